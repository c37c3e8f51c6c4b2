"""Drop-in tensorized ``nn.LSTM`` and ``nn.MultiheadAttention``.

LSTM (TT-LSTM/TR-LSTM protocol, Yang et al. 2017; Pan et al. 2019): every input-to-hidden
matrix ``W_ih`` (4H × D, the four gates folded into the first output mode) becomes a
tensorized Linear; hidden-to-hidden ``W_hh`` stays dense, or, with a spec key ``hh``
(``PlanOptions.lstm_hh="tensorized"``), is a tensorized Linear H -> 4H too, rebuilt
wherever ``W_hh`` is read (:meth:`TensorizedLSTM.weight_hh`; the compiled training
recurrence, which needs a masked dense ``W_hh``, is then not taken). The recurrence is the one of
``nn.LSTM`` (gates i, f, g, o), so outputs match a dense LSTM with the equivalent weights.
Three ways run it (:attr:`TensorizedLSTM.recurrence`): ``"fused"`` rebuilds each ``W_ih``
from its cores (differentiably, a few thousand multiply-adds) and runs torch's own fused
LSTM (``torch.func.functional_call`` on a weightless ``nn.LSTM`` template: one ATen call
for all layers and steps, forward and backward), so training costs what the dense LSTM
costs; ``"loop"`` applies the chain to all steps' inputs at once and runs the recurrence
step by step in torch ops, cheaper only when the dense ``W_ih`` would be much larger than
``W_hh``; ``"kernel"`` applies each input projection to all steps at once (its chain or
rebuild, per its train path) and runs the recurrence, forward and backward through time, in
compiled C over the KEPT entries of a pruned ``W_hh``
(:mod:`tedepr_cli.kernels.lstm_train`), falling back to the ``"auto"`` choice below where
the kernel cannot run (no compiler, not float32 on the CPU, under a ``torch.func``
transform). ``"auto"`` (default) takes ``"kernel"`` while autograd records
(training) when every ``W_hh`` carries a pruning mask keeping at most 10 % of its entries
(:data:`KERNEL_MAX_DENSITY`: above that torch's dense GEMMs are faster) and the kernel
can run; otherwise ``"fused"`` when every input projection is a linear chain and its
input size is at most 4× the hidden size (the dense projection then costs at most 4× the
hidden-to-hidden product every LSTM pays), else ``"loop"``. Fast inference is
:class:`tedepr_cli.kernels.lstm.KernelLSTM` (compiled recurrence, sparse ``W_hh``).

MultiheadAttention keeps its packed ``in_proj_weight`` (3E × E) as one tensorized Linear
E -> 3E and tensorizes ``out_proj``; attention itself is computed as in
``nn.MultiheadAttention`` (scaled dot product, additive/boolean masks).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..kernels import lstm_train
from ..masks import mask_of
from .base import TensorizedLayer
from .tr import TRLinear
from .tt import TTLinear


def _linear(spec: dict[str, Any]) -> nn.Module:
    """The TT/TR Linear of a projection's spec (malformed specs raise ``ValueError``)."""
    if spec.get("type") != "linear" or spec.get("format") not in ("tt", "tr"):
        raise ValueError(f"a projection must be a TT/TR linear spec, got {spec.get('type')!r}/"
                         f"{spec.get('format')!r}")
    return (TTLinear if spec["format"] == "tt" else TRLinear)(spec)


FUSED_MAX_INPUT_RATIO = 4  # "auto" fuses while input size <= this x hidden size
# "auto" trains on the compiled recurrence while every W_hh keeps <= this fraction. Measured
# (zoo LSTM, H 128, T 28, batch 128, whole training steps, one thread): kernel / fused step
# 0.62 at 0.5 % kept, 0.84 at 5 %, 0.91 at 10 %, 1.22 at 25 %: torch's dense GEMMs win above
KERNEL_MAX_DENSITY = 0.1


class TensorizedLSTM(nn.Module):
    """``nn.LSTM`` with tensorized input projections (batch_first, layers, bidirectional),
    and optionally tensorized hidden-to-hidden matrices (``hh``: linear chains H -> 4H
    without bias; ``b_hh`` stays a parameter of this module).

    ``recurrence``: ``"auto"``, ``"fused"``, ``"loop"`` or ``"kernel"`` (see the module
    doc); a plain attribute, not part of the spec (every way computes the same function).
    """

    kind = "lstm"
    RECURRENCES = ("auto", "fused", "loop", "kernel")

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self._spec = dict(spec)
        self.hidden_size = int(spec["hidden_size"])
        self.num_layers = int(spec["num_layers"])
        self.bidirectional = bool(spec["bidirectional"])
        self.batch_first = bool(spec["batch_first"])
        dirs = 2 if self.bidirectional else 1
        if len(spec["ih"]) != self.num_layers * dirs:
            raise ValueError("LSTM spec needs one input projection per layer and direction")
        self.ih = nn.ModuleList([_linear(s) for s in spec["ih"]])
        for m in self.ih:  # trained on the rebuilt W_ih, as the fused path does (train_path.py)
            m.train_path = "dense"
        h = self.hidden_size
        hh = spec.get("hh")
        if hh is not None:  # W_hh as chains too (PlanOptions.lstm_hh "tensorized")
            if len(hh) != self.num_layers * dirs:
                raise ValueError("LSTM spec needs one hidden-to-hidden chain per layer and direction")
            self.hh = nn.ModuleList([_linear(s) for s in hh])
            for m in self.hh:
                m.rebuilt_by_owner = True  # read only through weight_hh: no train path (train_path.py)
                if m.in_features != h or m.out_features != 4 * h or m.bias is not None:
                    raise ValueError(f"a hidden-to-hidden chain must map {h} -> {4 * h} without bias, got "
                                     f"{m.in_features} -> {m.out_features}")
                if m.chain != "linear":
                    raise ValueError("a hidden-to-hidden chain must be a linear chain (its rebuilt W_hh runs "
                                     "the recurrence)")
        for name in self._suffixes():
            if hh is None:
                self.register_parameter(f"weight_hh_{name}", nn.Parameter(torch.zeros(4 * h, h)))
            if spec.get("bias", True):
                self.register_parameter(f"bias_hh_{name}", nn.Parameter(torch.zeros(4 * h)))
        self.recurrence = "auto"
        self._template: list[nn.LSTM] = []  # built on first use; a list keeps it out of the module tree
        self._kept: dict[str, tuple[Any, int, Any]] = {}  # W_hh suffix -> (mask, its version, pattern)

    def _suffixes(self) -> list[str]:
        dirs = ["", "_reverse"] if self.bidirectional else [""]
        return [f"l{k}{d}" for k in range(self.num_layers) for d in dirs]

    def spec(self) -> dict[str, Any]:
        out = {**self._spec, "type": self.kind, "ih": [m.spec() for m in self.ih]}
        if self.hh_tensorized:
            out["hh"] = [m.spec() for m in self.hh]
        return out

    @property
    def hh_tensorized(self) -> bool:
        """Whether every ``W_hh`` is a chain (spec key ``hh``) rather than a dense parameter."""
        return "hh" in self._modules

    def weight_hh(self, idx: int) -> Tensor:
        """The ``(4H, H)`` hidden-to-hidden matrix of layer/direction ``idx`` (the order of
        :meth:`_suffixes`): the dense parameter (masked, when pruned), or the matrix rebuilt
        from its chain's cores (differentiable in them; pruned core entries contribute zeros).
        The one place every path of this module reads ``W_hh`` from."""
        if self.hh_tensorized:
            m = self.hh[idx]  # a chain swapped for its dense nn.Linear (e.g. onnx-fast's dense trace)
            return m.dense_weight() if isinstance(m, TensorizedLayer) else m.weight
        return getattr(self, f"weight_hh_{self._suffixes()[idx]}")

    def __getattr__(self, name: str) -> Any:
        # ``weight_hh_<sfx>`` of a chain W_hh: its rebuilt matrix, under nn.LSTM's name, so that
        # code reading an LSTM's weights (kernels, the planner's cost model) keeps working;
        # computed on each read, never stored (as TensorizedLayer.weight)
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("weight_hh_") and "hh" in self.__dict__.get("_modules", {}):
                sfx = name[len("weight_hh_"):]
                if sfx in self._suffixes():
                    return self.weight_hh(self._suffixes().index(sfx))
            raise

    def fused(self) -> bool:
        """Whether :meth:`forward` runs torch's fused LSTM where it does not run the compiled
        recurrence (see :attr:`recurrence` and :meth:`runs_kernel`)."""
        if self.recurrence not in self.RECURRENCES:
            raise ValueError(f"recurrence must be one of {self.RECURRENCES}, got {self.recurrence!r}")
        if self.recurrence == "loop":
            return False
        # a projection swapped for another module (e.g. a KernelLinear) has no dense weight
        linear = all(isinstance(m, TensorizedLayer) and m.chain == "linear" for m in self.ih)
        if self.recurrence == "fused":
            if not linear:
                raise ValueError("recurrence 'fused' needs tensorized linear-chain input projections")
            return True
        return linear and all(m.in_features <= FUSED_MAX_INPUT_RATIO * self.hidden_size for m in self.ih)

    def hh_density(self) -> float | None:
        """The largest kept fraction of any ``W_hh`` (its pruning mask's), or None when some
        ``W_hh`` carries no mask (unpruned)."""
        if self.hh_tensorized:  # no mask on a rebuilt W_hh: its chain's cores carry them
            return None
        worst = 0.0
        for sfx in self._suffixes():
            mask = mask_of(self, f"weight_hh_{sfx}")
            if mask is None:
                return None
            worst = max(worst, float(mask.sum()) / max(mask.numel(), 1))
        return worst

    def runs_kernel(self, x: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> bool:
        """Whether :meth:`forward` on ``x`` (and ``hx``) runs the compiled recurrence: the
        recurrence is ``"kernel"``, or ``"auto"`` while autograd records with every ``W_hh``
        pruned to at most :data:`KERNEL_MAX_DENSITY`; and the kernel can run (float32 CPU
        tensors, the library built; no ``torch.func`` transform, tracing, compiling or
        autocast active)."""
        if self.recurrence not in self.RECURRENCES:
            raise ValueError(f"recurrence must be one of {self.RECURRENCES}, got {self.recurrence!r}")
        if self.recurrence in ("fused", "loop") or x.dim() != 3 or self.hh_tensorized:
            return False  # a chain W_hh: the kernel's kept-entry pattern is a mask of a dense W_hh
        if self.recurrence == "auto":
            records = x.requires_grad or any(p.requires_grad for p in self.parameters())
            if not (torch.is_grad_enabled() and records):
                return False
            density = self.hh_density()
            if density is None or density > KERNEL_MAX_DENSITY:
                return False
        if (torch._C._functorch.is_functorch_wrapped_tensor(x) or torch._C._are_functorch_transforms_active()
                or torch.jit.is_tracing() or torch.compiler.is_compiling()
                or torch.is_autocast_enabled(x.device.type)):
            return False
        ws = [getattr(self, f"weight_hh_{s}") for s in self._suffixes()]
        return lstm_train.usable(x, *ws, *(hx or ())) is None

    def _pattern(self, sfx: str) -> lstm_train.KeptPattern:
        """The kept entries of ``weight_hh_<sfx>`` (its mask's; all without one), cached
        while the mask tensor and its version are unchanged."""
        mask = mask_of(self, f"weight_hh_{sfx}")
        got = self._kept.get(sfx)
        version = -1 if mask is None else mask._version
        if got is None or got[0] is not mask or got[1] != version:
            h = self.hidden_size
            got = (mask, version, lstm_train.KeptPattern.of(mask, (4 * h, h)))
            self._kept[sfx] = got
        return got[2]

    def _by_layer(self, x: Tensor, hx: tuple[Tensor, Tensor] | None, recur: Any
                  ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The stacked LSTM with each layer and direction's recurrence ``recur(idx, suffix,
        gx, h0, c0, reverse) -> (out, h_T, c_T)`` on its input projections ``gx`` (B, T, 4H)
        (``h0``/``c0``: ``(B, H)`` or None for zeros); directions concatenated per layer."""
        if not self.batch_first:
            x = x.transpose(0, 1)
        dirs = 2 if self.bidirectional else 1
        layer_in, hn, cn = x, [], []
        outs: list[Tensor] = []
        for idx, sfx in enumerate(self._suffixes()):
            gx = self.ih[idx](layer_in)  # (B, T, 4H): the projection's chain or rebuild, all steps
            out, h, c = recur(idx, sfx, gx, None if hx is None else hx[0][idx],
                              None if hx is None else hx[1][idx], idx % dirs == 1)
            outs.append(out)
            hn.append(h)
            cn.append(c)
            if idx % dirs == dirs - 1:
                layer_in = outs[0] if dirs == 1 else torch.cat(outs, dim=2)
                outs = []
        out = layer_in if self.batch_first else layer_in.transpose(0, 1)
        return out, (torch.stack(hn), torch.stack(cn))

    def _kernel_forward(self, x: Tensor, hx: tuple[Tensor, Tensor] | None
                        ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The compiled recurrence per layer and direction (see :mod:`tedepr_cli.kernels.lstm_train`)."""
        def recur(idx: int, sfx: str, gx: Tensor, h0: Tensor | None, c0: Tensor | None, reverse: bool):
            pattern = self._pattern(sfx)
            vals = getattr(self, f"weight_hh_{sfx}").reshape(-1)[pattern.flat]  # kept entries only
            return lstm_train.recurrence(gx, vals, getattr(self, f"bias_hh_{sfx}", None), h0, c0, pattern,
                                         reverse)

        return self._by_layer(x, hx, recur)

    def dense_weights(self) -> dict[str, Tensor]:
        """The equivalent ``nn.LSTM`` parameters by name (``weight_ih_l0``, ...): ``W_ih``
        rebuilt from the cores (differentiable in them), ``W_hh``/``b_hh`` as they are, a
        missing ``b_ih`` as zeros. Raises ``ValueError`` for a nonlinear chain."""
        out: dict[str, Tensor] = {}
        bias = hasattr(self, "bias_hh_l0")
        for idx, sfx in enumerate(self._suffixes()):
            ih = self.ih[idx]
            out[f"weight_ih_{sfx}"] = ih.dense_weight()
            out[f"weight_hh_{sfx}"] = self.weight_hh(idx)
            if bias:
                out[f"bias_ih_{sfx}"] = ih.bias if ih.bias is not None else \
                    out[f"weight_hh_{sfx}"].new_zeros(4 * self.hidden_size)
                out[f"bias_hh_{sfx}"] = getattr(self, f"bias_hh_{sfx}")
        return out

    def _lstm_template(self) -> nn.LSTM:
        """A weightless (meta-device) ``nn.LSTM`` of this shape: the function whose
        parameters :meth:`forward` supplies through ``functional_call``."""
        if not self._template:
            self._template.append(nn.LSTM(self.ih[0].in_features, self.hidden_size, self.num_layers,
                                          bias=hasattr(self, "bias_hh_l0"), batch_first=self.batch_first,
                                          bidirectional=self.bidirectional, device="meta"))
        return self._template[0]

    def forward(self, x: Tensor, hx: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        if self.runs_kernel(x, hx):
            return self._kernel_forward(x, hx)
        if x.dim() == 3 and self.fused():
            return functional_call(self._lstm_template(), self.dense_weights(), (x, hx))
        return self._by_layer(x, hx, lambda idx, sfx, gx, h0, c0, reverse: lstm_train.torch_recurrence(
            gx, self.weight_hh(idx), getattr(self, f"bias_hh_{sfx}", None), h0, c0, reverse))


class TensorizedMHA(nn.Module):
    """``nn.MultiheadAttention`` whose packed input projection and output projection are
    tensorized Linears.

    Drop-in for code that reads ``nn.MultiheadAttention``'s public attributes:
    ``in_proj_weight`` (3E × E) and ``out_proj.weight`` are the dense equivalents of the
    chains (computed on read), ``in_proj_bias``/``out_proj.bias`` the biases, ``bias_k``/
    ``bias_v``/``q_proj_weight``/... ``None`` as in a packed ``nn.MultiheadAttention``.
    ``_qkv_same_embed_dim`` is False: torch's ``nn.TransformerEncoderLayer`` then takes its
    slow path, which calls this module, instead of its fused kernel on dense packed weights
    (which would bypass the chain and its masks' savings).
    """

    kind = "mha"
    _qkv_same_embed_dim = False  # see the class docstring: keeps the chain on the forward path
    bias_k = bias_v = None
    q_proj_weight = k_proj_weight = v_proj_weight = None
    add_zero_attn = False

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self._spec = dict(spec)
        self.embed_dim = int(spec["embed_dim"])
        self.num_heads = int(spec["num_heads"])
        self.batch_first = bool(spec["batch_first"])
        self.in_proj = _linear(spec["in_proj"])
        self.out_proj = _linear(spec["out_proj"]) if spec.get("out_proj") else \
            nn.Linear(self.embed_dim, self.embed_dim)
        self.dropout = float(spec.get("dropout", 0.0))  # on the attention weights, in training
        self.kdim = self.vdim = self.embed_dim
        self.head_dim = self.embed_dim // self.num_heads

    @property
    def in_proj_weight(self) -> Tensor:
        """The dense (3E, E) packed projection the chain equals (a new tensor each read)."""
        return self.in_proj.dense_weight()

    @property
    def in_proj_bias(self) -> Tensor | None:
        return self.in_proj.bias

    def spec(self) -> dict[str, Any]:
        out = {**self._spec, "type": self.kind, "in_proj": self.in_proj.spec()}
        out["out_proj"] = self.out_proj.spec() if hasattr(self.out_proj, "cores") else None
        return out

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        e, nh = self.embed_dim, self.num_heads
        if query is key and key is value:
            q, k, v = self.in_proj(query).split(e, dim=-1)
        else:  # separate inputs: project each with its slice of the packed projection
            q = self.in_proj(query)[..., :e]
            k = self.in_proj(key)[..., e:2 * e]
            v = self.in_proj(value)[..., 2 * e:]
        b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
        q = q.reshape(b, lq, nh, e // nh).transpose(1, 2)
        k = k.reshape(b, lk, nh, e // nh).transpose(1, 2)
        v = v.reshape(b, lk, nh, e // nh).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(e // nh)
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu(1)
        for mask in (attn_mask, key_padding_mask):
            if mask is None:
                continue
            if mask is key_padding_mask:
                mask = mask.reshape(b, 1, 1, lk)
            elif mask.dim() == 3:
                mask = mask.reshape(b, nh, lq, lk)
            att = att.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else att + mask
        w = F.softmax(att, dim=-1)
        if self.training and self.dropout > 0:
            w = F.dropout(w, p=self.dropout)
        out = self.out_proj((w @ v).transpose(1, 2).reshape(b, lq, e))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, w.mean(dim=1) if average_attn_weights else w

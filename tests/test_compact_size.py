"""Issue 17, storage: packed tensors (one per dtype), the format-2 encoding, reports kept only
in manifest.json of directory artifacts, older files still loading, and the metadata share
of the compact file on the sample LeNet-300-100 (a size check, not a timing)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tedepr_cli import artifact as artifact_mod
from tedepr_cli.arch import parse_arch
from tedepr_cli.artifact import EXTERNAL_KEY, MANIFEST_FILE, MODEL_FILE, load_artifact, save_artifact
from tedepr_cli.errors import BadInput
from tedepr_cli.loading import load_model
from tedepr_cli.pruning.prune import PruneOptions, prune
from tedepr_cli.storage import PACK_PREFIX, decode, encode, pack, unpack

from .conftest import LENET300

MAX_METADATA_SHARE = 0.35  # of the sample LeNet-300-100's compact file at 99.5 %; it was 0.46


def header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return 8 + n, json.loads(raw[8:8 + n])


@pytest.fixture(scope="module")
def pruned():
    art, _ = prune(load_model(LENET300, parse_arch("lenet300")),
                   PruneOptions(sparsity=0.995, criterion="magnitude"))
    return art


def _state():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(30, 40, generator=g)
    m = torch.rand(30, 40, generator=g) < 0.05
    c = torch.randn(2, 5, 3, generator=g)
    mc = torch.rand(2, 5, 3, generator=g) < 0.5
    state = {"w": w * m, "c": c * mc, "b": torch.randn(40, generator=g).to(torch.bfloat16),
             "n": torch.tensor(7), "flag": torch.tensor([True, False]), "e": torch.zeros(0, 3)}
    return state, {"w": m, "c": mc}


@pytest.mark.parametrize("layout", ["auto", "csr", "coo", "bitmask", "delta"])
def test_pack_round_trip_is_bit_exact(layout):
    state, masks = _state()
    tensors, enc = pack(*encode(state, masks, layout=layout))
    assert all(k.startswith(PACK_PREFIX) for k in tensors)
    assert len(tensors) == len({t.dtype for t in tensors.values()})  # one tensor per dtype
    assert enc["format"] == 2 and [e[0] for e in enc["tensors"]] == list(state)
    out, out_masks = decode(tensors, json.loads(json.dumps(enc)))
    for k, v in state.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape and torch.equal(out[k], v)
    assert set(out_masks) == set(masks) and all(torch.equal(out_masks[k], masks[k]) for k in masks)


def test_corrupt_packed_files_are_bad_input():
    state, masks = _state()
    tensors, enc = pack(*encode(state, masks))
    short = {k: (v[:-1] if k == f"{PACK_PREFIX}F32" else v) for k, v in tensors.items()}
    with pytest.raises(BadInput, match="ends before"):
        decode(short, enc)
    longer = {k: (torch.cat([v, v[:1]]) if k == f"{PACK_PREFIX}F32" else v) for k, v in tensors.items()}
    with pytest.raises(BadInput, match="longer"):
        decode(longer, enc)
    for bad in ([["w"]], [["w", [3], "NOPE"]], [["w", [-1]]], [["w", [2], "csr", [["F32", 1]]]],
                [["w", [40]], ["w", [40]]]):
        with pytest.raises(BadInput):
            decode(tensors, {"format": 2, "tensors": bad})
    with pytest.raises(BadInput, match="upgrade"):
        unpack(tensors, {"format": 3, "tensors": []})


def test_directory_artifact_keeps_reports_in_manifest_json_only(pruned, tmp_path):
    out = save_artifact(pruned, tmp_path / "a")
    full = json.loads((out / MANIFEST_FILE).read_text())
    assert full["pruning"]["layers"] and full["tensorization"]["report"]
    _, h = header(out / MODEL_FILE)
    embedded = json.loads(h["__metadata__"]["tedepr.manifest"])
    assert "layers" not in embedded["pruning"] and "report" not in embedded["tensorization"]
    assert embedded[EXTERNAL_KEY]["keys"] == ["pruning.layers", "tensorization.report"]
    back = load_artifact(out)  # the reports come back from manifest.json
    assert back.meta["pruning"]["layers"] == full["pruning"]["layers"] and EXTERNAL_KEY not in back.meta
    alone = tmp_path / "alone"  # the compact file alone still loads (without the reports)
    alone.mkdir()
    shutil.copy(out / MODEL_FILE, alone / MODEL_FILE)
    model = load_artifact(alone).model
    for k, v in back.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    full["pruning"]["layers"][0]["kept"] += 1  # an edited report is still detected
    (out / MANIFEST_FILE).write_text(json.dumps(full))
    with pytest.raises(BadInput, match="differs"):
        load_artifact(out)


def test_single_file_artifact_embeds_the_whole_manifest(pruned, tmp_path):
    out = save_artifact(pruned, tmp_path / "a.safetensors")
    _, h = header(out)
    embedded = json.loads(h["__metadata__"]["tedepr.manifest"])
    assert embedded["pruning"]["layers"] and EXTERNAL_KEY not in embedded
    assert load_artifact(out).meta == load_artifact(save_artifact(pruned, tmp_path / "d")).meta


def test_unpacked_artifacts_still_load(pruned, tmp_path, monkeypatch):
    """Artifacts written before packing (per-part tensors, the per-tensor encoding map and
    the whole manifest embedded) load as before."""
    monkeypatch.setattr(artifact_mod, "pack", lambda tensors, enc: (tensors, enc))
    monkeypatch.setattr(artifact_mod, "embedded_manifest", lambda m: m)
    out = save_artifact(pruned, tmp_path / "old")
    _, h = header(out / MODEL_FILE)
    assert any("::" in k for k in h)  # one safetensors entry per part, as before
    monkeypatch.undo()
    back = load_artifact(out)
    assert set(back.masks) == set(pruned.masks)
    for k, v in pruned.model.state_dict().items():
        assert torch.equal(back.model.state_dict()[k], v)


def test_metadata_share_of_the_sample_compact_file(pruned, tmp_path):
    """The header (manifest, encoding, tensor table) of the sample LeNet-300-100 at 99.5 %
    stays a minority of its compact file: 46 % before issue 17, about 31 % after."""
    out = save_artifact(pruned, tmp_path / "a")
    size = (out / MODEL_FILE).stat().st_size
    head, h = header(out / MODEL_FILE)
    kept = sum(int(m.sum()) for m in pruned.masks.values())
    assert head / size <= MAX_METADATA_SHARE, f"metadata {head} of {size} B ({head / size:.0%})"
    assert size / kept <= 9.0, f"{size / kept:.1f} bytes per kept weight"
    assert len(h) - 1 <= 3  # packed: one tensor per dtype, not one per part

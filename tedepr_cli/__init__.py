"""tedepr: dual-grained model compression (TEDEPR, IEEE TPAMI 2024).

The Python API (:mod:`tedepr_cli.api`) is importable from the package itself::

    import tedepr_cli as tedepr
    model = tedepr.tensorize(net, rank="auto", sparsity=0.995, example_input=x[:1])
    tedepr.prune(model, sparsity=0.995, batches=loader)

Its names are loaded on first use, so ``import tedepr_cli`` (and the CLI's start-up) stays light.
"""

from .version import __version__

_API = ("tensorize", "from_linear", "from_conv2d", "prune", "get_masks", "remove_masks", "save", "load",
        "accelerate", "export_onnx")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'tedepr_cli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

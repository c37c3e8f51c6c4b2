"""Property-based fuzzing: the manifest / safetensors-metadata loader and the CLI option
parser never crash with an unhandled exception, whatever they are fed."""

from __future__ import annotations

import contextlib
import json

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from tedepr_cli.artifact import META_ENCODING, META_MANIFEST, load_artifact, parse_manifest
from tedepr_cli.errors import EXIT_CODES, TedeprError

from .conftest import LENET300, run_cli

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)

MANIFEST_KEYS = ["schema", "schema_version", "arch", "input_shape", "input_kind", "tensorization",
                 "pruning", "history", "metrics", "training", "data"]


def manifests():
    base = {"schema": "tedepr-artifact", "schema_version": 1, "arch": {"name": "lenet300", "kwargs": {}},
            "input_shape": [784], "input_kind": "flat", "history": []}
    return st.fixed_dictionaries({}, optional={k: json_values for k in MANIFEST_KEYS}).map(
        lambda d: {**base, **d})


FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(text=st.one_of(st.text(max_size=200), json_values.map(json.dumps), manifests().map(json.dumps)))
def test_manifest_parser_only_raises_tedepr_errors(text):
    with contextlib.suppress(TedeprError):
        parse_manifest(text, "fuzz")


@FAST
@given(manifest=manifests(), encoding=json_values, names=st.lists(st.text(min_size=1, max_size=10),
                                                                   max_size=3))
def test_artifact_loader_only_raises_tedepr_errors(tmp_path_factory, manifest, encoding, names):
    d = tmp_path_factory.mktemp("fz")
    tensors = {n: torch.zeros(2) for n in set(names)} or {"x": torch.zeros(1)}
    meta = {META_MANIFEST: json.dumps(manifest), META_ENCODING: json.dumps(encoding)}
    save_file(tensors, str(d / "m.safetensors"), metadata=meta)
    with contextlib.suppress(TedeprError):
        load_artifact(d / "m.safetensors")


COMMANDS = ["info", "decompose", "prune", "finetune", "eval", "export", "validate", "bench", "zoo"]
FLAGS = ["--rank", "--sparsity", "--density", "--format", "--modes", "--arch", "--arch-kwargs", "--data",
         "--criterion", "--scope", "--epochs", "--lr", "--opset", "--to", "--batch", "--engines",
         "--iters", "--threads", "--min-density", "--compression", "--input-shape", "-o", "--json", "-q",
         "--bogus", "--seed", "--split", "--batch-size"]
VALUES = st.sampled_from(["0", "-1", "1.5", "abc", "{", "[]", "{}", "lenet300", "tt", "x=1", "fc1=0",
                          "nan", "inf", "1e400", "", "/nonexistent", "0.999", "3", "-", "auto"])


@settings(max_examples=80, deadline=None)
@given(cmd=st.sampled_from(COMMANDS), args=st.lists(st.one_of(st.sampled_from(FLAGS), VALUES), max_size=6))
def test_cli_never_crashes(cmd, args):
    # the model path is a real one, so parsing reaches the library; outputs go nowhere writable
    argv = [cmd, str(LENET300), *args] if cmd not in ("zoo",) else [cmd, *args]
    argv = [a if a != "-o" else "-o" for a in argv]
    r = run_cli(*argv, "-o", "/proc/tedepr-fuzz") if cmd in ("decompose", "prune", "export") else \
        run_cli(*argv)
    assert r.exit_code in EXIT_CODES, (argv, r.exit_code)
    assert r.exit_code != 1, (argv, r.stderr[-2000:])  # 1 = internal error: a bug
    assert "Traceback" not in r.stderr

"""The zoo builds the paper's five families with the documented shapes and sizes."""

from __future__ import annotations

import pytest
import torch

from tedepr_cli.errors import BadInput
from tedepr_cli.zoo import MODELS

from .conftest import ZOO_CASES, sample_inputs


def count(m):
    return sum(p.numel() for p in m.parameters())


def test_every_registered_model_has_a_case():
    assert set(MODELS.names()) == set(ZOO_CASES)


@pytest.mark.parametrize("name", sorted(ZOO_CASES))
def test_forward_on_sample_data(name):
    torch.manual_seed(0)
    model = MODELS.get(name)(**ZOO_CASES[name]).eval()
    x, _ = sample_inputs(model, 5)
    assert x.shape == (5, *model.input_shape)
    out = model(x)
    assert out.shape == (5, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("name,params", [
    ("lenet300", 266_610),  # LeCun et al. 1998
    ("lenet5", 431_080),  # Caffe 20-50-500 variant
    ("resnet20", 269_722),  # He et al. 2016: 0.27M
    ("resnet56", 853_018),  # 0.85M
    ("vgg16", 14_728_266),  # CIFAR VGG-16 with BN
])
def test_reference_parameter_counts(name, params):
    assert count(MODELS.get(name)()) == params


def test_num_classes_and_channels_are_configurable():
    m = MODELS.get("resnet20")(num_classes=100, in_channels=1, input_size=32)
    assert m(torch.zeros(2, 1, 32, 32)).shape == (2, 100)
    assert m.input_shape == (1, 32, 32)


def test_lstm_bidirectional_and_layers():
    m = MODELS.get("lstm")(num_layers=2, bidirectional=True, hidden=16)
    assert m(torch.zeros(3, 28, 28)).shape == (3, 10)
    assert m.input_kind == "sequence"


def test_vit_with_multihead_attention_module():
    m = MODELS.get("vit_tiny")(attn="mha", dim=32, depth=1)
    assert any(isinstance(x, torch.nn.MultiheadAttention) for x in m.modules())
    assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("name,kwargs", [
    ("lenet300", {"num_classes": 0}),
    ("vgg11", {"input_size": 28}),
    ("vit_tiny", {"dim": 30, "heads": 4}),
    ("lenet5", {"input_size": 8}),
])
def test_bad_kwargs_are_clear_errors(name, kwargs):
    with pytest.raises(BadInput):
        MODELS.get(name)(**kwargs)


def test_unknown_arch_lists_choices():
    with pytest.raises(BadInput, match="lenet300"):
        MODELS.get("alexnet")

"""DepthwiseConv2d equals a depthwise nn.Conv2d (groups = channels, with a depth multiplier)."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from gridgraph import DepthwiseConv2d, GridConv2d
from _conv_reference import DTYPES, PATHS, assert_same_message, check_conv, randomise_

# (id, channels, depth multiplier, Conv2d geometry keywords, batch, height, width)
CASES = [
    ("k3-p1", 3, 1, dict(kernel_size=3, padding=1), 2, 5, 6),
    ("k3-p1-x2", 3, 2, dict(kernel_size=3, padding=1), 2, 5, 6),
    ("k5-s2-same-nobias", 4, 1, dict(kernel_size=5, stride=2, padding=2, bias=False), 2, 7, 6),
    ("k2-same-reflect-x3", 2, 3, dict(kernel_size=2, padding="same", padding_mode="reflect"), 1, 4, 5),
    ("k3x2-d2-circular", 3, 1, dict(kernel_size=(3, 2), dilation=2, padding=(2, 1), padding_mode="circular"),
     2, 5, 4),
    ("k7-replicate", 2, 1, dict(kernel_size=7, padding=3, padding_mode="replicate"), 1, 4, 4),
    ("k1x7-s(1,3)", 2, 2, dict(kernel_size=(1, 7), stride=(1, 3), padding=(0, 3)), 2, 3, 8),
    ("1-channel", 1, 1, dict(kernel_size=3), 2, 4, 4),
    ("batch0", 3, 1, dict(kernel_size=3, padding=1), 0, 4, 4),
    ("tiny-1x1", 2, 2, dict(kernel_size=3, padding=1, padding_mode="replicate"), 3, 1, 1),
]


def make_conv(channels, multiplier, kwargs, dtype, device, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(channels, channels * multiplier, groups=channels, **kwargs).to(device=device, dtype=dtype)
    return randomise_(conv, torch.Generator().manual_seed(seed + 1))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("name, channels, multiplier, kwargs, batch, height, width", CASES, ids=[c[0] for c in CASES])
def test_equals_depthwise_conv2d(name, channels, multiplier, kwargs, batch, height, width, dtype, path, device):
    conv = make_conv(channels, multiplier, kwargs, dtype, device)
    layer = DepthwiseConv2d.from_conv2d(conv)
    assert layer.groups == channels and layer.depth_multiplier == multiplier
    check_conv(conv, layer, batch, height, width, path)


def test_constructor_is_grouped_grid_conv():
    layer = DepthwiseConv2d(4, (3, 2), stride=2, padding=1, dilation=(1, 2), bias=False,
                            padding_mode="reflect", depth_multiplier=3)
    conv = nn.Conv2d(4, 12, (3, 2), stride=2, padding=1, dilation=(1, 2), groups=4, bias=False,
                     padding_mode="reflect")
    assert isinstance(layer, GridConv2d)
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode"):
        assert getattr(layer, attr) == getattr(conv, attr), attr
    assert layer.weight.shape == conv.weight.shape == (12, 1, 3, 2) and layer.bias is None
    assert repr(layer) == repr(conv).replace("Conv2d(", "DepthwiseConv2d(", 1)


def test_init_matches_conv2d():
    torch.manual_seed(11)
    conv = nn.Conv2d(6, 12, 3, groups=6)
    torch.manual_seed(11)
    layer = DepthwiseConv2d(6, 3, depth_multiplier=2)
    assert torch.equal(conv.weight, layer.weight) and torch.equal(conv.bias, layer.bias)


def test_round_trip_and_state_dict():
    conv = nn.Conv2d(3, 6, 3, padding="same", groups=3, padding_mode="circular")
    layer = DepthwiseConv2d.from_conv2d(conv)
    back = layer.to_conv2d()
    assert type(back) is nn.Conv2d and back.groups == 3 and back.padding == "same"
    assert back.padding_mode == "circular" and torch.equal(back.weight, conv.weight)
    fresh = DepthwiseConv2d(3, 3, padding="same", padding_mode="circular", depth_multiplier=2)
    fresh.load_state_dict(conv.state_dict())
    assert torch.equal(fresh.bias, conv.bias)
    with torch.no_grad():
        conv.bias.zero_()
    assert not bool((layer.bias == 0).all())  # an independent copy


def test_rejects_non_depthwise_conv():
    with pytest.raises(ValueError, match=r"expects groups == in_channels \(got groups=2, in_channels=4\)"):
        DepthwiseConv2d.from_conv2d(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(TypeError, match=r"conv must be an nn.Conv2d \(got Linear\)"):
        DepthwiseConv2d.from_conv2d(nn.Linear(3, 3))


@pytest.mark.parametrize("multiplier", [0, -1, 1.5, True])
def test_rejects_bad_depth_multiplier(multiplier):
    with pytest.raises(ValueError, match=re.escape(f"depth_multiplier must be a positive integer (got {multiplier!r})")):
        DepthwiseConv2d(3, 3, depth_multiplier=multiplier)


@pytest.mark.parametrize("kwargs", [dict(padding="same", stride=2), dict(padding="full"), dict(padding_mode="zero")])
def test_rejects_what_conv2d_rejects(kwargs):
    with pytest.raises(ValueError) as theirs:
        nn.Conv2d(3, 3, 3, groups=3, **kwargs)
    with pytest.raises(ValueError) as ours:
        DepthwiseConv2d(3, 3, **kwargs)
    assert_same_message(str(ours.value), str(theirs.value))

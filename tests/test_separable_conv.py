"""SeparableConv2d equals a depthwise nn.Conv2d followed by a 1x1 nn.Conv2d."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gridgraph import DepthwiseConv2d, PointwiseConv2d, SeparableConv2d, graph_to_image, image_to_graph
from _conv_reference import DTYPES, PATHS, check_conv, randomise_

NAMES = {"depthwise.weight": "0.weight", "pointwise.weight": "1.weight", "pointwise.bias": "1.bias"}

# (id, in, out, multiplier, depthwise Conv2d keywords, pointwise bias, batch, height, width)
CASES = [
    ("k3-p1", 3, 5, 1, dict(kernel_size=3, padding=1), True, 2, 5, 6),
    ("k3-s2-x2", 2, 4, 2, dict(kernel_size=3, stride=2, padding=1), True, 2, 7, 6),
    ("k5-reflect-same", 3, 2, 1, dict(kernel_size=5, padding="same", padding_mode="reflect"), False, 1, 5, 6),
    ("k3x2-d2-circular", 2, 3, 1, dict(kernel_size=(3, 2), dilation=2, padding=(2, 1), padding_mode="circular"),
     True, 2, 4, 5),
    ("batch0", 2, 3, 1, dict(kernel_size=3, padding=1), True, 0, 4, 4),
    ("tiny", 2, 3, 2, dict(kernel_size=3, padding=1, padding_mode="replicate"), True, 1, 1, 2),
]


def make_pair(c_in, c_out, multiplier, kwargs, bias, dtype, device, seed=0):
    torch.manual_seed(seed)
    dw = nn.Conv2d(c_in, c_in * multiplier, groups=c_in, bias=False, **kwargs)
    pw = nn.Conv2d(c_in * multiplier, c_out, 1, bias=bias)
    seq = nn.Sequential(dw, pw).to(device=device, dtype=dtype)
    randomise_(seq, torch.Generator().manual_seed(seed + 1))
    return dw, pw, seq


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("name, c_in, c_out, multiplier, kwargs, bias, batch, height, width", CASES,
                         ids=[c[0] for c in CASES])
def test_equals_depthwise_then_pointwise(name, c_in, c_out, multiplier, kwargs, bias, batch, height, width, dtype,
                                         path, device):
    dw, pw, seq = make_pair(c_in, c_out, multiplier, kwargs, bias, dtype, device)
    layer = SeparableConv2d.from_conv2d(dw, pw)
    names = {k: v for k, v in NAMES.items() if bias or k != "pointwise.bias"}
    check_conv(dw, layer, batch, height, width, path, names=names, reference_module=seq)


def test_constructor_and_submodules():
    layer = SeparableConv2d(4, 6, 3, stride=2, padding=1, padding_mode="reflect", depth_multiplier=2)
    assert isinstance(layer.depthwise, DepthwiseConv2d) and isinstance(layer.pointwise, PointwiseConv2d)
    assert layer.depthwise.out_channels == 8 and layer.depthwise.bias is None
    assert layer.pointwise.in_channels == 8 and layer.pointwise.bias is not None
    assert (layer.in_channels, layer.out_channels) == (4, 6)
    assert layer.geometry == layer.depthwise.geometry
    assert [n for n, _ in layer.named_parameters()] == ["depthwise.weight", "pointwise.weight", "pointwise.bias"]
    assert SeparableConv2d(4, 6, 3, bias=False).pointwise.bias is None


def test_constructor_forward_matches_its_conv2d_pair(device):
    layer = SeparableConv2d(3, 4, 3, padding=1, device=device, dtype=torch.float64)
    dw, pw = layer.to_conv2d()
    assert dw.groups == 3 and pw.kernel_size == (1, 1)
    images = torch.randn(2, 3, 5, 4, dtype=torch.float64, device=device)
    g = image_to_graph(images, layer)
    out = graph_to_image(layer(g.x, g.edge_index, g.edge_type, size=g.size()), g)
    torch.testing.assert_close(out, pw(dw(images)), rtol=1e-10, atol=1e-10)


def test_round_trip_is_identical():
    dw, pw, _ = make_pair(3, 4, 2, dict(kernel_size=3, padding=1), True, torch.float32, "cpu")
    layer = SeparableConv2d.from_conv2d(dw, pw)
    dw2, pw2 = layer.to_conv2d()
    for a, b in ((dw, dw2), (pw, pw2)):
        assert type(b) is nn.Conv2d and a.kernel_size == b.kernel_size and a.groups == b.groups
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with torch.no_grad():
        dw.weight.zero_()
    assert not bool((layer.depthwise.weight == 0).all())  # an independent copy


def test_state_dict_of_sequential_maps_by_name():
    dw, pw, seq = make_pair(2, 3, 1, dict(kernel_size=3, padding=1), True, torch.float32, "cpu")
    layer = SeparableConv2d(2, 3, 3, padding=1)
    layer.load_state_dict({mine: seq.state_dict()[theirs] for mine, theirs in NAMES.items()})
    assert torch.equal(layer.pointwise.weight, pw.weight) and torch.equal(layer.depthwise.weight, dw.weight)


def test_from_conv2d_rejects_mismatched_pair():
    with pytest.raises(ValueError, match=r"pointwise_conv must take the depthwise output's 6 channels "
                                         r"\(got in_channels=3\)"):
        SeparableConv2d.from_conv2d(nn.Conv2d(3, 6, 3, groups=3), nn.Conv2d(3, 4, 1))
    with pytest.raises(ValueError, match="expects a 1x1 convolution"):
        SeparableConv2d.from_conv2d(nn.Conv2d(3, 3, 3, groups=3), nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="expects groups == in_channels"):
        SeparableConv2d.from_conv2d(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 1))


def test_repr():
    assert repr(SeparableConv2d(2, 4, 3, padding=1)) == (
        "SeparableConv2d(\n"
        "  (depthwise): DepthwiseConv2d(2, 2, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), groups=2, bias=False)\n"
        "  (pointwise): PointwiseConv2d(2, 4, kernel_size=(1, 1), stride=(1, 1))\n"
        ")")

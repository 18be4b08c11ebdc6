"""PointwiseConv2d equals a 1x1 nn.Conv2d: message passing over self-loops only."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gridgraph import GridConv2d, PointwiseConv2d, graph_to_image, image_to_graph
from _conv_reference import DTYPES, PATHS, assert_matches, check_conv, randomise_

CASES = [  # (in, out, groups, bias, batch, height, width)
    (3, 5, 1, True, 2, 4, 5),
    (4, 6, 2, False, 3, 3, 2),
    (4, 4, 4, True, 1, 5, 1),
    (2, 3, 1, True, 0, 3, 3),
    (1, 1, 1, False, 2, 1, 1),
]


def make_conv(c_in, c_out, groups, bias, dtype, device, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, 1, groups=groups, bias=bias).to(device=device, dtype=dtype)
    return randomise_(conv, torch.Generator().manual_seed(seed + 1))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("c_in, c_out, groups, bias, batch, height, width", CASES)
def test_equals_1x1_conv2d(c_in, c_out, groups, bias, batch, height, width, dtype, path, device):
    conv = make_conv(c_in, c_out, groups, bias, dtype, device)
    layer = PointwiseConv2d.from_conv2d(conv)
    check_conv(conv, layer, batch, height, width, path)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
def test_without_edges(dtype, device):
    """``edge_index`` and ``edge_type`` are optional: the self-loops are implied."""
    conv = make_conv(4, 6, 2, True, dtype, device)
    layer = PointwiseConv2d.from_conv2d(conv)
    images = torch.randn(2, 4, 3, 5, dtype=dtype, device=device, requires_grad=True)
    g = image_to_graph(images, layer)
    out = graph_to_image(layer(g.x), g)
    ref_images = images.detach().clone().requires_grad_(True)
    ref = conv(ref_images)
    assert_matches(out, ref, "forward")
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    assert_matches(images.grad, ref_images.grad, "gradient of the input")
    for name in ("weight", "bias"):
        assert_matches(getattr(layer, name).grad, getattr(conv, name).grad, f"gradient of {name}")
    # With edges but no edge_type (every edge is tap 0), and with an explicit size.
    assert_matches(graph_to_image(layer(g.x, g.edge_index.as_tensor().clone()), g), ref.detach(), "forward, no edge_type")
    assert_matches(graph_to_image(layer(g.x, size=(30, 30)), g), ref.detach(), "forward, size")


def test_graph_is_self_loops_and_geometry_is_1x1():
    layer = PointwiseConv2d(3, 2)
    assert layer.kernel_size == (1, 1) and layer.stride == (1, 1) and layer.padding == (0, 0)
    g = image_to_graph(torch.randn(2, 3, 4, 4), layer)
    assert torch.equal(g.edge_index[0], g.edge_index[1]) and g.edge_index.size(1) == 32


def test_equals_grid_conv_with_kernel_1():
    """Pointwise is GridConv2d with kernel 1: same parameters, same numbers (one implementation)."""
    torch.manual_seed(5)
    a = PointwiseConv2d(4, 6, groups=2)
    torch.manual_seed(5)
    b = GridConv2d(4, 6, 1, groups=2)
    assert isinstance(a, GridConv2d)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    x = torch.randn(10, 4)
    idx = torch.arange(10)
    edge_index, edge_type = torch.stack([idx, idx]), torch.zeros(10, dtype=torch.long)
    torch.testing.assert_close(a(x), b(x, edge_index, edge_type), rtol=1e-6, atol=1e-6)


def test_init_matches_conv2d():
    torch.manual_seed(3)
    conv = nn.Conv2d(5, 7, 1)
    torch.manual_seed(3)
    layer = PointwiseConv2d(5, 7)
    assert torch.equal(conv.weight, layer.weight) and torch.equal(conv.bias, layer.bias)


def test_round_trip_and_state_dict():
    conv = nn.Conv2d(4, 6, 1, groups=2)
    layer = PointwiseConv2d.from_conv2d(conv)
    back = layer.to_conv2d()
    assert type(back) is nn.Conv2d and back.kernel_size == (1, 1) and back.groups == 2
    assert torch.equal(back.weight, conv.weight) and torch.equal(back.bias, conv.bias)
    fresh = PointwiseConv2d(4, 6, groups=2)
    fresh.load_state_dict(conv.state_dict())
    assert torch.equal(fresh.weight, conv.weight)
    other = nn.Conv2d(4, 6, 1, groups=2)
    other.load_state_dict(fresh.state_dict())
    assert torch.equal(other.bias, conv.bias)
    with torch.no_grad():
        conv.weight.zero_()
    assert not bool((layer.weight == 0).all())  # an independent copy


def test_repr():
    assert repr(PointwiseConv2d(3, 8)) == "PointwiseConv2d(3, 8, kernel_size=(1, 1), stride=(1, 1))"
    assert repr(PointwiseConv2d(4, 8, bias=False, groups=2)) == \
        "PointwiseConv2d(4, 8, kernel_size=(1, 1), stride=(1, 1), groups=2, bias=False)"


def test_from_conv2d_accepts_valid_and_same_padding():
    for padding in ("valid", "same", 0):
        conv = nn.Conv2d(2, 3, 1, padding=padding)
        layer = PointwiseConv2d.from_conv2d(conv)
        x = torch.randn(1, 2, 3, 4)
        g = image_to_graph(x, layer)
        torch.testing.assert_close(graph_to_image(layer(g.x), g), conv(x), rtol=1e-5, atol=1e-6)


def test_rejects_neighbours():
    layer = PointwiseConv2d(2, 3)
    x = torch.randn(4, 2)
    edge_index = torch.tensor([[0, 1, 2, 3], [0, 1, 3, 3]])
    with pytest.raises(ValueError, match=r"self-loops only.*cannot see its neighbours"):
        layer(x, edge_index, torch.zeros(4, dtype=torch.long))
    g = image_to_graph(torch.randn(1, 2, 3, 3), kernel_size=3, padding=1)
    with pytest.raises(ValueError, match="self-loops only"):
        layer(g.x, g.edge_index, torch.zeros_like(g.edge_type))
    with pytest.raises(ValueError, match=r"computes the convolution k1x1 .* pixel graph of another one \(grid k3x3"):
        layer(g.x, g.edge_index, g.edge_type)
    with pytest.raises(ValueError, match=r"edge_type must lie in \[0, 1\)"):
        layer(g.x, torch.arange(9).repeat(2, 1), torch.arange(9))


@pytest.mark.parametrize("conv, match", [
    (nn.Conv2d(2, 3, 3), r"expects a 1x1 convolution \(got kernel_size=\(3, 3\)\)"),
    (nn.Conv2d(2, 3, 1, stride=2), r"expects stride 1 and no padding \(got stride=\(2, 2\)"),
    (nn.Conv2d(2, 3, 1, padding=1), r"expects stride 1 and no padding .*padding=\(1, 1\)"),
])
def test_from_conv2d_rejects_what_is_not_a_self_loop_graph(conv, match):
    with pytest.raises(ValueError, match=match):
        PointwiseConv2d.from_conv2d(conv)


def test_from_conv2d_rejects_other_modules():
    with pytest.raises(TypeError, match=r"conv must be an nn.Conv2d \(got Conv1d\)"):
        PointwiseConv2d.from_conv2d(nn.Conv1d(2, 3, 1))
    with pytest.raises(TypeError, match=r"conv must be an nn.Conv2d \(got ConvTranspose2d\)"):
        PointwiseConv2d.from_conv2d(nn.ConvTranspose2d(2, 3, 1))


def test_bad_optional_arguments():
    layer = PointwiseConv2d(2, 3)
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="edge_type given without edge_index"):
        layer(x, None, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"size must be \(4, 4\) \(got \(4, 5\)\)"):
        layer(x, size=(4, 5))
    with pytest.raises(ValueError, match=r"expected x with 2 channels, the layer.s in_channels \(got 3: "):
        layer(torch.randn(4, 3))

"""GridConv1d / GridConv3d equal nn.Conv1d / nn.Conv3d: forward and gradients, both computation paths.

The 1-D and 3-D layers are the n-d layer with ``_ndim`` fixed; the reference is the torch module itself,
weights moved with ``from_conv1d`` / ``from_conv3d``.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gridgraph
from gridgraph import graph_to_image
from gridgraph.graph import sequence_to_graph, volume_to_graph
from gridgraph.nn.functional import kernel_trace
from gridgraph.pixel_graph import PixelEdgeIndex
from gridgraph.nn import GridConv1d, GridConv2d, GridConv3d, GridConvNd
from _conv_reference import DTYPES, Result, compare, randomise_, reference

TWINS = {1: (nn.Conv1d, GridConv1d, GridConv1d.from_conv1d, sequence_to_graph),
         3: (nn.Conv3d, GridConv3d, GridConv3d.from_conv3d, volume_to_graph)}


def graph_run(layer, data, grad_out, path: str) -> Result:
    """The graph layer on the sequence/volume graph of ``data``, forward and backward, on ``path``."""
    layer.zero_grad(set_to_none=True)
    x = data.detach().clone().requires_grad_(True)
    to_graph = TWINS[layer._ndim][3]
    g = to_graph(x, layer)
    assert isinstance(g.edge_index, PixelEdgeIndex)
    edge_index = g.edge_index if path == "table" else g.edge_index.as_tensor()
    with kernel_trace() as trace:
        out = layer(g.x, edge_index, g.edge_type, size=g.size())
    assert trace == (["grid"] if path == "table" else ["edges"]), f"wrong computation path for {path!r}: {trace}"
    image = graph_to_image(out, g, side="output")
    image.backward(grad_out)
    return Result(image.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()})


def check(ndim, kwargs, c_in, c_out, batch, grid, dtype, device, path, seed=0):
    torch_cls, _, from_torch, _ = TWINS[ndim]
    torch.manual_seed(seed)
    conv = randomise_(torch_cls(c_in, c_out, **kwargs).to(device=device, dtype=dtype),
                      torch.Generator().manual_seed(seed + 1))
    layer = from_torch(conv)
    gen = torch.Generator().manual_seed(seed + 2)
    data = torch.randn(batch, c_in, *grid, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    want_out = conv(data)
    grad_out = torch.randn(want_out.shape, generator=gen, dtype=torch.float64).to(want_out)
    return compare(graph_run(layer, data, grad_out, path), reference(conv, data, grad_out))


# (id, keyword arguments, in_channels, out_channels, batch, grid)
CONFIGS_1D = [
    ("k1", dict(kernel_size=1), 3, 4, 2, (7,)),
    ("k2", dict(kernel_size=2), 2, 3, 2, (7,)),
    ("k3-p1", dict(kernel_size=3, padding=1), 3, 4, 3, (9,)),
    ("k5-s2-p2", dict(kernel_size=5, stride=2, padding=2), 2, 3, 2, (11,)),
    ("k3-s3-d2", dict(kernel_size=3, stride=3, dilation=2, padding=1), 2, 3, 2, (13,)),
    ("k4-same-d2", dict(kernel_size=4, padding="same", dilation=2), 2, 3, 1, (9,)),
    ("k3-valid", dict(kernel_size=3, padding="valid"), 2, 3, 2, (6,)),
    ("g2-nobias", dict(kernel_size=3, padding=1, groups=2, bias=False), 4, 6, 2, (8,)),
    ("depthwise-x2", dict(kernel_size=3, padding=1, groups=3), 3, 6, 2, (8,)),
    ("reflect", dict(kernel_size=5, padding=2, padding_mode="reflect"), 2, 3, 2, (7,)),
    ("replicate-s2", dict(kernel_size=3, stride=2, padding=2, padding_mode="replicate"), 2, 3, 2, (7,)),
    ("circular-d2", dict(kernel_size=3, padding=2, dilation=2, padding_mode="circular"), 2, 3, 2, (6,)),
    ("batch0", dict(kernel_size=3, padding=1), 2, 3, 0, (5,)),
    ("length1-k3-p1", dict(kernel_size=3, padding=1), 2, 3, 2, (1,)),
]
CONFIGS_3D = [
    ("k1", dict(kernel_size=1), 3, 4, 2, (3, 4, 5)),
    ("k3-p1", dict(kernel_size=3, padding=1), 2, 3, 2, (4, 5, 3)),
    ("k2-same", dict(kernel_size=2, padding="same"), 2, 3, 1, (3, 4, 4)),
    ("k(3,1,2)-s(2,1,1)", dict(kernel_size=(3, 1, 2), stride=(2, 1, 1), padding=(1, 0, 1)), 2, 3, 2, (5, 3, 4)),
    ("k3-s2-d(1,2,1)", dict(kernel_size=3, stride=2, dilation=(1, 2, 1), padding=1), 2, 2, 1, (5, 6, 5)),
    ("g2-nobias", dict(kernel_size=3, padding=1, groups=2, bias=False), 4, 2, 2, (3, 4, 3)),
    ("depthwise", dict(kernel_size=3, padding=1, groups=2), 2, 2, 1, (3, 3, 4)),
    ("reflect", dict(kernel_size=3, padding=1, padding_mode="reflect"), 2, 3, 1, (3, 4, 3)),
    ("replicate", dict(kernel_size=3, padding=(2, 1, 1), padding_mode="replicate"), 2, 3, 1, (3, 3, 4)),
    ("circular-s2", dict(kernel_size=3, stride=2, padding=1, padding_mode="circular"), 2, 3, 2, (4, 5, 3)),
    ("batch0", dict(kernel_size=3, padding=1), 2, 3, 0, (3, 3, 3)),
]


@pytest.mark.parametrize("path", ["table", "edges"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("name, kwargs, c_in, c_out, batch, grid", CONFIGS_1D, ids=[c[0] for c in CONFIGS_1D])
def test_equals_conv1d(name, kwargs, c_in, c_out, batch, grid, dtype, path, device):
    check(1, kwargs, c_in, c_out, batch, grid, dtype, device, path)


@pytest.mark.parametrize("path", ["table", "edges"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("name, kwargs, c_in, c_out, batch, grid", CONFIGS_3D, ids=[c[0] for c in CONFIGS_3D])
def test_equals_conv3d(name, kwargs, c_in, c_out, batch, grid, dtype, path, device):
    check(3, kwargs, c_in, c_out, batch, grid, dtype, device, path)


@st.composite
def nd_configs(draw, ndim: int):
    k = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    s = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
    d = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    grid = tuple(draw(st.integers(1, 5 if ndim == 3 else 9)) for _ in range(ndim))
    if mode == "reflect":  # reflect needs padding < size
        p = tuple(draw(st.integers(0, min(2, n - 1))) for n in grid)
    else:
        p = tuple(draw(st.integers(0, min(2, n))) for n in grid)
    if any(n + 2 * pi < di * (ki - 1) + 1 for n, pi, ki, di in zip(grid, p, k, d)):
        p = tuple(max(pi, (di * (ki - 1) + 1 - n + 1) // 2) for n, pi, ki, di in zip(grid, p, k, d))
        if mode in ("reflect", "circular") and any(pi >= n for pi, n in zip(p, grid)):
            mode = "zeros"
    groups = draw(st.sampled_from([1, 2]))
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 2))
    kwargs = dict(kernel_size=k, stride=s, padding=p, dilation=d, groups=groups, bias=draw(st.booleans()),
                  padding_mode=mode)
    return kwargs, c_in, c_out, draw(st.integers(0, 2)), grid


@settings(max_examples=15)
@given(config=nd_configs(1), path=st.sampled_from(["table", "edges"]))
def test_property_conv1d(config, path):
    kwargs, c_in, c_out, batch, grid = config
    check(1, kwargs, c_in, c_out, batch, grid, torch.float64, torch.device("cpu"), path)


@settings(max_examples=15)
@given(config=nd_configs(3), path=st.sampled_from(["table", "edges"]))
def test_property_conv3d(config, path):
    kwargs, c_in, c_out, batch, grid = config
    check(3, kwargs, c_in, c_out, batch, grid, torch.float64, torch.device("cpu"), path)


# ------------------------------------------------------------------------------- one implementation
def test_one_implementation_of_the_maths():
    """The 1-D, 2-D and 3-D layers differ only in their number of dimensions and their torch twin."""
    for cls in (GridConv1d, GridConv2d, GridConv3d):
        assert issubclass(cls, GridConvNd)
        for name in ("forward", "message", "reset_parameters", "_check_x"):
            assert getattr(cls, name) is getattr(GridConvNd, name), f"{cls.__name__}.{name} is a copy"
    assert (GridConv1d._ndim, GridConv2d._ndim, GridConv3d._ndim) == (1, 2, 3)


# ------------------------------------------------------------------------------- round trips and repr
@pytest.mark.parametrize("ndim", [1, 3])
def test_round_trip_and_state_dict(ndim):
    torch_cls, grid_cls, from_torch, _ = TWINS[ndim]
    conv = torch_cls(4, 6, 3, stride=2, padding=1, dilation=1, groups=2, padding_mode="circular")
    layer = from_torch(conv)
    back = getattr(layer, f"to_conv{ndim}d")()
    assert type(back) is torch_cls and repr(back) == repr(conv)
    assert torch.equal(back.weight, conv.weight) and torch.equal(back.bias, conv.bias)
    assert back.weight is not conv.weight
    with torch.no_grad():
        conv.weight.add_(1.0)  # the twin is an independent copy
    assert not torch.equal(layer.weight, conv.weight)
    fresh = grid_cls(4, 6, 3, stride=2, padding=1, groups=2, padding_mode="circular")
    fresh.load_state_dict(conv.state_dict())  # torch -> graph
    assert torch.equal(fresh.weight, conv.weight) and torch.equal(fresh.bias, conv.bias)
    conv.load_state_dict(layer.state_dict())  # graph -> torch
    assert torch.equal(layer.weight, conv.weight) and torch.equal(layer.bias, conv.bias)
    assert repr(layer) == repr(conv).replace(f"Conv{ndim}d", f"GridConv{ndim}d")


@pytest.mark.parametrize("ndim", [1, 3])
def test_initialisation_matches_torch(ndim):
    torch_cls, grid_cls, _, _ = TWINS[ndim]
    torch.manual_seed(7)
    conv = torch_cls(4, 6, 3, groups=2)
    torch.manual_seed(7)
    layer = grid_cls(4, 6, 3, groups=2)
    assert torch.equal(conv.weight, layer.weight) and torch.equal(conv.bias, layer.bias)


# ------------------------------------------------------------------------------- graphs and errors
def test_sequence_graph_structure():
    g = sequence_to_graph(torch.arange(10.).view(2, 1, 5), kernel_size=3, stride=2, padding=1)
    assert g.size() == (10, 6) and g.in_size == (5,) and g.out_size == (3,)
    assert g.pos.tolist() == [[l] for l in range(5)] * 2
    # output position 1 of the second sequence (node 3 + 1) reads positions 1, 2, 3 through taps 0, 1, 2
    into = g.edge_index[1] == 4
    assert g.edge_index[0, into].tolist() == [6, 7, 8] and g.edge_type[into].tolist() == [0, 1, 2]
    assert g.edge_attr[into].flatten().tolist() == [-1.0, 0.0, 1.0]
    assert graph_to_image(g.x, g).shape == (2, 1, 5)


def test_volume_graph_round_trip_is_exact():
    vol = torch.randn(2, 3, 4, 5, 6)
    g = volume_to_graph(vol, kernel_size=3, stride=2, padding=1)
    assert torch.equal(graph_to_image(g.x, g, side="input"), vol)
    assert g.size() == (2 * 120, 2 * 2 * 3 * 3) and g.edge_attr.shape[1] == 3


@pytest.mark.parametrize("ndim, bad, match", [
    (1, torch.zeros(2, 3, 4, 5), r"expected sequence of shape \(C, L\) or \(B, C, L\)"),
    (3, torch.zeros(3, 4, 5), r"expected volume of shape \(C, D, H, W\) or \(B, C, D, H, W\)"),
    (1, torch.zeros(2, 4, 5), "expected sequence with 3 channels"),
    (3, torch.zeros(1, 2, 4, 5, 5), "expected volume with 3 channels"),
])
def test_bad_input_is_named(ndim, bad, match):
    torch_cls, _, _, to_graph = TWINS[ndim]
    with pytest.raises(ValueError, match=match):
        to_graph(bad, torch_cls(3, 4, 3))


def test_wrong_dimensionality_of_conv_is_refused():
    with pytest.raises(ValueError, match="conv is a 2-d convolution; expected a 1-d one"):
        sequence_to_graph(torch.zeros(1, 3, 5), nn.Conv2d(3, 4, 3))
    with pytest.raises(TypeError, match=r"conv must be an nn.Conv3d \(got Conv2d\)"):
        GridConv3d.from_conv3d(nn.Conv2d(3, 4, 3))
    with pytest.raises(TypeError, match=r"conv must be an nn.Conv1d \(got ConvTranspose1d\)"):
        GridConv1d.from_conv1d(nn.ConvTranspose1d(3, 4, 3))
    with pytest.raises(ValueError, match="image too small for the kernel"):
        volume_to_graph(torch.zeros(1, 2, 2, 2), kernel_size=3, padding=0)


def test_convert_handles_conv1d_and_conv3d():
    from gridgraph.conversion import ImageGridConv1d, ImageGridConv3d, convert, unconvert

    torch.manual_seed(0)
    net1 = nn.Sequential(nn.Conv1d(2, 4, 5, stride=2, padding=2, padding_mode="reflect"), nn.ReLU(),
                         nn.Conv1d(4, 3, 3, groups=1)).double()
    net3 = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1, padding_mode="circular"), nn.ReLU(),
                         nn.Conv3d(4, 4, 3, stride=2, groups=2)).double()
    for net, cls, x in ((net1, ImageGridConv1d, torch.randn(2, 2, 17, dtype=torch.float64)),
                        (net3, ImageGridConv3d, torch.randn(2, 2, 5, 6, 7, dtype=torch.float64))):
        twin = convert(net)
        assert isinstance(twin[0], cls) and isinstance(twin[2], cls)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out, ref = twin(xa), net(xb)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        out.square().sum().backward()
        ref.square().sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(twin[2].weight.grad, net[2].weight.grad, rtol=1e-10, atol=1e-10)
        back = unconvert(twin)
        assert [type(m) for m in back] == [type(m) for m in net]

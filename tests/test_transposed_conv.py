"""GridConvTranspose2d equals nn.ConvTranspose2d: forward and gradients, both computation paths.

The graph is the strided convolution's graph reversed; the reference is ``torch.nn.ConvTranspose2d``
itself, weights moved with ``from_conv_transpose2d``.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gridgraph
from gridgraph import graph_to_image, image_to_graph
from gridgraph.domains import TransposedGeometry, transposed_image_to_graph, transposed_table
from gridgraph.graph import neighbour_table
from gridgraph.nn import GridConv2d, GridConvTranspose2d
from _conv_reference import DTYPES, check_conv, randomise_

# (id, ConvTranspose2d keyword arguments, in_channels, out_channels, batch, height, width)
CONFIGS = [
    ("k1", dict(kernel_size=1), 3, 4, 2, 5, 6),
    ("k1-s3", dict(kernel_size=1, stride=3), 3, 2, 2, 3, 4),
    ("k2-s2", dict(kernel_size=2, stride=2), 3, 4, 2, 4, 5),
    ("k3", dict(kernel_size=3), 2, 3, 2, 4, 5),
    ("k3-p1", dict(kernel_size=3, padding=1), 2, 3, 3, 5, 4),
    ("k3-s2-p1", dict(kernel_size=3, stride=2, padding=1), 3, 2, 2, 4, 5),
    ("k3-s2-p1-op1", dict(kernel_size=3, stride=2, padding=1, output_padding=1), 3, 2, 2, 4, 5),
    ("k4-s2-p1", dict(kernel_size=4, stride=2, padding=1), 2, 3, 2, 5, 3),
    ("k5-s3-p2-op2", dict(kernel_size=5, stride=3, padding=2, output_padding=2), 2, 3, 1, 3, 4),
    ("k3x2-s(2,3)-p(1,0)-op(1,2)", dict(kernel_size=(3, 2), stride=(2, 3), padding=(1, 0), output_padding=(1, 2)),
     2, 3, 2, 4, 3),
    ("k1x7-p(0,3)", dict(kernel_size=(1, 7), padding=(0, 3)), 2, 2, 1, 3, 8),
    ("k3-d2", dict(kernel_size=3, dilation=2), 2, 3, 2, 4, 4),
    ("k3-s1-d3-op2", dict(kernel_size=3, dilation=3, output_padding=2, padding=2), 2, 3, 1, 4, 5),
    ("k3-s2-d2-p3", dict(kernel_size=3, stride=2, dilation=2, padding=3), 2, 2, 2, 5, 5),
    ("big-padding", dict(kernel_size=5, stride=1, padding=4), 2, 2, 1, 6, 7),
    ("g2", dict(kernel_size=3, stride=2, padding=1, groups=2), 4, 6, 2, 4, 5),
    ("g2-nobias", dict(kernel_size=3, padding=1, groups=2, bias=False), 4, 2, 2, 4, 4),
    ("depthwise-x2", dict(kernel_size=3, stride=2, groups=3), 3, 6, 2, 3, 4),
    ("nobias", dict(kernel_size=2, stride=2, bias=False), 2, 3, 2, 3, 3),
    ("batch0", dict(kernel_size=3, stride=2, padding=1), 2, 3, 0, 4, 5),
    ("batch1", dict(kernel_size=3, stride=2), 2, 3, 1, 4, 5),
    ("1x1-image", dict(kernel_size=3, stride=2), 2, 3, 2, 1, 1),
    ("1x1-image-k3-p1", dict(kernel_size=3, padding=1), 2, 3, 2, 1, 1),
]


def make(kwargs, c_in, c_out, dtype, device, seed=0):
    torch.manual_seed(seed)
    up = nn.ConvTranspose2d(c_in, c_out, **kwargs).to(device=device, dtype=dtype)
    return randomise_(up, torch.Generator().manual_seed(seed + 1))


@pytest.mark.parametrize("path", ["table", "edges"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("name, kwargs, c_in, c_out, batch, height, width", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_equals_conv_transpose2d(name, kwargs, c_in, c_out, batch, height, width, dtype, path, device):
    up = make(kwargs, c_in, c_out, dtype, device)
    check_conv(up, GridConvTranspose2d.from_conv_transpose2d(up), batch, height, width, path)


@pytest.mark.parametrize("name", ["k3-s2-p1-op1", "g2", "k3-s2-d2-p3"])
def test_shuffled_edges(name):
    _, kwargs, c_in, c_out, batch, height, width = next(c for c in CONFIGS if c[0] == name)
    up = make(kwargs, c_in, c_out, torch.float64, torch.device("cpu"))
    check_conv(up, GridConvTranspose2d.from_conv_transpose2d(up), batch, height, width, "shuffled", seed=5)


@st.composite
def transposed_configs(draw):
    k = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    d = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    op = tuple(draw(st.integers(0, max(si, di) - 1)) for si, di in zip(s, d))
    h, w = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    # keep the output size positive: 2p <= (n-1)s + d(k-1) + op
    p = tuple(draw(st.integers(0, max(0, ((n - 1) * si + di * (ki - 1) + opi) // 2)))
              for n, si, di, ki, opi in zip((h, w), s, d, k, op))
    groups = draw(st.sampled_from([1, 2]))
    kwargs = dict(kernel_size=k, stride=s, padding=p, output_padding=op, dilation=d, groups=groups,
                  bias=draw(st.booleans()))
    return kwargs, groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2)), draw(st.integers(1, 2)), h, w


@settings(max_examples=30)
@given(config=transposed_configs(), path=st.sampled_from(["table", "edges"]))
def test_property_equals_conv_transpose2d(config, path):
    kwargs, c_in, c_out, batch, h, w = config
    up = make(kwargs, c_in, c_out, torch.float64, torch.device("cpu"))
    check_conv(up, GridConvTranspose2d.from_conv_transpose2d(up), batch, h, w, path)


# ------------------------------------------------------------------------------- the graph
@pytest.mark.parametrize("kwargs, size", [(dict(kernel_size=3, stride=2, padding=1, output_padding=1), (4, 5)),
                                          (dict(kernel_size=(2, 3), stride=(3, 1), dilation=(1, 2), padding=(0, 2)),
                                           (3, 4)),
                                          (dict(kernel_size=3, stride=2, dilation=3, output_padding=2), (3, 3))])
def test_graph_is_the_strided_conv_graph_reversed(kwargs, size):
    """The transposed graph's edges are exactly the strided Conv2d's edges on the output grid, reversed
    (restricted to the conv outputs that exist on the transposed input grid)."""
    t = TransposedGeometry.from_keywords(2, kwargs.get("kernel_size"), kwargs.get("stride", 1),
                                         kwargs.get("padding", 0), kwargs.get("output_padding", 0),
                                         kwargs.get("dilation", 1))
    out_size = t.output_size(size)
    conv = neighbour_table(t.conv, out_size)  # conv on the H_out grid: rows are conv outputs
    conv_out = t.conv.output_size(out_size)
    assert conv_out[0] >= size[0] and conv_out[1] >= size[1]
    rows = [r * conv_out[1] + c for r in range(size[0]) for c in range(size[1])]
    want = {(i, int(conv.index[row, k]), k) for i, row in enumerate(rows) for k in range(t.num_taps)
            if conv.index[row, k] >= 0}  # (source on the H grid, target on the H_out grid, tap)
    g = transposed_image_to_graph(torch.zeros(1, *size), **kwargs)
    got = set(zip(g.edge_index[0].tolist(), g.edge_index[1].tolist(), g.edge_type.tolist()))
    assert got == want and len(got) == g.edge_index.size(1)
    assert g.size() == (size[0] * size[1], out_size[0] * out_size[1])
    assert g.in_size == tuple(size) and g.out_size == out_size


def test_table_layout_and_image_round_trip():
    images = torch.randn(2, 3, 4, 5)
    up = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1)
    g = image_to_graph(images, up)  # image_to_graph dispatches on a transposed conv
    assert isinstance(g, gridgraph.domains.TransposedPixelGraph)
    assert torch.equal(graph_to_image(g.x, g, side="input"), images)
    out = torch.randn(g.num_dst, 2)
    assert graph_to_image(out, g).shape == (2, 2, 8, 10)
    table = g.table
    assert torch.equal(table.index, transposed_table(TransposedGeometry.from_module(up), (4, 5)).index)
    assert table.index.shape == (80, 9) and table.num_src == 20 and table.num_dst == 80
    assert g.edge_attr.shape == (g.edge_index.size(1), 2)


def test_upsampling_impulse_orientation():
    """k=2, s=2: each input pixel paints its own 2x2 block with the kernel, unflipped."""
    layer = GridConvTranspose2d(1, 1, 2, stride=2, bias=False, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64).view(1, 1, 2, 2))
    image = torch.tensor([[[1.0, 0.0], [0.0, 10.0]]], dtype=torch.float64)
    g = image_to_graph(image, layer)
    out = graph_to_image(layer(g.x, g.edge_index, g.edge_type, size=g.size()), g)
    expected = torch.tensor([[1, 2, 0, 0], [3, 4, 0, 0], [0, 0, 10, 20], [0, 0, 30, 40]], dtype=torch.float64)
    assert torch.equal(out[0], expected)
    assert torch.equal(layer.to_conv_transpose2d()(image).detach()[0], expected)


# ------------------------------------------------------------------------------- conversion and errors
def test_round_trip_state_dict_and_repr():
    up = nn.ConvTranspose2d(4, 6, (3, 2), stride=2, padding=1, output_padding=1, groups=2, dilation=(1, 2))
    layer = GridConvTranspose2d.from_conv_transpose2d(up)
    assert repr(layer) == repr(up).replace("ConvTranspose2d", "GridConvTranspose2d")
    back = layer.to_conv_transpose2d()
    assert type(back) is nn.ConvTranspose2d and repr(back) == repr(up)
    assert torch.equal(back.weight, up.weight) and torch.equal(back.bias, up.bias)
    with torch.no_grad():
        up.weight.add_(1)
    assert not torch.equal(layer.weight, up.weight)  # an independent copy
    fresh = GridConvTranspose2d(4, 6, (3, 2), stride=2, padding=1, output_padding=1, groups=2, dilation=(1, 2))
    fresh.load_state_dict(up.state_dict())
    assert torch.equal(fresh.weight, up.weight)
    up.load_state_dict(layer.state_dict())
    assert torch.equal(up.weight, layer.weight)
    assert [(n, p.shape) for n, p in layer.named_parameters()] == [(n, p.shape) for n, p in up.named_parameters()]


def test_initialisation_matches_torch():
    torch.manual_seed(3)
    up = nn.ConvTranspose2d(4, 6, 3, groups=2)
    torch.manual_seed(3)
    layer = GridConvTranspose2d(4, 6, 3, groups=2)
    assert torch.equal(up.weight, layer.weight) and torch.equal(up.bias, layer.bias)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(padding_mode="reflect"), ValueError, 'Only "zeros" padding mode is supported for ConvTranspose2d'),
    (dict(stride=2, output_padding=2), ValueError, "output padding must be smaller than either stride or dilation"),
    (dict(padding="same"), TypeError, "padding must be an int or a tuple of 2 ints"),
    (dict(groups=3), ValueError, "in_channels must be divisible by groups"),
])
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        GridConvTranspose2d(4, 6, 3, **kwargs)


def test_bad_inputs_are_named():
    up = nn.ConvTranspose2d(3, 2, 3, padding=3)
    with pytest.raises(ValueError, match="expected image with 3 channels for ConvTranspose2d"):
        image_to_graph(torch.zeros(2, 4, 4), up)
    with pytest.raises(ValueError, match=r"output size \(-3, -3\) is not positive"):
        image_to_graph(torch.zeros(3, 1, 1), up)
    with pytest.raises(TypeError, match="conv must be an nn.ConvTranspose2d"):
        GridConvTranspose2d.from_conv_transpose2d(nn.Conv2d(3, 2, 3))
    layer = GridConvTranspose2d.from_conv_transpose2d(nn.ConvTranspose2d(3, 2, 3))
    g = image_to_graph(torch.zeros(3, 4, 4), layer)
    with pytest.raises(ValueError, match="expected x with 3 channels"):
        layer(torch.zeros(16, 2), g.edge_index, g.edge_type)
    with pytest.raises(ValueError, match="size .* does not match"):
        layer(g.x, g.edge_index, g.edge_type, size=(16, 16))


def test_conv2d_on_the_transposed_graph_is_message_passing_on_reversed_edges():
    """The graph is a graph: a GridConv2d refuses it as a pixel graph (another geometry) and, given its plain
    edge list, computes PyG's sum over those edges."""
    g = transposed_image_to_graph(torch.randn(2, 3, 4, 4, dtype=torch.float64), kernel_size=3, stride=2)
    conv = GridConv2d(3, 2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"pixel graph of another one \(transposed k3x3 s2x2"):
        conv(g.x, g.edge_index, g.edge_type, size=g.size())
    plain = g.edge_index.as_tensor()
    out = conv(g.x, plain, g.edge_type, size=g.size())
    messages = conv.message(g.x[plain[0]], g.edge_type)
    want = torch.zeros(g.num_dst, 2, dtype=torch.float64).index_add_(0, plain[1], messages) + conv.bias
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------- convert
def test_convert_handles_conv_transpose2d():
    from gridgraph.conversion import convert, unconvert
    from gridgraph.nn.transposed_conv import ImageGridConvTranspose2d

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                        nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1, groups=2)).double()
    twin = convert(net)
    assert isinstance(twin[2], ImageGridConvTranspose2d) and twin[2].weight is not net[2].weight
    x = torch.randn(2, 3, 8, 10, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    out, ref = twin(x), net(x2)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(twin[2].weight.grad, net[2].weight.grad, rtol=1e-10, atol=1e-10)
    twin.load_state_dict(net.state_dict())
    net.load_state_dict(twin.state_dict())
    back = unconvert(twin)
    assert type(back[2]) is nn.ConvTranspose2d and repr(back[2]) == repr(net[2])


def test_image_twin_takes_output_size_like_torch():
    from gridgraph.nn.transposed_conv import ImageGridConvTranspose2d

    up = make(dict(kernel_size=3, stride=2, padding=1), 4, 2, torch.float64, torch.device("cpu"))
    twin = ImageGridConvTranspose2d.from_conv_transpose2d(up)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    for size in (None, (9, 11), (10, 12), torch.Size([2, 2, 10, 11])):
        torch.testing.assert_close(twin(x, output_size=size), up(x, output_size=size), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(twin(x[0]), up(x[0]), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match=r"valid sizes range from \[9, 11\] to \[10, 12\]"):
        twin(x, output_size=(12, 12))
    g = image_to_graph(x, twin)  # and it is still the graph layer on node features
    torch.testing.assert_close(graph_to_image(twin(g.x, g.edge_index, g.edge_type), g), up(x), rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------- 1-D and 3-D
from gridgraph.graph import sequence_to_graph, volume_to_graph  # noqa: E402
from gridgraph.nn.functional import kernel_trace  # noqa: E402
from gridgraph.nn import GridConvTranspose1d, GridConvTranspose3d  # noqa: E402
from _conv_reference import compare, reference  # noqa: E402
from _conv_reference import Result  # noqa: E402

ND = {1: (nn.ConvTranspose1d, GridConvTranspose1d.from_conv_transpose1d, sequence_to_graph),
      3: (nn.ConvTranspose3d, GridConvTranspose3d.from_conv_transpose3d, volume_to_graph)}
CONFIGS_ND = [
    ("1d-k3-s2-p1-op1", 1, dict(kernel_size=3, stride=2, padding=1, output_padding=1), 3, 2, 2, (6,)),
    ("1d-k4-s3-d2-g2", 1, dict(kernel_size=4, stride=3, dilation=2, groups=2, output_padding=1), 4, 6, 2, (5,)),
    ("1d-k1-nobias", 1, dict(kernel_size=1, bias=False), 2, 3, 1, (4,)),
    ("3d-k2-s2", 3, dict(kernel_size=2, stride=2), 2, 3, 2, (2, 3, 2)),
    ("3d-k3-s(2,1,2)-p1-op(1,0,1)", 3, dict(kernel_size=3, stride=(2, 1, 2), padding=1, output_padding=(1, 0, 1)),
     2, 2, 1, (3, 2, 3)),
    ("3d-k(1,3,2)-g2-d(1,2,1)", 3, dict(kernel_size=(1, 3, 2), groups=2, dilation=(1, 2, 1)), 2, 4, 2, (2, 3, 3)),
]


@pytest.mark.parametrize("path", ["table", "edges"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("name, ndim, kwargs, c_in, c_out, batch, grid", CONFIGS_ND, ids=[c[0] for c in CONFIGS_ND])
def test_equals_conv_transpose1d_3d(name, ndim, kwargs, c_in, c_out, batch, grid, dtype, path, device):
    torch_cls, from_torch, to_graph = ND[ndim]
    up = randomise_(torch_cls(c_in, c_out, **kwargs).to(device=device, dtype=dtype), torch.Generator().manual_seed(1))
    layer = from_torch(up)
    gen = torch.Generator().manual_seed(2)
    data = torch.randn(batch, c_in, *grid, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    want_out = up(data)
    grad_out = torch.randn(want_out.shape, generator=gen, dtype=torch.float64).to(want_out)
    want = reference(up, data, grad_out)
    x = data.detach().clone().requires_grad_(True)
    g = to_graph(x, layer)  # dispatches to the reversed graph for a transposed convolution
    edge_index = g.edge_index if path == "table" else g.edge_index.as_tensor()
    with kernel_trace() as trace:
        out = graph_to_image(layer(g.x, edge_index, g.edge_type, size=g.size()), g, side="output")
    assert trace == (["grid"] if path == "table" else ["edges"]), trace
    out.backward(grad_out)
    compare(Result(out.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}), want)


def test_convert_handles_conv_transpose1d_and_3d():
    from gridgraph.conversion import convert, unconvert
    from gridgraph.nn.transposed_conv import ImageGridConvTranspose1d, ImageGridConvTranspose3d

    torch.manual_seed(0)
    for net, cls, x in (
            (nn.Sequential(nn.Conv1d(2, 4, 3, stride=2, padding=1), nn.ConvTranspose1d(4, 2, 4, stride=2, padding=1)),
             ImageGridConvTranspose1d, torch.randn(2, 2, 9)),
            (nn.Sequential(nn.Conv3d(2, 4, 3, stride=2, padding=1), nn.ConvTranspose3d(4, 2, 2, stride=2)),
             ImageGridConvTranspose3d, torch.randn(1, 2, 4, 6, 5))):
        net = net.double()
        x = x.double()
        twin = convert(net)
        assert isinstance(twin[1], cls)
        torch.testing.assert_close(twin(x), net(x), rtol=1e-10, atol=1e-10)
        hidden = net[0](x).detach()
        torch.testing.assert_close(twin[1](hidden), net[1](hidden), rtol=1e-10, atol=1e-10)  # the layer alone
        torch.testing.assert_close(twin[1](hidden[0]), net[1](hidden[0]), rtol=1e-10, atol=1e-10)  # unbatched
        assert type(unconvert(twin)[1]) is type(net[1])

"""Bad input gets a ValueError / TypeError that names the argument and says what was expected and what came.

Every case asserts the exception type and the message content. Where ``nn.Conv2d`` refuses the same input,
the test checks that it does (so gridgraph's refusal matches torch's), and constructor messages are
compared with ``nn.Conv2d``'s own, word for word.
"""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from gridgraph import (DepthwiseConv2d, GridConv2d, PointwiseConv2d, SeparableConv2d, graph_to_image,
                       image_to_graph)
from _conv_reference import assert_same_message


@pytest.fixture
def layer():
    return GridConv2d(2, 3, 3, padding=1)


@pytest.fixture
def graph():
    return image_to_graph(torch.randn(2, 2, 3, 4), kernel_size=3, padding=1)


@pytest.fixture
def strided():
    return image_to_graph(torch.randn(1, 2, 5, 5), kernel_size=3, stride=2, padding=1)


def both_paths(graph):
    """The pixel graph's own edge_index (neighbour-table path) and a clone (general edge-list path)."""
    return [graph.edge_index, graph.edge_index.as_tensor().clone()]


# ------------------------------------------------------------------------------- x
@pytest.mark.parametrize("shape", [(24,), (1, 24, 2), (2, 2, 3, 4)])
def test_x_of_wrong_ndim(layer, graph, shape):
    for edge_index in both_paths(graph):
        with pytest.raises(ValueError, match=re.escape(f"expected x of shape [num_nodes, 2]: 2 dims (got a "
                                                       f"{len(shape)}-dim tensor of shape {shape})")):
            layer(torch.randn(shape), edge_index, graph.edge_type)


def test_x_with_wrong_channel_count(layer, graph):
    for edge_index in both_paths(graph):
        with pytest.raises(ValueError, match=re.escape("expected x with 2 channels, the layer's in_channels (got 5: ")):
            layer(torch.randn(24, 5), edge_index, graph.edge_type)


def test_x_with_wrong_row_count(layer, graph):
    with pytest.raises(ValueError, match=re.escape("expected x with 24 rows, the source nodes of this pixel graph "
                                                   "(2 image(s) of 3x4) (got 23): x and edge_index must come from "
                                                   "the same graph")):
        layer(graph.x[:23], graph.edge_index, graph.edge_type)
    with pytest.raises(ValueError, match=re.escape("size[0] = 24 (the source node count) must equal the number of rows of x (23)")):
        layer(graph.x[:23], graph.edge_index.as_tensor().clone(), graph.edge_type, size=(24, 24))


def test_x_not_a_tensor_or_wrong_dtype(layer, graph):
    with pytest.raises(TypeError, match="x must be a torch.Tensor \\(got list\\)"):
        layer(graph.x.tolist(), graph.edge_index, graph.edge_type)
    with pytest.raises(TypeError, match=re.escape("expected x of dtype torch.float32, the layer's dtype "
                                                  "(got torch.float64)")):
        layer(graph.x.double(), graph.edge_index, graph.edge_type)


# ------------------------------------------------------------------------------- edge_index
@pytest.mark.parametrize("dtype", [torch.int32, torch.float32, torch.int16])
def test_edge_index_not_long(layer, graph, dtype):
    with pytest.raises(TypeError, match=re.escape(f"expected edge_index of dtype torch.int64 (got {dtype})")):
        layer(graph.x, graph.edge_index.to(dtype), graph.edge_type)


@pytest.mark.parametrize("reshape", [lambda e: e[0], lambda e: e[:1], lambda e: torch.cat([e, e[:1]]),
                                     lambda e: e.reshape(1, 2, -1), lambda e: e.t()],
                         ids=["1-d", "[1, E]", "[3, E]", "[1, 2, E]", "[E, 2]"])
def test_edge_index_not_2_by_e(layer, graph, reshape):
    bad = reshape(graph.edge_index)
    with pytest.raises(ValueError, match=re.escape(f"expected edge_index of shape [2, num_edges] "
                                                   f"(got {tuple(bad.shape)})")):
        layer(graph.x, bad, graph.edge_type)


def test_edge_index_not_a_tensor(layer, graph):
    with pytest.raises(TypeError, match=re.escape("edge_index must be a torch.Tensor (got list)")):
        layer(graph.x, graph.edge_index.tolist(), graph.edge_type)


@pytest.mark.parametrize("row, value, match", [
    (0, 24, r"edge_index\[0\] \(source node ids\) must lie in \[0, 24\) \(got values in \[0, 24\]\)"),
    (0, -1, r"edge_index\[0\] \(source node ids\) must lie in \[0, 24\) \(got values in \[-1, 23\]\)"),
    (1, 24, r"edge_index\[1\] \(target node ids\) must lie in \[0, 24\) \(got values in \[0, 24\]\)"),
    (1, -3, r"edge_index\[1\] \(target node ids\) must lie in \[0, 24\) \(got values in \[-3, 23\]\)"),
])
def test_node_ids_out_of_range(layer, graph, row, value, match):
    edge_index = graph.edge_index.as_tensor().clone()
    edge_index[row, 5] = value
    with pytest.raises(ValueError, match=match):
        layer(graph.x, edge_index, graph.edge_type)
    with pytest.raises(ValueError, match=match):
        layer(graph.x, edge_index, graph.edge_type, size=(24, 24))


def test_target_ids_beyond_size(strided):
    """A strided graph's targets are checked against ``size[1]``: the output grid."""
    layer = GridConv2d(2, 3, 3, stride=2, padding=1)
    with pytest.raises(ValueError, match=r"edge_index\[1\] \(target node ids\) must lie in \[0, 4\)"):
        layer(strided.x, strided.edge_index.as_tensor().clone(), strided.edge_type, size=(25, 4))
    out = layer(strided.x, strided.edge_index.as_tensor().clone(), strided.edge_type, size=(25, 9))
    assert out.shape == (9, 3)


# ------------------------------------------------------------------------------- edge_type
def test_edge_type_wrong_length(layer, graph):
    e = graph.edge_index.size(1)
    for bad in (graph.edge_type[:-1], torch.cat([graph.edge_type, graph.edge_type[:2]]),
                graph.edge_type.view(1, -1)):
        for edge_index in both_paths(graph):
            with pytest.raises(ValueError, match=re.escape(f"expected edge_type of shape [{e}], one tap per edge "
                                                           f"(got {tuple(bad.shape)})")):
                layer(graph.x, edge_index, bad)


@pytest.mark.parametrize("value", [9, 100, -1])
def test_edge_type_out_of_range(layer, graph, value):
    bad = graph.edge_type.clone()
    bad[3] = value
    lo, hi = min(value, 0), max(value, 8)
    for edge_index in both_paths(graph):
        with pytest.raises(ValueError, match=re.escape(f"edge_type must lie in [0, 9) for a (3, 3) kernel "
                                                       f"(got values in [{lo}, {hi}])")):
            layer(graph.x, edge_index, bad)


def test_edge_type_not_long_or_missing(layer, graph):
    with pytest.raises(TypeError, match=re.escape("expected edge_type of dtype torch.int64 (got torch.int32)")):
        layer(graph.x, graph.edge_index, graph.edge_type.int())
    with pytest.raises(ValueError, match=re.escape("edge_type is required with a plain edge_index")):
        layer(graph.x, graph.edge_index.as_tensor(), None)
    with pytest.raises(TypeError, match=re.escape("edge_type must be a torch.Tensor (got list)")):
        layer(graph.x, graph.edge_index.as_tensor(), [0] * graph.edge_index.size(1))
    torch.testing.assert_close(layer(graph.x, graph.edge_index, None), layer(graph.x, graph.edge_index, graph.edge_type))


def test_edge_type_of_a_bigger_kernel(graph):
    """A 5x5 graph is refused by a 3x3 layer: by geometry as a pixel graph, by tap range as a plain edge list."""
    g5 = image_to_graph(graph.x.new_zeros(2, 2, 3, 4), kernel_size=5, padding=2)
    layer = GridConv2d(2, 3, 3, padding=1)
    with pytest.raises(ValueError, match=r"GridConv2d computes the convolution k3x3 s1x1 p1x1 d1x1 zeros, but this is "
                                         r"the pixel graph of another one \(grid k5x5 s1x1 p2x2 d1x1 zeros"):
        layer(g5.x, g5.edge_index, g5.edge_type)
    with pytest.raises(ValueError, match=r"edge_type must lie in \[0, 9\) for a \(3, 3\) kernel \(got values in "
                                         r"\[0, 2[0-9]\]\)"):
        layer(g5.x, g5.edge_index.as_tensor(), g5.edge_type)


@pytest.mark.parametrize("kwargs, name", [(dict(kernel_size=5, padding=2), "k5x5 s1x1 p2x2 d1x1"),
                                          (dict(kernel_size=3, stride=2, padding=1), "k3x3 s2x2 p1x1 d1x1"),
                                          (dict(kernel_size=3, dilation=2, padding=2), "k3x3 s1x1 p2x2 d2x2"),
                                          (dict(kernel_size=3, padding=1, padding_mode="reflect"),
                                           "k3x3 s1x1 p1x1 d1x1 reflect")])
def test_layer_of_another_geometry_is_refused_naming_both(graph, kwargs, name):
    """A stride-2, 5x5, dilated or reflect layer on a 3x3 stride-1 zero-padded graph: a ValueError naming both
    geometries (before, each returned a plausible tensor that was not the convolution). As a plain edge list
    (no pixel structure) the 3x3 graph is legal message passing for a 5x5 layer: taps 0..8 of 25."""
    layer = GridConv2d(2, 3, **kwargs).double()
    with pytest.raises(ValueError, match=re.escape(f"computes the convolution {name}")) as info:
        layer(graph.x.double(), graph.edge_index, graph.edge_type)
    assert "k3x3 s1x1 p1x1 d1x1 zeros" in str(info.value)
    if kwargs["kernel_size"] == 5:
        layer(graph.x.double(), graph.edge_index.as_tensor(), graph.edge_type)  # PyG semantics: no error


# ------------------------------------------------------------------------------- size
def test_bad_size(layer, graph):
    with pytest.raises(ValueError, match=re.escape("size (24, 23) does not match the pixel graph's (N_src, N_dst) = "
                                                   "(24, 24)")):
        layer(graph.x, graph.edge_index, graph.edge_type, size=(24, 23))
    with pytest.raises(ValueError, match=re.escape("size must be (num_src, num_dst) (got (24,))")):
        layer(graph.x, graph.edge_index.as_tensor().clone(), graph.edge_type, size=(24,))


# ------------------------------------------------------------------------------- devices
def test_tensors_on_different_devices(graph):
    """The 'meta' device is a second device on every machine: each mismatch is caught by name."""
    cpu_layer = GridConv2d(2, 3, 3, padding=1)
    with pytest.raises(ValueError, match="x is on meta but the layer's weight is on cpu"):
        cpu_layer(graph.x.to("meta"), graph.edge_index, graph.edge_type)
    with pytest.raises(ValueError, match="edge_index is on meta but x is on cpu"):
        cpu_layer(graph.x, graph.edge_index.to("meta"), graph.edge_type)
    with pytest.raises(ValueError, match="edge_type is on meta but x is on cpu"):
        cpu_layer(graph.x, graph.edge_index, graph.edge_type.to("meta"))
    meta_layer = GridConv2d(2, 3, 3, padding=1, device="meta")
    x = graph.x.to("meta")
    with pytest.raises(ValueError, match="edge_index is on cpu but x is on meta"):  # the neighbour-table path
        meta_layer(x, graph.edge_index, graph.edge_type)
    with pytest.raises(ValueError, match="edge_index is on cpu but x is on meta"):  # the general path
        meta_layer(x, graph.edge_index.as_tensor().clone(), graph.edge_type)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tensors_on_cpu_and_cuda(graph):
    layer = GridConv2d(2, 3, 3, padding=1)
    with pytest.raises(ValueError, match="x is on cuda:0 but the layer's weight is on cpu"):
        layer(graph.x.cuda(), graph.edge_index, graph.edge_type)
    with pytest.raises(ValueError, match="edge_index is on cpu but x is on cuda:0"):
        layer.cuda()(graph.x.cuda(), graph.edge_index, graph.edge_type)


# ------------------------------------------------------------------------------- images and graphs
@pytest.mark.parametrize("shape", [(3, 4), (5,), (1, 2, 1, 3, 4)])
def test_image_of_wrong_ndim(shape):
    with pytest.raises(ValueError, match=re.escape(f"expected image of shape (C, H, W) or (B, C, H, W): 3 or 4 dims "
                                                   f"(got a {len(shape)}-dim tensor of shape {shape})")):
        image_to_graph(torch.randn(shape))
    with pytest.raises(ValueError, match="3 or 4 dims"):
        image_to_graph(torch.randn(shape), nn.Conv2d(2, 2, 3))


def test_image_with_wrong_channel_count():
    for conv in (nn.Conv2d(3, 4, 3), GridConv2d(3, 4, 3), SeparableConv2d(3, 4, 3)):
        with pytest.raises(ValueError, match=re.escape(f"expected image with 3 channels for {type(conv).__name__} "
                                                       "(got 2 channels, image of shape (1, 2, 5, 5))")):
            image_to_graph(torch.randn(1, 2, 5, 5), conv)
    with pytest.raises(ValueError, match=re.escape("expected image with 3 channels for Conv2d (got 5 channels, "
                                                   "image of shape (5, 4, 4))")):
        image_to_graph(torch.randn(5, 4, 4), nn.Conv2d(3, 4, 3))


def test_image_not_a_tensor_and_conv_not_a_conv():
    with pytest.raises(TypeError, match=re.escape("image must be a torch.Tensor (got list)")):
        image_to_graph([[[1.0]]])
    with pytest.raises(TypeError, match=re.escape("conv must be an nn.Conv1d/Conv2d/Conv3d or a gridgraph "
                                                  "convolution layer (got Linear)")):
        image_to_graph(torch.randn(1, 2, 3, 3), nn.Linear(2, 2))
    with pytest.raises(ValueError, match=re.escape("conv is a 1-d convolution; expected a 2-d one")):
        image_to_graph(torch.randn(1, 2, 3, 3), nn.Conv1d(2, 2, 3))


TOO_SMALL = [  # Conv2d keywords, image size, message
    (dict(kernel_size=5), (4, 9), r"image too small for the kernel: padded input size per channel \(4, 9\), "
                                  r"dilated kernel size \(5, 5\)"),
    (dict(kernel_size=3, dilation=2, padding=1), (2, 8), r"image too small for the kernel: padded input size per "
                                                         r"channel \(4, 10\), dilated kernel size \(5, 5\)"),
    (dict(kernel_size=(1, 3), stride=2), (5, 2), r"image too small for the kernel"),
    (dict(kernel_size=3, padding=2, padding_mode="reflect"), (2, 5),
     r"padding \(\(2, 2\), \(2, 2\)\) with padding_mode='reflect' needs each padding to be less than the "
     r"corresponding image size \(got image size \(2, 5\)\)"),
    (dict(kernel_size=3, padding=1, padding_mode="reflect"), (1, 1), r"padding_mode='reflect' needs each padding"),
    (dict(kernel_size=7, padding=4, padding_mode="circular"), (3, 6),
     r"padding \(\(4, 4\), \(4, 4\)\) with padding_mode='circular' would wrap around more than once "
     r"\(image size \(3, 6\)\)"),
]


@pytest.mark.parametrize("kwargs, size, match", TOO_SMALL)
def test_image_too_small_where_conv2d_refuses(kwargs, size, match):
    conv = nn.Conv2d(1, 2, **kwargs)
    image = torch.randn(1, 1, *size)
    with pytest.raises(RuntimeError):
        conv(image)
    with pytest.raises(ValueError, match=match):
        image_to_graph(image, conv)
    with pytest.raises(ValueError, match=match):
        image_to_graph(image, **{"padding": 0, **kwargs})  # image_to_graph's own default padding is 1
    with pytest.raises(ValueError, match=match):
        image_to_graph(image[0], GridConv2d.from_conv2d(conv))


def test_graph_to_image_bad_input(graph, strided):
    with pytest.raises(TypeError, match=re.escape("x must be a torch.Tensor (got list)")):
        graph_to_image([[1.0]], graph)
    with pytest.raises(TypeError, match=re.escape("graph must be a PixelGraph from image_to_graph (got Data)")):
        from torch_geometric.data import Data
        graph_to_image(graph.x, Data(x=graph.x))
    with pytest.raises(ValueError, match=re.escape("expected x of shape [num_nodes, channels]: 2 dims "
                                                   "(got shape (24,))")):
        graph_to_image(graph.x[:, 0], graph)
    with pytest.raises(ValueError, match=re.escape("x has 7 rows, but the graph has 1x25 input nodes and 1x9 "
                                                   "output nodes")):
        graph_to_image(torch.randn(7, 2), strided)
    with pytest.raises(ValueError, match=re.escape("side must be 'input', 'output' or None (got 'middle')")):
        graph_to_image(graph.x, graph, side="middle")
    with pytest.raises(ValueError, match=re.escape("x has 9 rows, but the input grid holds 1x5x5 = 25 nodes")):
        graph_to_image(torch.randn(9, 2), strided, side="input")


# ------------------------------------------------------------------------------- constructors
BAD_CONSTRUCTOR = [
    ((4, 8, 3), dict(groups=0)),
    ((4, 8, 3), dict(groups=-1)),
    ((4, 8, 3), dict(groups=3)),
    ((6, 4, 3), dict(groups=3)),
    ((4, 8, 3), dict(padding="full")),
    ((4, 8, 3), dict(padding="SAME")),
    ((4, 8, 3), dict(padding="same", stride=2)),
    ((4, 8, 3), dict(padding="same", stride=(2, 1))),
    ((4, 8, 3), dict(padding_mode="zero")),
    ((4, 8, 3), dict(padding_mode="constant")),
]


@pytest.mark.parametrize("args, kwargs", BAD_CONSTRUCTOR)
def test_constructor_messages_are_conv2ds(args, kwargs):
    with pytest.raises(ValueError) as theirs:
        nn.Conv2d(*args, **kwargs)
    with pytest.raises(ValueError) as ours:
        GridConv2d(*args, **kwargs)
    assert_same_message(str(ours.value), str(theirs.value))
    if "groups" not in kwargs:
        with pytest.raises(ValueError) as ours:
            SeparableConv2d(*args, **kwargs)
        assert_same_message(str(ours.value), str(theirs.value))


CONV2D_FAILS_LATER = [  # accepted by nn.Conv2d's constructor, refused by its forward; gridgraph refuses at once
    (dict(kernel_size=0), r"kernel_size must be positive \(got \(0, 0\)\)"),
    (dict(kernel_size=(3, 0)), r"kernel_size must be positive \(got \(3, 0\)\)"),
    (dict(kernel_size=3, stride=0), r"stride must be positive \(got \(0, 0\)\)"),
    (dict(kernel_size=3, stride=(1, -1)), r"stride must be positive \(got \(1, -1\)\)"),
    (dict(kernel_size=3, padding=-1), r"padding must be non-negative"),
    (dict(kernel_size=3, dilation=0), r"dilation must be positive \(got \(0, 0\)\)"),
    (dict(kernel_size=(3, 3, 3)), r"kernel_size must be an int or a tuple of 2 ints \(got \(3, 3, 3\)\)"),
    (dict(kernel_size=3, stride=(1, 1, 1)), r"stride must be an int or a tuple of 2 ints"),
]


@pytest.mark.parametrize("kwargs, match", CONV2D_FAILS_LATER)
def test_constructor_refuses_what_conv2d_cannot_run(kwargs, match):
    with pytest.raises(RuntimeError):
        nn.Conv2d(2, 2, **kwargs)(torch.randn(1, 2, 6, 6))
    with pytest.raises(ValueError, match=match):
        GridConv2d(2, 2, **kwargs)


@pytest.mark.parametrize("args, match", [
    ((2.0, 3, 3), r"in_channels must be an int \(got float 2.0\)"),
    ((2, "3", 3), r"out_channels must be an int \(got str '3'\)"),
    ((2, 3, 3.0), r"kernel_size must be an int or a tuple of 2 ints \(got float 3.0\)"),
    ((2, 3, None), r"kernel_size must be an int or a tuple of 2 ints"),
])
def test_constructor_type_errors(args, match):
    with pytest.raises(TypeError):
        nn.Conv2d(*args)
    with pytest.raises(TypeError, match=match):
        GridConv2d(*args)


def test_from_conv2d_rejects_non_conv2d():
    for module, name in ((nn.Conv1d(2, 2, 3), "Conv1d"), (nn.ConvTranspose2d(2, 2, 3), "ConvTranspose2d"),
                         (nn.Linear(2, 2), "Linear")):
        with pytest.raises(TypeError, match=re.escape(f"conv must be an nn.Conv2d (got {name})")):
            GridConv2d.from_conv2d(module)


def test_layer_specific_arguments():
    with pytest.raises(ValueError, match=re.escape("depth_multiplier must be a positive integer (got 0)")):
        DepthwiseConv2d(3, 3, depth_multiplier=0)
    with pytest.raises(ValueError, match="PointwiseConv2d takes self-loops only"):
        PointwiseConv2d(2, 2)(torch.randn(3, 2), torch.tensor([[0, 1], [1, 0]]))

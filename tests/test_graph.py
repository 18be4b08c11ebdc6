"""Pixel graphs: image_to_graph / graph_to_image / to_networkx, caching and neighbour tables.

The reference for which edges exist is torch itself: an image of pixel ids is padded with ``F.pad``
(the padding ``nn.Conv2d`` applies) and read at every tap's position, so zeros / reflect / replicate /
circular are pinned to torch's own semantics, not to a re-derivation of them.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gridgraph
from gridgraph import (ConvGeometry, GridConv2d, PixelGraph, clear_cache, graph_to_image, image_to_graph,
                       neighbour_table, to_networkx)
from gridgraph.nn.functional import kernel_trace
from gridgraph.pixel_graph import PixelEdgeIndex, pixel_structure

MODES = ("zeros", "reflect", "replicate", "circular")

GEOMETRIES = [  # (id, keywords, image size)
    ("k3-p1", dict(kernel_size=3, padding=1), (4, 5)),
    ("k1", dict(kernel_size=1, padding=0), (3, 4)),
    ("k1-p1", dict(kernel_size=1, padding=1), (3, 4)),
    ("k2-same", dict(kernel_size=2, padding="same"), (4, 3)),
    ("k3-s2-p1", dict(kernel_size=3, stride=2, padding=1), (5, 6)),
    ("k3x2-s(3,1)-p(2,1)-d(1,2)", dict(kernel_size=(3, 2), stride=(3, 1), padding=(2, 1), dilation=(1, 2)), (7, 5)),
    ("k5-d2-same", dict(kernel_size=5, padding="same", dilation=2), (5, 6)),
    ("k1x7-p(0,3)", dict(kernel_size=(1, 7), padding=(0, 3)), (2, 7)),
    ("k3-valid", dict(kernel_size=3, padding="valid"), (4, 4)),
    ("k3-p2-tiny", dict(kernel_size=3, padding=2), (2, 2)),
    ("k3-p1-1x1", dict(kernel_size=3, padding=1), (1, 1)),
]


def reference_edges(kwargs: dict, mode: str, size: tuple[int, int], batch: int) -> set[tuple[int, int, int]]:
    """``{(source, target, tap)}`` from torch's own padding of an image of pixel ids."""
    g = ConvGeometry.from_keywords(2, **kwargs, padding_mode=mode)
    (kh, kw), (sh, sw), (dh, dw) = g.kernel_size, g.stride, g.dilation
    (pt, pb), (pl, pr) = g.padding
    h, w = size
    ids = torch.arange(h * w, dtype=torch.float64).view(1, 1, h, w)
    if mode == "zeros":
        padded = F.pad(ids, (pl, pr, pt, pb), mode="constant", value=-1.0)
    else:
        padded = F.pad(ids, (pl, pr, pt, pb), mode=mode)
    h_out = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    w_out = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    edges = set()
    for b in range(batch):
        for oh in range(h_out):
            for ow in range(w_out):
                for u in range(kh):
                    for v in range(kw):
                        src = int(padded[0, 0, oh * sh + u * dh, ow * sw + v * dw])
                        if src >= 0:
                            edges.add((b * h * w + src, b * h_out * w_out + oh * w_out + ow, u * kw + v))
    return edges


def edge_set(g: PixelGraph) -> set[tuple[int, int, int]]:
    return set(zip(*g.edge_index.tolist(), g.edge_type.tolist()))


def graph_of(kwargs: dict, mode: str, size: tuple[int, int], batch: int, channels: int = 2, device="cpu",
             dtype=torch.float64) -> tuple[PixelGraph, torch.Tensor]:
    images = torch.randn(batch, channels, *size, dtype=dtype, device=device)
    return image_to_graph(images, **kwargs, padding_mode=mode), images


# ------------------------------------------------------------------------------- edges
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name, kwargs, size", GEOMETRIES, ids=[c[0] for c in GEOMETRIES])
def test_edges_are_torch_padding(name, kwargs, size, mode, device):
    try:
        nn.Conv2d(1, 1, **kwargs, padding_mode=mode)(torch.zeros(1, 1, *size))
    except RuntimeError:  # e.g. reflect padding as large as the image: refused by both
        with pytest.raises(ValueError, match="padding_mode='reflect'"):
            graph_of(kwargs, mode, size, batch=3, device=device)
        assert mode == "reflect"
        return
    g, images = graph_of(kwargs, mode, size, batch=3, device=device)
    geometry = ConvGeometry.from_keywords(2, **kwargs, padding_mode=mode)
    want = reference_edges(kwargs, mode, size, batch=3)
    e = g.edge_index.size(1)
    assert g.edge_index.dtype == torch.long and g.edge_index.shape == (2, e)
    assert g.edge_type.dtype == torch.long and g.edge_type.shape == (e,)
    assert g.edge_index.device == images.device and g.edge_type.device == images.device
    assert edge_set(g) == want and e == len(want)  # same edges, none duplicated
    h_out, w_out = nn.Conv2d(1, 1, **kwargs, padding_mode=mode)(torch.zeros(1, 1, *size)).shape[-2:]
    assert tuple(g.out_size) == (h_out, w_out) and tuple(g.in_size) == size
    assert g.size() == (3 * size[0] * size[1], 3 * h_out * w_out)
    per_target = torch.bincount(g.edge_index[1], minlength=g.num_dst)
    if mode != "zeros":  # every target receives exactly kH*kW messages
        assert bool((per_target == geometry.num_taps).all())
        assert e == 3 * h_out * w_out * geometry.num_taps
    else:
        assert bool((per_target <= geometry.num_taps).all())


@pytest.mark.parametrize("h, w", [(4, 5), (1, 6), (7, 2)])
def test_zeros_padding_edge_count_3x3(h, w):
    """Edges to padded positions are absent: a 3x3 'same' kernel has (3H-2)(3W-2) edges per image."""
    g, _ = graph_of(dict(kernel_size=3, padding=1), "zeros", (h, w), batch=2)
    assert g.edge_index.size(1) == 2 * (3 * h - 2) * (3 * w - 2)


def test_kernel_1_is_self_loops(device):
    images = torch.randn(3, 4, 5, 6, device=device)
    g = image_to_graph(images, kernel_size=1, padding=0)
    n = 3 * 5 * 6
    assert torch.equal(g.edge_index[0], g.edge_index[1])
    assert sorted(g.edge_index[0].tolist()) == list(range(n))
    assert bool((g.edge_type == 0).all()) and bool((g.edge_attr == 0).all())
    g_conv = image_to_graph(images, nn.Conv2d(4, 2, 1))
    assert torch.equal(g_conv.edge_index, g.edge_index)


@pytest.mark.parametrize("kwargs", [dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=(3, 2), stride=(3, 2))])
def test_stride_graph_is_bipartite(kwargs):
    g, _ = graph_of(kwargs, "zeros", (7, 6), batch=2)
    n_src, n_dst = g.size()
    assert n_src == 2 * 7 * 6 and n_dst == 2 * math.prod(g.out_size) and n_dst < n_src
    assert int(g.edge_index[0].max()) < n_src and int(g.edge_index[1].max()) < n_dst
    assert int(g.edge_index.min()) >= 0
    assert set(g.edge_index[1].tolist()) == set(range(n_dst))  # every output pixel is a target
    sh, sw = g.geometry.stride
    h, w = g.in_size
    h_out, w_out = g.out_size
    for j, i, t in edge_set(g):  # a source lies at its target's anchor plus the tap's offset
        (jb, jr), (ib, ir) = divmod(j, h * w), divmod(i, h_out * w_out)
        assert jb == ib  # edges never cross images
        dy, dx = g.geometry.offsets()[t].tolist()
        assert divmod(jr, w) == ((ir // w_out) * sh + dy, (ir % w_out) * sw + dx)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name, kwargs, size", GEOMETRIES[:6], ids=[c[0] for c in GEOMETRIES[:6]])
def test_edge_attr_is_nominal_tap_offset(name, kwargs, size, mode):
    g, images = graph_of(kwargs, mode, size, batch=2, dtype=torch.float32)
    geometry = ConvGeometry.from_keywords(2, **kwargs, padding_mode=mode)
    assert g.edge_attr.shape == (g.edge_index.size(1), 2) and g.edge_attr.dtype == torch.float32
    assert torch.equal(g.edge_attr, geometry.offsets()[g.edge_type].float())


@pytest.mark.parametrize("kwargs", [dict(kernel_size=3, padding="same"), dict(kernel_size=5, padding="same", dilation=2),
                                    dict(kernel_size=(3, 7), padding="same")])
def test_centre_tap_of_same_kernel_has_zero_offset(kwargs):
    g, _ = graph_of(kwargs, "zeros", (6, 7), batch=1)
    kh, kw = g.geometry.kernel_size
    centre = g.edge_type == (kh // 2) * kw + kw // 2
    assert int(centre.sum()) == 6 * 7  # one self-loop per pixel
    assert bool((g.edge_attr[centre] == 0).all())
    assert torch.equal(g.edge_index[0, centre], g.edge_index[1, centre])


def test_node_features_pos_and_batch(device):
    images = torch.randn(3, 4, 5, 6, device=device)
    g = image_to_graph(images, kernel_size=3, padding=1)
    assert g.x.shape == (3 * 5 * 6, 4) and g.x.device == images.device
    for b, h, w in [(0, 0, 0), (1, 2, 3), (2, 4, 5), (2, 0, 5)]:
        node = b * 30 + h * 6 + w
        assert torch.equal(g.x[node], images[b, :, h, w])
        assert g.pos[node].tolist() == [h, w]
    assert g.pos.shape == (90, 2)
    assert torch.equal(g.batch, torch.arange(3, device=device).repeat_interleave(30))
    assert g.num_images == 3 and g.batched
    single = image_to_graph(images[:1], kernel_size=3, padding=1)
    assert torch.equal(single.batch, torch.zeros(single.num_src, dtype=torch.long, device=device))
    assert single.batched and single.num_images == 1
    unbatched = image_to_graph(images[0], kernel_size=3, padding=1)
    assert not unbatched.batched
    assert torch.equal(unbatched.edge_index, single.edge_index)


@pytest.mark.parametrize("mode", MODES)
def test_empty_batch(mode):
    g = image_to_graph(torch.randn(0, 3, 4, 5), kernel_size=3, stride=2, padding=1, padding_mode=mode)
    assert g.x.shape == (0, 3) and g.edge_index.shape == (2, 0) and g.edge_type.shape == (0,)
    assert g.edge_attr.shape == (0, 2) and g.pos.shape == (0, 2)
    assert g.size() == (0, 0) and tuple(g.out_size) == (2, 3) and g.num_images == 0
    assert graph_to_image(torch.randn(0, 7), g, side="output").shape == (0, 7, 2, 3)


def test_geometry_from_conv_or_layer_or_keywords():
    images = torch.randn(2, 3, 7, 6)
    conv = nn.Conv2d(3, 4, (3, 2), stride=2, padding=(1, 0), dilation=(2, 1), padding_mode="circular")
    by_conv = image_to_graph(images, conv)
    by_layer = image_to_graph(images, GridConv2d.from_conv2d(conv))
    by_keywords = image_to_graph(images, kernel_size=(3, 2), stride=2, padding=(1, 0), dilation=(2, 1),
                                 padding_mode="circular")
    for g in (by_layer, by_keywords):
        assert g.geometry == by_conv.geometry
        assert torch.equal(g.edge_index, by_conv.edge_index) and torch.equal(g.edge_type, by_conv.edge_type)


def test_graph_depends_only_on_geometry_and_size():
    """Other pixel values, other weights: the same graph (equal edges, each graph with tensors of its own)."""
    conv_a = nn.Conv2d(3, 4, 3, padding=1)
    conv_b = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    g_a = image_to_graph(torch.randn(2, 3, 5, 5), conv_a)
    g_b = image_to_graph(torch.randn(2, 3, 5, 5) * 100, conv_b)
    g_c = image_to_graph(torch.randn(2, 3, 5, 5), kernel_size=3, padding=1)
    for other in (g_b, g_c):
        assert torch.equal(other.edge_index, g_a.edge_index) and torch.equal(other.edge_type, g_a.edge_type)
        assert other.edge_index.structure == g_a.edge_index.structure
        assert other.edge_index.as_tensor().data_ptr() != g_a.edge_index.as_tensor().data_ptr()
        assert other.edge_type.data_ptr() != g_a.edge_type.data_ptr()


def test_default_keywords_are_3x3_same():
    g = image_to_graph(torch.randn(1, 2, 4, 4))
    assert g.geometry == ConvGeometry.from_keywords(2, 3, 1, 1, 1, "zeros")
    assert tuple(g.out_size) == (4, 4)


# ------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64])
@pytest.mark.parametrize("shape", [(3, 2, 5, 6), (1, 4, 1, 7), (0, 3, 4, 4), (2, 5, 3), (1, 1, 1)])
def test_image_graph_image_is_bit_exact(shape, dtype, device):
    image = (torch.randn(shape, device=device) * 100).to(dtype)
    g = image_to_graph(image, kernel_size=3, stride=2, padding=1)
    back = graph_to_image(g.x, g, side="input")
    assert back.shape == image.shape and back.dtype == image.dtype and back.device == image.device
    assert torch.equal(back, image)
    if len(shape) == 3 or shape[0] != 0:
        assert torch.equal(graph_to_image(g.x, g), image)  # the grid is found from the row count
    else:  # an empty batch fits both grids, and they differ: side is required
        with pytest.raises(ValueError, match="pass side='input' or side='output'"):
            graph_to_image(g.x, g)


def test_round_trip_of_non_contiguous_images():
    base = torch.randn(2, 3, 6, 8)
    for image in (base.to(memory_format=torch.channels_last), base[:, :, ::2, 1::2], base.transpose(2, 3),
                  base[:, [2, 0]]):
        g = image_to_graph(image, kernel_size=3, padding=1)
        assert torch.equal(graph_to_image(g.x, g), image)
        assert torch.equal(g.x, image.permute(0, 2, 3, 1).reshape(-1, image.size(1)))


def test_node_features_are_row_major_and_view_channels_last_images():
    """One NCHW image reshapes to a column-major view; the kernels would copy it at every call (a 7x7
    stem on a 224x224 image: 0.2 ms of a 2.5 ms forward). The graph holds row-major features instead,
    and a channels-last image is not copied at all."""
    for shape in ((1, 3, 16, 12), (3, 16, 12), (2, 3, 16, 12)):
        image = torch.randn(shape)
        g = image_to_graph(image, kernel_size=7, stride=2, padding=3)
        assert g.x.is_contiguous(), shape
        assert torch.equal(graph_to_image(g.x, g, side="input"), image)
    cl = torch.randn(2, 3, 16, 12).to(memory_format=torch.channels_last)
    g = image_to_graph(cl, kernel_size=3, padding=1)
    assert g.x.is_contiguous() and g.x.data_ptr() == cl.data_ptr()


def test_output_side(device):
    images = torch.randn(2, 3, 7, 6, device=device)
    g = image_to_graph(images, kernel_size=3, stride=2, padding=1)
    out = torch.randn(g.num_dst, 5, device=device)
    img = graph_to_image(out, g)  # only the output grid has that many nodes
    assert img.shape == (2, 5, 4, 3)
    assert torch.equal(img, graph_to_image(out, g, side="output"))
    assert torch.equal(img[1, :, 2, 1], out[1 * 12 + 2 * 3 + 1])
    unbatched = image_to_graph(images[0], kernel_size=3, stride=2, padding=1)
    assert graph_to_image(out[:12], unbatched, side="output").shape == (5, 4, 3)


def test_same_grid_needs_no_side():
    g = image_to_graph(torch.randn(2, 3, 4, 5), kernel_size=3, padding="same")
    assert graph_to_image(torch.randn(40, 2), g).shape == (2, 2, 4, 5)


def test_side_is_asked_for_when_both_grids_fit_with_different_shapes():
    # a (2, 1) kernel with padding (0, 1) maps a 3x4 grid to a 2x6 grid: 12 nodes on both sides.
    g = image_to_graph(torch.randn(1, 2, 3, 4), kernel_size=(2, 1), padding=(0, 1))
    assert tuple(g.in_size) == (3, 4) and tuple(g.out_size) == (2, 6)
    x = torch.randn(12, 2)
    with pytest.raises(ValueError, match=r"fits both the input grid \(3, 4\) and the output grid \(2, 6\).*side="):
        graph_to_image(x, g)
    assert graph_to_image(x, g, side="input").shape == (1, 2, 3, 4)
    assert graph_to_image(x, g, side="output").shape == (1, 2, 2, 6)


# ------------------------------------------------------------------------------- networkx
def test_to_networkx_same_grid():
    g = image_to_graph(torch.randn(1, 2, 3, 4), kernel_size=3, padding=1)
    nxg = to_networkx(g)
    assert nxg.number_of_nodes() == 12 and nxg.number_of_edges() == g.edge_index.size(1)
    assert nxg.nodes[6]["pixel"] == (1, 2) and nxg.nodes[6]["pos"] == (2, -1) and nxg.nodes[6]["side"] == "input"
    offsets = g.geometry.offsets().tolist()
    for j, i, data in nxg.edges(data=True):
        assert tuple(offsets[data["tap"]]) == tuple(data["offset"])
        (jr, jc), (ir, ic) = divmod(j, 4), divmod(i, 4)
        assert (jr - ir, jc - ic) == tuple(data["offset"])


def test_to_networkx_strided_has_output_nodes():
    g = image_to_graph(torch.randn(1, 2, 5, 5), kernel_size=3, stride=2, padding=1)
    nxg = to_networkx(g)
    outputs = [n for n, d in nxg.nodes(data=True) if d["side"] == "output"]
    assert len(outputs) == 9 and nxg.number_of_nodes() == 25 + 9
    assert nxg.number_of_edges() == g.edge_index.size(1)
    assert all(i >= 25 for _, i in nxg.edges())


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_to_networkx_keeps_every_edge(mode):
    """Non-zero padding joins some pixel pairs through several taps; the export keeps each of them."""
    g = image_to_graph(torch.randn(1, 1, 3, 3), kernel_size=3, padding=1, padding_mode=mode)
    nxg = to_networkx(g)
    assert nxg.number_of_edges() == g.edge_index.size(1) == 81
    taps = sorted((j, i, d["tap"]) for j, i, d in nxg.edges(data=True))
    assert taps == sorted(edge_set(g))


# ------------------------------------------------------------------------------- cache and tables
def test_every_graph_owns_its_tensors():
    """Two calls give equal graphs that share no storage with each other or with the cache."""
    clear_cache()
    images = torch.randn(2, 3, 6, 5)
    g1 = image_to_graph(images, kernel_size=3, padding=1, padding_mode="reflect")
    g2 = image_to_graph(images.clone(), kernel_size=3, padding=1, padding_mode="reflect")
    for a, b in ((g1.edge_index.as_tensor(), g2.edge_index.as_tensor()), (g1.edge_type, g2.edge_type),
                 (g1.edge_attr, g2.edge_attr), (g1.pos, g2.pos)):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    t1 = neighbour_table(g1.geometry, (6, 5))
    t2 = neighbour_table(g1.geometry, (6, 5))
    assert torch.equal(t1.index, t2.index) and t1.index.data_ptr() != t2.index.data_ptr()
    assert torch.equal(g1.table.index, t1.index) and g1.table.index.data_ptr() != t1.index.data_ptr()


def test_edits_never_reach_other_graphs_or_the_cache():
    """In-place edits, also through aliases that skip the version counter (.data, numpy), stay in their graph."""
    clear_cache()
    images = torch.randn(2, 3, 4, 4)
    g1 = image_to_graph(images, kernel_size=3, padding=1)
    want_index, want_type = g1.edge_index.as_tensor().clone(), g1.edge_type.clone()
    g1.edge_index[0].zero_()
    g1.edge_type.data.fill_(4)  # .data: an alias that shares the version counter
    with pytest.raises(ValueError, match="read-only"):
        g1.edge_type.numpy()[:] = 7  # numpy would skip the version counter: read-only
    with pytest.raises(ValueError, match="read-only"):
        g1.edge_index.numpy()[0, 0] = 3  # the edge list's numpy view is read-only
    g2 = image_to_graph(images, kernel_size=3, padding=1)
    assert torch.equal(g2.edge_index, want_index) and torch.equal(g2.edge_type, want_type)
    table = neighbour_table(g2.geometry, (4, 4))
    want_table = table.index.clone()
    table.index.fill_(0)
    assert torch.equal(neighbour_table(g2.geometry, (4, 4)).index, want_table)
    assert torch.equal(image_to_graph(images, kernel_size=3, padding=1).edge_index, want_index)
    clear_cache()


def test_layer_does_not_trust_an_edited_pixel_graph():
    """After an in-place edit the edges mean something else; the layer computes on the edited edges."""
    clear_cache()
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    layer = GridConv2d.from_conv2d(conv)
    images = torch.randn(2, 2, 4, 5, dtype=torch.float64)
    g = image_to_graph(images, conv)
    assert pixel_structure(g.edge_index) is not None
    edited_type = g.edge_type
    edited_type[::2] = 4  # every other message now uses the centre tap's weight
    assert pixel_structure(g.edge_index) is None
    with kernel_trace() as trace:
        got = layer(g.x, g.edge_index, edited_type, size=g.size())
        want = layer(g.x, g.edge_index.as_tensor().clone(), edited_type.clone(), size=g.size())  # the general path
    assert trace == ["edges", "edges"]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(graph_to_image(got, image_to_graph(images, conv)), conv(images))
    edited_index = image_to_graph(images, conv).edge_index
    edited_index[0] = edited_index[0].flip(0)
    assert pixel_structure(edited_index) is None
    clear_cache()


@pytest.mark.parametrize("mode", MODES)
def test_neighbour_table_is_the_edge_list(mode, device):
    geometry = ConvGeometry.from_keywords(2, (3, 2), stride=(2, 1), padding=(1, 1), padding_mode=mode)
    table = neighbour_table(geometry, (5, 4), device)
    assert table.index.device.type == device.type and table.index.dtype == torch.long
    assert table.index.shape == (table.num_dst, geometry.num_taps) == (3 * 5, 6)
    assert table.complete == (mode != "zeros") and table.complete == bool((table.index >= 0).all())
    dst, tap = (table.index >= 0).nonzero(as_tuple=True)
    from_table = set(zip(table.index[dst, tap].tolist(), dst.tolist(), tap.tolist()))
    assert from_table == reference_edges(dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 1)), mode, (5, 4), 1)


def test_cache_is_per_device(device):
    geometry = ConvGeometry.from_keywords(2, 3, padding=1)
    cpu = neighbour_table(geometry, (3, 3), "cpu")
    here = neighbour_table(geometry, (3, 3), device)
    assert torch.equal(cpu.index, here.index.cpu()) and here.index.device.type == device.type
    from gridgraph.structure import cached_table
    assert (cached_table(geometry, (3, 3), "cpu") is cached_table(geometry, (3, 3), device)) == (device.type == "cpu")


def test_pyg_batching_of_pixel_graphs():
    """Two strided pixel graphs collated by PyG are one pixel graph: targets offset by the output node count,
    the table kernels run, and graph_to_image gives the stacked images."""
    from torch_geometric.data import Batch

    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, padding_mode="reflect").double()
    layer = GridConv2d.from_conv2d(conv)
    a, b = torch.randn(1, 2, 5, 4, dtype=torch.float64), torch.randn(2, 2, 5, 4, dtype=torch.float64)
    ga, gb = image_to_graph(a, conv), image_to_graph(b, conv)
    batch = Batch.from_data_list([ga, gb])
    assert isinstance(batch.edge_index, PixelEdgeIndex)
    assert batch.size() == (ga.num_src + gb.num_src, ga.num_dst + gb.num_dst)
    assert int(batch.edge_index[1].max()) == ga.num_dst + gb.num_dst - 1
    with kernel_trace() as trace:
        out = layer(batch.x, batch.edge_index, batch.edge_type, size=batch.size())
    assert trace == ["grid"]
    torch.testing.assert_close(graph_to_image(out, batch), conv(torch.cat([a, b])), rtol=1e-10, atol=1e-10)

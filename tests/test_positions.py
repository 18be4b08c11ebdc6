"""Convolution weights on point positions (``positions_to_graph``).

References: on the lattice (or jittered by less than a quarter spacing) the masked pixel graph of the
points' cells (``image_to_graph(..., mask=...)``) and ``nn.Conv2d`` on the rasterised image read at the
points; off the lattice a direct O(N^2) reference written here from the rule alone (every pair's
``delta``, its nearest tap, the reduction of each tap's points, one einsum), forward and gradients.
"""
from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch_geometric.data import Batch

import gridgraph.positions as positions_module
from gridgraph import GridConv1d, GridConv2d, GridConv3d, PointGraph, graph_to_image, image_to_graph, positions_to_graph
from gridgraph.domains import masked_grid_to_graph
from gridgraph.geometry import ConvGeometry
from gridgraph.nn.functional import kernel_trace
from gridgraph.pixel_graph import PixelEdgeIndex
from _conv_reference import randomise_

F64 = dict(rtol=0, atol=1e-10)

# Conv2d keyword arguments whose outputs sit on the input grid (stride 1, 'same'-like padding, zeros).
CONFIGS = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=5, padding=2, groups=2),
    dict(kernel_size=3, padding=2, dilation=2),
    dict(kernel_size=(3, 5), padding="same", dilation=(1, 2), bias=False),
    dict(kernel_size=2, padding="same"),  # asymmetric: offsets {0, 1}
    dict(kernel_size=(1, 3), padding=(0, 1)),
]


def make_conv(kwargs, c_in=4, c_out=6, dtype=torch.float64, device="cpu", seed=0, cls=nn.Conv2d):
    torch.manual_seed(seed)
    conv = cls(c_in, c_out, **kwargs).to(device=device, dtype=dtype)
    return randomise_(conv, torch.Generator().manual_seed(seed + 1))


def lattice_points(mask: torch.Tensor, spacing, jitter: float, seed: int = 0):
    """The active cells of ``mask`` ``(*grid)`` row-major, and positions on them jittered by ``< jitter``."""
    cells = mask.nonzero()
    gen = torch.Generator().manual_seed(seed)
    noise = (torch.rand(cells.shape, generator=gen, dtype=torch.float64) * 2 - 1) * jitter
    step = torch.tensor(spacing if isinstance(spacing, tuple) else (spacing,) * cells.size(1), dtype=torch.float64)
    return cells, ((cells.double() + noise) * step).to(mask.device)


def offsets_of(conv) -> torch.Tensor:
    """``[T, ndim]`` the tap offsets ``u*d - pad_before`` of ``conv``, row-major over the kernel (the reference's own)."""
    geometry = ConvGeometry.from_module(conv)  # only for the resolved 'same' padding amounts
    axes = [torch.arange(k) * d - lo for k, d, (lo, _) in zip(geometry.kernel_size, geometry.dilation, geometry.padding)]
    return torch.stack([g.reshape(-1) for g in torch.meshgrid(*axes, indexing="ij")], 1)


def dense_reference(pos, x, conv, spacing=1.0, reduce="sum", batch=None):
    """Outputs on the points by the rule itself, O(N^2): per pair the nearest offset ``floor(delta + 1/2)``,
    per (target, tap) the reduction of its points, then ``sum_t W_t (reduced x)`` + bias."""
    n, ndim = pos.shape
    step = torch.as_tensor(spacing, dtype=torch.float64).expand(ndim).to(pos.device)
    delta = (pos.double()[None, :, :] - pos.double()[:, None, :]) / step  # [i, j, ndim]: source j, target i
    nearest = torch.floor(delta + 0.5)
    same_image = torch.ones(n, n, dtype=torch.bool, device=pos.device) if batch is None else batch[:, None] == batch[None]
    offsets = offsets_of(conv).to(pos.device)
    weights = conv.weight.reshape(conv.out_channels, conv.in_channels // conv.groups, -1)
    out = torch.zeros(n, conv.out_channels, dtype=x.dtype, device=x.device)
    groups, c_in_g, c_out_g = conv.groups, conv.in_channels // conv.groups, conv.out_channels // conv.groups
    for t, offset in enumerate(offsets):
        hit = (nearest == offset.to(nearest)).all(-1) & same_image  # [i, j]
        a = hit.to(x.dtype)
        if reduce == "mean":
            a = a / a.sum(1, keepdim=True).clamp(min=1)
        elif reduce == "nearest":
            distance = ((delta - offset.to(delta)) ** 2).sum(-1)
            a = torch.zeros_like(a)
            for i in range(n):
                js = hit[i].nonzero().flatten().tolist()
                if js:
                    a[i, min(js, key=lambda j: (float(distance[i, j]), j != i, j))] = 1
        mixed = a @ x  # [i, C_in]: the reduced features on tap t of every target
        for g in range(groups):
            w = weights[g * c_out_g:(g + 1) * c_out_g, :, t]
            out[:, g * c_out_g:(g + 1) * c_out_g] += mixed[:, g * c_in_g:(g + 1) * c_in_g] @ w.t()
    return out if conv.bias is None else out + conv.bias


def run(layer, g, x=None):
    with kernel_trace() as trace:
        out = layer(g.x if x is None else x, g.edge_index, g.edge_type, size=g.size())
    assert trace == ["sparse"], f"the plain call took {trace}, not the per-tap edge kernels of the graph"
    return out


# ------------------------------------------------------------------------------ on the lattice
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")  # the reference's, not ours
@pytest.mark.parametrize("kwargs", CONFIGS, ids=str)
@pytest.mark.parametrize("spacing", [1.0, 0.37, (2.0, 0.5)], ids=str)
@pytest.mark.parametrize("jitter", [0.0, 0.2499])
def test_on_the_lattice_it_is_the_masked_pixel_graph(kwargs, spacing, jitter, device):
    conv = make_conv(kwargs, device=device)
    layer = GridConv2d.from_conv2d(conv)
    gen = torch.Generator().manual_seed(3)
    image = torch.randn(4, 9, 11, generator=gen, dtype=torch.float64).to(device)
    mask = (torch.rand(9, 11, generator=gen) < 0.45).to(device)
    cells, pos = lattice_points(mask, spacing, jitter)
    features = image[:, cells[:, 0], cells[:, 1]].t()
    masked = image_to_graph(image, conv, mask=mask)
    for reduce in ("sum", "mean", "nearest"):  # one point per tap of a target: the three coincide
        g = positions_to_graph(pos, features, conv, spacing=spacing, reduce=reduce, size=(9, 11))
        assert isinstance(g, PointGraph) and isinstance(g.edge_index, PixelEdgeIndex)
        assert g.size() == masked.size()
        assert torch.equal(g.edge_index.as_tensor(), masked.edge_index.as_tensor())
        assert torch.equal(g.edge_type, masked.edge_type)
        assert torch.equal(g.cells, cells) and torch.equal(g.in_keys, masked.in_keys)
        assert torch.equal(g.mask, mask)
        out = run(layer, g)
        torch.testing.assert_close(out, run(layer, masked), **F64)
        reference = conv(image * mask)[:, cells[:, 0], cells[:, 1]].t()
        torch.testing.assert_close(out, reference, **F64)
        torch.testing.assert_close(graph_to_image(out, g), conv(image * mask) * mask, **F64)


@pytest.mark.parametrize("kwargs", CONFIGS[:3], ids=str)
def test_on_the_lattice_gradients_equal_conv2d(kwargs, device):
    conv = make_conv(kwargs, device=device)
    layer = GridConv2d.from_conv2d(conv)
    gen = torch.Generator().manual_seed(5)
    image = torch.randn(4, 8, 10, generator=gen, dtype=torch.float64).to(device)
    mask = (torch.rand(8, 10, generator=gen) < 0.5).to(device)
    cells, pos = lattice_points(mask, 1.0, 0.24, seed=1)
    upstream = torch.randn(cells.size(0), 6, generator=gen, dtype=torch.float64).to(device)
    xr = image.clone().requires_grad_(True)
    ref = conv(xr * mask)[:, cells[:, 0], cells[:, 1]].t()
    ref_grads = torch.autograd.grad(ref, [xr, conv.weight, conv.bias], upstream)
    features = image[:, cells[:, 0], cells[:, 1]].t().clone().requires_grad_(True)
    g = positions_to_graph(pos, features, layer)
    grads = torch.autograd.grad(run(layer, g), [features, layer.weight, layer.bias], upstream)
    torch.testing.assert_close(grads[0], ref_grads[0][:, cells[:, 0], cells[:, 1]].t(), **F64)
    torch.testing.assert_close(grads[1], ref_grads[1], **F64)
    torch.testing.assert_close(grads[2], ref_grads[2], **F64)


def test_float32_on_the_lattice(device):
    conv = make_conv(dict(kernel_size=3, padding=1), c_in=8, c_out=16, dtype=torch.float32, device=device)
    layer = GridConv2d.from_conv2d(conv)
    gen = torch.Generator().manual_seed(2)
    image = torch.randn(8, 16, 16, generator=gen).to(device)
    mask = (torch.rand(16, 16, generator=gen) < 0.6).to(device)
    cells, pos = lattice_points(mask, 0.5, 0.2)
    g = positions_to_graph(pos.float(), image[:, cells[:, 0], cells[:, 1]].t(), conv, spacing=0.5)
    reference = conv(image * mask)[:, cells[:, 0], cells[:, 1]].t()
    scale = reference.abs().max().item()
    torch.testing.assert_close(run(layer, g), reference, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("ndim", [1, 3])
def test_other_dimensions_on_the_lattice(ndim):
    cls, layer_cls = {1: (nn.Conv1d, GridConv1d), 3: (nn.Conv3d, GridConv3d)}[ndim]
    conv = make_conv(dict(kernel_size=3, padding=1), c_in=3, c_out=4, cls=cls)
    layer = layer_cls.from_conv1d(conv) if ndim == 1 else layer_cls.from_conv3d(conv)
    grid = {1: (40,), 3: (5, 6, 4)}[ndim]
    gen = torch.Generator().manual_seed(4)
    image = torch.randn(3, *grid, generator=gen, dtype=torch.float64)
    mask = torch.rand(grid, generator=gen) < 0.5
    cells, pos = lattice_points(mask, 1.5, 0.2)
    features = image[(slice(None), *cells.t())].t()
    g = positions_to_graph(pos, features, conv, spacing=1.5)
    masked = masked_grid_to_graph(image, ConvGeometry.from_module(conv), mask)
    assert torch.equal(g.edge_index.as_tensor(), masked.edge_index.as_tensor())
    assert torch.equal(g.edge_type, masked.edge_type)
    torch.testing.assert_close(run(layer, g), conv(image * mask)[(slice(None), *cells.t())].t(), **F64)


# ------------------------------------------------------------------------------ off the lattice
def irregular_points(n, extent, seed, device, quarter=False):
    """Random points in ``[0, extent)^2``, many sharing taps; ``quarter``: on multiples of 1/4 (every
    half-spacing boundary is hit exactly), with some points repeated."""
    gen = torch.Generator().manual_seed(seed)
    pos = torch.rand(n, 2, generator=gen, dtype=torch.float64) * extent
    if quarter:
        pos = torch.round(pos * 4) / 4
        pos[-3:] = pos[:3]  # coincident points
    return pos.to(device)


@pytest.mark.parametrize("reduce", ["sum", "mean", "nearest"])
@pytest.mark.parametrize("kwargs", [CONFIGS[0], CONFIGS[2], CONFIGS[3], CONFIGS[1]], ids=str)
def test_irregular_points_equal_the_direct_reference(reduce, kwargs, device):
    conv = make_conv(kwargs, device=device)
    layer = GridConv2d.from_conv2d(conv)
    gen = torch.Generator().manual_seed(7)
    for spacing, quarter in ((1.0, True), (0.8, False)):
        pos = irregular_points(70, 5.0, seed=11, device=device, quarter=quarter)
        features = torch.randn(70, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
        g = positions_to_graph(pos, features, conv, spacing=spacing, reduce=reduce)
        slots = g.edge_index.as_tensor()[1] * g.geometry.num_taps + g.edge_type
        shared = torch.unique(slots).numel() < slots.numel()
        assert shared == (reduce == "sum")  # parallel edges of one tap: 'sum' only, and this set has them
        assert (g.size(0) > g.size(1)) == (reduce == "mean")  # virtual nodes: 'mean' only
        out = run(layer, g)
        upstream = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device)
        params = [features, layer.weight] + ([layer.bias] if layer.bias is not None else [])
        grads = torch.autograd.grad(out, params, upstream)
        ref = dense_reference(pos, features, conv, spacing, reduce)
        ref_params = [features, conv.weight] + ([conv.bias] if conv.bias is not None else [])
        ref_grads = torch.autograd.grad(ref, ref_params, upstream)
        torch.testing.assert_close(out, ref, **F64)
        for mine, theirs in zip(grads, ref_grads):
            torch.testing.assert_close(mine, theirs, **F64)


@given(n=st.integers(1, 40), kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
       dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)), spacing=st.sampled_from([0.5, 1.0, 1.25]),
       reduce=st.sampled_from(["sum", "mean", "nearest"]), seed=st.integers(0, 2 ** 16))
def test_property_any_points_any_kernel_equal_the_direct_reference(n, kernel, dilation, spacing, reduce, seed):
    """Random point sets (on multiples of 1/8: exact half-spacing boundaries and coincident points happen)
    and kernels, odd or even, dilated or not."""
    conv = make_conv(dict(kernel_size=kernel, dilation=dilation, padding="same"), c_in=2, c_out=3, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 24, (n, 2), generator=gen).double() / 8 * spacing
    features = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    g = positions_to_graph(pos, features, conv, spacing=spacing, reduce=reduce)
    out = run(GridConv2d.from_conv2d(conv), g)
    torch.testing.assert_close(out, dense_reference(pos, features, conv, spacing, reduce), **F64)


def test_two_layers_with_mean_read_the_virtual_nodes_again():
    conv1, conv2 = make_conv(CONFIGS[0], 4, 6, seed=1), make_conv(CONFIGS[0], 6, 3, seed=2)
    layer1, layer2 = GridConv2d.from_conv2d(conv1), GridConv2d.from_conv2d(conv2)
    pos = irregular_points(60, 4.0, seed=3, device="cpu")
    features = torch.randn(60, 4, dtype=torch.float64)
    g = positions_to_graph(pos, features, conv1, reduce="mean")
    hidden = run(layer1, g)
    out = run(layer2, g, g.source_features(hidden))
    ref = dense_reference(pos, dense_reference(pos, features, conv1, reduce="mean"), conv2, reduce="mean")
    torch.testing.assert_close(out, ref, **F64)
    assert g.size(0) > g.size(1)  # virtual nodes
    torch.testing.assert_close(g.source_features(features), g.x, rtol=0, atol=0)


def test_edges_follow_the_rule_at_the_half_spacing_boundaries():
    """Every pair joins by ``floor(delta + 1/2)`` on every axis: brute force over all pairs, positions on
    multiples of 1/4 so that ``delta`` lands exactly on ``+-1/2``, ``+-3/2`` boundaries."""
    conv = make_conv(dict(kernel_size=3, padding=1))
    pos = irregular_points(80, 4.0, seed=9, device="cpu", quarter=True)
    g = positions_to_graph(pos, torch.zeros(80, 4, dtype=torch.float64), conv)
    delta = pos[None, :, :] - pos[:, None, :]  # [i, j]
    nearest = torch.floor(delta + 0.5).long()
    offsets = offsets_of(conv)
    want = set()
    for i in range(80):
        for j in range(80):
            hit = (offsets == nearest[i, j]).all(1).nonzero().flatten().tolist()
            want |= {(j, i, t) for t in hit}
    got = set(zip(*g.edge_index.as_tensor().tolist(), g.edge_type.tolist()))
    assert got == want
    assert bool((delta.abs() == 0.5).any()) and bool((delta.abs() == 1.5).any())  # the boundaries are hit
    order = (g.edge_index.as_tensor()[1] * 9 + g.edge_type) * 80 + g.edge_index.as_tensor()[0]
    assert bool((order[1:] > order[:-1]).all())  # target-major, taps ascending, sources ascending


def test_nearest_keeps_the_closest_point_and_breaks_ties_as_documented():
    #  target 0 at the origin; tap (0, +1) holds points 1 (delta 0.8) and 2 (delta 1.1): 2 is nearer.
    #  point 3 coincides with 0: on 0's centre both are at distance 0, the target itself wins; on 3's centre too.
    #  points 4 and 5 at (0, -0.8) and (0, -1.2): equally near tap (0, -1) of 0 -> the lower index, 4.
    pos = torch.tensor([[0.0, 0.0], [0.0, 0.8], [0.0, 1.1], [0.0, 0.0], [0.0, -0.75], [0.0, -1.25]],
                       dtype=torch.float64)
    g = positions_to_graph(pos, torch.zeros(6, 1, dtype=torch.float64), reduce="nearest")
    edges = {(int(i), int(t)): int(j) for j, i, t in zip(*g.edge_index.as_tensor(), g.edge_type)}
    assert edges[(0, 5)] == 2 and edges[(0, 4)] == 0 and edges[(3, 4)] == 3 and edges[(0, 3)] == 4
    assert g.table.index[0].tolist() == [-1, -1, -1, 4, 0, 2, -1, -1, -1]
    g_sum = positions_to_graph(pos, torch.zeros(6, 1, dtype=torch.float64), reduce="sum")
    with pytest.raises(ValueError, match="several points share a tap of one target"):
        g_sum.table


# ------------------------------------------------------------------------------ batches
@pytest.mark.parametrize("reduce", ["sum", "mean", "nearest"])
def test_a_batch_vector_keeps_images_apart(reduce, device):
    conv = make_conv(CONFIGS[0], device=device)
    layer = GridConv2d.from_conv2d(conv)
    gen = torch.Generator().manual_seed(1)
    a, b = irregular_points(40, 4.0, 1, device), irregular_points(30, 4.0, 2, device)  # overlapping regions
    xa = torch.randn(40, 4, generator=gen, dtype=torch.float64).to(device)
    xb = torch.randn(30, 4, generator=gen, dtype=torch.float64).to(device)
    batch = torch.cat([torch.zeros(40, dtype=torch.long), torch.ones(30, dtype=torch.long)]).to(device)
    g = positions_to_graph(torch.cat([a, b]), torch.cat([xa, xb]), conv, reduce=reduce, batch=batch)
    assert g.num_images == 2 and g.batched
    out = run(layer, g)
    ref = dense_reference(torch.cat([a, b]), torch.cat([xa, xb]), conv, reduce=reduce, batch=batch)
    torch.testing.assert_close(out, ref, **F64)
    torch.testing.assert_close(out[:40], dense_reference(a, xa, conv, reduce=reduce), **F64)


def test_a_batch_vector_on_the_lattice_is_the_batched_masked_graph():
    conv = make_conv(CONFIGS[0])
    gen = torch.Generator().manual_seed(8)
    images = torch.randn(3, 4, 7, 9, generator=gen, dtype=torch.float64)
    mask = torch.rand(3, 7, 9, generator=gen) < 0.5
    cells, pos = lattice_points(mask, 1.0, 0.2)  # (image, row, col), row-major image by image
    g = positions_to_graph(pos[:, 1:], images[cells[:, 0], :, cells[:, 1], cells[:, 2]], conv,
                           batch=cells[:, 0], size=(7, 9))
    masked = image_to_graph(images, conv, mask=mask)
    assert torch.equal(g.edge_index.as_tensor(), masked.edge_index.as_tensor())
    assert torch.equal(g.edge_type, masked.edge_type) and torch.equal(g.in_keys, masked.in_keys)
    out = run(GridConv2d.from_conv2d(conv), g)
    torch.testing.assert_close(graph_to_image(out, g), conv(images * mask[:, None]) * mask[:, None], **F64)


@pytest.mark.parametrize("reduce", ["sum", "mean", "nearest"])
def test_pyg_batches_clone_move_and_save(reduce, device):
    conv = make_conv(CONFIGS[0], device=device)
    layer = GridConv2d.from_conv2d(conv)
    gen = torch.Generator().manual_seed(6)
    graphs, refs, points = [], [], []
    for k, n in enumerate((50, 35)):
        pos = irregular_points(n, 4.0, 20 + k, device)
        x = torch.randn(n, 4, generator=gen, dtype=torch.float64).to(device)
        graphs.append(positions_to_graph(pos, x, conv, reduce=reduce))
        refs.append(dense_reference(pos, x, conv, reduce=reduce))
        points.append(x)
    batch = Batch.from_data_list(graphs)
    assert isinstance(batch, PointGraph) and isinstance(batch.edge_index, PixelEdgeIndex)
    with kernel_trace() as trace:
        out = layer(batch.x, batch.edge_index, batch.edge_type, size=batch.size())
    assert trace == ["sparse", "sparse"]
    torch.testing.assert_close(out, torch.cat(refs), **F64)
    torch.testing.assert_close(batch.source_features(torch.cat(points)), batch.x, rtol=0, atol=1e-14)
    second = torch.randn(85, 4, generator=gen, dtype=torch.float64).to(device)
    torch.testing.assert_close(batch.source_features(second),
                               torch.cat([graphs[0].source_features(second[:50]),
                                          graphs[1].source_features(second[50:])]), rtol=0, atol=1e-14)
    again = batch.to_data_list()[1]
    torch.testing.assert_close(run(layer, again), refs[1], **F64)
    for copy in (graphs[0].clone(), graphs[0].to(device), _saved(graphs[0])):
        assert isinstance(copy, PointGraph) and isinstance(copy.edge_index, PixelEdgeIndex)
        torch.testing.assert_close(run(layer, copy), refs[0], **F64)


def _saved(graph):
    buffer = io.BytesIO()
    torch.save(graph, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)  # a PyG Data pickles its stores (as tests/test_pyg_workflow.py)


# ------------------------------------------------------------------------------ construction
def test_dense_map_search_and_chunks_build_the_same_graph(monkeypatch):
    pos = irregular_points(300, 12.0, seed=4, device="cpu", quarter=True)
    features = torch.zeros(300, 1, dtype=torch.float64)
    batch = torch.arange(300) % 2
    built = {}
    for name, patch in (("dense", {}), ("search", {"DENSE_MAP_LIMIT": 0, "_DENSE_PER_POINT": 0}),
                        ("chunks", {"_LOOKUPS_PER_CHUNK": 100})):
        with monkeypatch.context() as m:
            for attr, value in patch.items():
                m.setattr(positions_module, attr, value)
            for reduce in ("sum", "mean", "nearest"):
                g = positions_to_graph(pos, features, reduce=reduce, dilation=2, padding=2, batch=batch)
                built[name, reduce] = (g.edge_index.as_tensor(), g.edge_type, g.pool_index)
    for (name, reduce), got in built.items():
        for a, b in zip(got, built["dense", reduce]):
            assert torch.equal(a, b), (name, reduce)


def test_far_apart_points_take_the_search_path():
    """Points spread over a huge box: the cell map would be enormous; binary search needs memory ~ N."""
    pos = torch.tensor([[0.0, 0.0], [0.4, 0.6], [1e9, -3e9], [1e9 + 1, -3e9]], dtype=torch.float64)
    g = positions_to_graph(pos, torch.ones(4, 1, dtype=torch.float64))
    assert g.edge_index.size(1) == 8 and g.in_size == (1_000_000_002, 3_000_000_002)
    assert sorted(zip(*g.edge_index.as_tensor().tolist())) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 2), (2, 3),
                                                                (3, 2), (3, 3)]


def test_a_large_point_set_builds_in_memory_that_grows_with_the_points():
    """200k points: an N^2 matrix would need 40 billion entries; the grid hashing never forms one. A jittered
    H x W lattice, shuffled, has exactly (3H - 2)(3W - 2) edges for a 3 x 3 kernel."""
    h, w = 400, 500
    gen = torch.Generator().manual_seed(0)
    cells = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).view(-1, 2)
    cells = cells[torch.randperm(h * w, generator=gen)]
    pos = (cells + (torch.rand(h * w, 2, generator=gen) - 0.5) * 0.49) * 0.1
    g = positions_to_graph(pos, torch.zeros(h * w, 1), spacing=0.1)
    assert g.edge_index.size(1) == (3 * h - 2) * (3 * w - 2)
    assert torch.equal(g.cells, cells)
    counts = torch.bincount(g.edge_index.as_tensor()[1], minlength=h * w)
    assert int(counts.max()) == 9 and int(counts.min()) == 4  # interior points see 9 taps, corners 4


def test_empty_and_integer_positions():
    g = positions_to_graph(torch.zeros(0, 2), torch.zeros(0, 3))
    assert g.size() == (0, 0) and g.edge_index.size(1) == 0
    layer = GridConv2d(3, 2, 3, padding=1)
    assert layer(g.x, g.edge_index).shape == (0, 2)
    g = positions_to_graph(torch.tensor([[0, 0], [0, 1]]), torch.ones(2, 3))
    assert g.pos.dtype == torch.get_default_dtype() and g.edge_index.size(1) == 4


# ------------------------------------------------------------------------------ errors
BAD = [
    (dict(pos=[[0.0, 0.0]]), TypeError, r"pos must be a torch.Tensor of positions \(got list\)"),
    (dict(pos=torch.zeros(2, 2, dtype=torch.bool)), TypeError, r"pos must hold real numbers.*torch.bool"),
    (dict(pos=torch.zeros(2)), ValueError, r"expected pos of shape \[N, ndim\].*\(got \(2,\)\)"),
    (dict(pos=torch.tensor([[0.0, 0.0], [float("nan"), 1.0]])), ValueError, r"pos must be finite \(got \[nan, 1.0\] at point 1\)"),
    (dict(features=torch.zeros(3, 4)), ValueError, r"expected features of shape \[2, C\].*\(got \(3, 4\)\)"),
    (dict(features=[[0.0]]), TypeError, r"features must be a torch.Tensor \(got list\)"),
    (dict(spacing=0.0), ValueError, r"spacing must be a positive finite number.*\(got 0.0\)"),
    (dict(spacing=-1), ValueError, r"spacing must be a positive finite number.*\(got -1\)"),
    (dict(spacing=(1.0, 2.0, 3.0)), ValueError, r"spacing must be .* a sequence of 2 \(got \(1.0, 2.0, 3.0\)\)"),
    (dict(spacing="1"), TypeError, r"spacing must be a positive number or a sequence of 2 \(got '1'\)"),
    (dict(reduce="max"), ValueError, r"reduce must be one of \('sum', 'mean', 'nearest'\) \(got 'max'\)"),
    (dict(stride=2, padding=1), ValueError, r"stride must be 1.*\(got stride=\(2, 2\)\)"),
    (dict(padding_mode="reflect"), ValueError, r"padding_mode must be 'zeros'.*\(got padding_mode='reflect'\)"),
    (dict(padding=0), ValueError, r"padding must keep the grid.*\(got padding=\(\(0, 0\), \(0, 0\)\) for kernel_size=\(3, 3\)"),
    (dict(conv=nn.Conv1d(4, 2, 3, padding=1)), ValueError, r"conv is a 1-d convolution; expected a 2-d one"),
    (dict(conv=nn.Conv2d(3, 2, 3, padding=1)), ValueError, r"expected features with 3 channels for Conv2d \(got 4\)"),
    (dict(conv=nn.ConvTranspose2d(4, 2, 3)), TypeError, r"not a transposed one \(got ConvTranspose2d\)"),
    (dict(conv=nn.Conv2d(4, 2, 3, stride=2, padding=1)), ValueError, r"stride must be 1"),
    (dict(batch=torch.zeros(2)), TypeError, r"batch must be a torch.int64 tensor.*\(got dtype torch.float32\)"),
    (dict(batch=torch.zeros(3, dtype=torch.long)), ValueError, r"expected batch of shape \[2\].*\(got \(3,\)\)"),
    (dict(batch=torch.tensor([0, -1])), ValueError, r"batch entries must be non-negative.*\(got -1\)"),
    (dict(batch=torch.tensor([0, 3]), num_images=2), ValueError, r"num_images must be an int of at least .* \(4\) \(got 2\)"),
    (dict(num_images=2), ValueError, r"num_images=2 needs a batch vector"),
    (dict(size=(1, 1)), ValueError, r"cells must lie inside size=\(1, 1\) \(got cells from \[0, 0\] to \[0, 1\]\)"),
    (dict(size=(4,)), ValueError, r"size must be a tuple of 2 positive ints.*\(got \(4,\)\)"),
    (dict(features=torch.zeros(2, 4, dtype=torch.long), reduce="mean"), TypeError, r"reduce='mean' needs floating-point features \(got dtype torch.int64\)"),
    (dict(pos=torch.tensor([[0.0, 1e300], [0.0, 0.0]], dtype=torch.float64)), ValueError, r"pos / spacing must lie within \+-2\*\*50"),
]


@pytest.mark.parametrize("changes, error, message", BAD, ids=[m[:40] for _, _, m in BAD])
def test_bad_input_is_refused_with_a_clear_message(changes, error, message):
    args = dict(pos=torch.tensor([[0.0, 0.0], [0.0, 1.0]]), features=torch.zeros(2, 4), conv=None)
    args.update(changes)
    pos, features, conv = args.pop("pos"), args.pop("features"), args.pop("conv")
    with pytest.raises(error, match=message):
        positions_to_graph(pos, features, conv, **args)


def test_graph_to_image_refuses_points_that_share_a_cell():
    g = positions_to_graph(torch.tensor([[0.0, 0.0], [0.2, 0.1], [2.0, 2.0]]), torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"several points share the cell \[0, 0\] of image 0"):
        graph_to_image(g.x, g)
    with pytest.raises(ValueError, match=r"expected y of shape \[3, C\], one row per point \(got \(2, 2\)\)"):
        g.source_features(torch.ones(2, 2))


def test_negative_positions_rasterise_from_the_smallest_cell():
    pos = torch.tensor([[-2.2, 1.0], [0.0, -0.9]])
    g = positions_to_graph(pos, torch.tensor([[1.0], [2.0]]))
    assert g.cells.tolist() == [[-2, 1], [0, -1]] and g.in_size == (3, 3)
    image = graph_to_image(g.x, g)
    assert image[0].tolist() == [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [2.0, 0.0, 0.0]]
    assert math.isclose(float(image.sum()), 3.0)

"""Masked and sparse pixel domains: a layer on the graph of the active pixels equals ``nn.Conv2d`` on the
image with inactive pixels zeroed, read at the active output pixels; forward and gradients.

Active outputs: the active inputs themselves at stride 1 on the same grid (submanifold), else the output
pixels whose window holds an active input (computed here independently, by a dense convolution of the
mask with a kernel of ones on the padded mask).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from gridgraph import GridConv2d, graph_to_image, image_to_graph
from gridgraph.domains import MaskedPixelGraph, SparseTable, sparse_to_graph
from gridgraph.nn.functional import kernel_trace
from gridgraph.nn import DepthwiseConv2d, GridConv1d, GridConv3d, PointwiseConv2d, SeparableConv2d
from _conv_reference import DTYPES, assert_matches, randomise_


def reference_out_mask(mask: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """Active output pixels ``(B, *out)``: an active input in the window (or the mask itself, submanifold)."""
    n = mask.dim() - 1
    m = mask[:, None].double()
    ones = torch.ones(1, 1, *conv.kernel_size, dtype=torch.double, device=mask.device)
    pads = conv._reversed_padding_repeated_twice  # F.pad's order: last dimension first
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    m = F.pad(m, pads, mode=mode)
    window = getattr(F, f"conv{n}d")(m, ones, stride=conv.stride, dilation=conv.dilation)[:, 0] > 0
    if window.shape == mask.shape and all(s == 1 for s in conv.stride):
        return mask  # submanifold: outputs on the active inputs
    return window


def run_masked(conv: nn.Module, layer: nn.Module, images: torch.Tensor, mask: torch.Tensor, path: str,
               seed: int = 0, names=None) -> dict:
    """Compare the graph layer on the masked graph with ``conv`` on the zeroed image, forward and backward."""
    batch_mask = mask if mask.dim() == images.dim() - 1 else mask.expand(images.size(0), *mask.shape)
    out_mask = reference_out_mask(batch_mask, conv)
    gen = torch.Generator().manual_seed(seed)
    # reference
    conv.zero_grad(set_to_none=True)
    xr = images.detach().clone().requires_grad_(True)
    ref = conv(xr * batch_mask[:, None].to(xr.dtype))
    grad_out = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(ref) * out_mask[:, None].to(ref.dtype)
    ref.backward(grad_out)
    want = ref.detach() * out_mask[:, None].to(ref.dtype)
    # graph
    layer.zero_grad(set_to_none=True)
    x = images.detach().clone().requires_grad_(True)
    g = image_to_graph(x, conv, mask=mask)
    assert isinstance(g, MaskedPixelGraph)
    assert g.size() == (int(batch_mask.sum()), int(out_mask.sum()))
    assert torch.equal(g.out_mask, out_mask)
    edge_index = g.edge_index if path == "table" else g.edge_index.as_tensor()
    with kernel_trace() as trace:
        out = layer(g.x, edge_index, g.edge_type, size=g.size())
    assert trace == (["sparse"] if path == "table" else ["edges"]), f"wrong computation path for {path!r}: {trace}"
    image = graph_to_image(out, g, side="output")
    image.backward(grad_out)
    errors = {"forward": assert_matches(image.detach(), want, "forward output"),
              "grad input": assert_matches(x.grad, xr.grad, "gradient of the input")}
    names = names or {n: n for n, _ in layer.named_parameters()}
    mine = dict(layer.named_parameters())
    theirs = dict(conv.named_parameters())
    for a, b in names.items():
        errors[f"grad {b}"] = assert_matches(mine[a].grad, theirs[b].grad, f"gradient of {b}")
    return errors


def make(kwargs, c_in, c_out, dtype, device, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, **kwargs).to(device=device, dtype=dtype)
    return randomise_(conv, torch.Generator().manual_seed(seed + 1))


def random_mask(shape, occupancy, seed, device):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=gen) < occupancy).to(device)


# (id, Conv2d keyword arguments, in_channels, out_channels, batch, height, width, occupancy, shared mask)
CONFIGS = [
    ("submanifold-k3", dict(kernel_size=3, padding=1), 3, 4, 2, 7, 8, 0.3, False),
    ("submanifold-k3-shared-mask", dict(kernel_size=3, padding=1), 3, 4, 2, 7, 8, 0.5, True),
    ("submanifold-k5-d2", dict(kernel_size=5, padding=4, dilation=2), 2, 3, 2, 8, 9, 0.4, False),
    ("submanifold-k2-same", dict(kernel_size=2, padding="same"), 2, 3, 1, 6, 5, 0.5, False),
    ("submanifold-g2-nobias", dict(kernel_size=3, padding=1, groups=2, bias=False), 4, 6, 2, 6, 7, 0.4, False),
    ("submanifold-reflect", dict(kernel_size=3, padding=1, padding_mode="reflect"), 2, 3, 2, 6, 7, 0.4, False),
    ("submanifold-circular", dict(kernel_size=3, padding=1, padding_mode="circular"), 2, 3, 2, 6, 7, 0.3, False),
    ("submanifold-replicate", dict(kernel_size=3, padding=1, padding_mode="replicate"), 2, 3, 2, 5, 6, 0.4, False),
    ("submanifold-full-mask", dict(kernel_size=3, padding=1), 2, 3, 2, 5, 6, 1.0, False),
    ("submanifold-empty-mask", dict(kernel_size=3, padding=1), 2, 3, 2, 5, 6, 0.0, False),
    ("k1", dict(kernel_size=1), 3, 4, 2, 5, 6, 0.5, False),
    ("strided-k3-s2", dict(kernel_size=3, stride=2, padding=1), 3, 4, 2, 9, 8, 0.2, False),
    ("strided-k2-s2", dict(kernel_size=2, stride=2), 2, 3, 2, 8, 8, 0.3, True),
    ("strided-k3x2-s(2,1)-d(1,2)", dict(kernel_size=(3, 2), stride=(2, 1), padding=(2, 0), dilation=(1, 2)),
     2, 3, 2, 7, 8, 0.3, False),
    ("strided-depthwise", dict(kernel_size=3, stride=2, padding=1, groups=3), 3, 6, 2, 7, 7, 0.3, False),
    ("strided-reflect", dict(kernel_size=3, stride=2, padding=1, padding_mode="reflect"), 2, 3, 2, 7, 8, 0.1, False),
    ("strided-circular", dict(kernel_size=3, stride=3, padding=2, padding_mode="circular"), 2, 3, 2, 7, 8, 0.1, False),
    ("strided-replicate", dict(kernel_size=3, stride=2, padding=1, padding_mode="replicate"), 2, 3, 1, 6, 7, 0.1, False),
    ("valid-k3", dict(kernel_size=3), 2, 3, 2, 6, 7, 0.2, False),
    ("batch1", dict(kernel_size=3, padding=1), 2, 3, 1, 5, 6, 0.5, False),
]


@pytest.mark.parametrize("path", ["table", "edges"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("name, kwargs, c_in, c_out, batch, h, w, occupancy, shared", CONFIGS,
                         ids=[c[0] for c in CONFIGS])
def test_masked_equals_conv2d_on_zeroed_image(name, kwargs, c_in, c_out, batch, h, w, occupancy, shared, dtype,
                                              path, device):
    conv = make(kwargs, c_in, c_out, dtype, device)
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(batch, c_in, h, w, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    mask = random_mask((h, w) if shared else (batch, h, w), occupancy, 3, device)
    run_masked(conv, GridConv2d.from_conv2d(conv), images, mask, path)


@pytest.mark.parametrize("name", ["submanifold-k3", "strided-k3x2-s(2,1)-d(1,2)", "strided-reflect",
                                  "submanifold-replicate", "valid-k3", "strided-depthwise"])
def test_construction_without_dense_maps(name, monkeypatch):
    """The coordinate-only construction (sort, unique, binary search: what a huge, nearly empty grid uses)
    gives the same graph as the dense-map construction, and the same results."""
    import gridgraph.structure as domains

    _, kwargs, c_in, c_out, batch, h, w, occupancy, shared = next(c for c in CONFIGS if c[0] == name)
    conv = make(kwargs, c_in, c_out, torch.float64, "cpu")
    images = torch.randn(batch, c_in, h, w, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mask = random_mask((h, w) if shared else (batch, h, w), occupancy, 3, "cpu")
    dense = image_to_graph(images, conv, mask=mask)
    monkeypatch.setattr(domains, "DENSE_MAP_LIMIT", 0)
    monkeypatch.setattr(domains, "_DENSE_PER_SITE", 0)
    sparse = image_to_graph(images, conv, mask=mask)
    for attr in ("edge_index", "edge_type", "out_keys", "in_keys", "pos", "out_pos"):
        assert torch.equal(getattr(sparse, attr), getattr(dense, attr)), attr
    assert torch.equal(sparse.table.index, dense.table.index)
    run_masked(conv, GridConv2d.from_conv2d(conv), images, mask, "table")


@st.composite
def masked_configs(draw):
    k = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    d = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    h, w = draw(st.integers(3, 8)), draw(st.integers(3, 8))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    p = tuple(draw(st.integers(0, 2)) for _ in range(2))
    if any(n + 2 * pi < di * (ki - 1) + 1 for n, pi, ki, di in zip((h, w), p, k, d)):
        p = (2, 2) if mode != "zeros" else (4, 4)
        if any(n + 2 * pi < di * (ki - 1) + 1 for n, pi, ki, di in zip((h, w), p, k, d)):
            k = (1, 1)
    groups = draw(st.sampled_from([1, 2]))
    kwargs = dict(kernel_size=k, stride=s, padding=p, dilation=d, groups=groups, bias=draw(st.booleans()),
                  padding_mode=mode)
    return (kwargs, groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2)), draw(st.integers(1, 2)),
            h, w, draw(st.sampled_from([0.1, 0.3, 0.7])), draw(st.integers(0, 1000)))


@settings(max_examples=30)
@given(config=masked_configs(), path=st.sampled_from(["table", "edges"]))
def test_property_masked(config, path):
    kwargs, c_in, c_out, batch, h, w, occupancy, seed = config
    conv = make(kwargs, c_in, c_out, torch.float64, torch.device("cpu"), seed)
    images = torch.randn(batch, c_in, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    mask = random_mask((batch, h, w), occupancy, seed, "cpu")
    run_masked(conv, GridConv2d.from_conv2d(conv), images, mask, path, seed)


# ------------------------------------------------------------------------------- every layer
@pytest.mark.parametrize("path", ["table", "edges"])
def test_depthwise_and_pointwise_on_masked_graph(path):
    images = torch.randn(2, 3, 9, 7, dtype=torch.float64)
    mask = random_mask((2, 9, 7), 0.3, 5, "cpu")
    dw = make(dict(kernel_size=3, padding=1, groups=3), 3, 6, torch.float64, "cpu")
    run_masked(dw, DepthwiseConv2d.from_conv2d(dw), images, mask, path)
    pw = make(dict(kernel_size=1), 3, 5, torch.float64, "cpu")
    run_masked(pw, PointwiseConv2d.from_conv2d(pw), images, mask, path)


def test_separable_on_masked_graph():
    dw = make(dict(kernel_size=3, stride=2, padding=1, groups=4, bias=False), 4, 4, torch.float64, "cpu")
    pw = make(dict(kernel_size=1), 4, 6, torch.float64, "cpu", seed=3)
    layer = SeparableConv2d.from_conv2d(dw, pw)
    images = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    mask = random_mask((2, 9, 8), 0.25, 1, "cpu")
    g = image_to_graph(images, layer, mask=mask)
    out = graph_to_image(layer(g.x, g.edge_index, g.edge_type), g, side="output")
    out_mask = reference_out_mask(mask, dw)
    want = pw(dw(images * mask[:, None])) * out_mask[:, None]
    # the pointwise bias lands on active outputs only: inactive outputs are not nodes
    assert_matches(out, want, "separable forward")


# ------------------------------------------------------------------------------- sparse point sets
def test_sparse_to_graph_equals_masked_graph():
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(3, 2, 8, 9, generator=gen, dtype=torch.float64)
    mask = random_mask((3, 8, 9), 0.3, 4, "cpu")
    conv = make(dict(kernel_size=3, stride=2, padding=1), 2, 3, torch.float64, "cpu")
    layer = GridConv2d.from_conv2d(conv)
    dense = image_to_graph(images, conv, mask=mask)
    b, r, c = mask.nonzero(as_tuple=True)
    order = torch.randperm(b.numel(), generator=gen)  # points in any order
    coords = torch.stack([b, r, c], 1)[order]
    features = images[b, :, r, c][order]
    g = sparse_to_graph(coords, features, (8, 9), conv)
    assert torch.equal(g.x, dense.x) and torch.equal(g.x, features[g.perm])
    assert torch.equal(g.edge_index, dense.edge_index) and torch.equal(g.edge_type, dense.edge_type)
    assert torch.equal(g.pos, dense.pos) and torch.equal(g.out_pos, dense.out_pos)
    assert torch.equal(g.batch, b) and g.batched and g.num_images == 3
    out = layer(g.x, g.edge_index, g.edge_type)
    want = conv(images * mask[:, None])
    ob, orow, ocol = g.out_batch, g.out_pos[:, 0], g.out_pos[:, 1]
    assert_matches(out, want[ob, :, orow, ocol], "sparse forward at the active outputs")


def test_sparse_submanifold_keeps_nodes_and_order_and_unbatched_round_trip():
    coords = torch.tensor([[4, 1], [0, 0], [0, 1], [3, 3]])
    feats = torch.arange(8.0).view(4, 2)
    conv = nn.Conv2d(2, 2, 3, padding=1)
    g = sparse_to_graph(coords, feats, (5, 6), conv)
    assert g.submanifold and g.size() == (4, 4) and not g.batched
    assert g.pos.tolist() == [[0, 0], [0, 1], [3, 3], [4, 1]] and torch.equal(g.out_pos, g.pos)
    image = graph_to_image(g.x, g)
    assert image.shape == (2, 5, 6) and torch.equal(image[:, coords[:, 0], coords[:, 1]].t(), feats)
    assert int((image != 0).sum()) == int((feats != 0).sum())
    out = GridConv2d.from_conv2d(conv)(g.x, g.edge_index, g.edge_type)
    back = out[g.perm.argsort()]  # the caller's order
    dense = torch.zeros(2, 5, 6)
    dense[:, coords[:, 0], coords[:, 1]] = feats.t()
    torch.testing.assert_close(back, conv(dense)[:, coords[:, 0], coords[:, 1]].t(), rtol=1e-5, atol=1e-5)


def test_sparse_cost_scales_with_points_not_grid():
    """A million-by-million grid with four points: nothing of size H x W is ever built."""
    n = 10 ** 6
    coords = torch.tensor([[0, 0], [1, 1], [n - 1, n - 1], [500_000, 3]])
    conv = nn.Conv2d(1, 2, 3, stride=2, padding=1)
    g = sparse_to_graph(coords, torch.ones(4, 1), (n, n), conv)
    assert isinstance(g.table, SparseTable) and g.table.index.shape == (g.num_dst, 9)
    # outputs o with 2*o + u - 1 = c: (0,0) -> {(0,0)}; (1,1) -> {0,1}x{0,1}; (n-1,n-1) -> {(n/2-1, n/2-1)};
    # (500000, 3) -> {(250000, 1), (250000, 2)}: seven active outputs, (0, 0) shared
    assert g.out_size == (n // 2, n // 2) and g.num_dst == 7
    assert sorted(map(tuple, g.out_pos.tolist())) == [(0, 0), (0, 1), (1, 0), (1, 1), (250000, 1), (250000, 2),
                                                      (n // 2 - 1, n // 2 - 1)]
    out = GridConv2d.from_conv2d(conv)(g.x, g.edge_index, g.edge_type)
    assert out.shape == (g.num_dst, 2)
    sub = sparse_to_graph(coords, torch.ones(4, 1), (n, n), kernel_size=3, padding=1)
    assert sub.size() == (4, 4) and sub.edge_index.size(1) == 6  # four self-loops and (0,0) <-> (1,1)


def test_sparse_volumes_and_sequences():
    """The construction is n-dimensional: sparse 3-D and 1-D domains with GridConv3d / GridConv1d."""
    gen = torch.Generator().manual_seed(1)
    vol = torch.randn(2, 2, 5, 4, 6, generator=gen, dtype=torch.float64)
    mask = torch.rand(2, 5, 4, 6, generator=gen) < 0.3
    conv3 = randomise_(nn.Conv3d(2, 3, 3, stride=(2, 1, 2), padding=1).double(), gen)
    coords = mask.nonzero()
    g = sparse_to_graph(coords, vol[coords[:, 0], :, coords[:, 1], coords[:, 2], coords[:, 3]], (5, 4, 6), conv3)
    out = graph_to_image(GridConv3d.from_conv3d(conv3)(g.x, g.edge_index, g.edge_type), g, side="output")
    out_mask = reference_out_mask(mask, conv3)
    assert_matches(out, conv3(vol * mask[:, None]) * out_mask[:, None], "3-d sparse forward")
    seq = torch.randn(1, 2, 9, generator=gen, dtype=torch.float64)
    conv1 = randomise_(nn.Conv1d(2, 2, 3, padding=1).double(), gen)
    pts = torch.tensor([[0], [4], [5]])
    g1 = sparse_to_graph(pts, seq[0, :, pts[:, 0]].t(), (9,), conv1)
    out1 = GridConv1d.from_conv1d(conv1)(g1.x, g1.edge_index, g1.edge_type)
    m1 = torch.zeros(1, 9, dtype=torch.bool)
    m1[0, pts[:, 0]] = True
    assert_matches(out1, conv1(seq * m1[:, None])[0, :, pts[:, 0]].t(), "1-d sparse forward")


# ------------------------------------------------------------------------------- graph structure
def test_full_mask_gives_the_dense_graph():
    images = torch.randn(2, 3, 5, 6)
    for kwargs in (dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1, padding_mode="reflect")):
        dense = image_to_graph(images, **kwargs)
        full = image_to_graph(images, **kwargs, mask=torch.ones(5, 6, dtype=torch.bool))
        assert torch.equal(full.edge_index, dense.edge_index) and torch.equal(full.edge_type, dense.edge_type)
        assert torch.equal(full.x, dense.x) and full.size() == dense.size()
        assert torch.equal(graph_to_image(full.x, full), images)


def test_nodes_row_major_edges_between_active_pixels_only():
    mask = torch.tensor([[True, False, True], [False, True, True]])
    g = image_to_graph(torch.arange(6.0).view(1, 2, 3), mask=mask)
    assert g.pos.tolist() == [[0, 0], [0, 2], [1, 1], [1, 2]] and g.x.flatten().tolist() == [0.0, 2.0, 4.0, 5.0]
    src, dst = g.edge_index.tolist()
    for j, i, t in zip(src, dst, g.edge_type.tolist()):  # each edge's tap joins its two active pixels
        (jr, jc), (ir, ic) = g.pos[j].tolist(), g.pos[i].tolist()
        assert t == (jr - ir + 1) * 3 + (jc - ic + 1)
    assert len(src) == 4 + 2 * 4  # 4 self-loops; pairs (0,2)-(1,1), (0,2)-(1,2), (1,1)-(1,2), (0,0)-(1,1)
    assert g.structure.parts[0].num_images == 1 and g.structure.parts[0].kind == "sparse"
    image = graph_to_image(g.x, g)
    assert torch.equal(image, torch.tensor([[[0.0, 0.0, 2.0], [0.0, 4.0, 5.0]]]))


def test_graph_to_image_asks_for_side_when_ambiguous():
    mask = torch.zeros(1, 6, 6, dtype=torch.bool)
    mask[0, 0, 0] = mask[0, 5, 5] = True  # two inputs, two (different) strided outputs
    g = image_to_graph(torch.zeros(1, 1, 6, 6), kernel_size=3, stride=2, padding=1, mask=mask)
    assert g.size() == (2, 2) and not g.submanifold
    with pytest.raises(ValueError, match="pass side='input' or side='output'"):
        graph_to_image(torch.zeros(2, 1), g)
    assert graph_to_image(torch.ones(2, 1), g, side="output").shape == (1, 1, 3, 3)


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("mask, error, match", [
    (torch.ones(5, 6), TypeError, r"mask must be a bool tensor \(got dtype torch.float32\)"),
    ([[True]], TypeError, "mask must be a bool torch.Tensor"),
    (torch.ones(5, 5, dtype=torch.bool), ValueError, r"expected mask of shape \(5, 6\) or \(2, 5, 6\)"),
    (torch.ones(3, 5, 6, dtype=torch.bool), ValueError, r"expected mask of shape .* \(got \(3, 5, 6\)\)"),
])
def test_bad_masks(mask, error, match):
    with pytest.raises(error, match=match):
        image_to_graph(torch.zeros(2, 2, 5, 6), kernel_size=3, padding=1, mask=mask)


def test_mask_with_transposed_conv_is_refused():
    with pytest.raises(ValueError, match="mask is not supported with a transposed convolution"):
        image_to_graph(torch.zeros(2, 5, 6), nn.ConvTranspose2d(2, 2, 3), mask=torch.ones(5, 6, dtype=torch.bool))


@pytest.mark.parametrize("coords, features, size, error, match", [
    (torch.zeros(3, 2), torch.zeros(3, 1), (4, 4), TypeError, "coords must be an integer torch.Tensor"),
    (torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 1), (4, 4), ValueError, r"expected coords of shape \[N, 2\]"),
    (torch.tensor([[0, 4]]), torch.zeros(1, 1), (4, 4), ValueError, "coords must lie inside the grid"),
    (torch.tensor([[-1, 0]]), torch.zeros(1, 1), (4, 4), ValueError, "coords must lie inside the grid"),
    (torch.tensor([[1, 2], [0, 0], [1, 2]]), torch.zeros(3, 1), (4, 4), ValueError,
     r"coords must be unique: pixel \[1, 2\] appears more than once"),
    (torch.tensor([[1, 2]]), torch.zeros(2, 1), (4, 4), ValueError, r"expected features of shape \[1, C\]"),
    (torch.tensor([[1, 2]]), torch.zeros(1, 1), (4, 0), ValueError, "size must be a tuple of positive ints"),
    (torch.tensor([[-1, 1, 2]]), torch.zeros(1, 1), (4, 4), ValueError, "image indices in coords"),
])
def test_bad_coords(coords, features, size, error, match):
    with pytest.raises(error, match=match):
        sparse_to_graph(coords, features, size)


def test_bad_sparse_conv_and_channels():
    with pytest.raises(ValueError, match="expected features with 3 channels for Conv2d"):
        sparse_to_graph(torch.tensor([[0, 0]]), torch.zeros(1, 2), (4, 4), nn.Conv2d(3, 1, 3))
    with pytest.raises(ValueError, match="conv is a 2-d convolution; expected a 3-d one"):
        sparse_to_graph(torch.tensor([[0, 0, 0]]), torch.zeros(1, 3), (4, 4, 4), nn.Conv2d(3, 1, 3))
    with pytest.raises(ValueError, match="num_images=1 is smaller than the largest image index"):
        sparse_to_graph(torch.tensor([[1, 0, 0]]), torch.zeros(1, 3), (4, 4), num_images=1)


@pytest.mark.parametrize("frozen", ["weight", "input", "bias"])
def test_sparse_kernel_partial_gradients(frozen):
    """The per-tap kernel's backward computes only what is asked, and what it computes is right."""
    conv = make(dict(kernel_size=3, stride=2, padding=1, groups=2), 4, 6, torch.float64, "cpu")
    layer = GridConv2d.from_conv2d(conv)
    images = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    mask = random_mask((2, 7, 6), 0.4, 9, "cpu")
    g = image_to_graph(images, layer, mask=mask)
    x = g.x.detach().clone().requires_grad_(frozen != "input")
    getattr(layer, frozen if frozen != "input" else "weight").requires_grad_(frozen == "input")
    if frozen == "input":
        layer.bias.requires_grad_(True)
    fast = layer(x, g.edge_index, g.edge_type)
    wanted = [t for t in (x, layer.weight, layer.bias) if t.requires_grad]
    grads_fast = torch.autograd.grad(fast.square().sum(), wanted)
    slow = layer(x, g.edge_index.as_tensor().clone(), g.edge_type, size=g.size())
    grads_slow = torch.autograd.grad(slow.square().sum(), wanted)
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_fast, grads_slow):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_to_networkx_places_the_active_outputs():
    from gridgraph import to_networkx

    mask = torch.zeros(1, 6, 6, dtype=torch.bool)
    mask[0, 0, 0] = mask[0, 5, 5] = True
    g = image_to_graph(torch.zeros(1, 1, 6, 6), kernel_size=3, stride=2, padding=1, mask=mask)
    nxg = to_networkx(g)
    assert [nxg.nodes[k]["pixel"] for k in nxg.nodes] == [(0, 0), (5, 5), (0, 0), (2, 2)]
    assert sorted(nxg.edges(keys=True)) == [(0, 2, 4), (1, 3, 8)]  # (5,5) = 2*(2,2) + tap (2,2) - 1


# ------------------------------------------------------------------------------- the two sparse kernels
@pytest.fixture(params=["table", "per-tap"])
def sparse_kernel(request, monkeypatch):
    """Force one of the two kernels of masked / sparse graphs; yields the calls of the table kernel."""
    from gridgraph.nn import kernels

    monkeypatch.setattr(kernels, "TABLE_MIN_FILL", 0.0 if request.param == "table" else 2.0)
    calls = []
    table_forward = kernels._table_forward

    def spy(*args, **kwargs):
        calls.append(1)
        return table_forward(*args, **kwargs)

    monkeypatch.setattr(kernels, "_table_forward", spy)
    return request.param, calls


@pytest.mark.parametrize("name, kwargs, c_in, c_out, batch, h, w, occupancy, shared", CONFIGS,
                         ids=[c[0] for c in CONFIGS])
def test_each_sparse_kernel_equals_conv2d(name, kwargs, c_in, c_out, batch, h, w, occupancy, shared, sparse_kernel):
    """The blocked table kernel and the per-tap kernel, each forced, equal nn.Conv2d (forward, gradients)."""
    kernel, calls = sparse_kernel
    conv = make(kwargs, c_in, c_out, torch.float64, "cpu")
    images = torch.randn(batch, c_in, h, w, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mask = random_mask((h, w) if shared else (batch, h, w), occupancy, 3, "cpu")
    run_masked(conv, GridConv2d.from_conv2d(conv), images, mask, "table")
    table_ran = kwargs.get("groups", 1) == 1 and kernel == "table" and occupancy > 0
    assert bool(calls) == table_ran, (kernel, len(calls))


def test_sparse_kernels_on_a_larger_image_float32(sparse_kernel):
    """Many blocks (a 3-channel 96x80 image, batch 2) through each kernel, against nn.Conv2d in float32."""
    conv = make(dict(kernel_size=3, padding=1), 3, 5, torch.float32, "cpu")
    images = torch.randn(2, 3, 96, 80, generator=torch.Generator().manual_seed(4))
    run_masked(conv, GridConv2d.from_conv2d(conv), images, random_mask((2, 96, 80), 0.5, 4, "cpu"), "table")


def _slot_reference(x, table, weight, bias):
    """out[i] = bias + sum_t W_t x[table[i, t]] (holes skipped), one slot at a time."""
    out = bias.expand(table.size(0), -1).clone()
    w = weight.reshape(weight.size(0), weight.size(1), -1)
    for i, t in (table >= 0).nonzero().tolist():
        out[i] += w[:, :, t] @ x[table[i, t]]
    return out


@pytest.mark.parametrize("spread", ["local", "wide"])
def test_table_kernel_on_an_arbitrary_slot_table(spread, sparse_kernel, monkeypatch):
    """Edge lists with unique (target, tap) slots, in any order, through both kernels: forward, input and
    weight gradients equal a slot-by-slot reference. 'wide': sources far apart, so the table kernel
    gathers globally and zeroes its holes instead of copying each block's source range."""
    from gridgraph.nn import kernels
    from gridgraph.nn.functional import EdgeList, conv

    monkeypatch.setattr(kernels, "CPU_BLOCK_BYTES", 64 * 4 * 6 * 8)  # blocks of 64 rows: several blocks
    layouts = []

    class Blocks(kernels._TableBlocks):
        def __init__(self, *args):
            super().__init__(*args)
            layouts.append("local" if self.local is not None else "wide")

    monkeypatch.setattr(kernels, "_TableBlocks", Blocks)
    gen = torch.Generator().manual_seed(7)
    num_src, num_dst, taps = 3000, 200, 6
    table = torch.randint(0, num_src, (num_dst, taps), generator=gen)
    if spread == "local":
        table = (torch.arange(num_dst)[:, None] + torch.arange(taps)[None, :]) % num_src
    table[torch.rand(num_dst, taps, generator=gen) < 0.4] = -1
    dst, tap = (table >= 0).nonzero(as_tuple=True)
    order = torch.randperm(dst.numel(), generator=gen)  # any edge order
    edge_index = torch.stack([table[dst, tap], dst])[:, order]
    edge_type = tap[order]
    x = torch.randn(num_src, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 4, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    out = conv(x, EdgeList(edge_index, edge_type, num_src, num_dst), weight, bias)
    want = _slot_reference(x, table, weight, bias)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, (x, weight, bias), g)
    ref = torch.autograd.grad(want, (x, weight, bias), g)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    kernel, calls = sparse_kernel
    assert bool(calls) == (kernel == "table")
    assert set(layouts) == ({spread} if kernel == "table" else set()), layouts


def test_first_forward_and_backward_use_the_plan_seeded_at_construction(monkeypatch):
    """A masked graph's builder leaves its table in the registry: the layer neither scatters nor sorts the
    edges to plan its kernels (both kernels, forward and backward)."""
    from gridgraph.nn import kernels

    def refuse(*args, **kwargs):
        raise AssertionError("the edge plan was rebuilt from the edges")

    conv = make(dict(kernel_size=3, padding=1), 3, 4, torch.float64, "cpu")
    images = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    for fill in (0.0, 2.0):
        monkeypatch.setattr(kernels, "TABLE_MIN_FILL", fill)
        g = image_to_graph(images, conv, mask=random_mask((2, 9, 8), 0.4, 1, "cpu"))
        monkeypatch.setattr(kernels, "_slot_table", refuse)
        monkeypatch.setattr(kernels, "_pairs_of_edges", refuse)
        layer = GridConv2d.from_conv2d(conv)
        x = g.x.clone().requires_grad_(True)
        layer(x, g.edge_index, g.edge_type).square().sum().backward()
        assert x.grad is not None and layer.weight.grad is not None
        monkeypatch.undo()


def test_sorted_points_are_not_sorted_again_and_give_the_same_graph():
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(12, 10, generator=gen) < 0.4
    coords = mask.nonzero()
    features = torch.randn(coords.size(0), 3, generator=gen, dtype=torch.float64)
    g = sparse_to_graph(coords, features, (12, 10))
    assert g.x is features and torch.equal(g.perm, torch.arange(coords.size(0)))  # already row-major: no copy
    shuffle = torch.randperm(coords.size(0), generator=gen)
    h = sparse_to_graph(coords[shuffle], features[shuffle], (12, 10))
    assert torch.equal(features[shuffle][h.perm], g.x)
    for attr in ("edge_index", "edge_type", "edge_attr", "pos", "in_keys"):
        assert torch.equal(getattr(h, attr), getattr(g, attr)), attr


def test_sparse_table_int32_and_its_edges():
    """The int32 table (what the builder uses) equals the long one, and the edges read off it, from a
    row-major or a tap-major buffer, are target-major with taps ascending."""
    from gridgraph.geometry import ConvGeometry
    from gridgraph.structure import sparse_table, table_edges, unravel

    geometry = ConvGeometry.from_keywords(2, 3, padding=1)
    mask = random_mask((2, 7, 9), 0.5, 2, "cpu")
    keys = mask.reshape(-1).nonzero().squeeze(1)
    wide = sparse_table(keys, keys, geometry, (7, 9), (7, 9), 2)
    narrow = sparse_table(keys, keys, geometry, (7, 9), (7, 9), 2, torch.int32, unravel(keys, (7, 9)))
    assert wide.index.dtype == torch.long and narrow.index.dtype == torch.int32
    assert torch.equal(wide.index, narrow.index.long()) and wide.complete == narrow.complete
    dst, tap = (wide.index >= 0).nonzero(as_tuple=True)
    for index in (wide.index.contiguous(), narrow.index, narrow.index.contiguous()):
        data, taps = table_edges(index)
        assert data.dtype == taps.dtype == torch.long
        assert torch.equal(data[1], dst) and torch.equal(taps, tap) and torch.equal(data[0], wide.index[dst, tap])


@pytest.mark.parametrize("name", ["submanifold-k3", "submanifold-reflect", "strided-replicate"])
def test_per_tap_kernel_with_two_threads(name, monkeypatch):
    """With several threads the per-tap scatter of unique rows is a gather, an add and a copy; a tap whose
    sources repeat (reflect / replicate padding) must still sum them: equal to nn.Conv2d either way."""
    from gridgraph.nn import kernels

    monkeypatch.setattr(kernels, "TABLE_MIN_FILL", 2.0)
    _, kwargs, c_in, c_out, batch, h, w, occupancy, shared = next(c for c in CONFIGS if c[0] == name)
    conv = make(kwargs, c_in, c_out, torch.float64, "cpu")
    images = torch.randn(batch, c_in, h, w, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_masked(conv, GridConv2d.from_conv2d(conv), images, random_mask((batch, h, w), occupancy, 3, "cpu"),
                   "table")
    finally:
        torch.set_num_threads(threads)

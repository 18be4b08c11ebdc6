"""gridgraph.nn.functional and its kernels: the lattice path against nn.Conv2d, branch by branch.

Each configuration below takes a branch of the grid kernels (:mod:`gridgraph.nn.lattice`): dense gathers
with one GEMM, 1x1 layers (the identity gather), depthwise multiply-adds (compiled and torch), grouped
batched GEMMs, the input gradient per stride phase or by one scatter, reflect/replicate/circular padding read
through the per-axis maps, batch 0. Every case runs with the index path for small problems and with the
strided-view blocks (tiny blocks too, so that blocks cut through rows and images), with numba's compiled loops
and with torch's ops only. The reference is always ``torch.nn.Conv2d``; the lattice kernels are also checked
against the edge-list kernels on the graph's own edges.
"""
import math

import pytest
import torch

import gridgraph.nn.functional as functional
import gridgraph.nn.lattice as lattice
from gridgraph import GridConv2d, clear_cache, grid_to_graph, image_to_graph
from gridgraph.geometry import ConvGeometry
from gridgraph.nn.functional import kernel_trace
from gridgraph.pixel_graph import PixelEdgeIndex
from gridgraph.structure import REGISTRY, GraphPart, _build_table

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# (in, out, kernel, stride, padding, dilation, groups, padding_mode, batch, (H, W)): what it exercises
CONFIGS = [
    (3, 5, 3, 1, 1, 1, 1, "zeros", 2, (7, 6)),  # dense gather, one input-gradient phase
    (4, 6, 3, 2, 1, 1, 1, "zeros", 2, (9, 8)),  # strided: four input-gradient phases
    (3, 4, (7, 7), 2, 3, 1, 1, "zeros", 1, (15, 13)),  # stem-like, C_in < C_out
    (1, 3, 3, 1, 1, 1, 1, "zeros", 2, (6, 5)),  # one input channel
    (2, 3, 3, 2, 1, 1, 1, "reflect", 2, (7, 6)),  # strided, reflected borders
    (5, 3, (3, 2), 1, "same", 1, 1, "zeros", 2, (6, 7)),  # even kernel, asymmetric padding
    (4, 4, 3, 1, 2, 2, 1, "zeros", 2, (9, 9)),  # dilation
    (4, 6, 3, 1, 1, 1, 1, "reflect", 2, (6, 7)),  # a border pixel read twice by one tap
    (4, 6, 3, 1, 2, 1, 1, "replicate", 1, (5, 6)),
    (4, 6, 3, 2, 1, 1, 1, "circular", 2, (7, 8)),  # wrapped borders, strided phases
    (4, 6, 3, 1, 1, 1, 1, "circular", 2, (6, 6)),
    (6, 6, 3, 1, 1, 1, 6, "zeros", 2, (7, 7)),  # depthwise 3x3: the spelled-out window
    (4, 4, (3, 5), 1, (1, 2), 1, 4, "circular", 2, (8, 9)),  # depthwise, wrapped borders, taps in chunks
    (4, 4, 3, 1, 1, 2, 4, "reflect", 1, (8, 7)),  # depthwise, dilated, reflected
    (6, 6, 7, 1, 3, 1, 6, "zeros", 2, (9, 10)),  # depthwise 7x7: nine-, three- and one-tap chunks
    (6, 6, 5, 2, 2, 1, 6, "zeros", 2, (11, 9)),  # depthwise 5x5 strided
    (4, 8, 3, 2, 1, 1, 4, "zeros", 2, (8, 9)),  # depthwise with multiplier 2, strided: grouped path
    (6, 4, 3, 1, 1, 1, 2, "reflect", 2, (6, 6)),  # grouped: group-major gathers, batched GEMM
    (6, 9, (1, 3), 1, (0, 1), 1, 3, "zeros", 1, (5, 6)),  # grouped, rectangular
    (16, 16, 3, 2, 1, 1, 2, "zeros", 2, (9, 7)),  # grouped, strided
    (24, 1, 3, 1, 1, 1, 1, "zeros", 2, (6, 7)),  # C_out << C_in
    (40, 2, 3, 2, 1, 2, 1, "replicate", 2, (9, 8)),  # strided, dilated, remapped borders
    (8, 5, 1, 1, 0, 1, 1, "zeros", 3, (4, 5)),  # 1x1: the identity gather (one GEMM on x)
    (8, 5, 1, 2, 0, 1, 1, "zeros", 2, (5, 5)),  # 1x1 strided: sources no tap reads
    (3, 8, 7, 2, 3, 1, 1, "zeros", 2, (11, 10)),  # an RGB stem
    (1, 4, 3, 1, 1, 1, 1, "reflect", 2, (6, 7)),  # one channel (grey)
    (4, 6, 3, 3, 5, 1, 1, "zeros", 1, (4, 4)),  # padding larger than the kernel: targets reading nothing
    (4, 6, (2, 4), (3, 2), (0, 3), (2, 1), 2, "zeros", 2, (7, 9)),  # everything uneven
    (4, 6, 3, 1, 1, 1, 1, "zeros", 0, (5, 5)),  # batch 0
    (4, 6, 3, 3, 0, 1, 2, "zeros", 0, (7, 7)),  # batch 0, grouped, strided
]

PATHS = {  # monkeypatches of gridgraph.nn.lattice: which gathers run
    "index": {},  # these sizes are small: one index_select by the cached slot index
    "blocks": {"SMALL": 0},  # strided views of the zero-padded source, one block
    "tiny-blocks": {"SMALL": 0, "BLOCK_BYTES": 256},  # blocks of one row (or one image) at a time
}


def _run_graph_layer(conv, images):
    layer = GridConv2d.from_conv2d(conv)
    g = image_to_graph(images, layer)
    assert isinstance(g.edge_index, PixelEdgeIndex), "the pixel graph lost its structure"
    x = g.x.detach().clone().requires_grad_()
    with kernel_trace() as trace:
        out = layer(x, g.edge_index, g.edge_type)
    assert trace == ["grid"]
    return layer, g, x, out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c[0]}-{c[1]}-k{c[2]}-s{c[3]}-p{c[4]}-d{c[5]}-g{c[6]}-{c[7]}-b{c[8]}")
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("loops", ["compiled", "torch"])
def test_lattice_path_matches_conv2d(config, dtype, device, path, loops, monkeypatch):
    """Every branch against nn.Conv2d, with numba's compiled loops and with torch's ops only."""
    from gridgraph.nn import compiled

    if loops == "torch":
        monkeypatch.setattr(compiled, "ENABLED", False)
    for name, value in PATHS[path].items():
        monkeypatch.setattr(lattice, name, value)
    monkeypatch.setattr(lattice, "DEVICE_BLOCK_BYTES", PATHS[path].get("BLOCK_BYTES", lattice.DEVICE_BLOCK_BYTES))
    clear_cache()  # the gathers' recipes are cached with the lattice: build them under these settings
    c_in, c_out, k, s, p, d, groups, mode, batch, size = config
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(c_in, c_out, k, s, p, d, groups, bias=True, padding_mode=mode,
                           device=device, dtype=dtype)
    images = torch.randn(batch, c_in, *size, device=device, dtype=dtype, requires_grad=True)
    ref = conv(images)
    layer, g, x, out = _run_graph_layer(conv, images.detach())
    h_out, w_out = g.out_size
    got = out.view(batch, h_out, w_out, c_out).permute(0, 3, 1, 2)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, ref, **tol)

    grad = torch.randn_like(ref)
    ref.backward(grad)
    out.backward(grad.permute(0, 2, 3, 1).reshape(-1, c_out))
    grad_x = x.grad.view(batch, *size, c_in).permute(0, 3, 1, 2)
    torch.testing.assert_close(grad_x, images.grad, **tol)
    torch.testing.assert_close(layer.weight.grad, conv.weight.grad, **tol)
    torch.testing.assert_close(layer.bias.grad, conv.bias.grad, **tol)
    if path != "index":  # the gathers ran as configured: no slot index (the strided-view blocks)
        for key, item in REGISTRY._items.items():
            if key[0] == "lattice":
                assert not item[0].tensors(), "a gather took the index path"
    clear_cache()


@pytest.mark.parametrize("config", CONFIGS[:22], ids=lambda c: f"{c[0]}-{c[1]}-k{c[2]}-s{c[3]}-g{c[6]}-{c[7]}")
def test_lattice_kernels_equal_the_edge_list_kernels_on_the_graphs_own_edges(config):
    """The shifted views are the graph's edges: the lattice kernels and the per-tap edge kernels, run on the
    same graph's edge_index and edge_type, agree to float64 rounding (forward and all gradients)."""
    c_in, c_out, k, s, p, d, groups, mode, batch, size = config
    torch.manual_seed(1)
    layer = GridConv2d(c_in, c_out, k, s, p, d, groups, padding_mode=mode, dtype=torch.float64)
    g = image_to_graph(torch.randn(batch, c_in, *size, dtype=torch.float64), layer)
    results = []
    with kernel_trace() as trace:
        for edges in (g.edge_index, g.edge_index.as_tensor()):
            x = g.x.clone().requires_grad_()
            layer.zero_grad()
            out = layer(x, edges, g.edge_type, size=g.size())
            torch.autograd.backward(out, torch.ones_like(out) + out.detach())
            results.append((out.detach(), x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()))
    assert trace == ["grid", "edges"]
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_compiled_loops_leave_torchs_thread_count_alone():
    """numba's threading layer starts at the first compiled loop and, sharing libgomp with torch, set the
    calling thread's OpenMP count to its own: a user's torch.set_num_threads(1) became 2 after the first
    depthwise call (and torch.compile recompiled on the changed global state). A fresh process: the layer
    starts once per process."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "torch.set_num_threads(1)\n"
        "from gridgraph import GridConv2d, image_to_graph\n"
        "from gridgraph.nn import compiled\n"
        "for c_in, groups in ((3, 1), (8, 8)):\n"
        "    layer = GridConv2d(c_in, 8, 3, padding=1, groups=groups)\n"
        "    g = image_to_graph(torch.randn(1, c_in, 6, 6), layer)\n"
        "    layer(g.x, g.edge_index, g.edge_type)\n"
        "print(compiled.available(torch.zeros(1)), torch.get_num_threads())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    used, threads = proc.stdout.split()[-2:]
    assert used == "True", "numba is a dependency: the compiled loops must be available"
    assert threads == "1"


def test_lattice_path_equals_edge_list_path():
    """The fast path and the general edge-list path compute the same thing (same layer, same graph)."""
    torch.manual_seed(1)
    layer = GridConv2d(5, 7, 3, stride=2, padding=1, dtype=torch.float64)
    g = image_to_graph(torch.randn(2, 5, 9, 10, dtype=torch.float64), layer)
    with kernel_trace() as trace:
        fast = layer(g.x, g.edge_index, g.edge_type)
        plain_edges = g.edge_index.as_tensor()  # the plain [2, E] tensor: no structure, the edge-list path
        slow = layer(g.x, plain_edges, g.edge_type, size=g.size())
    assert trace == ["grid", "edges"]
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)


def test_functional_conv_direct_and_lattice_cached():
    """functional.conv on a structure alone; the lattice (the gathers of the three maps) is built once, kept
    in the one registry (it holds no tensors: nothing is charged) and forgotten by clear_cache."""
    clear_cache()
    geometry = ConvGeometry.from_keywords(2, kernel_size=3, padding=1)
    part = GraphPart.grid(geometry, (4, 5), 3)
    x = torch.randn(3 * 20, 2, dtype=torch.float64)
    weight = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    out = functional.conv(x, part, weight)
    lattices = [k for k in REGISTRY._items if k[0] == "lattice"]
    assert len(lattices) == 1, "the forward built the part's lattice"
    entries, held = len(REGISTRY), REGISTRY.nbytes
    functional.conv(x, part, weight)
    assert (len(REGISTRY), REGISTRY.nbytes) == (entries, held), "the lattice is built once per structure"
    lat = REGISTRY._items[lattices[0]][0]
    assert lat.forward.offsets == ((-1, 0, 1), (-1, 0, 1)) and lat.forward.anchor == (1, 1)
    assert len(lat.phases) == 1 and lat.phases[0].gather.offsets == ((-1, 0, 1), (-1, 0, 1))
    images = x.view(3, 4, 5, 2).permute(0, 3, 1, 2)
    ref = torch.nn.functional.conv2d(images, weight, padding=1)
    torch.testing.assert_close(out.view(3, 4, 5, 4).permute(0, 3, 1, 2), ref)
    clear_cache()
    assert len(REGISTRY) == 0 and REGISTRY.nbytes == 0


def test_strided_lattice_phases_and_their_taps():
    """A stride-2 3x3 convolution with padding 1: the sources split into four phases; an even source row is
    read only by the centre row of taps (offset 0), an odd one by the rows above and below (offsets -1, +1)."""
    geometry = ConvGeometry.from_keywords(2, kernel_size=3, stride=2, padding=1)
    lat = lattice.lattice(geometry, (8, 8), 1)
    assert [p.start for p in lat.phases] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    taps = {p.start: p.gather.taps for p in lat.phases}
    assert taps[(0, 0)] == (4,)  # the centre tap only
    assert sorted(taps[(1, 1)]) == [0, 2, 6, 8]  # the corners
    assert sorted(taps[(0, 1)]) == [3, 5] and sorted(taps[(1, 0)]) == [1, 7]


def test_autograd_keeps_no_per_edge_tensors():
    """The operator saves x and the weight, nothing of size E x C."""
    layer = GridConv2d(4, 6, 3, padding=1)
    g = image_to_graph(torch.randn(2, 4, 8, 8), layer)
    x = g.x.clone().requires_grad_()
    out = layer(x, g.edge_index, g.edge_type)
    saved = out.grad_fn.saved_tensors
    assert sum(t.numel() for t in saved) == x.numel() + layer.weight.numel()


def test_workspace_is_reused_and_forgotten():
    """The gathers' temporary buffer is taken from a per-thread workspace (no page faults at every call) and
    dropped by clear_cache."""
    like = torch.zeros(1)
    a = lattice.workspace(1000, like, "probe")
    b = lattice.workspace(500, like, "probe")
    assert a.data_ptr() == b.data_ptr()
    clear_cache()
    c = lattice.workspace(500, like, "probe")
    assert c.data_ptr() != a.data_ptr() or c.untyped_storage() is not a.untyped_storage()


def test_a_channels_last_weight_is_viewed_not_copied_and_edits_take_effect():
    """The forward reads a channels-last weight's memory in place (the view is remembered per layout, never its
    values): an in-place edit, through .data too, changes the next output."""
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, dtype=torch.float64).to(memory_format=torch.channels_last)
    layer = GridConv2d.from_conv2d(conv).to(memory_format=torch.channels_last)
    g = image_to_graph(torch.randn(1, 4, 5, 5, dtype=torch.float64), layer)
    geometry = layer.geometry
    lat = lattice.lattice(geometry, (5, 5), 1)
    w = lattice._weights(layer.weight, 1, "dense", lat.forward.taps, False)
    assert w.untyped_storage().data_ptr() == layer.weight.untyped_storage().data_ptr()
    before = layer(g.x, g.edge_index)
    with torch.no_grad():
        layer.weight.data.mul_(2)
    after = layer(g.x, g.edge_index)
    torch.testing.assert_close(after - layer.bias, 2 * (before - layer.bias))


def test_double_backward_equals_conv2d():
    """A gradient penalty's gradient (double backward) equals nn.Conv2d's."""
    conv = torch.nn.Conv2d(2, 3, 3, padding=1, dtype=torch.float64)
    layer = GridConv2d.from_conv2d(conv)
    images = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    g = image_to_graph(images, layer)
    x = g.x.clone().requires_grad_()
    (grad_x,) = torch.autograd.grad(layer(x, g.edge_index).square().sum(), x, create_graph=True)
    grad_x.square().sum().backward()
    xr = images.clone().requires_grad_()
    (grad_r,) = torch.autograd.grad(conv(xr).square().sum(), xr, create_graph=True)
    grad_r.square().sum().backward()
    torch.testing.assert_close(grad_x.view(1, 5, 5, 2).permute(0, 3, 1, 2), grad_r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.weight.grad, conv.weight.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad.view(1, 5, 5, 2).permute(0, 3, 1, 2), xr.grad, rtol=1e-10, atol=1e-10)


def _reference_table(geometry, in_size):
    """The table by brute force: every (target, tap), its source by Conv2d's formula, then the mode."""
    out_size = geometry.output_size(in_size)
    targets = torch.cartesian_prod(*[torch.arange(n) for n in out_size]).view(-1, geometry.ndim)
    taps = torch.cartesian_prod(*[torch.arange(k) for k in geometry.kernel_size]).view(-1, geometry.ndim)
    stride = torch.tensor(geometry.stride)
    dil = torch.tensor(geometry.dilation)
    pad = torch.tensor([a for a, _ in geometry.padding])
    size = torch.tensor(in_size)
    pos = targets[:, None, :] * stride + taps[None, :, :] * dil - pad  # [N, T, ndim]
    inside = ((pos >= 0) & (pos < size)).all(-1)
    mode = geometry.padding_mode
    if mode == "replicate":
        pos = torch.minimum(pos.clamp(min=0), size - 1)
    elif mode == "circular":
        pos = torch.remainder(pos, size)
    elif mode == "reflect":
        pos = pos.abs()
        pos = torch.where(pos >= size, 2 * (size - 1) - pos, pos)
    strides = torch.tensor([math.prod(in_size[a + 1:]) for a in range(geometry.ndim)])
    index = (pos * strides).sum(-1)
    if mode == "zeros":
        index = torch.where(inside, index, -1)
    return index


GEOMETRIES = [
    (2, 3, 1, 1, 1, "zeros", (9, 11)),
    (2, 3, 2, 1, 1, "zeros", (8, 7)),
    (2, (5, 3), (2, 1), (2, 0), (1, 2), "reflect", (7, 9)),
    (2, 3, 1, 4, 1, "replicate", (4, 5)),
    (2, 4, 3, (3, 1), 2, "circular", (6, 6)),
    (2, 7, 2, 3, 1, "zeros", (24, 23)),
    (2, 1, 2, 0, 1, "zeros", (5, 4)),
    (2, 2, 1, "same", 3, "zeros", (6, 5)),
    (1, 5, 2, 2, 1, "reflect", (11,)),
    (3, 3, (1, 2, 1), 1, 1, "zeros", (3, 5, 4)),
    (3, (2, 3, 1), 1, (1, 1, 0), (2, 1, 1), "circular", (4, 3, 5)),
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_table_and_edges_against_brute_force(geometry):
    ndim, k, s, p, d, mode, in_size = geometry
    geo = ConvGeometry.from_keywords(ndim, k, s, p, d, mode)
    table = _build_table(geo, in_size, torch.device("cpu"))
    ref = _reference_table(geo, in_size)
    assert torch.equal(table.index, ref)
    assert table.complete == bool((ref >= 0).all())
    for batch in (1, 3):
        g = grid_to_graph(torch.zeros(batch, 1, *in_size), geo)
        edge_index, edge_type, edge_attr, pos, batch_vec = g.edge_index, g.edge_type, g.edge_attr, g.pos, g.batch
        dst, tap = (ref >= 0).nonzero(as_tuple=True)  # target-major, taps ascending
        src = ref[dst, tap]
        e = src.numel()
        for b in range(batch):
            seg = slice(b * e, (b + 1) * e)
            assert torch.equal(edge_index[0, seg], src + b * table.num_src)
            assert torch.equal(edge_index[1, seg], dst + b * table.num_dst)
            assert torch.equal(edge_type[seg], tap)
            assert torch.equal(edge_attr[seg], geo.offsets()[tap].float())
        coords = torch.cartesian_prod(*[torch.arange(n) for n in in_size]).view(-1, ndim)
        assert torch.equal(pos, coords.repeat(batch, 1))
        assert torch.equal(batch_vec, torch.arange(batch).repeat_interleave(math.prod(in_size)))

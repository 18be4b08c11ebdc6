"""Pixel graphs off the demo path: what PyG and torch users do to graphs keeps them exact and fast.

Every case builds a pixel graph, puts it through one of the operations PyG and torch apply to graphs
(clone, deepcopy, save/load, ``.to(device)``, ``Batch``, ``DataLoader``, ``to_data_list``, ``index_select``),
then runs the plain call ``layer(g.x, g.edge_index, g.edge_type, size=g.size())`` and asserts both that
it took the neighbour-table kernels (:func:`~gridgraph.nn.functional.kernel_trace`: never the edge-list
fallback) and that the result is the torch module's. Then: transforms, caches, geometry edits, and the
whole workflow (Dataset, transform, DataLoader, a model mixing GridConv2d and GCNConv, one optimizer step).
"""
from __future__ import annotations

import copy
import gc
import io
import types
from dataclasses import dataclass
import warnings
from typing import Callable

import pytest
import torch
import torch_geometric.transforms as T
from torch import nn
from torch_geometric.data import Batch, Data, Dataset
from torch_geometric.loader import DataLoader

import gridgraph
from gridgraph import (GridConv2d, GridConvTranspose2d, PixelEdgeIndex, ToPixelGraph, cache_info, clear_cache, convert,
                       graph_to_image, image_to_graph, set_cache_limit, sparse_to_graph, unconvert)
from gridgraph.nn.functional import kernel_trace
from gridgraph.structure import REGISTRY

F64 = dict(rtol=1e-10, atol=1e-10)


@dataclass
class Kind:
    """A kind of pixel graph: how to build it from images, the twin layer and the torch reference."""

    name: str
    module: nn.Module
    layer: nn.Module
    build: Callable  # images (B, C, H, W) -> graph
    reference: Callable  # images -> expected output images (zeros off the active outputs)
    kernel: str  # the kernel the plain call must take


def _mask(images: torch.Tensor) -> torch.Tensor:
    """About 45% of the pixels, chosen by the image itself (so a batch's mask is its images' masks)."""
    return images[:, 0] < -0.1


def _window(mask: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    ones = torch.ones(1, 1, *conv.kernel_size, dtype=torch.float64, device=mask.device)
    window = torch.nn.functional.conv2d(mask[:, None].double(), ones, stride=conv.stride, padding=conv.padding,
                                        dilation=conv.dilation)
    return window[:, 0] > 0


def make_kind(name: str, device: torch.device) -> Kind:
    torch.manual_seed(0)
    if name == "grid":
        conv = nn.Conv2d(3, 4, 3, padding=1).double().to(device)
        return Kind(name, conv, GridConv2d.from_conv2d(conv), lambda im: image_to_graph(im, conv), conv, "grid")
    if name == "strided":
        conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="reflect").double().to(device)
        return Kind(name, conv, GridConv2d.from_conv2d(conv), lambda im: image_to_graph(im, conv), conv, "grid")
    if name == "masked":
        conv = nn.Conv2d(3, 4, 3, padding=1).double().to(device)

        def reference(im):
            m = _mask(im)
            return conv(im * m[:, None]) * m[:, None]
        return Kind(name, conv, GridConv2d.from_conv2d(conv), lambda im: image_to_graph(im, conv, mask=_mask(im)),
                    reference, "sparse")
    if name == "sparse":  # a point set, strided: outputs where a window holds a point
        conv = nn.Conv2d(3, 4, 3, stride=2, padding=1).double().to(device)

        def build(im):
            b, r, c = _mask(im).nonzero(as_tuple=True)
            return sparse_to_graph(torch.stack([b, r, c], 1), im[b, :, r, c], tuple(im.shape[2:]), conv,
                                   num_images=im.shape[0])

        def reference(im):
            m = _mask(im)
            return conv(im * m[:, None]) * _window(m, conv)[:, None]
        return Kind(name, conv, GridConv2d.from_conv2d(conv), build, reference, "sparse")
    if name == "transposed":
        up = nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1).double().to(device)
        return Kind(name, up, GridConvTranspose2d.from_conv_transpose2d(up), lambda im: image_to_graph(im, up), up,
                    "grid")
    raise ValueError(name)


KINDS = ["grid", "strided", "masked", "sparse", "transposed"]


def images(batch: int = 2, size: tuple[int, int] = (6, 5), device="cpu", seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *size, generator=gen, dtype=torch.float64).to(device)


def run_plain(kind: Kind, g) -> torch.Tensor:
    """The plain call; asserts the table kernels ran (never the edge-list fallback)."""
    with kernel_trace() as trace:
        out = kind.layer(g.x, g.edge_index, g.edge_type, size=g.size())
    assert trace and set(trace) == {kind.kernel}, f"{kind.name}: expected the {kind.kernel!r} kernels, ran {trace}"
    return out


def _save_load(g):
    buffer = io.BytesIO()
    torch.save(g, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


SINGLE_OPS = {
    "as built": lambda g, device: g,
    "clone": lambda g, device: g.clone(),
    "deepcopy": lambda g, device: copy.deepcopy(g),
    "save-load": lambda g, device: _save_load(g),
    "to-device": lambda g, device: g.to(device),
    "apply-to": lambda g, device: g.apply(lambda t: t.to(device)),
}


@pytest.mark.parametrize("op", list(SINGLE_OPS))
@pytest.mark.parametrize("name", KINDS)
def test_structure_survives_copies_moves_and_saving(name, op, device):
    """Built on the CPU, then copied / saved / moved: still the neighbour-table kernels, still exact."""
    kind = make_kind(name, device)
    im = images(device=device)
    g = SINGLE_OPS[op](kind.build(im.cpu()), device)
    assert isinstance(g.edge_index, PixelEdgeIndex) and g.edge_index.device == im.device
    out = graph_to_image(run_plain(kind, g), g, side="output")
    torch.testing.assert_close(out, kind.reference(im), **F64)


@pytest.mark.parametrize("name", KINDS)
def test_batches_are_pixel_graphs(name, device):
    """Batch.from_data_list of three graphs (bipartite ones offset by their output counts): size() is
    (N_src, N_dst), the plain call is exact, graph_to_image stacks the images; to_data_list and
    index_select give back graphs that work alone."""
    kind = make_kind(name, device)
    ims = [images(1, seed=s, device=device) for s in (1, 2, 3)]
    graphs = [kind.build(im) for im in ims]
    batch = Batch.from_data_list(graphs)
    assert batch.size() == (sum(g.size(0) for g in graphs), sum(g.size(1) for g in graphs))
    out = run_plain(kind, batch)
    assert out.shape[0] == batch.size(1)
    torch.testing.assert_close(graph_to_image(out, batch, side="output"), kind.reference(torch.cat(ims)), **F64)
    for k, g in enumerate(batch.to_data_list()):
        torch.testing.assert_close(graph_to_image(run_plain(kind, g), g, side="output"), kind.reference(ims[k]), **F64)
    (g2,) = batch.index_select([2])
    torch.testing.assert_close(graph_to_image(run_plain(kind, g2), g2, side="output"), kind.reference(ims[2]), **F64)


def test_strided_batch_of_three_has_the_output_rows_it_should():
    """The reported case: three strided images used to give 112 rows where 35 outputs exist."""
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1).double()
    layer = GridConv2d.from_conv2d(conv)
    ims = [torch.randn(1, 2, 5, 7, dtype=torch.float64) for _ in range(3)]  # 3 x (3 x 4) = 36 outputs
    batch = Batch.from_data_list([image_to_graph(im, conv) for im in ims])
    out = layer(batch.x, batch.edge_index, batch.edge_type, size=batch.size())
    assert out.shape == (36, 3) and batch.size() == (105, 36)
    torch.testing.assert_close(graph_to_image(out, batch), conv(torch.cat(ims)), **F64)


def test_batch_of_different_image_sizes_gives_a_list():
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1).double()
    layer = GridConv2d.from_conv2d(conv)
    ims = [torch.randn(1, 2, 5, 7, dtype=torch.float64), torch.randn(2, 2, 8, 6, dtype=torch.float64)]
    batch = Batch.from_data_list([image_to_graph(im, conv) for im in ims])
    with kernel_trace() as trace:
        out = layer(batch.x, batch.edge_index, batch.edge_type, size=batch.size())
    assert trace == ["grid", "grid"]  # one kernel call per grid size
    result = graph_to_image(out, batch)
    assert isinstance(result, list) and len(result) == 2
    for got, im in zip(result, ims):
        torch.testing.assert_close(got, conv(im), **F64)
    with pytest.raises(ValueError, match="mixes pixel graphs of different geometries or grid sizes"):
        batch.in_size


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_then_to_device(workers, device):
    """A DataLoader (worker processes too) of pixel graphs, each batch moved to the device: exact, table path."""
    kind = make_kind("strided", device)
    ims = [images(1, seed=s) for s in range(5)]
    loader = DataLoader([kind.build(im) for im in ims], batch_size=2, num_workers=workers)
    outs = []
    for batch in loader:
        batch = batch.to(device)
        outs.append(graph_to_image(run_plain(kind, batch), batch))
    torch.testing.assert_close(torch.cat(outs), kind.reference(torch.cat(ims).to(device)), **F64)


# ------------------------------------------------------------------------------------ transforms
@pytest.mark.parametrize("mode", ["zeros", "reflect"])
@pytest.mark.parametrize("transform", [T.ToUndirected(), T.RemoveDuplicatedEdges(), T.AddSelfLoops()],
                         ids=["ToUndirected", "RemoveDuplicatedEdges", "AddSelfLoops"])
def test_transforms_that_change_edges_are_refused(transform, mode):
    """Merged, reordered or added edges are not the convolution's graph: asking for its taps raises
    (before, the layer computed garbage with no warning)."""
    g = image_to_graph(torch.randn(2, 3, 5, 6), kernel_size=3, padding=1, padding_mode=mode)
    h = transform(g)
    assert not isinstance(h.edge_index, PixelEdgeIndex)
    with pytest.raises(ValueError, match="no longer a PixelEdgeIndex.*ToUndirected or RemoveDuplicatedEdges"):
        h.edge_type


def test_transforms_that_keep_edges_keep_the_graph_exact(device):
    conv = nn.Conv2d(3, 4, 3, padding=1).double().to(device)
    layer = GridConv2d.from_conv2d(conv)
    im = images(device="cpu")
    g = T.Compose([T.NormalizeFeatures(), T.ToDevice(device)])(image_to_graph(im, conv))
    with kernel_trace() as trace:
        out = layer(g.x, g.edge_index, g.edge_type, size=g.size())
    assert trace == ["grid"]
    torch.testing.assert_close(graph_to_image(out, g), conv(graph_to_image(g.x, g)), **F64)


def test_to_pixel_graph_transform_in_a_dataset():
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1).double()
    sample = Data(image=torch.randn(3, 6, 5, dtype=torch.float64), y=torch.tensor([2]))
    g = ToPixelGraph(conv)(sample)
    assert isinstance(g, gridgraph.PixelGraph) and g.y.tolist() == [2] and "image" not in g
    out = GridConv2d.from_conv2d(conv)(g.x, g.edge_index, g.edge_type, size=g.size())
    torch.testing.assert_close(graph_to_image(out, g), conv(sample.image), **F64)
    with pytest.raises(ValueError, match="expected data.image with 3 channels"):
        ToPixelGraph(conv)(Data(image=torch.randn(2, 6, 5)))
    with pytest.raises(ValueError, match="has no 'picture' attribute"):
        ToPixelGraph(conv, key="picture")(sample)
    masked = ToPixelGraph(conv, mask_key="mask")(Data(image=sample.image, mask=torch.rand(6, 5) < 0.5))
    assert isinstance(masked, gridgraph.MaskedPixelGraph) and "mask" not in masked


# ----------------------------------------------------------------------------------------- caches
def _reachable_bytes(root) -> int:
    """Bytes of the distinct tensor storages reachable from ``root`` by a generic walk (independent of the
    registry's own accounting)."""
    seen, storages, stack = set(), {}, [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (type, str, bytes, int, float)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.device.type != "meta":
                storages[(obj.device, obj.untyped_storage().data_ptr())] = obj.untyped_storage().nbytes()
            continue
        if isinstance(obj, types.ModuleType):
            continue  # a module's globals are not part of a cached value
        if isinstance(obj, types.FunctionType):  # a hook: what its closure holds, not its module's globals
            stack.extend(cell.cell_contents for cell in obj.__closure__ or ())
            continue
        stack.extend(gc.get_referents(obj))
    return sum(storages.values())


def test_registry_counts_the_bytes_it_holds():
    """What the cache holds is counted in full: the tables and edge templates of a batch-32 graph, and the
    slot indices the lattice kernels' small gathers build on first use (re-counted when they are added)."""
    clear_cache()
    layer = GridConv2d(4, 6, 3, padding=1)
    g = image_to_graph(torch.randn(32, 4, 20, 20), layer)
    x = g.x.clone().requires_grad_()
    layer(x, g.edge_index, g.edge_type).sum().backward()  # forward and backward
    small = GridConv2d(2, 3, 3, padding=1)
    gs = image_to_graph(torch.randn(1, 2, 6, 6), small)
    xs = gs.x.clone().requires_grad_()
    small(xs, gs.edge_index, gs.edge_type).sum().backward()  # a small problem: the index gathers
    values = [item[0] for item in REGISTRY._items.values()]
    lattices = [v for v in values if type(v).__name__ == "Lattice"]
    assert lattices and any(lat.tensors() for lat in lattices), "the small gather's slot index is held"
    assert REGISTRY.nbytes == _reachable_bytes(values) > 400 * 9 * 8  # the table of one 20 x 20 image at least
    clear_cache()


@pytest.mark.parametrize("occupancy", [0.05, 0.6], ids=["per-tap kernel", "table kernel"])
def test_registry_counts_what_edge_plans_build_later(occupancy):
    """A masked graph's edge plan is cached from its slot table and builds its per-tap pairs, reverse table
    and blocked gathers on first use: the cache re-counts it each time (it counted a fifth of the bytes at
    60% occupancy once forward and backward had run)."""
    clear_cache()
    torch.manual_seed(0)
    layer = GridConv2d(4, 6, 3, padding=1)
    g = image_to_graph(torch.randn(4, 64, 64), layer, mask=torch.rand(64, 64) < occupancy)
    x = g.x.clone().requires_grad_()
    with kernel_trace() as trace:
        layer(x, g.edge_index, g.edge_type, size=g.size()).sum().backward()
    assert trace == ["sparse"]
    values = [item[0] for item in REGISTRY._items.values()]
    assert REGISTRY.nbytes == _reachable_bytes(values) > g.size()[1] * 9 * 4  # the slot table at least
    clear_cache()


def test_registry_stays_within_its_byte_budget(monkeypatch):
    clear_cache()
    monkeypatch.setattr(REGISTRY, "max_bytes", 1 << 20)
    monkeypatch.setattr(REGISTRY, "_warned", True)  # it thrashes on purpose (the warning has its own test)
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    layer = GridConv2d.from_conv2d(conv)
    for size in range(8, 40, 2):
        im = torch.randn(8, 2, size, size - 1, dtype=torch.float64)
        g = image_to_graph(im, conv)
        out = graph_to_image(layer(g.x, g.edge_index, g.edge_type, size=g.size()), g)
        torch.testing.assert_close(out, conv(im), **F64)
        newest = list(REGISTRY._items.values())[-1][1]
        assert REGISTRY.nbytes <= max(REGISTRY.max_bytes, newest)
    clear_cache()


def test_a_cache_below_one_calls_working_set_warns_once(monkeypatch):
    """A bound below what one call builds makes every call rebuild its tables: a silent slow path
    unless it says so (a 4096 x 4096 image under the default 2 GiB did exactly this)."""
    clear_cache()
    layer = GridConv2d(2, 3, 3, padding=1)
    g = image_to_graph(torch.randn(2, 2, 16, 16), layer)
    x = g.x.clone().requires_grad_()
    old = set_cache_limit(max_bytes=4096)
    try:
        with pytest.warns(ResourceWarning, match=r"set_cache_limit\(max_bytes"):
            layer(x, g.edge_index, g.edge_type).sum().backward()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per process (until clear_cache)
            layer(x, g.edge_index, g.edge_type).sum().backward()
    finally:
        set_cache_limit(**old)
    clear_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default bound holds this easily
        for _ in range(3):
            layer(x, g.edge_index, g.edge_type).sum().backward()


def test_set_cache_limit_evicts_at_once_and_refuses_nonsense():
    clear_cache()
    image_to_graph(torch.randn(1, 2, 8, 8), kernel_size=3, padding=1)
    image_to_graph(torch.randn(1, 2, 9, 8), kernel_size=3, padding=1)
    assert len(REGISTRY) >= 2
    old = set_cache_limit(max_entries=1)
    try:
        assert len(REGISTRY) == 1 and cache_info()["max_entries"] == 1
    finally:
        assert set_cache_limit(**old) == {"max_bytes": old["max_bytes"], "max_entries": 1}
    assert cache_info()["max_entries"] == old["max_entries"]
    for bad in (0, -5, 1.5, True, "1GB"):
        with pytest.raises(ValueError, match="max_bytes must be a positive int"):
            set_cache_limit(max_bytes=bad)
    clear_cache()


def test_clear_cache_empties_every_cache():
    up = nn.ConvTranspose2d(2, 3, 3, stride=2)
    twin = convert(nn.Sequential(up, nn.Conv2d(3, 3, 3)))
    twin(torch.randn(1, 2, 5, 5))
    masked = image_to_graph(torch.randn(1, 2, 6, 6), kernel_size=3, padding=1, mask=torch.rand(6, 6) < 0.5)
    GridConv2d(2, 3, 3, padding=1)(masked.x, masked.edge_index, masked.edge_type)
    image_to_graph(torch.randn(1, 2, 5, 5), kernel_size=3, padding=1)  # a full grid's table and edge template
    kinds = {str(key[0]).split()[0] for key in REGISTRY._items}
    assert {"lattice", "table", "edge-plan"} <= kinds, kinds  # lattices, tables and a masked graph's edge plan
    clear_cache()
    assert len(REGISTRY) == 0 and REGISTRY.nbytes == 0


# ------------------------------------------------------------------------------ geometry edits
def test_dilation_edit_of_a_converted_conv_takes_effect_everywhere(device):
    """The DeepLab edit (stride -> dilation) works on nn.Conv2d; on its twin it reaches forward, repr,
    image_to_graph and unconvert (before, the twin kept computing the geometry it was built with)."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1)).double().to(device)
    twin = convert(net)
    for m in (net[0], twin[0]):
        m.stride, m.dilation, m.padding = (1, 1), (2, 2), (2, 2)
    x = images(device=device)
    torch.testing.assert_close(twin(x), net(x), **F64)
    assert "dilation=(2, 2)" in repr(twin[0]) and "stride=(1, 1)" in repr(twin[0])
    g = image_to_graph(x, twin[0])
    assert g.geometry.dilation == (2, 2) and g.out_size == (6, 5)
    out = twin[0](g.x, g.edge_index, g.edge_type, size=g.size())
    torch.testing.assert_close(graph_to_image(out, g), net(x), **F64)
    back = unconvert(twin)
    assert back[0].dilation == (2, 2) and back[0].stride == (1, 1)
    torch.testing.assert_close(back(x), net(x), **F64)


def test_a_graph_built_before_the_edit_is_refused_after_it():
    layer = GridConv2d(3, 4, 3, stride=2, padding=1)
    g = image_to_graph(torch.randn(1, 3, 6, 6), layer)
    layer.stride = (1, 1)
    with pytest.raises(ValueError, match=r"computes the convolution k3x3 s1x1 .* another one \(grid k3x3 s2x2"):
        layer(g.x, g.edge_index, g.edge_type)


# -------------------------------------------------------------------------------- the workflow
class Images(Dataset):
    """A small PyG Dataset of images with labels; the transform turns each into a pixel graph."""

    def __init__(self, count: int, transform=None) -> None:
        super().__init__(transform=transform)
        gen = torch.Generator().manual_seed(5)
        self.images = torch.randn(count, 3, 8, 6, generator=gen, dtype=torch.float64)
        self.labels = torch.randint(0, 3, (count,), generator=gen)

    def len(self) -> int:
        return len(self.images)

    def get(self, idx: int) -> Data:
        return Data(image=self.images[idx], y=self.labels[idx:idx + 1])


class GraphNet(nn.Module):
    """GCNConv on the 3x3 pixel graph, then a strided GridConv2d, pooled to class logits."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        from torch_geometric.nn import GCNConv

        self.gcn = GCNConv(3, 3).double()
        self.conv = GridConv2d.from_conv2d(conv)
        self.head = nn.Linear(conv.out_channels, 3).double()

    def forward(self, batch, strided) -> torch.Tensor:
        h = torch.relu(self.gcn(batch.x, batch.edge_index))
        out = self.conv(h, strided.edge_index, strided.edge_type, size=strided.size())
        return self.head(graph_to_image(out, strided).mean((2, 3)))


class ImageNet(nn.Module):
    """The same model with nn.Conv2d on images (the GCN on the same graph)."""

    def __init__(self, graph_net: GraphNet, conv: nn.Conv2d) -> None:
        super().__init__()
        self.gcn, self.conv, self.head = copy.deepcopy(graph_net.gcn), conv, copy.deepcopy(graph_net.head)

    def forward(self, batch, images) -> torch.Tensor:
        h = torch.relu(self.gcn(batch.x, batch.edge_index))
        h = graph_to_image(h, batch)
        return self.head(self.conv(h).mean((2, 3)))


def test_dataset_transform_loader_mixed_model_training_step(device):
    """Dataset -> ToPixelGraph -> DataLoader -> .to(device) -> GCNConv + GridConv2d -> loss -> backward ->
    SGD step: the same parameters afterwards as the model with nn.Conv2d (float64)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1).double()
    graph_net = GraphNet(conv).to(device)
    image_net = ImageNet(graph_net, copy.deepcopy(conv)).to(device)
    dataset = Images(6, transform=ToPixelGraph(kernel_size=3, padding=1))
    strided_transform = ToPixelGraph(conv)
    opt_g = torch.optim.SGD(graph_net.parameters(), lr=0.1)
    opt_i = torch.optim.SGD(image_net.parameters(), lr=0.1)
    for batch in DataLoader(dataset, batch_size=3):
        batch = batch.to(device)
        strided = Batch.from_data_list([strided_transform(Data(image=graph_to_image(g.x, g)))
                                        for g in batch.to_data_list()])
        for net, opt, extra in ((graph_net, opt_g, strided), (image_net, opt_i, None)):
            opt.zero_grad()
            with kernel_trace() as trace:
                logits = net(batch, extra)
            if net is graph_net:
                assert trace == ["grid"]
            torch.nn.functional.cross_entropy(logits, batch.y).backward()
            opt.step()
    for (name, p), q in zip(graph_net.named_parameters(), image_net.parameters()):
        torch.testing.assert_close(p, q, **F64, msg=lambda m: f"{name}: {m}")

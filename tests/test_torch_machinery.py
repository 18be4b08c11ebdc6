"""torch's machinery on every layer kind: torch's own result, or a clear error naming what is unsupported; never
a silent wrong number, a crash or a hang.

The families, each parametrised over the layer kinds it applies to (image twins that ``convert`` makes: 1-d,
2-d, 3-d, pointwise, depthwise, grouped, strided, dilated, reflect-padded, transposed; graph layers on pixel
graphs: grid, strided, pointwise, depthwise, separable, masked, transposed, attention):

1. forward-mode AD and transforms (``torch.func.jvp`` over inputs and over weights, dual tensors, ``jacfwd``,
   ``vmap``, ``vmap`` of ``grad``);
2. state edited after the fact (a converted conv's attributes; a pixel graph's edges in place, directly or
   through ``.data``, eager and compiled);
3. every hook kind on a converted conv;
4. autocast;
5. graphs without a size, strided graphs, graphs whose ``EdgeIndex`` PyG sorted, flipped or permuted; ``repr``;
6. ``torch.jit.trace`` run at another size, ``torch.export`` with a dynamic batch;
7. the Inf / NaN pattern;
8. ``FlopCounterMode``;
9. ``DataLoader`` workers forked after the compiled loops ran; builders under ``torch.inference_mode``;
10. batching masked with full graphs;
12. ``verify_model`` on float32 (a correct network passes, a broken one fails).

(Family 11, the strides of outputs and gradients, is ``tests/test_layout.py``; family 13, the builders' one
default padding, ``tests/test_geometry.py``.) The reference is always the torch module itself, in float64.
"""
from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacfwd, jvp, vmap
from torch_geometric.data import Batch, Data
from torch_geometric.loader import DataLoader

from gridgraph import (DepthwiseConv2d, GridConv2d, GridConvTranspose2d, PixelAttention, PointwiseConv2d,
                       SeparableConv2d, complete_pixel_graph, convert, graph_to_image, image_to_graph,
                       positions_to_graph, sparse_to_graph, verify_model)
from gridgraph.nn.functional import kernel_trace
from gridgraph.pixel_graph import pixel_structure

F64 = dict(rtol=1e-9, atol=1e-9)
D = torch.float64

# --------------------------------------------------------------------------------------- layer kinds
TWINS = {
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1), (2, 3, 5, 6)),
    "pointwise": (lambda: nn.Conv2d(3, 4, 1), (2, 3, 5, 6)),
    "depthwise": (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4), (2, 4, 5, 6)),
    "grouped": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (2, 4, 5, 6)),
    "strided": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (2, 3, 5, 6)),
    "dilated": (lambda: nn.Conv2d(3, 4, 3, padding=2, dilation=2), (2, 3, 5, 6)),
    "reflect": (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (2, 3, 5, 6)),
    "transposed": (lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1), (2, 3, 4, 5)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), (2, 3, 7)),
    "transposed1d": (lambda: nn.ConvTranspose1d(3, 4, 3, stride=2), (2, 3, 5)),
    "conv3d": (lambda: nn.Conv3d(3, 4, 3, padding=1), (2, 3, 3, 4, 4)),
}


def _twin(kind: str, dtype=D):
    make, shape = TWINS[kind]
    torch.manual_seed(0)
    conv = make().to(dtype)
    return conv, convert(conv), torch.randn(shape, dtype=dtype)


class _Ref(nn.Module):
    """The torch module behind a graph kind, with the graph module's parameter names (``layer.*``)."""

    def __init__(self, layer: nn.Module, mask=None) -> None:
        super().__init__()
        self.layer, self.mask = layer, mask

    def forward(self, image):
        if self.mask is not None:  # submanifold: the convolution of the image with inactive pixels zeroed, read
            m = self.mask[:, None]  # at the active pixels
            out = self.layer(torch.where(m, image, torch.zeros_like(image)))
            return torch.where(m, out, torch.zeros_like(out))
        return self.layer(image)


class _OnGraph(nn.Module):
    """A graph layer on the pixel graph of its input image (built once): image -> nodes -> layer -> image."""

    def __init__(self, layer: nn.Module, graph, mask=None, edges: bool = True) -> None:
        super().__init__()
        self.layer, self.graph, self.mask, self.edges = layer, graph, mask, edges

    def forward(self, image):
        g = self.graph
        nodes = image.movedim(1, -1)
        x = nodes[self.mask] if self.mask is not None else nodes.reshape(-1, image.size(1))
        if not self.edges:
            out = self.layer(x)
        elif isinstance(self.layer, PixelAttention):
            out = self.layer(x, g.edge_index)
        else:
            out = self.layer(x, g.edge_index, g.edge_type, size=g.size())
        return graph_to_image(out, g, side="output")


class _SeparableRef(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False)
        self.pointwise = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        return self.pointwise(self.depthwise(x))


class _AttentionRef(nn.Module):
    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.mha = mha

    def forward(self, image):
        seq = image.flatten(2).transpose(1, 2)
        return self.mha(seq, seq, seq, need_weights=True)[0].transpose(1, 2).reshape(image.shape)


def _graph_kind(kind: str):
    """``(ours, torch reference, image)``: a graph layer on a pixel graph and the torch module it equals."""
    torch.manual_seed(0)
    shape = (2, 4, 5, 6)
    image = torch.randn(shape, dtype=D)
    if kind == "separable":
        ref = _Ref(_SeparableRef(4, 3)).to(D)
        layer = SeparableConv2d(4, 3, 3, padding=1).to(D)
        layer.load_state_dict(ref.layer.state_dict())
        return _OnGraph(layer, image_to_graph(image, ref.layer.depthwise)), ref, image
    if kind == "attention":
        mha = nn.MultiheadAttention(4, 2, batch_first=True).to(D)
        return (_OnGraph(PixelAttention.from_multihead_attention(mha), complete_pixel_graph(image)),
                _AttentionRef(mha), image)
    if kind == "masked":
        conv = nn.Conv2d(4, 3, 3, padding=1).to(D)
        mask = torch.rand(2, 5, 6) < 0.6
        ours = _OnGraph(GridConv2d.from_conv2d(conv), image_to_graph(image, conv, mask=mask), mask=mask)
        return ours, _Ref(conv, mask), image
    conv = {"grid": lambda: nn.Conv2d(4, 3, 3, padding=1), "strided": lambda: nn.Conv2d(4, 3, 3, stride=2, padding=1),
            "pointwise": lambda: nn.Conv2d(4, 3, 1), "depthwise": lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4),
            "transposed": lambda: nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1)}[kind]().to(D)
    cls = {"grid": GridConv2d, "strided": GridConv2d, "pointwise": PointwiseConv2d, "depthwise": DepthwiseConv2d,
           "transposed": GridConvTranspose2d}[kind]
    layer = cls.from_conv_transpose2d(conv) if kind == "transposed" else cls.from_conv2d(conv)
    graph = image_to_graph(image, conv)
    return _OnGraph(layer, graph, edges=kind != "pointwise"), _Ref(conv), image


GRAPH_KINDS = ["grid", "strided", "pointwise", "depthwise", "separable", "masked", "transposed", "attention"]


def _kind(kind: str):
    """``(ours, reference, input)`` for a twin (``twin:...``) or a graph kind (``graph:...``)."""
    family, name = kind.split(":")
    if family == "twin":
        conv, twin, x = _twin(name)
        return twin, conv, x
    return _graph_kind(name)


ALL_KINDS = [f"twin:{k}" for k in TWINS] + [f"graph:{k}" for k in GRAPH_KINDS]


# ------------------------------------------------------------------ 1. forward-mode AD and transforms
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_jvp_over_the_input_equals_torch(kind):
    ours, ref, x = _kind(kind)
    t = torch.randn_like(x)
    got, want = jvp(ours, (x,), (t,)), jvp(ref, (x,), (t,))
    torch.testing.assert_close(got[0], want[0], **F64)
    torch.testing.assert_close(got[1], want[1], **F64)


@pytest.mark.parametrize("kind", [k for k in ALL_KINDS if k != "graph:attention"])
def test_jvp_over_the_weights_equals_torch(kind):
    """Weights as the primal through functional_call (the graph kinds share the torch module's names)."""
    ours, ref, x = _kind(kind)
    params = {n: p.detach() for n, p in ours.named_parameters()}
    ref_names = {n for n, _ in ref.named_parameters()}
    assert set(params) == ref_names
    tangents = {n: torch.randn_like(p) for n, p in params.items()}
    got = jvp(lambda p: functional_call(ours, p, (x,)), (params,), (tangents,))
    want = jvp(lambda p: functional_call(ref, p, (x,)), (params,), (tangents,))
    torch.testing.assert_close(got[1], want[1], **F64)


@pytest.mark.parametrize("kind", [f"twin:{k}" for k in ("conv2d", "depthwise", "transposed", "conv3d")] +
                         ["graph:grid", "graph:masked"])
def test_dual_tensors_and_jacfwd_equal_torch(kind):
    import torch.autograd.forward_ad as fwAD

    ours, ref, x = _kind(kind)
    t = torch.randn_like(x)
    with fwAD.dual_level():
        got = fwAD.unpack_dual(ours(fwAD.make_dual(x, t))).tangent
        want = fwAD.unpack_dual(ref(fwAD.make_dual(x, t))).tangent
    torch.testing.assert_close(got, want, **F64)
    small = x[:1]
    if kind.startswith("graph"):
        return  # a graph holds its image count
    torch.testing.assert_close(jacfwd(ours)(small), jacfwd(ref)(small), **F64)


@pytest.mark.parametrize("kind", [f"twin:{k}" for k in TWINS])
def test_vmap_and_per_sample_gradients_equal_torch(kind):
    ours, ref, x = _kind(kind)
    stack = torch.stack([x, 2 * x, -x])  # vmap over a leading dimension of image batches
    torch.testing.assert_close(vmap(ours)(stack), vmap(ref)(stack), **F64)

    def loss(module):
        return lambda sample: module(sample.unsqueeze(0)).square().sum()

    torch.testing.assert_close(vmap(torch.func.grad(loss(ours)))(x), vmap(torch.func.grad(loss(ref)))(x), **F64)


# ------------------------------------------------------------------ 2. state edited after the fact
def _edits(ndim: int, transposed: bool):
    t = lambda v: (v,) * ndim  # noqa: E731
    edits = [("kernel_size", t(5)), ("kernel_size", t(1)), ("padding", t(2)), ("padding", t(0)), ("stride", t(2)),
             ("dilation", t(2)), ("groups", 2), ("padding_mode", "zeros"), ("padding_mode", "circular"),
             ("padding_mode", "reflect"), ("padding", 1), ("stride", 2)]
    if not transposed:
        edits += [("padding", "same"), ("padding", "valid")]
    return edits


@pytest.mark.parametrize("kind", ["conv2d", "depthwise", "grouped", "reflect", "transposed", "conv1d", "conv3d"])
def test_attribute_edits_give_what_torch_gives_or_a_clear_error(kind):
    """After the same edit the twin returns what nn.ConvNd returns after it (torch ignores some: kernel_size,
    a non-zero padding mode's padding), or both raise, ours a clear ValueError/TypeError; never a third answer."""
    make, shape = TWINS[kind]
    bias_free = nn.Module  # groups edits: torch only checks channel counts, with a bias of the old size
    del bias_free
    for attr, value in _edits(len(shape) - 2, kind.startswith("transposed")):
        torch.manual_seed(0)
        conv = make().to(D)
        twin = convert(conv)
        x = torch.randn(shape, dtype=D)
        twin(x)  # plans cached before the edit
        setattr(conv, attr, value)
        setattr(twin, attr, value)
        try:
            want = conv(x)
        except Exception:  # noqa: BLE001  (torch refuses: so must we, clearly)
            with pytest.raises((ValueError, TypeError)) as info:
                twin(x)
            assert len(str(info.value)) > 20
            continue
        got = twin(x)
        assert got.shape == want.shape, (attr, value)
        torch.testing.assert_close(got, want, **F64)


def test_groups_edit_with_matching_channels_equals_torch():
    for make, shape in ((lambda: nn.Conv2d(4, 4, 3, padding=1, bias=False), (2, 8, 5, 5)),
                        (lambda: nn.ConvTranspose2d(4, 4, 3, bias=False), (2, 4, 5, 5))):
        conv = make().to(D)
        twin = convert(conv)
        conv.groups = twin.groups = 2
        x = torch.randn(shape, dtype=D)
        torch.testing.assert_close(twin(x), conv(x), **F64)


def _naive(layer: GridConv2d, x, edge_index, edge_type, num_dst):
    """PyG's semantics of a typed edge list, spelled out: every edge j -> i of tap t adds W_t x_j."""
    w = layer.weight
    groups, (c_out, c_in_g) = layer.groups, w.shape[:2]
    full = torch.zeros(w[0, 0].numel(), c_out, c_in_g * groups, dtype=w.dtype)
    taps = w.flatten(2).permute(2, 0, 1)
    for g in range(groups):
        rows, cols = slice(g * c_out // groups, (g + 1) * c_out // groups), slice(g * c_in_g, (g + 1) * c_in_g)
        full[:, rows, cols] = taps[:, rows]
    messages = torch.einsum("eoc,ec->eo", full[edge_type], x[edge_index[0]])
    out = torch.zeros(num_dst, c_out, dtype=w.dtype).index_add_(0, edge_index[1], messages)
    return out if layer.bias is None else out + layer.bias


EDGE_EDITS = ["index", "index-data", "types-data", "target", "types"]


def _edit(graph, how: str) -> None:
    ei, size = graph.edge_index, graph.size()
    if how == "index":
        ei[0, 3] = (ei[0, 3] + 1) % size[0]
    elif how == "index-data":
        ei.data[0, 4] = (ei.data[0, 4] + 2) % size[0]
    elif how == "types-data":
        graph.edge_type.data[2] = (graph.edge_type.data[2] + 1) % 9
    elif how == "target":
        ei[1, 7] = (ei[1, 7] + 1) % size[1]
    elif how == "types":
        graph.edge_type[5] = (graph.edge_type[5] + 4) % 9


@pytest.mark.parametrize("conv", ["grid", "strided", "depthwise", "masked"])
@pytest.mark.parametrize("how", EDGE_EDITS)
def test_in_place_edge_edits_compute_the_edited_edges(conv, how):
    """An edit (also through .data, which torch hides from version counters) makes the graph a plain edge
    list: the layer computes PyG's sum over the edited edges, never the old pixel graph."""
    torch.manual_seed(0)
    c = {"grid": nn.Conv2d(3, 4, 3, padding=1), "strided": nn.Conv2d(3, 4, 3, stride=2, padding=1),
         "depthwise": nn.Conv2d(3, 3, 3, padding=1, groups=3), "masked": nn.Conv2d(3, 4, 3, padding=1)}[conv].to(D)
    layer = GridConv2d.from_conv2d(c)
    image = torch.randn(2, 3, 5, 6, dtype=D)
    graph = image_to_graph(image, c, mask=torch.rand(2, 5, 6) < 0.7 if conv == "masked" else None)
    layer(graph.x, graph.edge_index, graph.edge_type, size=graph.size())
    _edit(graph, how)
    assert pixel_structure(graph.edge_index) is None
    with kernel_trace() as trace:
        got = layer(graph.x, graph.edge_index, graph.edge_type, size=graph.size())
    assert trace == ["edges"]
    want = _naive(layer, graph.x, graph.edge_index.as_tensor(), graph.edge_type.clone(), graph.size()[1])
    torch.testing.assert_close(got, want, **F64)
    assert "edited in place" in repr(graph.edge_index)


@pytest.mark.parametrize("how", ["index", "index-data", "types-data"])
def test_in_place_edge_edits_after_torch_compile_recompile(how):
    """A compiled layer guards on the graph being intact: after an edit it recompiles for the edited edges."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    c = nn.Conv2d(3, 4, 3, padding=1).to(D)
    layer = GridConv2d.from_conv2d(c)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    graph = image_to_graph(torch.randn(1, 3, 4, 5, dtype=D), c)
    torch.testing.assert_close(compiled(graph.x, graph.edge_index, graph.edge_type, size=graph.size()),
                               c(torch.zeros(0)).new_empty(0) if False else
                               layer(graph.x, graph.edge_index, graph.edge_type, size=graph.size()), **F64)
    _edit(graph, how)
    got = compiled(graph.x, graph.edge_index, graph.edge_type, size=graph.size())
    want = _naive(layer, graph.x, graph.edge_index.as_tensor(), graph.edge_type.clone(), graph.size()[1])
    torch.testing.assert_close(got, want, **F64)


def test_edge_types_alias_behaves_as_a_tensor():
    g = image_to_graph(torch.randn(1, 2, 3, 3), kernel_size=3)
    types = g.edge_type
    assert type(types + 0) is torch.Tensor and torch.equal(types, g.edge_index.edge_type)
    assert types.tolist() == g.edge_index.edge_type.tolist() and types.data_ptr() != 0
    assert torch.equal(copy.deepcopy(types), types) and torch.equal(torch.load(_saved(types)), types)
    with pytest.raises(AttributeError, match="cannot be replaced"):
        g.edge_index.edge_type.data = torch.zeros_like(types)
    with pytest.raises(ValueError, match="read-only"):
        types.numpy()[0] = 1


def _saved(t):
    import io

    buffer = io.BytesIO()
    torch.save(t, buffer)
    buffer.seek(0)
    return buffer


# ------------------------------------------------------------------------------------- 3. hooks
@pytest.mark.parametrize("kind", ["conv2d", "transposed", "conv1d", "conv3d"])
@pytest.mark.parametrize("inplace", [False, True])
def test_every_hook_kind_fires_on_the_twin_as_on_the_original(kind, inplace):
    def register(module, log):
        module.register_forward_pre_hook(lambda m, a: log.append("pre"))
        module.register_forward_pre_hook(lambda m, a, k: log.append("pre-kwargs"), with_kwargs=True)
        module.register_forward_hook(lambda m, a, o: log.append("forward"))
        module.register_forward_hook(lambda m, a, o: log.append("always"), always_call=True)
        module.register_full_backward_pre_hook(lambda m, g: log.append("backward-pre"))
        module.register_full_backward_hook(lambda m, gi, go: log.append(("backward", gi[0].shape)))
        module.weight.register_hook(lambda g: log.append("weight"))
        module.bias.register_post_accumulate_grad_hook(lambda p: log.append("bias-accumulated"))
        module.register_state_dict_post_hook(lambda *a: log.append("state_dict"))
        module.register_load_state_dict_post_hook(lambda *a: log.append("loaded"))

    def run(module, log, x):
        log.clear()
        module(x).sum().backward()
        module.load_state_dict(module.state_dict())
        return list(log)

    make, shape = TWINS[kind]
    conv = make().to(D)
    log = []
    register(conv, log)
    x = torch.randn(shape, dtype=D, requires_grad=True)
    twin = convert(copy.deepcopy(conv) if inplace else conv, inplace=inplace)
    if inplace:
        twin_log = []
        conv2 = make().to(D)
        register(conv2, twin_log)
        twin = convert(conv2, inplace=True)
        assert run(conv, log, x) == run(twin, twin_log, x)
    else:
        want = run(conv, log, x)
        assert run(twin, log, x) == want
        assert {"pre", "pre-kwargs", "forward", "always", "backward-pre", "weight", "bias-accumulated",
                "state_dict", "loaded"} <= set(e if isinstance(e, str) else e[0] for e in want)


# ------------------------------------------------------------------------------------ 4. autocast
@pytest.mark.parametrize("kind", ["conv2d", "depthwise", "grouped", "transposed", "conv1d", "conv3d"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cast", [torch.bfloat16, torch.float16])
def test_autocast_follows_the_torch_module(kind, dtype, cast):
    conv, twin, x = _twin(kind, dtype)
    with torch.autocast("cpu", dtype=cast):
        want, got = conv(x), twin(x)
    assert got.dtype == want.dtype
    tol = 1e-9 if want.dtype == torch.float64 else (1e-4 if want.dtype == torch.float32 else 3e-2)
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.abs().max().item())


# ----------------------------------------------------------------- 5. sizes, permutations, repr
PERMUTATIONS = ["no-size", "sort-col", "sort-row", "flip", "permute", "permute-no-size"]


@pytest.mark.parametrize("conv", ["grid", "strided", "pointwise", "depthwise", "masked", "transposed"])
@pytest.mark.parametrize("how", PERMUTATIONS)
def test_permuted_and_sizeless_graphs_give_the_right_rows_or_a_clear_error(conv, how):
    torch.manual_seed(0)
    c = {"grid": nn.Conv2d(3, 4, 3, padding=1), "strided": nn.Conv2d(3, 4, 3, stride=2, padding=1),
         "pointwise": nn.Conv2d(3, 4, 1), "depthwise": nn.Conv2d(3, 3, 3, padding=1, groups=3),
         "masked": nn.Conv2d(3, 4, 3, padding=1),
         "transposed": nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1)}[conv].to(D)
    layer = GridConvTranspose2d.from_conv_transpose2d(c) if conv == "transposed" else GridConv2d.from_conv2d(c)
    image = torch.randn(2, 3, 5, 6, dtype=D)
    g = image_to_graph(image, c, mask=torch.rand(2, 5, 6) < 0.7 if conv == "masked" else None)
    ei, et, size = g.edge_index, g.edge_type, g.size()
    reference = layer(g.x, ei.as_tensor().clone(), et.clone(), size=size)  # PyG's semantics, plain tensors
    if how == "no-size":
        got = layer(g.x, ei, et)
        torch.testing.assert_close(got, reference, **F64)
        return
    if how.startswith("sort"):
        edges, perm = ei.sort_by("col" if how == "sort-col" else "row")
    elif how == "flip":
        edges, perm = ei.flip(0), None
    else:
        perm = torch.randperm(ei.size(1))
        edges = ei[:, perm]
    types = et if perm is None else et[perm]
    assert repr(edges)  # PyG-made instances print
    kwargs = {} if how == "permute-no-size" else {"size": size[::-1] if how == "flip" else size}
    x = g.x
    if how == "flip":  # sources and targets swap: the flipped graph runs on the targets' node set
        x = torch.randn(size[1], g.x.size(1), dtype=D)
        if isinstance(layer, GridConv2d) and conv != "transposed":
            want = _naive(layer, x, edges.as_tensor() if hasattr(edges, "as_tensor") else edges, types, size[0])
            torch.testing.assert_close(layer(x, edges, types, **kwargs), want, **F64)
        else:
            assert layer(x, edges, types, **kwargs).shape[0] == size[0]
        return
    got = layer(x, edges, types, **kwargs)
    torch.testing.assert_close(got, reference, **F64)


@pytest.mark.parametrize("how", PERMUTATIONS[1:])
def test_attention_on_permuted_edges_is_unchanged(how):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(4, 2, batch_first=True).to(D)
    layer = PixelAttention.from_multihead_attention(mha)
    g = image_to_graph(torch.randn(1, 4, 4, 5, dtype=D), kernel_size=3, padding=1)
    want = layer(g.x, g.edge_index)
    ei = g.edge_index
    if how.startswith("sort"):
        edges, _ = ei.sort_by("col" if how == "sort-col" else "row")
    elif how == "flip":
        edges = ei.flip(0)  # a symmetric stencil: the same edge set
    else:
        edges = ei[:, torch.randperm(ei.size(1))]
    assert repr(edges) and repr(layer)
    torch.testing.assert_close(layer(g.x, edges), want, **F64)


# ---------------------------------------------------------------------------- 6. tracing, export
@pytest.mark.parametrize("kind", ["conv2d", "depthwise", "transposed", "conv1d", "conv3d"])
def test_trace_at_another_size_is_a_clear_error_and_export_takes_any_batch(kind):
    conv, twin, x = _twin(kind)
    traced = torch.jit.trace(twin, (x,), check_trace=False)
    torch.testing.assert_close(traced(x), conv(x), **F64)
    bigger = torch.randn(*x.shape[:2], *[s + 2 for s in x.shape[2:]], dtype=D)
    with pytest.raises(Exception, match="traced|size|grid"):
        traced(bigger)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(twin, (x,), dynamic_shapes=({0: batch},))
    for b in (1, 3, 5):
        xb = torch.randn(b, *x.shape[1:], dtype=D)
        torch.testing.assert_close(program.module()(xb), conv(xb), **F64)


# ------------------------------------------------------------------------------------ 7. Inf, NaN
def _pattern(t):
    return t.isnan(), t.isinf() & (t > 0), t.isinf() & (t < 0)


SCENARIOS = ["x-inf", "x-nan", "x-both-infs", "w-inf", "w-nan", "b-inf"]


def _poison(module, x, scenario: str) -> None:
    with torch.no_grad():
        if scenario == "x-inf":
            x.view(-1)[5] = float("inf")
        elif scenario == "x-nan":
            x.view(-1)[7] = float("nan")
        elif scenario == "x-both-infs":
            x.view(-1)[3], x.view(-1)[17] = float("inf"), -float("inf")
        elif scenario == "w-inf":
            module.weight.view(-1)[2] = float("inf")
        elif scenario == "w-nan":
            module.weight.view(-1)[4] = float("nan")
        elif scenario == "b-inf":
            module.bias[1] = float("inf")


@pytest.mark.parametrize("kind", list(TWINS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_nan_and_inf_pattern_equals_torch(kind, dtype):
    """For every scenario the twin's NaN/Inf pattern is torch's. Where torch's own memory formats disagree (its
    float32 oneDNN kernels treat zero padding differently in NCHW and channels-last for a few layer kinds), the
    twin matches one of them. bfloat16 is not compared: torch's own float32 and bfloat16 patterns differ."""
    for scenario in SCENARIOS:
        if kind == "transposed1d" and dtype != torch.float64 and scenario.startswith("w-"):
            continue  # a known difference, not hidden: see test_transposed_1d_low_precision_inf_weights_differ
        conv, _, x = _twin(kind, dtype)
        _poison(conv, x, scenario)
        twin = convert(conv)
        formats = [x] + ([x.to(memory_format=torch.channels_last)] if x.dim() == 4 else [])
        with torch.no_grad():
            wants = [conv(f) for f in formats]
            for f in formats:
                got = _pattern(twin(f))
                assert any(all(torch.equal(a, b) for a, b in zip(got, _pattern(w))) for w in wants), scenario


def test_transposed_1d_low_precision_inf_weights_differ():
    """The one pattern gridgraph does not reproduce: torch's float32 ConvTranspose1d (oneDNN) multiplies an
    infinite weight by the implicit padding at the ends of the output (NaN there), where its float64 kernel and
    its 2-d and 3-d transposed kernels leave those taps out, as gridgraph does. This test pins the difference
    down so that it is known, and fails if torch or gridgraph changes."""
    conv = nn.ConvTranspose1d(3, 4, 3, stride=2)
    with torch.no_grad():
        conv.weight[0, 0, 2] = float("inf")
    x = torch.randn(2, 3, 5)
    with torch.no_grad():
        want, got = conv(x), convert(conv)(x)
    assert want.isnan().sum() == 2 and got.isnan().sum() == 0
    assert torch.equal(want.isinf(), got.isinf())
    finite = ~want.isnan()
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["grid", "strided", "depthwise", "masked", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nan_and_inf_pattern_of_graph_layers_equals_torch(kind, dtype):
    for scenario in SCENARIOS:
        ours, ref, x = _graph_kind(kind)
        ours, ref, x = ours.to(dtype), ref.to(dtype), x.to(dtype)
        ours.graph.x = None
        _poison(ref.layer, x, scenario)
        ours.layer.load_state_dict(ref.layer.state_dict())
        with torch.no_grad():
            got, want = _pattern(ours(x)), _pattern(ref(x))
        if kind == "masked":  # off the mask both are zero by construction; compare on it
            keep = ours.mask[:, None].expand_as(got[0]).clone()
            if dtype != torch.float64 and scenario.startswith("w-"):
                # an absent tap of a masked graph is an inactive pixel (a zero torch multiplies: NaN) or, at the
                # border, torch's padding, which its float32 kernels leave out: compare the interior only
                keep[..., 0, :] = keep[..., -1, :] = keep[..., :, 0] = keep[..., :, -1] = False
            got, want = [t & keep for t in got], [t & keep for t in want]
        assert all(torch.equal(a, b) for a, b in zip(got, want)), scenario


# ------------------------------------------------------------------------------------ 8. FLOPs
@pytest.mark.parametrize("kind", list(TWINS))
def test_flop_counter_counts_every_twin_as_torch(kind):
    from torch.utils.flop_counter import FlopCounterMode

    conv, twin, x = _twin(kind)
    counts = []
    for module in (conv, twin):
        xi = x.clone().requires_grad_()
        with FlopCounterMode(display=False) as counter:
            module(xi).sum().backward()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


# ------------------------------------------------------------------------------------ 9. processes
class _Images(torch.utils.data.Dataset):
    def __init__(self, twin, conv):
        self.twin, self.conv = twin, conv

    def __len__(self):
        return 4

    def __getitem__(self, i):
        x = torch.randn(1, 8, 12, 12, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            return (self.twin(x) - self.conv(x)).abs().max()


def test_forked_dataloader_workers_run_layers_after_the_compiled_loops_ran():
    """numba's OpenMP pool cannot run in a forked child (it would terminate it): the child runs the torch path."""
    import multiprocessing

    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    twin = convert(conv)
    with torch.no_grad():
        twin(torch.randn(1, 8, 12, 12))  # the parent starts the compiled loops
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork start method here")
    loader = torch.utils.data.DataLoader(_Images(twin, conv), batch_size=2, num_workers=2,
                                         multiprocessing_context="fork", timeout=120)
    errors = torch.cat(list(loader))
    assert errors.max() < 1e-4


def test_graph_builders_and_layers_work_under_inference_mode():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    layer = GridConv2d.from_conv2d(conv)
    with torch.inference_mode():
        image = torch.randn(2, 3, 5, 6)
        graphs = [image_to_graph(image, conv), image_to_graph(image, conv, mask=torch.rand(2, 5, 6) < 0.5),
                  sparse_to_graph(torch.tensor([[0, 1], [1, 2], [1, 3]]), torch.randn(3, 3), (5, 6), conv),
                  positions_to_graph(torch.rand(6, 2) * 4, torch.randn(6, 3), conv)]
        for g in graphs:
            assert layer(g.x, g.edge_index, g.edge_type, size=g.size()).shape[1] == 4
        full = graphs[0]
        torch.testing.assert_close(graph_to_image(layer(full.x, full.edge_index, full.edge_type, size=full.size()),
                                                  full), conv(image), rtol=1e-5, atol=1e-5)
        full.edge_index[0, 0] = 1  # edits inside inference mode are seen too
        assert pixel_structure(full.edge_index) is None
    # a graph built under inference mode is an ordinary graph afterwards (autograd included)
    x = graphs[1].x.clone().requires_grad_()
    layer(x, graphs[1].edge_index, graphs[1].edge_type, size=graphs[1].size()).sum().backward()
    assert x.grad is not None


# ------------------------------------------------------------------------------------ 10. batching
def test_batching_masked_with_full_graphs_is_a_clear_error_and_all_true_masks_batch():
    conv = nn.Conv2d(3, 4, 3, padding=1).to(D)
    layer = GridConv2d.from_conv2d(conv)
    image = torch.randn(1, 3, 5, 5, dtype=D)
    mask = torch.rand(1, 5, 5) < 0.5
    masked, full = image_to_graph(image, conv, mask=mask), image_to_graph(image, conv)
    for pair in ([masked, full], [full, masked]):
        with pytest.raises(ValueError, match="all-True mask"):
            Batch.from_data_list(pair)
    batch = Batch.from_data_list([masked, image_to_graph(image, conv, mask=torch.ones(1, 5, 5, dtype=torch.bool))])
    out = graph_to_image(layer(batch.x, batch.edge_index, batch.edge_type, size=batch.size()), batch)
    torch.testing.assert_close(out[1:], conv(image), **F64)
    torch.testing.assert_close(out[:1], conv(image * mask[:, None]) * mask[:, None], **F64)


# ------------------------------------------------------------------------------------ 12. verify_model
def _mobile_block(c: int, expand: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c, c * expand, 1, bias=False), nn.BatchNorm2d(c * expand), nn.ReLU6(inplace=True),
                         nn.Conv2d(c * expand, c * expand, 3, padding=1, groups=c * expand, bias=False),
                         nn.BatchNorm2d(c * expand), nn.ReLU6(inplace=True), nn.Conv2d(c * expand, c, 1, bias=False),
                         nn.BatchNorm2d(c))


def _mobile_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
                         *[_mobile_block(16, 6) for _ in range(4)], nn.Conv2d(16, 64, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


@pytest.mark.parametrize("training", [False, True])
def test_verify_model_passes_a_correct_float32_network_and_fails_broken_ones(training):
    net = _mobile_net().train(training)
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    report = verify_model(net, convert(net), x, grads=True)
    assert report.passed, str(report)
    assert any("float64 run" in note for note in report.notes)

    broken = convert(net)
    with torch.no_grad():
        broken[3][3].weight[0, 0, 0, 0] += 1e-3  # one tap of one depthwise layer, slightly off
    assert not verify_model(net, broken, x, grads=True).passed

    wrong_backward = convert(net)
    wrong_backward[3][0].register_full_backward_hook(lambda m, gi, go: (gi[0] * 1.001,))
    report = verify_model(net, wrong_backward, x, grads=True)
    assert not report.passed
    assert any(r.backward_alone > r.backward_tolerance for r in report.layers)


def test_verify_model_float64_stays_strict():
    net = _mobile_net().double().eval()
    x = torch.randn(2, 3, 24, 24, dtype=D)
    report = verify_model(net, convert(net), x, grads=True)
    assert report.passed and not report.notes
    assert report.tol == 1e-10
    broken = convert(net)
    with torch.no_grad():
        broken[0].weight[0, 0, 0, 0] += 1e-8
    assert not verify_model(net, broken, x, grads=True).passed


def test_error_messages_name_the_argument():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    twin = convert(conv)
    with pytest.raises(ValueError, match=re.escape("expected input with 3 channels")):
        twin(torch.randn(1, 5, 4, 4))
    twin.bias = nn.Parameter(torch.zeros(7))
    with pytest.raises(ValueError, match=re.escape("expected bias of shape (4,)")):
        twin(torch.randn(1, 3, 4, 4))
    assert Data  # noqa: the PyG import is used by the batching tests

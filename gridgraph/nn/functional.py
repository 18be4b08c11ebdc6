"""``gridgraph.nn.functional``: the stateless graph convolution, as ``torch.nn.functional.conv2d`` is for ``nn.Conv2d``.

:func:`conv` computes, for every target node ``i``,

.. math::
    \\mathbf{x}'_i = \\mathbf{b} + \\sum_{(j \\to i) \\in \\mathcal{E}} \\mathbf{W}_{\\tau(j \\to i)} \\mathbf{x}_j

(``W`` block-diagonal over ``groups``) on a graph given by its *structure*, and is the one place where a
kernel is chosen. Every layer and converted module calls it:

* a pixel graph whose edges follow from its description (a full grid, a transposed convolution's
  reversed grid: a :class:`~gridgraph.structure.GraphPart` or :class:`~gridgraph.structure.PixelStructure`,
  or the :class:`~gridgraph.pixel_graph.PixelEdgeIndex` of such a graph) runs the blocked neighbour-table
  kernels, one ``torch.ops.gridgraph.grid_conv`` call per run of identical graphs;
* a masked or sparse pixel graph (its ``PixelEdgeIndex``) runs the per-tap edge kernels
  (``torch.ops.gridgraph.edge_conv``) on its own edges, whose plan is cached while they live;
* any other graph, an :class:`EdgeList`, runs the same edge kernels (PyG's semantics: every edge
  ``j -> i`` of type ``t`` adds ``W_t x_j``, parallel edges included).

Under autocast it follows ``nn.Conv2d``'s policy (inputs cast to the autocast dtype: CPU bfloat16, CUDA
float16 by default). :func:`kernel_trace` records which kernels ran, so tests can assert the path.
"""
from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Iterator, NamedTuple, Optional, Union

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from ..geometry import ConvGeometry, TransposedGeometry
from ..pixel_graph import PixelEdgeIndex, pixel_structure
from ..structure import REGISTRY, GraphPart, PixelStructure
from . import kernels, layout, ops
from .kernels import apply_tap, tap_weights

__all__ = ["conv", "conv_image", "EdgeList", "kernel_trace", "tap_weights", "apply_tap", "tap_messages", "ImagePlan"]


class EdgeList(NamedTuple):
    """A plain graph for :func:`conv`: ``edge_index`` ``[2, E]``, ``edge_type`` ``[E]`` and the node counts."""

    edge_index: Tensor
    edge_type: Tensor
    num_src: int
    num_dst: int


Structure = Union[GraphPart, PixelStructure, PixelEdgeIndex, EdgeList]

_LOCAL = threading.local()


@contextlib.contextmanager
def kernel_trace() -> Iterator[list[str]]:
    """Record the kernels :func:`conv` and :func:`conv_image` choose inside the block: ``'grid'`` (the lattice
    kernels of a full or transposed grid), ``'sparse'`` (the edges of a masked / sparse pixel graph),
    ``'edges'`` (a plain edge list), ``'image'`` (an image layer's eager path: the lattice kernels called
    directly) or ``'image-op'`` (an image layer through its registered operator: under ``torch.compile``,
    tracing, ``torch.func`` and dispatch modes), one entry per kernel call.

    Example:
        >>> layer = GridConv2d(2, 3, 3, padding=1)
        >>> g = image_to_graph(torch.randn(1, 2, 5, 5), layer)
        >>> with kernel_trace() as trace:
        ...     _ = layer(g.x, g.edge_index, g.edge_type, size=g.size())
        ...     _ = layer(g.x, g.edge_index.as_tensor(), g.edge_type, size=g.size())
        >>> trace
        ['grid', 'edges']
    """
    previous = getattr(_LOCAL, "trace", None)
    trace: list[str] = []
    _LOCAL.trace = trace
    try:
        yield trace
    finally:
        _LOCAL.trace = previous


def _record(kind: str) -> None:
    trace = getattr(_LOCAL, "trace", None)
    if trace is not None:
        trace.append(kind)


def conv(x: Tensor, structure: Structure, weight: Tensor, bias: Optional[Tensor] = None, groups: int = 1) -> Tensor:
    """The graph convolution of node features ``x`` on ``structure`` (see the module docstring).

    Args:
        x (Tensor): source node features ``[N_src, C_in]``.
        structure: the graph: a :class:`~gridgraph.structure.GraphPart` / :class:`~gridgraph.structure.PixelStructure`
            (full or transposed grids), a pixel graph's ``edge_index`` (:class:`~gridgraph.pixel_graph.PixelEdgeIndex`),
            or an :class:`EdgeList`.
        weight (Tensor): ``(C_out, C_in/groups, *kernel)``, as ``nn.Conv2d``'s (one weight slice per tap).
        bias (Tensor, optional): ``(C_out)``.
        groups (int): block-diagonal channel groups.

    Returns:
        Tensor: target node features ``[N_dst, C_out]``.

    Example:
        >>> from gridgraph.structure import GraphPart
        >>> part = GraphPart.grid(ConvGeometry.from_keywords(2, 3, padding=1), (2, 2), 1)
        >>> x = torch.tensor([[1.], [2.], [3.], [4.]])
        >>> conv(x, part, torch.ones(1, 1, 3, 3)).flatten().tolist()
        [10.0, 10.0, 10.0, 10.0]
    """
    device_type = x.device.type
    if autocast_enabled(device_type) and x.is_floating_point():
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return _conv(x, structure, weight, bias, groups)
    return _conv(x, structure, weight, bias, groups)


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (False for devices autocast does not know, e.g. meta)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _check(x: Tensor, weight: Tensor, bias: Optional[Tensor], groups: int, num_src: int) -> None:
    if weight.dim() < 3:
        raise ValueError(f"expected weight of shape (C_out, C_in/groups, *kernel) (got {tuple(weight.shape)})")
    if x.dim() != 2 or x.size(1) != weight.size(1) * groups:
        raise ValueError(f"expected x of shape [num_nodes, {weight.size(1) * groups}] for a weight of shape "
                         f"{tuple(weight.shape)} and groups={groups} (got {tuple(x.shape)})")
    if x.size(0) != num_src:
        raise ValueError(f"expected x with {num_src} rows, the graph's source nodes (got {x.size(0)})")
    if weight.size(0) % groups:
        raise ValueError(f"out_channels ({weight.size(0)}) must be divisible by groups ({groups})")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"expected {name} of dtype {x.dtype}, the input's (got {t.dtype})")
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _conv(x: Tensor, structure: Structure, weight: Tensor, bias: Optional[Tensor], groups: int) -> Tensor:
    if isinstance(structure, EdgeList):
        _check(x, weight, bias, groups, structure.num_src)
        _record("edges")
        return ops.apply("edge_conv", x, structure.edge_index, structure.edge_type, weight, bias, structure.num_dst, groups,
                             False, False)
    edges = None
    if isinstance(structure, PixelEdgeIndex):
        carried = pixel_structure(structure)
        if carried is None:  # edited in place: its current edges, as a plain graph
            plain = EdgeList(structure.as_tensor(), structure.edge_type, structure.structure.num_src,
                             structure.structure.num_dst)
            return _conv(x, plain, weight, bias, groups)
        edges, structure = structure, carried
    elif isinstance(structure, GraphPart):
        structure = PixelStructure.single(structure)
    elif not isinstance(structure, PixelStructure):
        raise TypeError("structure must be a GraphPart, a PixelStructure, a PixelEdgeIndex or an EdgeList "
                        f"(got {type(structure).__name__})")
    if not structure.canonical:
        raise ValueError("the graph's node ids are offset from its pixel structure (not a graph image_to_graph or "
                         f"a PyG batch of such graphs built): {structure.describe()}")
    _check(x, weight, bias, groups, structure.num_src)
    runs = structure.runs()
    outs = []
    for part, src, dst, first_edge in runs:
        xs = x if len(runs) == 1 else x.narrow(0, src, part.num_src)
        if part.is_grid:
            _record("grid")
            outs.append(ops.apply("grid_conv", xs, weight, bias, part.key, groups))
            continue
        if edges is None:
            raise ValueError("a masked or sparse pixel graph needs its edges: pass the graph's edge_index "
                             "(a PixelEdgeIndex) as the structure")
        _record("sparse")
        data, taps = edges.as_tensor(), edges.edge_type
        if len(runs) > 1:  # this graph's edges, numbered from its own first node
            data = data.narrow(1, first_edge, part.num_edges) - torch.tensor([[src], [dst]], device=data.device)
            taps = taps.narrow(0, first_edge, part.num_edges)
        outs.append(ops.apply("edge_conv", xs, data, taps, weight, bias, part.num_dst, groups, True, len(runs) == 1))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def tap_messages(x_j: Tensor, edge_type: Tensor, weight: Tensor, groups: int) -> Tensor:
    """Messages ``W[:, :, tap_e] x_j`` of every edge ``e`` (``[E, C_out]``): what
    :meth:`~gridgraph.GridConv2d.message` returns to ``MessagePassing.propagate``."""
    taps = tap_weights(weight, groups)
    num_taps = taps.size(0)
    c_out = weight.size(0)
    if x_j.size(0) == 0:
        return x_j.new_zeros(0, c_out) + 0 * (x_j.sum() + weight.sum())
    order = torch.argsort(edge_type, stable=True)
    counts = torch.bincount(edge_type, minlength=num_taps).tolist()
    pieces = [apply_tap(chunk, taps[t]) for t, chunk in enumerate(x_j[order].split(counts)) if counts[t]]
    sorted_messages = torch.cat(pieces, dim=0)
    return sorted_messages.new_empty(sorted_messages.shape).index_copy(0, order, sorted_messages)


# ------------------------------------------------------------------------------------ image layers
class ImagePlan:
    """What one call signature of an image-facing layer needs (shapes, strides, dtype and device of its input
    and weight, its geometry), worked out once and cached: the lattice of its pixel graph, the part key the
    registered operators take, and the strides torch's convolution would give the output, the input's
    gradient and the weight's gradient (:mod:`gridgraph.nn.layout`)."""

    __slots__ = ("key", "lattice", "transposed", "groups", "out_strides", "in_strides", "weight_strides",
                 "generation", "eager", "out_view", "in_view")

    def __init__(self, key: str, transposed: bool, groups: int, out_strides: list[int], in_strides: list[int],
                 weight_strides: list[int], eager: bool, compiling: bool = False) -> None:
        self.key, self.transposed, self.groups = key, transposed, groups
        self.out_strides, self.in_strides, self.weight_strides = out_strides, in_strides, weight_strides
        self.lattice = None if compiling else kernels.grid_lattice(key)[0]
        self.out_view = self.in_view = None  # whether the output / input gradient is a view of node features
        self.generation = REGISTRY.generation
        self.eager = eager  # real floating point: the eager path may call the kernels directly

    def forward(self, images: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        return kernels.image_forward(images, weight, bias, self.lattice, self.transposed, self.groups,
                                     self.out_strides, self.out_view)

    def input_grad(self, grad: Tensor, weight: Tensor) -> Tensor:
        return kernels.image_input_grad(grad, weight, self.lattice, self.transposed, self.groups, self.in_strides,
                                        self.in_view)

    def weight_grad(self, images: Tensor, grad: Tensor, weight: Tensor) -> Tensor:
        return kernels.image_weight_grad(images, grad, self.lattice, self.transposed, self.groups,
                                         weight.shape, self.weight_strides)

    def operator(self, images: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        """The same call through the registered operator (differentiable under every torch transform)."""
        return ops.apply("conv_image", images, weight, bias, self.key, self.groups, self.out_strides,
                         self.in_strides, self.weight_strides)


class _EagerImageConv(torch.autograd.Function):
    """The eager path of an image layer: the kernels called directly, with one Python frame for the forward
    and one for the backward (the registered operators' dispatch costs more than a small layer's work)."""

    @staticmethod
    def forward(ctx, images, weight, bias, plan):
        ctx.save_for_backward(images, weight)
        ctx.plan, ctx.has_bias = plan, bias is not None
        return plan.forward(images, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        images, weight = ctx.saved_tensors
        plan = ctx.plan
        gx = gw = gb = None
        if torch.is_grad_enabled():  # create_graph: the differentiable operators, for gradients of gradients
            if ctx.needs_input_grad[0]:
                gx = ops.apply("conv_image_input_grad", grad, weight, plan.key, plan.groups, plan.in_strides)
            if ctx.needs_input_grad[1]:
                gw = ops.apply("conv_image_weight_grad", images, grad, plan.key, plan.groups, list(weight.shape),
                               plan.weight_strides)
        else:
            if ctx.needs_input_grad[0]:
                gx = plan.input_grad(grad, weight)
            if ctx.needs_input_grad[1]:
                gw = plan.weight_grad(images, grad, weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = ops._bias_grad(grad)
        return gx, gw, gb, None


_PLANS: dict = {}
#: Call signatures kept (a plan holds no tensors: a few hundred bytes each).
PLAN_LIMIT = 4096
_REAL = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _eager(images: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """Whether nothing but plain eager autograd watches this call: no compiler or tracer, no torch.func
    transform, no dispatch mode (fake tensors, FLOP counters), no forward-mode AD, no tensor subclass."""
    return (not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and not torch._C._are_functorch_transforms_active() and torch._C._len_torch_dispatch_stack() == 0
            and _forward_ad._current_level < 0 and type(images) is Tensor
            and (type(weight) is Tensor or type(weight) is torch.nn.Parameter)
            and (bias is None or type(bias) is Tensor or type(bias) is torch.nn.Parameter))


def _autocast(images: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """``nn.Conv2d``'s autocast policy: inside an autocast region of the tensors' device type, floating
    tensors other than float64 are cast to the autocast dtype (float64 ones are left alone)."""
    device_type = images.device.type
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        if t is None or not t.is_floating_point() or t.dtype == torch.float64 or t.device.type != device_type:
            return t
        return t.to(dtype)
    return cast(images), cast(weight), cast(bias)


def conv_image(input: Tensor, weight: Tensor, bias: Optional[Tensor], geometry: Union[ConvGeometry, TransposedGeometry],
               groups: int = 1, name: str = "conv") -> Tensor:
    """The convolution of images by message passing on their pixel graph: the stateless form of the layers
    :func:`~gridgraph.convert` makes, as ``F.conv2d`` is for ``nn.Conv2d``.

    ``input`` is ``(B, C_in, *grid)`` or ``(C_in, *grid)`` in any memory format; the result has the strides
    torch's convolution would give it (channels-last when the input or the weight is, as torch decides), and
    so have the gradients. A :class:`~gridgraph.geometry.TransposedGeometry` makes it the transposed
    convolution (``weight`` ``(C_in, C_out/G, *kernel)``, as ``nn.ConvTransposeNd``'s). Each call signature is
    planned once (:class:`ImagePlan`); in plain eager mode the kernels then run with no per-call work beyond
    a dictionary lookup, and under ``torch.compile``, ``torch.export``, ``torch.func``, tracing and dispatch
    modes the registered operators run the same kernels.

    Args:
        input (Tensor): the images.
        weight (Tensor): ``(C_out, C_in/groups, *kernel)`` (transposed: ``(C_in, C_out/groups, *kernel)``).
        bias (Tensor, optional): ``(C_out)``.
        geometry: the convolution's geometry.
        groups (int): channel groups.
        name (str): how error messages name the caller.

    Example:
        >>> conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        >>> image = torch.randn(2, 3, 5, 6).to(memory_format=torch.channels_last)
        >>> out = conv_image(image, conv.weight, conv.bias, ConvGeometry.from_module(conv))
        >>> torch.allclose(out, conv(image), atol=1e-6), out.stride() == conv(image).stride()
        (True, True)
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"{name} expects an image tensor (got {type(input).__name__})")
    if input.device.type != "meta" and autocast_enabled(input.device.type):
        input, weight, bias = _autocast(input, weight, bias)
        with torch.autocast(input.device.type, enabled=False):
            return _conv_image(input, weight, bias, geometry, groups, name)
    return _conv_image(input, weight, bias, geometry, groups, name)


def _conv_image(input, weight, bias, geometry, groups, name) -> Tensor:
    if torch.compiler.is_compiling():  # no cache, no lock: the compiler folds the plan into its graph
        plan = _plan(input, weight, bias, geometry, groups, name, compiling=True)
        batched = input.dim() == geometry.ndim + 2
        out = plan.operator(input if batched else input.unsqueeze(0), weight, bias)
        return out if batched else out[0]
    if torch.jit.is_tracing():  # sizes are traced tensors: the plan (grid sizes, strides) is specialised on purpose
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            plan = _plan(input, weight, bias, geometry, groups, name, traced=True)
        batched = input.dim() == geometry.ndim + 2
        _record("image-op")
        out = plan.operator(input if batched else input.unsqueeze(0), weight, bias)
        return out if batched else out[0]
    sig = (geometry, groups, input.shape, input.stride(), input.dtype, input.device, weight.shape, weight.stride(),
           weight.dtype, weight.device, None if bias is None else (bias.shape, bias.dtype, bias.device))
    plan = _PLANS.get(sig)
    if plan is None or plan.generation != REGISTRY.generation:
        plan = _plan(input, weight, bias, geometry, groups, name)
        if len(_PLANS) >= PLAN_LIMIT:
            _PLANS.clear()
        _PLANS[sig] = plan
    batched = input.dim() == geometry.ndim + 2
    images = input if batched else input.unsqueeze(0)
    if plan.eager and _eager(input, weight, bias):
        _record("image")
        if torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad)):
            out = _EagerImageConv.apply(images, weight, bias, plan)
        else:
            out = plan.forward(images, weight, bias)
    else:
        _record("image-op")
        out = plan.operator(images, weight, bias)
    return out if batched else out[0]


def _plan(input: Tensor, weight: Tensor, bias: Optional[Tensor], geometry, groups: int, name: str,
          traced: bool = False, compiling: bool = False) -> ImagePlan:
    """Check a new call signature (the errors ``nn.ConvNd`` would raise, with our messages) and plan it."""
    n = geometry.ndim
    transposed = isinstance(geometry, TransposedGeometry)
    dims = {1: "L", 2: "H, W", 3: "D, H, W"}.get(n, "*grid")
    if not isinstance(input, Tensor):
        raise TypeError(f"{name} expects an image tensor (got {type(input).__name__})")
    if input.dim() not in (n + 1, n + 2):
        hint = ("; to run on node features, pass edge_index and edge_type as well"
                if input.dim() == 2 and n != 1 else "")
        raise ValueError(f"{name}: expected input of shape (C, {dims}) or (B, C, {dims}): {n + 1} or {n + 2} "
                         f"dims (got a {input.dim()}-dim tensor of shape {tuple(input.shape)}){hint}")
    if weight.dim() != n + 2:
        raise ValueError(f"{name}: expected a weight of {n + 2} dims (got shape {tuple(weight.shape)})")
    if not isinstance(groups, int) or groups < 1 or (weight.size(0) % groups if not transposed else 0):
        raise ValueError(f"{name}: groups must be a positive int dividing the output channels "
                         f"({weight.size(0)}) (got {groups!r})")
    in_channels = int(weight.size(0) if transposed else weight.size(1) * groups)
    channels = input.size(-n - 1)
    if channels != in_channels:
        raise ValueError(f"{name}: expected input with {in_channels} channels "
                         f"(got {channels} channels, input of shape {tuple(input.shape)})")
    if input.dtype != weight.dtype:
        raise TypeError(f"{name}: expected input of dtype {weight.dtype}, the layer's dtype (got {input.dtype})")
    if input.device != weight.device:
        raise ValueError(f"{name}: input is on {input.device} but the layer's weight is on {weight.device}")
    out_channels = int(weight.size(1) * groups if transposed else weight.size(0))
    if bias is not None and (bias.dim() != 1 or bias.size(0) != out_channels):
        raise ValueError(f"{name}: expected bias of shape ({out_channels},), one per output channel "
                         f"(got {tuple(bias.shape)})")
    if bias is not None and (bias.dtype != weight.dtype or bias.device != weight.device):
        raise TypeError(f"{name}: expected bias of dtype {weight.dtype} on {weight.device} (got {bias.dtype} on "
                        f"{bias.device})")
    images = input if input.dim() == n + 2 else input.unsqueeze(0)
    if traced:  # plain ints, and a tensor of those sizes to ask torch about the layout
        images = torch.empty_strided(tuple(int(v) for v in images.shape), images.stride(), dtype=images.dtype,
                                     device=images.device)
        weight = torch.empty_strided(tuple(int(v) for v in weight.shape), weight.stride(), dtype=weight.dtype,
                                     device=weight.device)
    key_images = None
    if compiling and not isinstance(images.shape[0], int):  # a dynamic batch (torch.export with a Dim): the
        # operators read the batch from their input; plan on a generic batch of two, whatever it is at run time
        images = torch.empty_strided((2, *(int(v) for v in images.shape[1:])), tuple(int(v) for v in images.stride()),
                                     dtype=images.dtype, device=images.device)
        key_images = 1
    num_images, _, *grid = (int(v) for v in images.shape)
    # raises the ValueError Conv2d raises for a small image
    part = GraphPart.grid(geometry, grid, num_images if key_images is None else key_images)
    conv = geometry.conv if transposed else geometry
    torch_padding = [a for a, _ in conv.padding]
    if any(a != b for a, b in conv.padding):  # 'same' with an even kernel: torch pads asymmetrically itself
        torch_padding = [0] * n
    in_shape = (num_images, in_channels, *grid)
    in_strides = None
    if conv.padding_mode != "zeros":  # torch pads first (F.pad), then convolves the padded image unpadded
        padded, in_strides = layout.padded_image(images, conv.padding, conv.padding_mode)
        conv_layout = layout.conv_layout(padded, weight, bias, conv.stride, [0] * n, conv.dilation, False, [0] * n,
                                         groups)
    else:
        conv_layout = layout.conv_layout(images, weight, bias, conv.stride, torch_padding, conv.dilation, transposed,
                                         geometry.output_padding if transposed else [0] * n, groups)
    weight_shape = tuple(int(v) for v in weight.shape)
    out_shape = (num_images, weight_shape[1] * groups if transposed else weight_shape[0], *part.out_size)
    eager = input.dtype in _REAL and input.device.type != "meta"
    plan = ImagePlan(part.key, transposed, groups, list(conv_layout.strides(out_shape)),
                     list(in_strides if in_strides is not None else conv_layout.strides(in_shape)),
                     list(conv_layout.weight_grad_strides(weight_shape)), eager, compiling)
    if not compiling:
        plan.out_view = layout.is_node_layout(out_shape, plan.out_strides)
        plan.in_view = layout.is_node_layout(in_shape, plan.in_strides)
    return plan

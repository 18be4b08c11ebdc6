r"""Analysis tools that make the analogy checkable: receptive fields, costs, operators, mixing.

Four questions about a convolution, each answered on its pixel graph:

* **Receptive field by reachability** (:func:`receptive_field`): which input pixels can send a
  message, through every layer of a stack, to a given output pixel? Each layer's pixel graph is a
  sparse 0/1 matrix ``A_l`` (``[N_out, N_in]``, one entry per edge, from the layer's neighbour
  table); the stack's is the product ``A_L ... A_1`` (:func:`composed_adjacency`), and the receptive
  field of an output pixel is the support of its row. :func:`receptive_field_size` and
  :func:`receptive_field_window` give the analytic answer,
  ``r_L = 1 + sum_l (k_l - 1) d_l prod_{m<l} s_m``, which the graph must (and does) reproduce.
* **Cost** (:class:`Cost`, :func:`conv_cost`, :func:`separable_cost`, :func:`layer_cost`,
  :func:`separable_ratio`, :func:`count_flops`): parameters and multiply-accumulates (MACs) of
  standard, grouped, depthwise, pointwise and separable layers. A separable layer costs
  ``1/C_out + 1/k^2`` of a full one.
* **Linear operators and rank** (:func:`linear_operator`, :func:`patch_operator`,
  :func:`effective_weight`, :func:`rank_bound`, :func:`separable_approximation`): the explicit
  matrix of a layer, built by pushing basis images through the *graph* layer.
* **Mixing matrices** (:func:`mixing_matrices`, :func:`mixing_matrix`): the ``C_out x C_in`` matrix
  each tap applies to a neighbour's channel vector, and their sum.

Layers are given as a gridgraph layer, an ``nn.Conv2d``, an ``nn.Sequential`` / model, or any
iterable of modules. In a stack, modules with a geometry (gridgraph layers, ``nn.Conv*d``,
``nn.MaxPool*d`` / ``nn.AvgPool*d``) are the spatial steps, taken in registration order; modules
without children and without a geometry (activations, norms, dropout) act pixel by pixel and are
skipped; modules that break the grid (``nn.Linear``, ``nn.Flatten``, adaptive pooling, upsampling,
transposed convolutions) or carry a spatial kernel without a geometry are refused.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from .geometry import ConvGeometry, _ntuple
from .graph import graph_to_image, grid_to_graph, neighbour_table

__all__ = [
    # stacks and graphs
    "spatial_layers", "layer_geometries", "pixel_adjacency", "composed_adjacency", "graph_apply",
    # receptive fields
    "receptive_field", "receptive_field_size", "receptive_field_window",
    # cost
    "Cost", "conv_cost", "depthwise_cost", "pointwise_cost", "separable_cost", "layer_cost",
    "separable_ratio", "count_flops",
    # operators and rank
    "linear_operator", "patch_operator", "effective_weight", "matrix_rank", "rank_bound",
    "collapsed_separable", "separable_slice_ranks", "separable_approximation",
    # mixing
    "mixing_matrices", "mixing_matrix",
]

_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_GRID_BREAKERS = (nn.Linear, nn.Flatten, nn.Unflatten, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                  nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
                  nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle, nn.Fold, nn.Unfold)


# ================================================================================ stacks of layers
def _has_geometry(module: Any) -> bool:
    if isinstance(getattr(module, "geometry", None), ConvGeometry):
        return True
    return isinstance(module, nn.modules.conv._ConvNd) and not module.transposed


def _pool_geometry(pool: nn.Module) -> ConvGeometry:
    ndim = int(type(pool).__name__[-2])
    if getattr(pool, "ceil_mode", False):
        raise ValueError(f"{type(pool).__name__} with ceil_mode=True is not supported (its output grid has "
                         "windows that start in the padding); use ceil_mode=False")
    stride = pool.stride if pool.stride is not None else pool.kernel_size
    dilation = getattr(pool, "dilation", 1)
    return ConvGeometry.from_keywords(ndim, pool.kernel_size, stride, pool.padding, dilation)


def spatial_layers(layers: Any) -> list[nn.Module]:
    """The spatial steps of a stack, in order: modules with a convolution geometry, or pooling.

    ``layers`` is one module, an ``nn.Sequential`` (or any model, read in registration order) or an
    iterable of modules. Modules with a ``geometry`` (gridgraph layers, a converted model's graph
    modules) or ``nn.Conv*d`` are taken whole; other modules with children are searched; childless
    modules without a geometry (activations, norms, dropout) act pixel by pixel and are skipped.

    Raises:
        ValueError: for a module that breaks the grid (``nn.Linear``, ``nn.Flatten``, adaptive
            pooling, upsampling, transposed convolution), or when no spatial step is found.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), SeparableConv2d(8, 8, 3))
        >>> [type(m).__name__ for m in spatial_layers(net)]
        ['Conv2d', 'SeparableConv2d']
    """
    found = _collect(layers)
    if not found:
        raise ValueError(f"layers holds no convolution or pooling layer (got {type(layers).__name__})")
    return found


def _collect(layers: Any) -> list[nn.Module]:
    if isinstance(layers, nn.Module):
        if _has_geometry(layers) or isinstance(layers, _POOLS):
            return [layers]
        if hasattr(layers, "transposed_geometry") or isinstance(layers, nn.modules.conv._ConvTransposeNd):
            raise ValueError(f"{type(layers).__name__}: transposed convolutions are not supported here (yet); "
                             "receptive fields, costs and operators cover convolution and pooling stacks")
        if isinstance(layers, _GRID_BREAKERS):
            raise ValueError(f"{type(layers).__name__} does not act on the pixel grid; receptive fields, "
                             "costs and operators are defined for convolution and pooling stacks only")
        children = list(layers.children())
        weight = getattr(layers, "weight", None)
        if not children and isinstance(weight, Tensor) and weight.dim() >= 3:
            raise ValueError(f"{type(layers).__name__} has a spatial kernel but no convolution geometry; "
                             "give it a `geometry` (a ConvGeometry) or use nn.Conv2d / gridgraph layers")
    elif isinstance(layers, Iterable) and not isinstance(layers, (str, bytes, Tensor)):
        children = list(layers)
        for m in children:
            if not isinstance(m, nn.Module):
                raise TypeError(f"layers must be modules (got an element of type {type(m).__name__})")
    else:
        raise TypeError(f"layers must be an nn.Module or an iterable of modules (got {type(layers).__name__})")
    found: list[nn.Module] = []
    for child in children:
        found.extend(_collect(child))
    return found


def layer_geometries(layers: Any) -> list[ConvGeometry]:
    """The :class:`ConvGeometry` of each spatial step of ``layers`` (see :func:`spatial_layers`).

    A separable layer counts once, with its depthwise geometry (its pointwise step is 1x1).

    Example:
        >>> [g.describe() for g in layer_geometries([GridConv2d(1, 1, 3, stride=2), torch.nn.MaxPool2d(2)])]
        ['k3x3 s2x2 p0x0 d1x1 zeros', 'k2x2 s2x2 p0x0 d1x1 zeros']
    """
    return [_pool_geometry(m) if isinstance(m, _POOLS) else ConvGeometry.from_module(m)
            for m in spatial_layers(layers)]


def _grid_sizes(geometries: Sequence[ConvGeometry], input_size: Sequence[int]) -> list[tuple[int, ...]]:
    sizes = [tuple(int(n) for n in input_size)]
    for g in geometries:
        if len(sizes[-1]) != g.ndim:
            raise ValueError(f"input_size {tuple(input_size)} has {len(input_size)} dimensions, but the layers "
                             f"are {g.ndim}-d")
        sizes.append(g.output_size(sizes[-1]))
    return sizes


def _size(input_size: Any, name: str = "input_size") -> tuple[int, ...]:
    if isinstance(input_size, int) or not isinstance(input_size, (tuple, list, torch.Size)):
        raise TypeError(f"{name} must be a tuple of spatial sizes such as (H, W) (got {input_size!r})")
    return tuple(int(n) for n in input_size)


# ================================================================================ pixel graphs as matrices
def pixel_adjacency(geometry: ConvGeometry, input_size: Sequence[int], device: Any = None) -> Tensor:
    r"""The pixel graph of one image as a sparse ``[N_out, N_in]`` matrix counting edges ``j -> i``.

    Entry ``(i, j)`` is the number of kernel taps through which input pixel ``j`` sends a message to
    output pixel ``i`` (usually 0 or 1; replicate or reflect padding can join a pair by several taps).
    It is read from the layer's :func:`~gridgraph.neighbour_table`.

    Args:
        geometry (ConvGeometry): the convolution's geometry.
        input_size (tuple): the input grid, e.g. ``(H, W)``.
        device (optional): where to build it (default: CPU).

    Shapes:
        - **output:** sparse COO ``float64`` :math:`(H_{out} W_{out}, H W)`

    Example:
        >>> A = pixel_adjacency(ConvGeometry.from_keywords(2, kernel_size=1), (2, 2))
        >>> A.to_dense().tolist()  # a 1x1 graph: self-loops only
        [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    """
    table = neighbour_table(geometry, _size(input_size), device)
    index = table.index
    dst = torch.arange(table.num_dst, device=index.device)[:, None].expand_as(index)
    valid = index >= 0
    rows, cols = dst[valid], index[valid]
    values = torch.ones(rows.numel(), dtype=torch.float64, device=index.device)
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (table.num_dst, table.num_src),
                                   check_invariants=False).coalesce()


def composed_adjacency(layers: Any, input_size: Sequence[int], device: Any = None) -> Tensor:
    r"""The stack's pixel graph: the sparse product ``A_L ... A_2 A_1`` of its layers' adjacencies.

    Entry ``(i, j)`` counts the paths through the stack from input pixel ``j`` to output pixel ``i``;
    it is non-zero exactly when ``j`` is in the receptive field of ``i``.

    Args:
        layers: a module, ``nn.Sequential`` or iterable of modules (see :func:`spatial_layers`).
        input_size (tuple): the input grid of the first layer.

    Shapes:
        - **output:** sparse COO ``float64`` :math:`(N_{out}, N_{in})`

    Example:
        >>> P = composed_adjacency([GridConv2d(1, 1, 3, padding=1)] * 2, (5, 5))
        >>> P.shape, int(P.to_dense()[12].count_nonzero()), int(P.to_dense()[12, 12])  # centre pixel
        (torch.Size([25, 25]), 25, 9)
    """
    geometries = layer_geometries(layers)
    sizes = _grid_sizes(geometries, _size(input_size))
    product = None
    for g, size in zip(geometries, sizes):
        a = pixel_adjacency(g, size, device)
        if product is None:
            product = a
        else:
            with warnings.catch_warnings():  # sparse @ sparse goes through the (beta) CSR kernels
                warnings.simplefilter("ignore", UserWarning)
                product = torch.sparse.mm(a, product).coalesce()
    return product


def _target_index(target: Any, out_size: tuple[int, ...]) -> int:
    if target is None:
        target = tuple(n // 2 for n in out_size)
    if isinstance(target, int) or len(target) != len(out_size):
        raise ValueError(f"target must be a pixel ({', '.join('i' + str(a) for a in range(len(out_size)))}) "
                         f"of the output grid {out_size} (got {target!r})")
    target = tuple(int(t) for t in target)
    if any(not 0 <= t < n for t, n in zip(target, out_size)):
        raise ValueError(f"target {target} lies outside the output grid {out_size}")
    index = 0
    for t, n in zip(target, out_size):
        index = index * n + t
    return index


def receptive_field(layers: Any, input_size: Sequence[int], target: Any = None, *, counts: bool = False,
                    method: str = "sparse") -> Tensor:
    r"""The input pixels that can reach ``target`` through the stack's pixel graphs, as a mask.

    Reachability is computed on the composed pixel graphs: starting from the one-hot vector of
    ``target`` on the last output grid, ``v <- A_l^T v`` walks each layer's edges backwards
    (``method='sparse'``, sparse matrix products), or ``networkx.ancestors`` runs on the layered
    graph of all layers (``method='networkx'``). Both give the same set.

    Args:
        layers: a module, ``nn.Sequential``/model or iterable of modules (see :func:`spatial_layers`).
        input_size (tuple): the input grid, e.g. ``(H, W)``.
        target (tuple, optional): the output pixel ``(row, col)``; by default the centre of the
            output grid ``(H_out // 2, W_out // 2)``.
        counts (bool, optional): return the number of paths from each input pixel to ``target``
            (``float64``) instead of a boolean mask (default: ``False``; ``method='sparse'`` only).
        method (str, optional): ``'sparse'`` or ``'networkx'`` (default: ``'sparse'``).

    Shapes:
        - **output:** ``input_size``, ``bool`` (or ``float64`` path counts)

    Example:
        >>> ones = [PointwiseConv2d(4, 4) for _ in range(10)]  # ten 1x1 layers
        >>> int(receptive_field(ones, (9, 9)).sum())
        1
        >>> threes = [GridConv2d(4, 4, 3, padding=1) for _ in range(2)]
        >>> receptive_field(threes, (7, 7), target=(3, 3)).int()[1:6, 1:6].tolist()
        [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
        >>> receptive_field(threes, (7, 7), target=(3, 3), counts=True)[3, 1:6].tolist()
        [3.0, 6.0, 9.0, 6.0, 3.0]
    """
    if method not in ("sparse", "networkx"):
        raise ValueError(f"method must be 'sparse' or 'networkx' (got {method!r})")
    geometries = layer_geometries(layers)
    sizes = _grid_sizes(geometries, _size(input_size))
    index = _target_index(target, sizes[-1])
    if method == "networkx":
        if counts:
            raise ValueError("counts=True needs method='sparse'")
        return _receptive_field_networkx(geometries, sizes, index)
    v = torch.zeros(math.prod(sizes[-1]), 1, dtype=torch.float64)
    v[index] = 1.0
    for g, size in zip(reversed(geometries), reversed(sizes[:-1])):
        v = torch.sparse.mm(pixel_adjacency(g, size).t(), v)
    field = v.view(sizes[0])
    return field if counts else field > 0


def _receptive_field_networkx(geometries: Sequence[ConvGeometry], sizes: Sequence[tuple[int, ...]],
                              index: int) -> Tensor:
    import networkx as nx

    graph = nx.DiGraph()
    for layer, (g, size) in enumerate(zip(geometries, sizes[:-1])):
        table = neighbour_table(g, size)
        dst, tap = (table.index >= 0).nonzero(as_tuple=True)
        src = table.index[dst, tap]
        graph.add_edges_from(((layer, j), (layer + 1, i)) for j, i in zip(src.tolist(), dst.tolist()))
    last = (len(geometries), index)
    mask = torch.zeros(math.prod(sizes[0]), dtype=torch.bool)
    if last in graph:
        reached = [j for (layer, j) in nx.ancestors(graph, last) if layer == 0]
        mask[torch.tensor(reached, dtype=torch.long)] = True
    return mask.view(sizes[0])


def receptive_field_size(layers: Any) -> tuple[int, ...]:
    r"""The analytic receptive field extent of a stack, per spatial dimension.

    .. math::
        r_L = 1 + \sum_{l=1}^{L} (k_l - 1)\, d_l \prod_{m < l} s_m

    It is the side of the smallest box holding the receptive field of an output pixel whose window
    lies inside the image (with dilation the box can have holes).

    Example:
        >>> receptive_field_size([PointwiseConv2d(3, 3)] * 50)
        (1, 1)
        >>> receptive_field_size([GridConv2d(1, 1, 3), GridConv2d(1, 1, 3, stride=2), GridConv2d(1, 1, 3, dilation=2)])
        (13, 13)
    """
    geometries = layer_geometries(layers)
    ndim = geometries[0].ndim
    size, jump = [1] * ndim, [1] * ndim
    for g in geometries:
        for a in range(ndim):
            size[a] += (g.kernel_size[a] - 1) * g.dilation[a] * jump[a]
            jump[a] *= g.stride[a]
    return tuple(size)


def receptive_field_window(layers: Any, target: Sequence[int]) -> tuple[tuple[int, int], ...]:
    r"""The analytic window ``(start, stop)`` (stop exclusive) per dimension of ``target``'s receptive field.

    ``start = i * J_L - sum_l p_l J_{l-1}`` with ``J_l = prod_{m <= l} s_m`` the jump of layer ``l`` and
    ``p_l`` its padding before; ``stop = start + r_L``. The window is in input coordinates and may
    reach into the padding (negative or past the edge); with zero padding the receptive field is
    the window clipped to the image.

    Example:
        >>> receptive_field_window([GridConv2d(1, 1, 3, padding=1)] * 2, target=(0, 4))
        ((-2, 3), (2, 7))
    """
    geometries = layer_geometries(layers)
    ndim = geometries[0].ndim
    target = tuple(int(t) for t in target)
    if len(target) != ndim:
        raise ValueError(f"target must have {ndim} coordinates (got {target})")
    start, jump = [0] * ndim, [1] * ndim
    for g in geometries:
        for a in range(ndim):
            start[a] -= g.padding[a][0] * jump[a]
            jump[a] *= g.stride[a]
    size = receptive_field_size(layers)
    return tuple((t * j + s, t * j + s + r) for t, j, s, r in zip(target, jump, start, size))


# ================================================================================ cost
@dataclass(frozen=True)
class Cost:
    """Parameters and multiply-accumulates (MACs) of a layer on one image.

    MACs count the products of the weights with the inputs, as ``torch.utils.flop_counter`` does
    (``flops = 2 * macs``); bias additions are not counted, bias parameters are.

    Example:
        >>> conv_cost(3, 8, 3, (32, 32), padding=1) + pointwise_cost(8, 16, (32, 32))
        Cost(params=368, macs=352256)
    """

    params: int
    macs: int

    @property
    def flops(self) -> int:
        """``2 * macs``: the figure ``torch.utils.flop_counter.FlopCounterMode`` reports."""
        return 2 * self.macs

    def __add__(self, other: "Cost") -> "Cost":
        if not isinstance(other, Cost):
            return NotImplemented
        return Cost(self.params + other.params, self.macs + other.macs)


def conv_cost(in_channels: int, out_channels: int, kernel_size: Any, input_size: Sequence[int], *,
              stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1, bias: bool = True) -> Cost:
    r"""Cost of a standard (``groups=1``) or grouped 2-D convolution on one image of ``input_size``.

    .. math::
        \text{params} = C_{out} \frac{C_{in}}{g} k_H k_W \;(+\, C_{out}), \qquad
        \text{MACs} = H_{out} W_{out} \, C_{out} \frac{C_{in}}{g} k_H k_W

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as in ``nn.Conv2d``.
        input_size (tuple): ``(H, W)``.

    Example:
        >>> conv_cost(192, 384, 3, (16, 16), padding=1, bias=False)
        Cost(params=663552, macs=169869312)
        >>> conv_cost(192, 384, 3, (16, 16), padding=1, groups=4, bias=False).macs * 4
        169869312
    """
    for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive int (got {v!r})")
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by "
                         f"groups ({groups})")
    input_size = _size(input_size)
    geometry = ConvGeometry.from_keywords(len(input_size), kernel_size, stride, padding, dilation)
    per_output = (in_channels // groups) * geometry.num_taps * out_channels
    params = per_output + (out_channels if bias else 0)
    return Cost(params, math.prod(geometry.output_size(input_size)) * per_output)


def depthwise_cost(channels: int, kernel_size: Any, input_size: Sequence[int], *, stride: Any = 1,
                   padding: Any = 0, dilation: Any = 1, depth_multiplier: int = 1, bias: bool = True) -> Cost:
    """Cost of a depthwise convolution (``groups = channels``, ``depth_multiplier`` filters per channel).

    Example:
        >>> depthwise_cost(192, 3, (16, 16), padding=1, bias=False)
        Cost(params=1728, macs=442368)
    """
    return conv_cost(channels, channels * depth_multiplier, kernel_size, input_size, stride=stride,
                     padding=padding, dilation=dilation, groups=channels, bias=bias)


def pointwise_cost(in_channels: int, out_channels: int, input_size: Sequence[int], *, groups: int = 1,
                   bias: bool = True) -> Cost:
    """Cost of a 1x1 convolution: ``C_out * C_in / groups`` MACs per pixel.

    Example:
        >>> pointwise_cost(192, 384, (16, 16), bias=False)
        Cost(params=73728, macs=18874368)
    """
    return conv_cost(in_channels, out_channels, 1, input_size, groups=groups, bias=bias)


def separable_cost(in_channels: int, out_channels: int, kernel_size: Any, input_size: Sequence[int], *,
                   stride: Any = 1, padding: Any = 0, dilation: Any = 1, depth_multiplier: int = 1,
                   bias: bool = True) -> Cost:
    r"""Cost of a depthwise-separable layer (depthwise without bias, then pointwise), as :class:`SeparableConv2d`.

    With ``depth_multiplier = 1`` and no bias its MACs are ``H_out W_out C_in (k^2 + C_out)``, so
    against a full convolution the ratio is exactly :func:`separable_ratio` ``= 1/C_out + 1/k^2``.

    Example:
        >>> sep = separable_cost(192, 384, 3, (16, 16), padding=1, bias=False)
        >>> full = conv_cost(192, 384, 3, (16, 16), padding=1, bias=False)
        >>> sep, round(1 - sep.macs / full.macs, 4)
        (Cost(params=75456, macs=19316736), 0.8863)
    """
    input_size = _size(input_size)
    depthwise = depthwise_cost(in_channels, kernel_size, input_size, stride=stride, padding=padding,
                               dilation=dilation, depth_multiplier=depth_multiplier, bias=False)
    geometry = ConvGeometry.from_keywords(len(input_size), kernel_size, stride, padding, dilation)
    pointwise = pointwise_cost(in_channels * depth_multiplier, out_channels, geometry.output_size(input_size),
                               bias=bias)
    return depthwise + pointwise


def separable_ratio(out_channels: int, kernel_size: Any) -> Fraction:
    r"""The separable/standard cost ratio ``1/C_out + 1/(k_H k_W)``, as an exact fraction.

    It is the ratio of MACs (and of weights) of :func:`separable_cost` (``depth_multiplier=1``, no
    bias) to :func:`conv_cost` for the same ``C_in``, ``C_out``, kernel and grid:
    ``C_in (k^2 + C_out) / (C_in C_out k^2)``. The reduction is ``1 - ratio``.

    Example:
        >>> r = separable_ratio(384, 3)
        >>> r, round(float(1 - r), 4)
        (Fraction(131, 1152), 0.8863)
    """
    if not isinstance(out_channels, int) or isinstance(out_channels, bool) or out_channels <= 0:
        raise ValueError(f"out_channels must be a positive int (got {out_channels!r})")
    k = _ntuple(kernel_size, 2, "kernel_size") if isinstance(kernel_size, int) else tuple(kernel_size)
    return Fraction(1, out_channels) + Fraction(1, math.prod(k))


def layer_cost(layers: Any, input_size: Sequence[int]) -> Cost:
    """Cost of a layer or a stack on one image of ``input_size``: the sum over its convolutions.

    Accepts ``nn.Conv2d``, every gridgraph layer (grouped, depthwise, pointwise, separable) and stacks
    of them (see :func:`spatial_layers`; pooling counts as free). Grid sizes are carried from layer
    to layer.

    Example:
        >>> layer_cost(SeparableConv2d(192, 384, 3, padding=1, bias=False), (16, 16))
        Cost(params=75456, macs=19316736)
        >>> layer_cost(torch.nn.Conv2d(192, 384, 3, padding=1, bias=False), (16, 16))
        Cost(params=663552, macs=169869312)
    """
    size = _size(input_size)
    total = Cost(0, 0)
    for module in spatial_layers(layers):
        parts = [module.depthwise, module.pointwise] if hasattr(module, "depthwise") and hasattr(module, "pointwise") \
            else [module]
        for part in parts:
            if isinstance(part, _POOLS):
                size = _pool_geometry(part).output_size(size)
                continue
            weight = getattr(part, "weight", None)
            if not isinstance(weight, Tensor):
                raise TypeError(f"cannot cost {type(part).__name__}: it has no convolution weight")
            geometry = ConvGeometry.from_module(part)
            out_size = geometry.output_size(size)
            per_output = weight[0].numel() * weight.size(0)
            bias = getattr(part, "bias", None)
            total = total + Cost(weight.numel() + (bias.numel() if isinstance(bias, Tensor) else 0),
                                 math.prod(out_size) * per_output)
            size = out_size
    return total


def count_flops(fn: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs that ``torch.utils.flop_counter.FlopCounterMode`` counts while running ``fn(*args, **kwargs)``.

    The independent check of the cost model: for a ``nn.Conv2d`` it is ``2 * MACs`` of :func:`conv_cost`.

    Example:
        >>> conv = torch.nn.Conv2d(192, 384, 3, padding=1, bias=False)
        >>> count_flops(conv, torch.zeros(1, 192, 16, 16)) == conv_cost(192, 384, 3, (16, 16), padding=1).flops
        True
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


# ================================================================================ linear operators
def _graph_layer(module: nn.Module) -> nn.Module:
    """A module that computes from a pixel graph: gridgraph layers as they are, ``nn.ConvNd`` converted."""
    from .nn import GridConv2d, GridConvNd, SeparableConv2d

    if isinstance(module, (GridConvNd, SeparableConv2d)):
        return module
    if isinstance(module, nn.Conv2d):
        return GridConv2d.from_conv2d(module)
    raise TypeError(f"expected a gridgraph layer or an nn.Conv2d (got {type(module).__name__}); operators are "
                    "built by pushing images through the graph layers")


def _linear_layers(layers: Any) -> list[nn.Module]:
    """The graph layers of a linear stack: convolutions only, with nothing but identities between them."""
    mods = spatial_layers(layers)
    inside = {id(q) for p in mods for q in p.modules()}
    roots = [layers] if isinstance(layers, nn.Module) else list(layers)
    for root in roots:
        for m in root.modules():
            if not list(m.children()) and id(m) not in inside and not isinstance(m, nn.Identity):
                raise TypeError(f"{type(m).__name__} is not a convolution layer; linear operators are defined "
                                "for stacks of convolutions only")
    return [_graph_layer(m) for m in mods]


def graph_apply(layers: Any, image: Tensor, geometry: Optional[ConvGeometry] = None) -> Tensor:
    """Run a gridgraph layer (or a stack of them) on an image batch, through its pixel graphs.

    For each layer: :func:`~gridgraph.image_to_graph` with the layer's geometry (or ``geometry``, for
    a single layer), the layer's message passing, :func:`~gridgraph.graph_to_image` on the output grid.
    An ``nn.Conv2d`` is first turned into its :class:`~gridgraph.GridConv2d` twin.

    Args:
        layers: a gridgraph layer, ``nn.Conv2d`` or a stack of them.
        image (Tensor): ``(B, C, H, W)`` or ``(C, H, W)``.
        geometry (ConvGeometry, optional): run a single layer on the pixel graph of this geometry instead.

    Example:
        >>> conv = torch.nn.Conv2d(2, 3, 3, padding=1)
        >>> x = torch.randn(4, 2, 6, 5)
        >>> torch.allclose(graph_apply(conv, x), conv(x), atol=1e-6)
        True
    """
    mods = _linear_layers(layers)
    if geometry is not None:
        if len(mods) != 1:
            raise ValueError(f"geometry can replace the geometry of a single layer only (got {len(mods)} layers)")
        mods = [_with_geometry(mods[0], geometry)]
    out = image
    for m in mods:
        g = grid_to_graph(out, m.geometry)
        out = graph_to_image(m(g.x, g.edge_index, g.edge_type, size=g.size()), g, side="output")
    return out


def _with_geometry(module: nn.Module, geometry: ConvGeometry) -> nn.Module:
    """A shallow copy of ``module`` (same parameters) whose kernel's geometry is ``geometry``."""
    if hasattr(module, "depthwise") and hasattr(module, "pointwise"):  # a separable block: its depthwise step
        twin = copy.copy(module)
        twin._modules = dict(module._modules, depthwise=_with_geometry(module.depthwise, geometry))
        return twin
    if tuple(module.kernel_size) != geometry.kernel_size:
        raise ValueError(f"geometry must keep the layer's kernel size {tuple(module.kernel_size)} "
                         f"(got {geometry.kernel_size})")
    twin = copy.copy(module)
    pads = geometry.padding
    twin.stride, twin.dilation, twin.padding_mode = geometry.stride, geometry.dilation, geometry.padding_mode
    twin.padding = tuple(a for a, _ in pads) if all(a == b for a, b in pads) else geometry.torch_padding()
    return twin


def _float64_copy(layers: Any) -> list[nn.Module]:
    return [copy.deepcopy(m).to(torch.float64) for m in _linear_layers(layers)]



def _in_channels(mods: Sequence[nn.Module]) -> int:
    return int(mods[0].in_channels)


def linear_operator(layers: Any, input_size: Sequence[int], *, include_bias: bool = False) -> Tensor:
    r"""The explicit matrix of a layer (or stack) acting on a whole image of ``input_size``.

    Column ``c*H*W + h*W + w`` is the layer's response to the basis image with a single 1 at channel
    ``c``, pixel ``(h, w)``, computed by message passing on the graph layer (in ``float64``), minus
    its response to the zero image (the bias), so the matrix is the linear part of the layer. Rows
    are the output image flattened the same way, ``(C_out, H_out, W_out)``.

    Args:
        layers: a gridgraph layer, an ``nn.Conv2d`` (run as its graph twin) or a stack of them.
        input_size (tuple): ``(H, W)``.
        include_bias (bool, optional): keep the bias in every column (default: ``False``).

    Shapes:
        - **output:** :math:`(C_{out} H_{out} W_{out},\; C_{in} H W)`, ``float64``

    Example:
        >>> layer = PointwiseConv2d(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([1., -1.]).view(1, 2, 1, 1))
        >>> linear_operator(layer, (1, 2)).tolist()
        [[1.0, 0.0, -1.0, 0.0], [0.0, 1.0, 0.0, -1.0]]
    """
    mods = _float64_copy(layers)
    size = _size(input_size)
    c_in = _in_channels(mods)
    n = c_in * math.prod(size)
    with torch.no_grad():
        basis = torch.eye(n, dtype=torch.float64).view(n, c_in, *size)
        out = graph_apply(mods, basis)
        if not include_bias:
            out = out - graph_apply(mods, torch.zeros(1, c_in, *size, dtype=torch.float64))
    return out.reshape(n, -1).t().contiguous()


def _single(layer: Any) -> nn.Module:
    if isinstance(layer, nn.Module) and _has_geometry(layer):
        return _graph_layer(layer)
    raise TypeError(f"expected one gridgraph layer or nn.Conv2d (got {type(layer).__name__})")


def patch_operator(layer: Any) -> Tensor:
    r"""The matrix of a layer acting on one ``kH x kW`` patch: ``[C_out, C_in * kH * kW]``.

    The patch is the set of input pixels read by the taps of one output pixel; column
    ``c * kH*kW + u*kW + v`` is channel ``c`` at tap ``(u, v)``. It is built like
    :func:`linear_operator`, on the pixel graph of a ``kH x kW`` image with a ``'valid'`` kernel
    (one output pixel), so stride, padding and dilation (which only choose which pixels form the
    patch) drop out. For a full convolution it equals ``weight.reshape(C_out, -1)``; for grouped,
    depthwise and separable layers it is their weight written as a full one.

    Shapes:
        - **output:** :math:`(C_{out},\; C_{in} k_H k_W)`, ``float64``

    Example:
        >>> conv = torch.nn.Conv2d(2, 3, 3).double()
        >>> torch.equal(patch_operator(conv), conv.weight.detach().reshape(3, -1))
        True
        >>> patch_operator(DepthwiseConv2d(2, 3)).shape
        torch.Size([2, 18])
    """
    mod = copy.deepcopy(_single(layer)).to(torch.float64)
    geometry = mod.geometry
    patch = ConvGeometry(geometry.kernel_size, (1,) * geometry.ndim, ((0, 0),) * geometry.ndim,
                         (1,) * geometry.ndim, "zeros")
    c_in = int(mod.in_channels)
    n = c_in * geometry.num_taps
    with torch.no_grad():
        basis = torch.eye(n, dtype=torch.float64).view(n, c_in, *geometry.kernel_size)
        out = graph_apply(mod, basis, patch) - graph_apply(mod, basis[:1] * 0, patch)
    return out.reshape(n, -1).t().contiguous()


def effective_weight(layer: Any) -> Tensor:
    """The full ``(C_out, C_in, kH, kW)`` kernel that a layer applies (groups expanded, separable composed).

    Computed from :func:`patch_operator`, i.e. from the graph layer's messages.

    Example:
        >>> sep = SeparableConv2d(2, 3, 3, bias=False)
        >>> w = effective_weight(sep)
        >>> expected = sep.pointwise.weight[:, :, 0, 0, None, None] * sep.depthwise.weight[:, 0][None]
        >>> w.shape, torch.allclose(w, expected.double())
        (torch.Size([3, 2, 3, 3]), True)
    """
    mod = _single(layer)
    return patch_operator(mod).view(int(mod.out_channels), int(mod.in_channels), *mod.geometry.kernel_size)


def matrix_rank(matrix: Tensor, rtol: Optional[float] = None) -> int:
    """Numerical rank of ``matrix`` (in ``float64``; ``torch.linalg.matrix_rank`` with its default tolerance).

    Example:
        >>> matrix_rank(torch.ones(4, 3))
        1
    """
    if not isinstance(matrix, Tensor) or matrix.dim() != 2:
        raise ValueError(f"expected a 2-d tensor (got {type(matrix).__name__} "
                         f"{tuple(matrix.shape) if isinstance(matrix, Tensor) else ''})")
    return int(torch.linalg.matrix_rank(matrix.to(torch.float64), rtol=rtol))


def rank_bound(layer: Any) -> int:
    r"""The largest rank the :func:`patch_operator` of a layer of this shape can have.

    * full convolution: ``min(C_out, C_in k^2)``; grouped: ``g * min(C_out/g, C_in/g * k^2)``;
    * pointwise: ``min(C_out, C_in)``;
    * separable (depthwise with multiplier ``m``, then pointwise): ``min(C_out, C_in m, C_in k^2)``,
      since every patch passes through the ``C_in m`` depthwise channels.

    Example:
        >>> rank_bound(GridConv2d(8, 32, 3)), rank_bound(SeparableConv2d(8, 32, 3)), rank_bound(PointwiseConv2d(8, 32))
        (32, 8, 8)
    """
    mod = _single(layer)
    if hasattr(mod, "depthwise") and hasattr(mod, "pointwise"):
        dw, pw = mod.depthwise, mod.pointwise
        return min(rank_bound(pw), rank_bound(dw))
    g, k2 = int(mod.groups), mod.geometry.num_taps
    return g * min(int(mod.out_channels) // g, int(mod.in_channels) // g * k2)


def collapsed_separable(layer: nn.Module) -> nn.Module:
    """A copy of a separable layer whose depthwise filters are the identity (a 1 at the centre tap).

    The depthwise step then passes every pixel through unchanged, and the block collapses to its
    pointwise part: its patch operator has rank at most ``min(C_out, C_in)``. Kernel sizes must be
    odd (so a centre tap exists).

    Example:
        >>> sep = collapsed_separable(SeparableConv2d(4, 6, 3, padding=1))
        >>> x = torch.randn(1, 4, 5, 5)
        >>> torch.allclose(graph_apply(sep, x), graph_apply(sep.pointwise, x), atol=1e-6)
        True
    """
    if not (hasattr(layer, "depthwise") and hasattr(layer, "pointwise")):
        raise TypeError(f"layer must be a SeparableConv2d (got {type(layer).__name__})")
    k = layer.depthwise.geometry.kernel_size
    if any(n % 2 == 0 for n in k):
        raise ValueError(f"the identity filter needs an odd kernel (got kernel_size={k})")
    out = copy.deepcopy(layer)
    with torch.no_grad():
        out.depthwise.weight.zero_()
        out.depthwise.weight[(slice(None), 0, *(n // 2 for n in k))] = 1.0
    return out


def _per_channel_slices(weight: Tensor) -> Tensor:
    if not isinstance(weight, Tensor) or weight.dim() < 3:
        raise ValueError(f"expected a full convolution weight (C_out, C_in, *kernel) (got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__})")
    c_out, c_in = weight.shape[:2]
    return weight.detach().to(torch.float64).reshape(c_out, c_in, -1).permute(1, 0, 2)  # [C_in, C_out, k^2]


def separable_slice_ranks(weight: Tensor) -> list[int]:
    r"""For each input channel ``c``, the rank of the ``C_out x k^2`` slice ``W[:, c]`` of a full kernel.

    A separable block with depth multiplier ``m`` (no bias) has the effective kernel
    ``W[o, c, u, v] = sum_j P[o, c m + j] D[c m + j, u, v]``: every slice has rank at most ``m``.
    Conversely any kernel whose slices all have rank ``<= m`` is exactly such a block. So a
    separable block reaches precisely the kernels with low-rank channel slices.

    Example:
        >>> separable_slice_ranks(effective_weight(SeparableConv2d(3, 8, 3)))
        [1, 1, 1]
        >>> separable_slice_ranks(torch.nn.Conv2d(3, 8, 3).weight)
        [8, 8, 8]
    """
    return [matrix_rank(s) for s in _per_channel_slices(weight)]


def separable_approximation(weight: Tensor, depth_multiplier: int = 1) -> tuple[Tensor, Tensor, float]:
    r"""The closest separable block to a full kernel: depthwise and pointwise weights, and the error.

    The constraint splits over input channels (each slice ``W[:, c]`` must have rank ``<= m``), so the
    truncated SVD of every slice is the best fit in the Frobenius norm (Eckart-Young).

    Args:
        weight (Tensor): ``(C_out, C_in, kH, kW)``, a full (``groups=1``) kernel.
        depth_multiplier (int, optional): ``m`` (default: ``1``).

    Returns:
        ``(depthwise_weight (C_in m, 1, kH, kW), pointwise_weight (C_out, C_in m, 1, 1), relative_error)``
        with ``relative_error = ||W - W_sep|| / ||W||``, 0 exactly when the kernel is reachable.

    Example:
        >>> sep = SeparableConv2d(3, 8, 3, bias=False)
        >>> _, _, err = separable_approximation(effective_weight(sep))
        >>> err < 1e-12
        True
    """
    if not isinstance(depth_multiplier, int) or depth_multiplier < 1:
        raise ValueError(f"depth_multiplier must be a positive int (got {depth_multiplier!r})")
    slices = _per_channel_slices(weight)
    c_in, c_out, k2 = slices.shape
    m = depth_multiplier
    u, s, vh = torch.linalg.svd(slices, full_matrices=False)  # [C_in, C_out, r], [C_in, r], [C_in, r, k2]
    r = s.size(1)
    keep = min(m, r)
    depthwise = torch.zeros(c_in, m, k2, dtype=torch.float64)
    pointwise = torch.zeros(c_out, c_in, m, dtype=torch.float64)
    depthwise[:, :keep] = vh[:, :keep] * s[:, :keep, None]
    pointwise[:, :, :keep] = u[:, :, :keep].permute(1, 0, 2)
    approx = torch.einsum("ocj,cjk->cok", pointwise, depthwise)
    error = float(torch.linalg.norm(approx - slices) / torch.linalg.norm(slices).clamp_min(1e-300))
    kernel = tuple(weight.shape[2:])
    return (depthwise.reshape(c_in * m, 1, *kernel).to(weight.dtype),
            pointwise.reshape(c_out, c_in * m, 1, 1).to(weight.dtype), error)


# ================================================================================ mixing matrices
def mixing_matrices(layer: Any) -> Tensor:
    r"""The ``C_out x C_in`` matrix each kernel tap applies to a neighbour's channel vector.

    The message along an edge of tap ``t`` is ``M_t x_j``; ``M_t`` is dense for a full convolution,
    block-diagonal (``groups`` blocks) for a grouped one, diagonal for a depthwise one, and
    ``P diag(d_t)`` for a separable one. Read from :func:`effective_weight`.

    Shapes:
        - **output:** :math:`(k_H k_W, C_{out}, C_{in})`, ``float64``

    Example:
        >>> layer = GridConv2d(4, 4, 1, groups=2)
        >>> (mixing_matrices(layer)[0] != 0).int().tolist()
        [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    """
    w = effective_weight(layer)
    return w.reshape(w.size(0), w.size(1), -1).permute(2, 0, 1).contiguous()


def mixing_matrix(layer: Any) -> Tensor:
    r"""The summed mixing matrix ``sum_t M_t`` (``C_out x C_in``): how a layer mixes a constant image's channels.

    For a pointwise layer it is its (only) weight matrix, ``weight[:, :, 0, 0]``.

    Example:
        >>> layer = PointwiseConv2d(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([1., -1.]).view(1, 2, 1, 1))
        >>> mixing_matrix(layer).tolist()
        [[1.0, -1.0]]
    """
    return mixing_matrices(layer).sum(0)

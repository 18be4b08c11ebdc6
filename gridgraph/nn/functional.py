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
from typing import Iterator, NamedTuple, Optional, Union

import torch
from torch import Tensor

from ..pixel_graph import PixelEdgeIndex, pixel_structure
from ..structure import GraphPart, PixelStructure
from . import ops
from .kernels import apply_tap, tap_weights

__all__ = ["conv", "EdgeList", "kernel_trace", "tap_weights", "apply_tap", "tap_messages"]


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
    """Record the kernels :func:`conv` chooses inside the block: ``'grid'`` (neighbour table of a full or
    transposed grid), ``'sparse'`` (the edges of a masked / sparse pixel graph) or ``'edges'`` (a plain
    edge list), one entry per kernel call.

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

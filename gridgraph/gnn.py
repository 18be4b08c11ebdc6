"""A whole CNN as a message-passing network on PyG batches of pixel graphs: :func:`to_gnn`.

``to_gnn(model, example_input)`` traces the model with ``torch.fx`` (shape-generic: no image size is baked
in) and runs that dataflow on :class:`Features`, node features ``[nodes, channels]`` of a batch of grids
(graphs one after the other, each a grid of its own size, nodes row-major), in place of an image batch.
Every operator becomes a graph operation:

* convolutions of every kind: message passing on each grid's pixel graph (the twins :func:`~gridgraph.convert`
  makes, run on the node features seen as a channels-last image: no copy for a batch of one size);
* max pooling: a ``max`` aggregation over each target's window of the finer grid, its gradient to the first
  maximal element as ``MaxPool2d``'s; average pooling with torch's divisor rules; adaptive pooling with
  torch's bins; global pooling as a readout per graph (``batch``), and its broadcast back to the nodes
  (squeeze-and-excitation);
* upsampling (nearest, bilinear with and without ``align_corners``): a weighted gather from the coarser grid,
  the interpolation weights as edge weights;
* BatchNorm on the node features (its statistics over all nodes of the batch), activations node-wise, residual
  additions and channel concatenations on the same grids, flatten and linear heads after a readout.

No torch convolution, pooling or interpolation operator runs, forward or backward.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import routing
from .conversion import CONVERSIONS, convert

__all__ = ["to_gnn", "GNN", "Features", "Grids", "features_of", "to_pixel_graphs"]


# ------------------------------------------------------------------------------------------ layout
class Grids:
    """The layout of a batch of grids: graph ``g`` is a grid ``sizes[g]``, its nodes row-major, the graphs one
    after the other. ``uniform``: one size for every graph (their nodes are then an image batch in memory).

    Example:
        >>> grids = Grids([(4, 5), (2, 3)])
        >>> grids.num_nodes, grids.batch(torch.device("cpu")).bincount().tolist()
        (26, [20, 6])
    """

    __slots__ = ("sizes", "cells", "counts", "offsets", "uniform", "_batch", "_groups", "_index")

    def __init__(self, sizes: Sequence[Sequence[int]], cells: Optional[Sequence[Tensor]] = None) -> None:
        self.sizes = tuple(tuple(int(v) for v in s) for s in sizes)
        self.cells = tuple(cells) if cells is not None else None  # masked: each graph's active cells (row-major)
        if self.cells is not None and len(self.cells) != len(self.sizes):
            raise ValueError(f"expected one cell list per graph ({len(self.sizes)}), got {len(self.cells)}")
        self.counts = [math.prod(s) for s in self.sizes] if self.cells is None else [int(c.numel()) for c in self.cells]
        self._index: dict = {}
        self.offsets = [0]
        for c in self.counts:
            self.offsets.append(self.offsets[-1] + c)
        self.uniform = len(set(self.sizes)) <= 1
        self._batch: dict = {}
        self._groups: Optional[dict] = None

    @property
    def num_graphs(self) -> int:
        return len(self.sizes)

    @property
    def num_nodes(self) -> int:
        return self.offsets[-1]

    @property
    def masked(self) -> bool:
        """Whether the graphs hold only some cells of their grids (masked pixel graphs)."""
        return self.cells is not None

    def dense_index(self, graphs: Sequence[int], device: torch.device) -> Tensor:
        """Masked grids: the row of each node of ``graphs`` (one size) in their stacked dense grids."""
        key = (tuple(graphs), device)
        index = self._index.get(key)
        if index is None:
            size = math.prod(self.sizes[graphs[0]])
            index = self._index[key] = torch.cat([self.cells[g].to(device) + i * size for i, g in enumerate(graphs)])
        return index

    @property
    def ndim(self) -> int:
        return len(self.sizes[0]) if self.sizes else 2

    def groups(self) -> dict:
        """``{size: [graph indices]}`` in order of first appearance."""
        if self._groups is None:
            groups: dict = {}
            for g, s in enumerate(self.sizes):
                groups.setdefault(s, []).append(g)
            self._groups = groups
        return self._groups

    def batch(self, device: torch.device) -> Tensor:
        """The graph of every node (PyG's ``batch`` vector)."""
        b = self._batch.get(device)
        if b is None:
            counts = torch.tensor(self.counts, device=device)
            b = self._batch[device] = torch.repeat_interleave(torch.arange(self.num_graphs, device=device), counts)
        return b

    def __eq__(self, other: Any) -> bool:
        if not isinstance(other, Grids) or other.sizes != self.sizes or (self.cells is None) != (other.cells is None):
            return False
        return self.cells is None or self.cells is other.cells or all(
            a is b or torch.equal(a, b) for a, b in zip(self.cells, other.cells))

    def __hash__(self) -> int:
        return hash(self.sizes)

    def __repr__(self) -> str:
        if self.masked:
            return f"Grids({', '.join('x'.join(map(str, s)) for s in self.sizes)}, masked: {self.counts} nodes)"
        if self.uniform and self.sizes:
            return f"Grids({self.num_graphs} x {'x'.join(map(str, self.sizes[0]))})"
        return f"Grids({', '.join('x'.join(map(str, s)) for s in self.sizes)})"


class GridShape(tuple):
    """The shape of :class:`Features` whose grids differ: ``(graphs, channels, grid...)`` where each grid
    entry is per graph (what ``x.shape`` and ``x.shape[-2:]`` give inside a traced network). Usable as an
    interpolation ``size`` or an ``expand`` target."""

    def __new__(cls, entries: Sequence[Any], grids: Optional[Grids] = None, dims: Optional[Sequence[int]] = None):
        out = super().__new__(cls, entries)
        out.grids, out.dims = grids, tuple(dims) if dims is not None else None
        return out


class Features:
    """Node features ``x`` ``[nodes, channels]`` of a batch of grids (:class:`Grids`): what flows through a
    :class:`GNN` where the CNN had an image batch ``[B, C, *grid]``.

    Example:
        >>> f = features_of(image_to_graph(torch.randn(2, 3, 4, 5), kernel_size=1))
        >>> f, f.shape
        (Features(x=[40, 3], Grids(2 x 4x5)), torch.Size([2, 3, 4, 5]))
    """

    __slots__ = ("x", "grids", "channels_last")

    def __init__(self, x: Tensor, grids: Grids, channels_last: bool = False) -> None:
        if x.dim() != 2 or x.size(0) != grids.num_nodes:
            raise ValueError(f"expected node features of shape [{grids.num_nodes}, C] for {grids} (got "
                             f"{tuple(x.shape)})")
        # channels_last: what the CNN holds as [B, *grid, C] after x.permute(0, 2, 3, 1) (ConvNeXt's LayerNorm
        # and Linear layers act on the last dim: the node features' channels); the nodes are the same
        self.x, self.grids, self.channels_last = x, grids, channels_last

    @property
    def channels(self) -> int:
        return self.x.size(1)

    @property
    def shape(self):
        if self.channels_last and self.grids.uniform:
            return torch.Size([self.grids.num_graphs, *self.grids.sizes[0], self.channels])
        if self.channels_last:
            raise NotImplementedError("to_gnn: the shape of channels-last features of grids of different sizes")
        if self.grids.uniform:
            return torch.Size([self.grids.num_graphs, self.channels, *self.grids.sizes[0]])
        return GridShape([self.grids.num_graphs, self.channels, *(None for _ in range(self.grids.ndim))],
                         self.grids, None)

    def dim(self) -> int:
        return self.grids.ndim + 2

    def size(self, d: Optional[int] = None):
        return self.shape if d is None else self.shape[d]

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    @property
    def device(self) -> torch.device:
        return self.x.device

    def with_x(self, x: Tensor, grids: Optional[Grids] = None) -> "Features":
        return Features(x, self.grids if grids is None else grids, self.channels_last)

    def images(self):
        """Per size: ``(size, graph indices, images [G, C, *size])``, the images a view of the node features
        (channels-last in memory) when the graphs of that size are consecutive."""
        grids, x, c = self.grids, self.x, self.channels
        out = []
        for size, graphs in grids.groups().items():
            if grids.masked:  # the active nodes on zeros: absent neighbours contribute nothing (submanifold)
                parts = [x[grids.offsets[g]:grids.offsets[g + 1]] for g in graphs]
                nodes = x.new_zeros(len(graphs) * math.prod(size), c).index_copy(
                    0, grids.dense_index(graphs, x.device), torch.cat(parts) if len(parts) > 1 else parts[0])
                n = len(size)
                out.append((size, graphs, nodes.view(len(graphs), *size, c).permute(0, n + 1, *range(1, n + 1))))
                continue
            lo, hi = grids.offsets[graphs[0]], grids.offsets[graphs[-1] + 1]
            if hi - lo == len(graphs) * math.prod(size):  # consecutive graphs: a view
                nodes = x[lo:hi]
            else:
                nodes = torch.cat([x[grids.offsets[g]:grids.offsets[g + 1]] for g in graphs])
            n = len(size)
            out.append((size, graphs, nodes.view(len(graphs), *size, c).permute(0, n + 1, *range(1, n + 1))))
        return out

    def __repr__(self) -> str:
        return f"Features(x=[{self.x.size(0)}, {self.channels}], {self.grids})"


_UNIFORM: dict = {}


def _uniform(size: tuple, num_graphs: int) -> Grids:
    """The (shared) layout of ``num_graphs`` grids of one size."""
    key = (size, num_graphs)
    grids = _UNIFORM.get(key)
    if grids is None:
        if len(_UNIFORM) > 512:
            _UNIFORM.clear()
        grids = _UNIFORM[key] = Grids([size] * num_graphs)
    return grids


def _assemble(pieces: list, num_graphs: int) -> Features:
    """Features from per-size results ``[(graph indices, images [G, C, *size])]`` (in any order)."""
    sizes: list = [None] * num_graphs
    per_graph: list = [None] * num_graphs
    for graphs, images in pieces:
        n = images.dim() - 2
        nodes = images.permute(0, *range(2, n + 2), 1)  # [G, *size, C]
        size = tuple(images.shape[2:])
        if len(pieces) == 1 and len(graphs) == num_graphs and graphs == sorted(graphs):
            x = nodes.reshape(-1, images.size(1))  # a view when the images are channels-last
            return Features(x, _uniform(size, num_graphs))
        for i, g in enumerate(graphs):
            sizes[g] = size
            per_graph[g] = nodes[i].reshape(-1, images.size(1))
    return Features(torch.cat(per_graph), Grids(sizes))


class _GridChange(ValueError):
    """An operator that changes the grid of masked graphs (no submanifold form)."""


def _per_size(f: Features, fn: Callable[[Tensor], Tensor]) -> Features:
    """``fn`` (images -> images) on each size group of ``f``; on masked graphs only on the active nodes, whose
    grid ``fn`` must keep (stride 1): the result read at the same nodes."""
    if f.channels_last:
        raise NotImplementedError("to_gnn: a grid operator on channels-last features (after x.permute(0, 2, 3, 1)); "
                                  "permute back first")
    grids = f.grids
    if grids.masked:
        rows = [None] * grids.num_graphs
        for size, graphs, images in f.images():
            out = fn(images)
            if tuple(out.shape[2:]) != size:
                raise _GridChange(f"it changes the grid of masked graphs ({'x'.join(map(str, size))} -> "
                                  f"{'x'.join(map(str, out.shape[2:]))}): only operators that keep each pixel "
                                  "(stride 1) run on masked pixel graphs")
            n = out.dim() - 2
            nodes = out.permute(0, *range(2, n + 2), 1).reshape(-1, out.size(1))[grids.dense_index(graphs, out.device)]
            start = 0
            for g in graphs:
                rows[g] = nodes[start:start + grids.counts[g]]
                start += grids.counts[g]
        return Features(torch.cat(rows) if len(rows) > 1 else rows[0], grids)
    return _assemble([(graphs, fn(images)) for _, graphs, images in f.images()], f.grids.num_graphs)


# -------------------------------------------------------------------------------------- pooling
def _pool_axis(size: int, kernel: int, stride: int, pad: int, dilation: int, ceil_mode: bool) -> int:
    """torch's pooling output size along one axis."""
    span = dilation * (kernel - 1) + 1
    out = (size + 2 * pad - span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:  # the last window must start inside the image or its left pad
        out -= 1
    return out


def _tuple(v: Any, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _padded(nodes: Tensor, kernel, stride, pad, dilation, out, fill: float) -> Tensor:
    """Node images ``[G, *size, C]`` padded with ``fill`` so that every target's window is inside."""
    n = len(kernel)
    size = nodes.shape[1:n + 1]
    hi = [max(0, (o - 1) * s + (k - 1) * d + 1 - p - sz) for o, s, k, d, p, sz in
          zip(out, stride, kernel, dilation, pad, size)]
    pads = []
    for p, h in zip(reversed(pad), reversed(hi)):
        pads += [p, h]
    return torch.constant_pad_nd(nodes, [0, 0] + pads, fill) if any(pads) else nodes


def _taps(padded: Tensor, kernel, stride, dilation, out):
    """Per tap (row-major): the ``[G, *out, C]`` view of each target's source at that tap, the shifted views
    of a regular grid's neighbourhood."""
    for offsets in _product([range(k) for k in kernel]):
        view = padded
        for a, (u, d, s, o) in enumerate(zip(offsets, dilation, stride, out)):
            view = view.narrow(1 + a, u * d, (o - 1) * s + 1)
            if s > 1:
                view = view[(slice(None),) * (1 + a) + (slice(None, None, s),)]
        yield view


def _product(ranges):
    if not ranges:
        yield ()
        return
    for head in ranges[0]:
        for rest in _product(ranges[1:]):
            yield (head,) + rest


def _max_aggregate(padded: Tensor, kernel, stride, dilation, out) -> Tensor:
    """``max`` aggregation over each target's window: with autograd, ``max`` over the stacked taps (its gradient
    goes to the first maximal source, as max pooling's); without, a running ``maximum`` (NaN propagates in
    both, as in max pooling)."""
    taps = _taps(padded, kernel, stride, dilation, out)
    if torch.is_grad_enabled() and padded.requires_grad:
        return torch.stack(list(taps), dim=len(kernel) + 1).max(dim=len(kernel) + 1).values
    best = next(taps).clone(memory_format=torch.contiguous_format)
    for tap in taps:
        torch.maximum(best, tap, out=best)
    return best


def max_pool(f: Features, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False) -> Features:
    """``MaxPoolNd`` as a ``max`` aggregation over each target's window (first maximal element wins, as torch's
    gradient routing)."""
    n = f.grids.ndim
    k = _tuple(kernel_size, n)
    s = _tuple(stride if stride not in (None, []) else kernel_size, n)
    p, d = _tuple(padding, n), _tuple(dilation, n)

    def pool(images):
        size = images.shape[2:]
        out = [_pool_axis(sz, kk, ss, pp, dd, ceil_mode) for sz, kk, ss, pp, dd in zip(size, k, s, p, d)]
        nodes = images.permute(0, *range(2, n + 2), 1)
        padded = _padded(nodes, k, s, p, d, out, -math.inf)
        return _max_aggregate(padded, k, s, d, out).permute(0, n + 1, *range(1, n + 1))
    return _per_size(f, pool)


def _avg_divisor(runs, size, kernel, stride, padding, count_include_pad: bool, dtype, device) -> Tensor:
    """Average pooling's divisor for the output indices ``runs`` (``[(start, stop)]`` per axis) of a grid ``size``,
    ``[1, *out, 1]`` (node layout): the window's length per axis, padding counted or not, as torch divides."""
    n = len(runs)
    divisor = None
    for a, (lo, hi) in enumerate(runs):
        start = torch.arange(lo, hi, device=device) * stride[a] - padding[a][0]
        end = torch.clamp(start + kernel[a], max=size[a] + padding[a][1])
        length = end - start if count_include_pad else torch.clamp(end, max=size[a]) - torch.clamp(start, min=0)
        shape = [1] * (n + 2)
        shape[1 + a] = hi - lo
        length = length.to(dtype).view(shape)
        divisor = length if divisor is None else divisor * length
    return divisor


def avg_pool(f: Features, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
             divisor_override=None) -> Features:
    """``AvgPoolNd``: the sum over each target's window divided as torch divides (``count_include_pad``,
    ``ceil_mode``, ``divisor_override``)."""
    n = f.grids.ndim
    k = _tuple(kernel_size, n)
    s = _tuple(stride if stride not in (None, []) else kernel_size, n)
    p = _tuple(padding, n)

    def pool(images):
        size = images.shape[2:]
        out = [_pool_axis(sz, kk, ss, pp, 1, ceil_mode) for sz, kk, ss, pp in zip(size, k, s, p)]
        nodes = images.permute(0, *range(2, n + 2), 1)
        padded = _padded(nodes, k, s, p, (1,) * n, out, 0.0)
        total = None
        for tap in _taps(padded, k, s, (1,) * n, out):
            total = tap.clone(memory_format=torch.contiguous_format) if total is None else total + tap
        if divisor_override:
            divisor = torch.tensor(float(divisor_override), dtype=images.dtype, device=images.device)
        else:
            divisor = _avg_divisor([(0, o) for o in out], size, k, s, [(q, q) for q in p], count_include_pad,
                                   images.dtype, images.device)
        return (total / divisor).permute(0, n + 1, *range(1, n + 1))
    return _per_size(f, pool)


def _bins(size: int, out: int) -> list[tuple[int, int]]:
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def adaptive_pool(f: Features, output_size, kind: str) -> Features:
    """``AdaptiveAvgPoolNd`` / ``AdaptiveMaxPoolNd`` with torch's bins; a 1x1 output is a readout per graph."""
    n = f.grids.ndim
    out_size = _tuple(output_size, n)
    if kind == "avg" and all(o == 1 for o in out_size):  # a readout per graph
        return readout_mean(f, keepdim=True)
    if f.grids.masked and all(o == 1 for o in out_size):  # a readout over each graph's active pixels
        if kind == "avg":
            return readout_mean(f, keepdim=True)
        grids = f.grids
        pooled = torch.stack([f.x[grids.offsets[g]:grids.offsets[g + 1]].max(0).values for g in range(grids.num_graphs)])
        return Features(pooled, _uniform((1,) * n, grids.num_graphs))

    def pool(images):
        size = images.shape[2:]
        out = [sz if o is None else int(o) for sz, o in zip(size, out_size)]
        nodes = images.permute(0, *range(2, n + 2), 1)  # [G, *size, C]
        if kind == "avg":
            result = nodes
            for a in range(n):  # one averaging matrix per axis: the bins as weighted edges
                weights = torch.zeros(out[a], size[a], dtype=images.dtype, device=images.device)
                for i, (lo, hi) in enumerate(_bins(size[a], out[a])):
                    weights[i, lo:hi] = 1.0 / (hi - lo)
                result = torch.movedim(torch.tensordot(result, weights, dims=([1 + a], [1])), -1, 1 + a)
            return result.permute(0, n + 1, *range(1, n + 1))
        cells = []
        for index in _product([range(o) for o in out]):
            view = nodes
            for a, i in enumerate(index):
                lo, hi = _bins(size[a], out[a])[i]
                view = view.narrow(1 + a, lo, hi - lo)
            cells.append(view.reshape(view.size(0), -1, view.size(-1)).max(dim=1).values)
        result = torch.stack(cells, dim=1).view(nodes.size(0), *out, nodes.size(-1))
        return result.permute(0, n + 1, *range(1, n + 1))
    return _per_size(f, pool)


def readout_mean(f: Features, keepdim: bool) -> Any:
    """The mean of each graph's nodes: ``[graphs, C]``, or :class:`Features` on 1x1 grids (``keepdim``)."""
    grids = f.grids
    if grids.uniform and not grids.masked:
        pooled = f.x.view(grids.num_graphs, -1, f.channels).mean(1)
    else:  # each graph's own nodes (masked: the active pixels only, as PyG's global_mean_pool)
        pooled = torch.stack([f.x[grids.offsets[g]:grids.offsets[g + 1]].mean(0) for g in range(grids.num_graphs)])
    if not keepdim:
        return pooled
    return Features(pooled, _uniform((1,) * grids.ndim, grids.num_graphs))


def broadcast(f: Features, grids: Grids) -> Features:
    """Features on 1x1 grids broadcast to every node of ``grids`` (one value per graph)."""
    if grids.uniform and not grids.masked:
        g, c = grids.num_graphs, f.channels
        return Features(f.x.view(g, 1, c).expand(g, grids.counts[0] if g else 0, c).reshape(-1, c), grids)
    return Features(f.x[grids.batch(f.x.device)], grids)


# -------------------------------------------------------------------------------------- interpolation
def _source(out: int, size: int, mode: str, align_corners: Optional[bool], scale: Optional[float],
            dtype: torch.dtype, device: torch.device):
    """Per output index: the source indices and weights of torch's upsampling along one axis."""
    dst = torch.arange(out, device=device)
    if mode == "nearest":
        ratio = torch.tensor((1.0 / scale) if scale else size / out, dtype=torch.float32)
        index = torch.clamp(torch.floor(dst.to(torch.float32) * ratio).to(torch.long), max=size - 1)
        return [(index, None)]
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    if align_corners:
        ratio = (size - 1) / (out - 1) if out > 1 else 0.0
        src = dst.to(opmath) * ratio
    else:
        ratio = (1.0 / scale) if scale else size / out
        src = torch.clamp((dst.to(opmath) + 0.5) * ratio - 0.5, min=0)
    low = src.to(torch.long)
    high = low + (low < size - 1).to(torch.long)
    lam = (src - low.to(opmath)).to(dtype)
    return [(low, 1 - lam), (high, lam)]


def _per_graph(entries) -> Optional[list]:
    """Per-graph grid sizes from a :class:`GridShape` of grid dims (or a sequence of one-dim ones), else None."""
    if isinstance(entries, GridShape) and entries.dims is not None:
        return [tuple(s[d] for d in entries.dims) for s in entries.grids.sizes]
    if isinstance(entries, (tuple, list)) and entries and all(isinstance(e, GridShape) for e in entries):
        parts = [_per_graph(e) for e in entries]
        if any(p is None for p in parts) or any(e.grids != entries[0].grids for e in entries):
            return None
        return [sum((p[g] for p in parts), ()) for g in range(entries[0].grids.num_graphs)]
    return None


def interpolate(f: Features, size=None, scale_factor=None, mode: str = "nearest", align_corners=None,
                recompute_scale_factor=None, antialias: bool = False) -> Features:
    """``F.interpolate`` (nearest, linear, bilinear, trilinear) as a weighted gather from each target's source
    pixels, per axis: the interpolation weights are the edge weights."""
    if antialias or mode not in ("nearest", "linear", "bilinear", "trilinear"):
        raise NotImplementedError(f"to_gnn: interpolate(mode={mode!r}, antialias={antialias}) has no graph form "
                                  "here (nearest, linear, bilinear, trilinear are mapped)")
    n = f.grids.ndim
    per_graph_sizes = _per_graph(size)
    if per_graph_sizes is not None:  # the sizes of another batch of grids, graph by graph
        size = None
    scales = _tuple(scale_factor, n) if scale_factor is not None else (None,) * n

    def run(images, target):
        grid = images.shape[2:]
        if target is None:
            target = [int(math.floor(g * sc)) for g, sc in zip(grid, scales)]
        use_scale = scale_factor is not None and not recompute_scale_factor
        nodes = images.permute(0, *range(2, n + 2), 1)
        for a in range(n):
            terms = _source(target[a], grid[a], mode, align_corners, scales[a] if use_scale else None,
                            images.dtype, images.device)
            result = None
            for index, weight in terms:
                piece = nodes.index_select(1 + a, index)
                if weight is not None:
                    shape = [1] * nodes.dim()
                    shape[1 + a] = -1
                    piece = piece * weight.view(shape)
                result = piece if result is None else result + piece
            nodes = result
        return nodes.permute(0, n + 1, *range(1, n + 1))

    if per_graph_sizes is not None:
        pieces = []
        for s, graphs, images in f.images():
            for i, g in enumerate(graphs):
                pieces.append(([g], run(images[i:i + 1], list(per_graph_sizes[g]))))
        return _assemble(pieces, f.grids.num_graphs)
    target = None if size is None else list(_tuple(size, n))
    return _per_size(f, lambda images: run(images, target))


# -------------------------------------------------------------------------------------- the network
_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
                        nn.LeakyReLU, nn.ELU, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout2d, nn.PReLU,
                        nn.Softplus, nn.CELU, nn.SELU, nn.Hardtanh)
_ELEMENTWISE_FUNCTIONS = {F.relu, F.relu6, F.silu, F.gelu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
                          F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.mish, F.dropout, torch.relu,
                          F.softplus, F.hardtanh, torch.nn.functional.relu_, torch.exp, torch.neg, torch.abs}
_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div,
           operator.iadd, operator.imul, torch.maximum, torch.minimum}
_CONVS = tuple(CONVERSIONS) + tuple(CONVERSIONS.values())


_LEAF_NAMES = ("StochasticDepth", "DropPath")  # torchvision's and timm's: their mode is read at each call


class _Tracer(torch.fx.Tracer):
    """Leaves: torch's own modules and gridgraph's twins and routed modules; everything else is traced into."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank  # the dims of the network's feature maps ([B, C, *grid]), for unpacking x.shape

    def iter(self, obj):
        """``*x.shape[-2:]`` and ``h, w = x.shape[2:]``: a shape has the feature maps' rank, so its entries are
        traced one by one (torch.fx cannot unpack a traced value of unknown length)."""
        length = _shape_length(obj.node, self.rank)
        if length is None:
            return super().iter(obj)
        return iter([obj[i] for i in range(length)])

    def proxy(self, node):
        return _Proxy(node, self)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, tuple(CONVERSIONS.values())) or routing.is_routed(m) or type(m).__name__ in _LEAF_NAMES:
            return True
        return super().is_leaf_module(m, qualname)


class _Proxy(torch.fx.Proxy):
    """A traced value whose length is known when it is a shape (``*x.shape[-2:]`` asks for it)."""

    def __len__(self) -> int:
        length = _shape_length(self.node, self.tracer.rank)
        if length is None:
            return super().__len__()
        return length


def _shape_length(node, rank: int) -> Optional[int]:
    if node.op == "call_function" and node.target is getattr and node.args[1] == "shape":
        return rank
    if node.op == "call_method" and node.target == "size" and len(node.args) == 1 and not node.kwargs:
        return rank
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], slice):
        inner = node.args[0]
        if isinstance(inner, torch.fx.Node) and _shape_length(inner, rank) == rank:
            return len(range(rank)[node.args[1]])
    return None


def _error(node, what: str) -> NotImplementedError:
    where = node.target if node.op == "call_module" else (node.stack_trace or "").strip().splitlines()[-1:] or ""
    return NotImplementedError(f"to_gnn: {what} (node {node.name!r}{', module ' + repr(node.target) if node.op == 'call_module' else ''}) has no graph "
                               f"form{(': ' + str(where[0]).strip()) if isinstance(where, list) and where else ''}")


class _Where:
    """What a handler reports in its errors: the traced node and its module path."""

    __slots__ = ("name", "op", "target", "stack_trace")

    def __init__(self, node: torch.fx.Node) -> None:
        self.name, self.op, self.stack_trace = node.name, node.op, node.stack_trace
        self.target = node.target if node.op == "call_module" else None


_RECORD: Optional[list] = None  # GNN.describe: the operators that ran on node features


def _first_features(values) -> Optional[Features]:
    return next((v for v in _leaves(values) if isinstance(v, Features)), None)


def _describe(where: _Where, kind: str, target: Any, args, result) -> None:
    source = _first_features(args)
    if source is None:
        return
    module = args[0] if kind == "call_module" else None
    if kind == "call_module":
        op = type(module).__name__
    elif kind == "call_function":
        op = getattr(target, "__name__", str(target))
    else:
        op = f".{target}()"
    out = result if isinstance(result, Features) else None
    row = {"node": where.name, "module": where.target, "op": op, "grid_in": source.grids.sizes[0],
           "channels_in": source.channels, "grid_out": out.grids.sizes[0] if out is not None else None,
           "channels_out": out.channels if out is not None else (result.size(-1) if isinstance(result, Tensor)
                                                                 else None)}
    if isinstance(module, _CONVS) or routing.is_routed(module):
        row["aggregation"] = "sum over taps (message passing)"
        if hasattr(module, "weight"):
            from .graph import image_to_graph  # the stage's own pixel graph: its edges per graph
            probe = torch.zeros(1, source.channels, *source.grids.sizes[0])
            try:
                row["edges"] = int(image_to_graph(probe, module).edge_index.size(1))
            except (TypeError, ValueError):
                pass
    elif "MaxPool" in op or op.startswith("max_pool") or op == "AdaptiveMaxPool2d":
        row["aggregation"] = "max over window"
    elif "AvgPool" in op or op.startswith("avg_pool") or op.startswith("adaptive_avg") or op in ("mean", ".mean()"):
        row["aggregation"] = "mean (readout per graph)" if out is None or math.prod(out.grids.sizes[0]) == 1 \
            else "mean over window"
    elif op in ("Upsample", "interpolate"):
        row["aggregation"] = "weighted gather from the coarser grid"
    elif out is not None and out.grids != source.grids and all(math.prod(s) == 1 for s in source.grids.sizes):
        row["aggregation"] = "broadcast to the nodes"
    else:
        row["aggregation"] = "node-wise"
    _RECORD.append(row)


def _masked_guard(fn: Callable, where: _Where, kind: str, target: Any) -> Callable:
    def run(*args, **kwargs):
        try:
            result = fn(*args, **kwargs)
        except _GridChange as error:
            module = f" (module {where.target!r})" if where.target is not None else ""
            raise NotImplementedError(f"to_gnn: {where.name!r}{module} cannot run on masked pixel graphs: "
                                      f"{error}") from None
        if _RECORD is not None:
            _describe(where, kind, target, args, result)
        return result
    return run


def _apply_module(where: _Where, module: nn.Module, *args, **kwargs):
    x = args[0] if args else None
    if not isinstance(x, Features):
        return module(*args, **kwargs)
    if isinstance(module, (nn.LayerNorm, nn.Linear)):  # on the last dim: channels only in channels-last layout
        if not x.channels_last and not all(math.prod(s) == 1 for s in x.grids.sizes):
            raise _error(where, f"{type(module).__name__} over the last dim of an image batch (the width, not the "
                                "channels; permute to channels-last first, as ConvNeXt does)")
        if isinstance(module, nn.LayerNorm) and tuple(module.normalized_shape) != (x.channels,):
            raise _error(where, f"LayerNorm over {tuple(module.normalized_shape)} (node features have {x.channels} "
                                "channels)")
        return x.with_x(module(x.x))
    if x.channels_last and not isinstance(module, _ELEMENTWISE_MODULES) and \
            type(module).__name__ not in ("StochasticDepth", "DropPath"):
        raise _error(where, f"{type(module).__name__} on channels-last features (permute back first)")
    if isinstance(module, _CONVS) or routing.is_routed(module):
        rest = args[1:]
        return _per_size(x, lambda images: module(images, *rest, **kwargs))
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return x.with_x(_batch_norm(module, x.x))  # statistics over all nodes, per channel
    if isinstance(module, _ELEMENTWISE_MODULES):
        return x.with_x(module(x.x))
    if type(module).__name__ in ("StochasticDepth", "DropPath"):  # torchvision / timm: per sample = per graph
        return _drop_path(x, float(getattr(module, "p", getattr(module, "drop_prob", 0.0)) or 0.0), module.training,
                          getattr(module, "mode", "row"), getattr(module, "scale_by_keep", True))
    if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
        if module.return_indices:
            raise _error(where, "max pooling with return_indices")
        return max_pool(x, module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode)
    if isinstance(module, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        return avg_pool(x, module.kernel_size, module.stride, module.padding, module.ceil_mode,
                        module.count_include_pad, getattr(module, "divisor_override", None))
    if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
        return adaptive_pool(x, module.output_size, "avg")
    if isinstance(module, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
        if module.return_indices:
            raise _error(where, "adaptive max pooling with return_indices")
        return adaptive_pool(x, module.output_size, "max")
    if isinstance(module, nn.Upsample):
        return interpolate(x, module.size, module.scale_factor, module.mode, module.align_corners,
                           getattr(module, "recompute_scale_factor", None))
    if isinstance(module, nn.Flatten):
        return _flatten(x, module.start_dim, module.end_dim, where)
    raise _error(where, f"{type(module).__name__} on node features")


def _apply_function(where: _Where, target: Callable, args, kwargs):
    if target is operator.getitem and isinstance(args[0], GridShape):
        return _getitem_shape(args[0], args[1])
    if not any(isinstance(a, (Features, GridShape)) for a in _leaves((args, kwargs))):
        return target(*args, **kwargs)
    if target is getattr:
        return getattr(args[0], args[1])
    if target is operator.getitem and isinstance(args[0], torch.Size):
        return args[0][args[1]]
    if target in _ELEMENTWISE_FUNCTIONS:
        return args[0].with_x(target(args[0].x, *args[1:], **kwargs))
    if target is torch.permute:
        return _permute(args[0], args[1] if len(args) > 1 else kwargs["dims"], where)
    if target in (F.layer_norm, F.linear):
        x = args[0]
        if not x.channels_last:
            raise _error(where, f"{target.__name__} over the last dim of an image batch (permute to channels-last "
                                "first)")
        return x.with_x(target(x.x, *args[1:], **kwargs))
    if target in _BINARY:
        return _binary(target, args, kwargs, where)
    if target is torch.cat:
        tensors = args[0] if args else kwargs["tensors"]
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        return _cat(tensors, dim, where)
    if target is torch.flatten:
        return _flatten(args[0], args[1] if len(args) > 1 else kwargs.get("start_dim", 0),
                        args[2] if len(args) > 2 else kwargs.get("end_dim", -1), where)
    if target is F.interpolate:
        return interpolate(*args, **kwargs)
    if target in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d):
        return adaptive_pool(args[0], args[1] if len(args) > 1 else kwargs["output_size"], "avg")
    if target in (F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d):
        return adaptive_pool(args[0], args[1] if len(args) > 1 else kwargs["output_size"], "max")
    if target in (F.max_pool1d, F.max_pool2d, F.max_pool3d):
        if kwargs.get("return_indices") or (len(args) > 6 and args[6]):
            raise _error(where, "max pooling with return_indices")
        return max_pool(*args[:6], **{k: v for k, v in kwargs.items() if k != "return_indices"})
    if target in (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d):
        return avg_pool(*args, **kwargs)
    if target is torch.mean:
        return _mean(args[0], args[1] if len(args) > 1 else kwargs.get("dim"), kwargs.get("keepdim", False), where)
    if getattr(target, "__name__", "") in ("stochastic_depth", "drop_path"):  # torchvision / timm functions
        return _drop_path_call(target, args, kwargs)
    if target in routing.CONV_FUNCTIONS:
        x = args[0]
        return _per_size(x, lambda images: routing.conv_call(target, (images,) + tuple(args[1:]), kwargs))
    raise _error(where, getattr(target, "__name__", str(target)))


_SAME_FEATURES_METHODS = ("contiguous", "float", "double", "to", "type_as", "clone")


def _apply_method(where: _Where, name: str, args, kwargs):
    x = args[0]
    if isinstance(x, GridShape) and name == "__getitem__":
        return _getitem_shape(x, args[1])
    if not isinstance(x, Features):
        return getattr(x, name)(*args[1:], **kwargs)
    if name == "size":
        return x.size(*args[1:])
    if name == "dim":
        return x.dim()
    if name == "mean":
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
        return _mean(x, dim, keepdim, where)
    if name == "flatten":
        return _flatten(x, args[1] if len(args) > 1 else kwargs.get("start_dim", 0),
                        args[2] if len(args) > 2 else kwargs.get("end_dim", -1), where)
    if name in ("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "clamp", "clamp_", "neg", "abs",
                "mul_", "add_", "div_", "sub_") and not any(isinstance(a, Features) for a in args[1:]):
        if name.endswith("_") and name[:-1] in ("mul", "add", "div", "sub"):
            other = args[1] if len(args) > 1 else kwargs.get("other")
            if isinstance(other, Tensor) and other.dim() > 1:
                return _binary(getattr(torch, name[:-1]), args, kwargs, where)
        return x.with_x(getattr(x.x, name)(*args[1:], **kwargs))
    if name in _SAME_FEATURES_METHODS:
        return x.with_x(getattr(x.x, name)(*args[1:], **kwargs))
    if name in ("add", "add_", "mul", "mul_", "sub", "sub_", "div", "div_", "__add__", "__mul__"):
        op = {"add": torch.add, "__add__": torch.add, "mul": torch.mul, "__mul__": torch.mul, "sub": torch.sub,
              "div": torch.div}[name.rstrip("_")]
        return _binary(op, args, kwargs, where)
    if name == "expand":
        return _expand(x, args[1:], where)
    if name == "permute":
        dims = args[1:] if len(args) > 2 or not isinstance(args[1], (tuple, list)) else args[1]
        return _permute(x, dims, where)
    if name in ("view", "reshape"):
        shape = args[1:] if len(args) > 2 or not isinstance(args[1], (tuple, list)) else args[1]
        if len(shape) == 2:
            return _flatten(x, 1, -1, where)
        raise _error(where, f"{name}{tuple(shape)}")
    raise _error(where, f"method {name!r} of node features")


def _handler(kind: str, where: _Where, target: Any) -> Callable:
    """A function for the generated program: the node's operator applied to :class:`Features` (or plain values)."""
    if kind == "call_module":
        def run(module, *args, **kwargs):
            return _apply_module(where, module, *args, **kwargs)
    elif kind == "call_function":
        def run(*args, **kwargs):
            return _apply_function(where, target, args, kwargs)
    else:
        def run(*args, **kwargs):
            return _apply_method(where, target, args, kwargs)
    run = _masked_guard(run, where, kind, target)
    run.__name__ = run.__qualname__ = f"gnn_{where.name}"
    run.__module__ = __name__
    return run


def _fetch(net: nn.Module, path: str) -> Any:
    for part in path.split("."):
        net = getattr(net, part)
    return net


def _program(graph: torch.fx.Graph) -> torch.fx.GraphModule:
    """The traced network as generated Python code calling a handler per node (no interpreter per call). The
    network is its first input: modules and parameters are read from it at each call (a module swapped after
    :func:`to_gnn` is the one that runs, and the program holds no state)."""
    out = torch.fx.Graph()
    env: dict = {}
    net = out.placeholder("net")

    def arg(a):
        return torch.fx.map_arg(a, lambda n: env[n])

    for node in graph.nodes:
        if node.op == "placeholder":
            env[node] = out.placeholder(node.target)
        elif node.op == "get_attr":
            env[node] = out.call_function(_fetch, (net, node.target))
        elif node.op == "output":
            out.output(arg(node.args[0]))
        else:
            where = _Where(node)
            args = tuple(arg(node.args))
            if node.op == "call_module":
                args = (out.call_function(_fetch, (net, node.target)),) + args
            env[node] = out.call_function(_handler(node.op, where, node.target), args, arg(node.kwargs))
    return torch.fx.GraphModule(nn.Module(), out)


def _drop_path(x: Features, p: float, training: bool, mode: str = "row", scale_by_keep: bool = True) -> Features:
    """Stochastic depth: whole samples (graphs) dropped in training (``mode="row"``), the identity in eval."""
    if not training or p == 0.0:
        return x
    survival = 1.0 - p
    if mode != "row":
        keep = x.x.new_empty(1, 1).bernoulli_(survival)
        return x.with_x(x.x * (keep.div_(survival) if survival > 0 and scale_by_keep else keep))
    keep = x.x.new_empty(x.grids.num_graphs, 1).bernoulli_(survival)
    if scale_by_keep and survival > 0:
        keep = keep.div_(survival)
    return x.with_x(x.x * keep[x.grids.batch(x.x.device)])


def _drop_path_call(target: Callable, args, kwargs) -> Features:
    """torchvision's ``stochastic_depth(input, p, mode, training=True)`` / timm's ``drop_path(x, drop_prob=0.,
    training=False, scale_by_keep=True)``."""
    if target.__name__ == "stochastic_depth":
        bound = dict(zip(("input", "p", "mode", "training"), args), **kwargs)
        return _drop_path(bound["input"], float(bound["p"]), bool(bound.get("training", True)), bound["mode"])
    bound = dict(zip(("x", "drop_prob", "training", "scale_by_keep"), args), **kwargs)
    return _drop_path(bound["x"], float(bound.get("drop_prob", 0.0)), bool(bound.get("training", False)), "row",
                      bool(bound.get("scale_by_keep", True)))


def _batch_norm(module: nn.Module, x: Tensor) -> Tensor:
    """``_BatchNorm.forward`` on node features ``[nodes, C]``: in training mode the statistics over all nodes of
    the batch (for graphs of one size, BatchNorm2d's over ``(N, H, W)``), the running statistics updated as
    torch updates them."""
    momentum = 0.0 if module.momentum is None else module.momentum
    if module.training and module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        if module.momentum is None:
            momentum = 1.0 / float(module.num_batches_tracked)
    use_batch = module.training or (module.running_mean is None and module.running_var is None)
    track = not module.training or module.track_running_stats
    return F.batch_norm(x, module.running_mean if track else None, module.running_var if track else None,
                        module.weight, module.bias, use_batch, momentum, module.eps)


def _leaves(value):
    if isinstance(value, (tuple, list)):
        for v in value:
            yield from _leaves(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    else:
        yield value


def _getitem_shape(shape, index):
    if isinstance(shape, GridShape):
        if isinstance(index, slice):
            dims = list(range(len(shape)))[index]
            if shape.dims is not None:
                return GridShape([None] * len(dims), shape.grids, [shape.dims[d] for d in dims])
            grid_dims = [d - 2 for d in dims if d >= 2]
            if len(grid_dims) == len(dims):
                return GridShape([None] * len(dims), shape.grids, grid_dims)
        elif isinstance(index, int) and -len(shape) <= index < len(shape):
            dims = list(range(len(shape)))
            d = dims[index]
            if shape.dims is None:  # (graphs, channels, grid...)
                if d in (0, 1):
                    return shape[d]
                return GridShape([None], shape.grids, [d - 2])
            return GridShape([None], shape.grids, [shape.dims[d]])  # one grid dim, per graph
        raise NotImplementedError("to_gnn: the grid sizes differ between the graphs of this batch: only x.shape[0], "
                                  "x.shape[1] and slices of the grid dims (e.g. as an interpolation size) are defined")
    return shape[index]


def _binary(op, args, kwargs, node):
    a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
    alpha = kwargs.get("alpha")
    fa, fb = isinstance(a, Features), isinstance(b, Features)
    if fa and fb:
        if a.channels_last != b.channels_last:
            raise _error(node, f"{getattr(op, '__name__', op)} of channels-first and channels-last features")
        if a.grids != b.grids:  # one per graph (a 1x1 readout) broadcast to the nodes of the other
            one_a = all(math.prod(s) == 1 for s in a.grids.sizes) and not a.grids.masked
            one_b = all(math.prod(s) == 1 for s in b.grids.sizes) and not b.grids.masked
            big = a if one_b else b
            if (one_a or one_b) and alpha is None and big.grids.uniform and not big.grids.masked:
                g, c = big.grids.num_graphs, big.channels  # per graph: a broadcast, nothing materialised
                va = a.x.view(g, -1, a.channels)
                vb = b.x.view(g, -1, b.channels)
                return big.with_x(op(va, vb).reshape(-1, max(a.channels, b.channels)))
            if all(math.prod(s) == 1 for s in b.grids.sizes):
                b = broadcast(b, a.grids)
            elif all(math.prod(s) == 1 for s in a.grids.sizes):
                a = broadcast(a, b.grids)
            else:
                raise _error(node, f"{getattr(op, '__name__', op)} of features on different grids ({a.grids} and "
                             f"{b.grids})")
        out = op(a.x, b.x) if alpha is None else op(a.x, b.x, alpha=alpha)
        return a.with_x(out)
    f = a if fa else b
    other = b if fa else a
    if isinstance(other, Tensor) and other.dim() > 1:
        # a per-channel tensor [C, 1, 1] / [1, C, 1, 1] (layer scale, affine maps): per node [C]
        shape = tuple(other.shape)
        rank = f.dim()
        if len(shape) <= rank and shape[-(rank - 1):][1:] == (1,) * (rank - 2) and math.prod(shape) == shape[-(rank - 1)]:
            other = other.reshape(-1)
    if isinstance(other, Tensor) and other.dim() > 1:
        raise _error(node, f"{getattr(op, '__name__', op)} of node features and a tensor of shape "
                     f"{tuple(other.shape)}")
    out = op(f.x, other) if fa else op(other, f.x)
    return f.with_x(out)


def _permute(x: Features, dims, where) -> Features:
    """``x.permute(0, 2, 3, 1)`` / ``x.permute(0, 3, 1, 2)`` (any grid rank): the same node features, read with
    the channels last / first."""
    n = x.grids.ndim
    dims = tuple(int(d) % (n + 2) for d in dims)
    to_last, to_first = (0, *range(2, n + 2), 1), (0, n + 1, *range(1, n + 1))
    if not x.channels_last and dims == to_last:
        return Features(x.x, x.grids, True)
    if x.channels_last and dims == to_first:
        return Features(x.x, x.grids, False)
    if dims == tuple(range(n + 2)):
        return x
    raise _error(where, f"permute{dims} of node features (only channels to the last dim and back)")


def _cat(tensors, dim, node):
    if any(not isinstance(t, Features) for t in tensors):
        raise _error(node, "torch.cat of node features with other tensors")
    last = tensors[0].channels_last
    if any(t.channels_last != last for t in tensors):
        raise _error(node, "torch.cat of channels-first and channels-last features")
    channel_dims = (-1, tensors[0].dim() - 1) if last else (1, -tensors[0].dim() + 1)
    if dim not in channel_dims:
        raise _error(node, f"torch.cat along dim {dim} (the channels are dim {channel_dims[0]})")
    grids = tensors[0].grids
    if any(t.grids != grids for t in tensors):
        raise _error(node, "torch.cat of features on different grids")
    return Features(torch.cat([t.x for t in tensors], dim=1), grids, last)


def _mean(x: Features, dim, keepdim: bool, node):
    dims = sorted(d % x.dim() for d in (_tuple(dim, 1) if dim is not None else range(x.dim())))
    if dims == list(range(2, x.dim())):
        return readout_mean(x, keepdim)
    raise _error(node, f"mean over dims {dims} (over the grid dims it is a readout per graph)")


def _flatten(x: Features, start: int, end: int, node):
    if start not in (1, -x.dim() + 1) or end not in (-1, x.dim() - 1):
        raise _error(node, f"flatten({start}, {end})")
    grids = x.grids
    if all(math.prod(s) == 1 for s in grids.sizes) and not grids.masked:
        return x.x  # one node per graph: the readout [graphs, C]
    if grids.masked:
        raise _error(node, "flatten of masked pixel graphs (a readout such as a global mean is defined)")
    if not grids.uniform:
        raise _error(node, "flatten of grids of different sizes into one tensor")
    n = grids.ndim
    images = x.x.view(grids.num_graphs, *grids.sizes[0], x.channels).permute(0, n + 1, *range(1, n + 1))
    return images.reshape(grids.num_graphs, -1)  # torch's (C, *grid) order


def _expand(x: Features, sizes, node):
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = tuple(sizes[0])
    if not all(math.prod(s) == 1 for s in x.grids.sizes):
        raise _error(node, "expand of features on grids larger than 1x1")
    grid = list(sizes[2:])
    per_graph = _per_graph(grid)
    if per_graph is not None:
        target = Grids(per_graph)
    elif isinstance(sizes, GridShape) and sizes.dims is None:
        target = sizes.grids
    elif grid and all(isinstance(g, int) for g in grid):
        target = _uniform(tuple(grid), x.grids.num_graphs)
    else:
        raise _error(node, f"expand to {sizes}")
    if target.num_graphs != x.grids.num_graphs:
        raise _error(node, "expand to the grids of another batch")
    return broadcast(x, target)


# ------------------------------------------------------------------------------------------ public
def features_of(data: Any) -> Features:
    """The :class:`Features` of a PyG ``Data`` / ``Batch`` of pixel graphs: its node features ``x`` and each
    graph's grid (read from the structure its ``edge_index`` carries: :func:`~gridgraph.image_to_graph`,
    ``ToPixelGraph``, ``Batch.from_data_list``). Masked and point graphs are refused (their nodes are not a
    full grid).

    Example:
        >>> from torch_geometric.data import Batch
        >>> batch = Batch.from_data_list([image_to_graph(torch.randn(1, 3, 4, 4), kernel_size=3),
        ...                               image_to_graph(torch.randn(1, 3, 2, 6), kernel_size=3)])
        >>> features_of(batch)
        Features(x=[28, 3], Grids(4x4, 2x6))
    """
    from .pixel_graph import PixelEdgeIndex, pixel_structure

    if isinstance(data, Features):
        return data
    x = getattr(data, "x", None)
    edge_index = getattr(data, "edge_index", None)
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise TypeError(f"to_gnn's network takes a PyG Data/Batch of pixel graphs with node features x [nodes, "
                        f"channels] (got {type(data).__name__} with x={type(x).__name__})")
    structure = pixel_structure(edge_index) if isinstance(edge_index, PixelEdgeIndex) else None
    if structure is None:
        raise ValueError("to_gnn's network reads each graph's grid from its edge_index (a PixelEdgeIndex, as "
                         "image_to_graph and ToPixelGraph build it); this graph has none (or it was edited)")
    sizes = []
    kinds = {part.kind for part in structure.parts}
    for part in structure.parts:
        if part.kind not in ("grid", "sparse"):
            raise ValueError(f"to_gnn runs on pixel graphs of full or masked grids; this batch holds a {part.kind} "
                             f"graph ({part.describe()})")
        sizes += [tuple(part.in_size)] * part.num_images
    if kinds == {"grid"}:
        return Features(x, _uniform(sizes[0], len(sizes)) if len(set(sizes)) == 1 else Grids(sizes))
    if kinds != {"sparse"}:
        raise ValueError("to_gnn: a batch mixes full and masked pixel graphs; give every graph a mask")
    pos, batch = getattr(data, "pos", None), getattr(data, "batch", None)
    if not isinstance(pos, Tensor) or pos.size(0) != x.size(0):
        raise ValueError("to_gnn reads a masked pixel graph's active pixels from its pos [nodes, ndim] (as "
                         "image_to_graph(..., mask=...) stores it); this graph has none")
    if batch is None:
        batch = torch.zeros(x.size(0), dtype=torch.long, device=x.device)
    counts = torch.bincount(batch, minlength=len(sizes)).tolist()
    cells, start = [], 0
    for g, size in enumerate(sizes):
        p = pos[start:start + counts[g]].to(torch.long)
        flat = torch.zeros(p.size(0), dtype=torch.long, device=x.device)
        for a, extent in enumerate(size):
            flat = flat * extent + p[:, a]
        if flat.numel() > 1 and not bool((flat[1:] > flat[:-1]).all()):
            raise ValueError("to_gnn: a masked pixel graph's nodes are not row-major (edited after it was built?)")
        cells.append(flat)
        start += counts[g]
    return Features(x, Grids(sizes, cells))


def to_pixel_graphs(f: Features, kernel_size: Any = 1) -> Any:
    """A PyG ``Batch`` of pixel graphs with ``f``'s node features (graphs of one size: one ``PixelGraph``
    batch), its edges those of a ``kernel_size`` convolution at stride 1 on each grid (1: self-loops only, the
    cheapest; 3: each pixel's 3x3 neighbourhood, for PyG layers such as ``GATConv``);
    :func:`~gridgraph.graph_to_image` gives the images back.

    Example:
        >>> f = features_of(image_to_graph(torch.randn(2, 3, 4, 5), kernel_size=1))
        >>> g = to_pixel_graphs(f, kernel_size=3)             # each pixel's 3x3 neighbourhood, for PyG layers
        >>> type(g).__name__, g.edge_index.size(1), torch.equal(graph_to_image(g.x, g), graph_to_image(f.x, g))
        ('PixelGraph', 260, True)
    """
    from torch_geometric.data import Batch

    from .graph import image_to_graph

    pieces = []
    for size, graphs, images in f.images():
        for i, g in enumerate(graphs):
            pieces.append((g, images[i:i + 1]))
    pieces.sort(key=lambda p: p[0])
    if f.grids.masked:
        masks = []
        for g, size in enumerate(f.grids.sizes):
            mask = torch.zeros(math.prod(size), dtype=torch.bool, device=f.x.device)
            mask[f.grids.cells[g].to(f.x.device)] = True
            masks.append(mask.view(size))
        graphs = [image_to_graph(img, kernel_size=kernel_size, mask=masks[g]) for g, img in pieces]
        return graphs[0] if len(graphs) == 1 else Batch.from_data_list(graphs)
    if f.grids.uniform:
        images = f.images()[0][2]
        return image_to_graph(images, kernel_size=kernel_size)
    return Batch.from_data_list([image_to_graph(img, kernel_size=kernel_size) for _, img in pieces])


class GNN(nn.Module):
    """A CNN run as a message-passing network on PyG batches of pixel graphs (made by :func:`to_gnn`).

    ``forward(data)`` takes a PyG ``Data``/``Batch`` of pixel graphs of any sizes (or :class:`Features`) and
    returns what the CNN returns: a tensor ``[graphs, ...]`` after a readout, or, for dense outputs, a
    ``Batch`` of output pixel graphs (:func:`to_pixel_graphs`; ``graph_to_image`` turns it into images, a
    list when the sizes differ). ``module`` is the converted CNN (its parameters are this module's).

    Example:
        >>> gnn = to_gnn(reference_model("resnet")).eval()
        >>> type(gnn).__name__, gnn(image_to_graph(torch.randn(2, 3, 16, 16), kernel_size=1)).shape
        ('GNN', torch.Size([2, 10]))
    """

    def __init__(self, module: nn.Module, graphs: dict, kernel_size: Any = 1) -> None:
        super().__init__()
        self.module = module
        self.graphs = graphs  # {training: torch.fx.Graph}: a trace per mode where the dataflow depends on it
        self.kernel_size = kernel_size

    @property
    def graph(self) -> torch.fx.Graph:
        """The traced dataflow of the current mode."""
        return self.graphs[self.training if self.training in self.graphs else next(iter(self.graphs))]

    def _run(self, features: Features) -> Any:
        programs = self.__dict__.get("_programs")
        if programs is None:
            programs = self.__dict__["_programs"] = {}
        graph = self.graph
        program = programs.get(id(graph))
        if program is None:
            program = programs[id(graph)] = _program(graph)
        return program(self.module, features)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_programs", None)  # generated code: rebuilt from the graphs
        return state

    def forward(self, data: Any) -> Any:
        return self._output(self._run(features_of(data)))

    def _output(self, out: Any) -> Any:
        if isinstance(out, Features):
            return to_pixel_graphs(out, self.kernel_size)
        if isinstance(out, (tuple, list)):
            return type(out)(self._output(o) for o in out)
        return out

    def features(self, data: Any) -> Any:
        """Like ``forward``, but dense outputs stay :class:`Features` (to chain networks without a graph)."""
        return self._run(features_of(data))

    @torch.no_grad()
    def describe(self, data: Any) -> list[dict]:
        """The operators that run on node features for ``data``, in order: per operator its node and module
        path, the grid and channels in and out (of the first graph), the aggregation (message passing over
        taps, max/mean over windows, readout, broadcast, node-wise) and, for convolutions, the edges of the
        stage's pixel graph per graph."""
        global _RECORD
        previous, _RECORD = _RECORD, []
        try:
            self._run(features_of(data))
            return _RECORD
        finally:
            _RECORD = previous


def to_gnn(model: nn.Module, example_input: Any = None, kernel_size: Any = 1) -> GNN:
    """``model`` (a CNN) as a message-passing network on PyG batches of pixel graphs.

    The model is converted (:func:`~gridgraph.convert`, on a copy) and traced with ``torch.fx`` (no image size
    is baked in); :class:`GNN` runs that dataflow on node features: each convolution as message passing on its
    grid's pixel graph, pooling as window aggregations and readouts, upsampling as weighted gathers,
    BatchNorm and activations node-wise (see :mod:`gridgraph.gnn`). With ``example_input`` (an image batch)
    the GNN is checked against the model once on it (float64 when the model is float64), and a mismatch is an
    error.

    Semantics beyond the CNN: a batch may hold graphs of different sizes (each graph's result equals the CNN on
    that image alone, in eval mode); in training mode BatchNorm's statistics are over all nodes of the batch.
    An operator that has no graph form here (or that bakes an image size into the trace) is a
    ``NotImplementedError`` naming the node and its module.

    Args:
        model (nn.Module): the CNN.
        example_input (Tensor, optional): an image batch to check the GNN on.
        kernel_size: the edges of the output pixel graphs of dense outputs (default 1: each node's self-loop,
            all that ``graph_to_image`` needs and the cheapest to build; 3 for PyG layers that follow and need
            each pixel's 3x3 neighbourhood, as between two stages).

    Example:
        >>> cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
        ...                           torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 2))
        >>> gnn = to_gnn(cnn)
        >>> from torch_geometric.data import Batch
        >>> images = [torch.randn(1, 3, 6, 6), torch.randn(1, 3, 9, 7)]   # two sizes, one batch
        >>> batch = Batch.from_data_list([image_to_graph(im, kernel_size=3) for im in images])
        >>> out = gnn(batch)                                              # [2 graphs, 2]
        >>> torch.allclose(out, torch.cat([cnn(im) for im in images]), atol=1e-6)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_gnn expects an nn.Module (got {type(model).__name__})")
    twin = convert(model, example_input=example_input) if any(
        isinstance(m, tuple(CONVERSIONS)) for m in model.modules()) or example_input is not None else model
    rank = example_input.dim() if isinstance(example_input, Tensor) else next(
        (m.weight.dim() for m in model.modules() if isinstance(m, tuple(CONVERSIONS)) and hasattr(m, "weight")), 4)
    graphs, mode = {}, twin.training
    try:
        for training in (mode, not mode):  # `if self.training:` in traced code: one dataflow per mode
            twin.train(training)
            graphs[training] = _Tracer(rank).trace(twin)
    except Exception as error:  # a size baked into control flow, or untraceable Python
        raise NotImplementedError(f"to_gnn could not trace {type(model).__name__} shape-generically with torch.fx "
                                  f"({type(error).__name__}: {error})") from error
    finally:
        twin.train(mode)
    if graphs[True].python_code("self").src == graphs[False].python_code("self").src:
        graphs = {mode: graphs[mode]}
    gnn = GNN(twin, graphs, kernel_size).train(mode)
    if example_input is not None:
        _check(model, gnn, example_input)
    return gnn


def _check(model: nn.Module, gnn: GNN, images: Tensor) -> None:
    from .graph import graph_to_image, image_to_graph
    from .verify import _state_kept

    with _state_kept(model, gnn), torch.no_grad():
        want = model(images)
        got = gnn(image_to_graph(images, kernel_size=1))
    if not isinstance(want, Tensor):
        return
    if not isinstance(got, Tensor):
        got = graph_to_image(got.x, got)
    tol = 1e-9 if images.dtype == torch.float64 else 1e-3
    scale = max(1.0, want.abs().max().item())
    if got.shape != want.shape or (got - want).abs().max().item() > tol * scale:
        raise ValueError(f"to_gnn: the GNN of {type(model).__name__} does not equal it on example_input "
                         f"(shapes {tuple(got.shape)} and {tuple(want.shape)})")

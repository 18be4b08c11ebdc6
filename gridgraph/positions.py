"""Convolution weights on point positions: :func:`positions_to_graph`.

A convolution's weights are indexed by relative offset, so they run on any set of points that have
positions, not only on a full grid or a mask. Points carry real-valued positions (row, col in 2-D; any
number of dimensions) in units of ``spacing``; the edge ``j -> i`` exists when

.. math::
    \\delta = (\\mathrm{pos}_j - \\mathrm{pos}_i) / \\mathrm{spacing}

lies within half a spacing of a kernel tap's offset ``o_t`` (dilation included) on every axis,
``o_t - 1/2 <= delta < o_t + 1/2``, i.e. ``floor(delta + 1/2) = o_t``, and it carries that tap. A
point falling between the taps of a dilated kernel joins nothing. Outputs sit on the input points
(submanifold semantics), so the stride is 1 and the padding keeps the grid (``'same'``).

**On the grid.** Points on the lattice, or jittered by less than a quarter spacing, give exactly the
masked pixel graph of their cells (``delta`` then rounds to the cells' difference): same edges, same
taps, same order when the points come row-major, and a layer on it equals ``nn.Conv2d`` on the rasterised
image read at the points.

**Several points on one tap of one target** (irregular points) are combined by ``reduce``:

* ``'sum'``: every such point is an edge (parallel edges of one tap, which the layers sum: PyG's
  semantics). The tap weight applies to the sum of their features.
* ``'nearest'``: only the point nearest to the tap's offset (Euclidean distance of ``delta`` to ``o_t``;
  ties go to the target itself, then to the lowest index) keeps its edge: at most one edge per tap, a
  table like the masked pixel graph's.
* ``'mean'``: the tap weight applies to the mean of their features. A tap-weighted mean is not a sum
  of tap-weighted messages from the points, so it is message passing from a *virtual source node* per
  shared (target, tap), whose features are the mean of its points (``g.x`` holds them after the
  points; :meth:`~gridgraph.PointGraph.source_features` computes them for new point features). One edge
  per tap again.

**Construction** is grid hashing, with no ``N x N`` distance matrix: each point's nearest lattice cell
is hashed (with its image) into one sorted key; a target looks up the cells a tap can reach (every tap
offset plus ``{-1, 0, 1}`` per axis) through a dense cell map when the cells' bounding box is small,
else by binary search in the sorted keys, and tests the candidates it finds. Targets are processed in
chunks: memory grows with the candidate pairs (about ``N x (d(k-1)+3)^ndim x`` points per cell), never
with ``N^2``.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from .domains import check_point_features
from .geometry import ConvGeometry, TransposedGeometry
from .pixel_graph import PixelEdgeIndex, PointGraph, outside_inference_mode
from .structure import DENSE_MAP_LIMIT, GraphPart, PixelStructure, ravel

__all__ = ["positions_to_graph", "PointGraph", "REDUCES"]

#: The ways several points on one tap of one target combine (see the module docstring).
REDUCES = ("sum", "mean", "nearest")

#: Cell look-ups per chunk of targets (bounds the temporaries of one chunk).
_LOOKUPS_PER_CHUNK = 1 << 20
_DENSE_PER_POINT = 16
_MAX_CELLS = 1 << 62


@outside_inference_mode
def positions_to_graph(pos: Tensor, features: Tensor, conv: Any = None, *, spacing: Any = 1.0, reduce: str = "sum",
                       kernel_size: Any = 3, stride: Any = 1, padding: Any = None, dilation: Any = 1,
                       padding_mode: str = "zeros", batch: Optional[Tensor] = None, num_images: Optional[int] = None,
                       size: Optional[Sequence[int]] = None) -> PointGraph:
    """The graph of a convolution on points with real-valued positions (see :mod:`gridgraph.positions`).

    The edge ``j -> i`` carries the tap whose offset is within half a spacing of
    ``(pos_j - pos_i) / spacing`` on every axis; the outputs sit on the points, in the caller's order:

    .. math::
        \\mathbf{x}'_i = \\mathbf{b} + \\sum_t \\mathbf{W}_t \\,
        \\underset{j:\\ \\lfloor \\delta_{ij} + 1/2 \\rfloor = o_t}{\\mathrm{reduce}} \\mathbf{x}_j

    On the lattice (or jittered by less than a quarter spacing) this is the masked pixel graph of the
    points' cells, and a layer on it equals ``nn.Conv2d`` on the rasterised image read at the points.

    Args:
        pos (Tensor): ``[N, ndim]`` positions (row, col in 2-D), in the units of ``spacing``; float, or
            integer (converted to the default float dtype). ``g.pos`` holds them as floats.
        features (Tensor): ``[N, C]`` features of the points.
        conv (nn.Module, optional): take the geometry from this convolution (``nn.Conv1d/2d/3d`` or a
            gridgraph layer); its dimensions must match ``ndim``.
        spacing (float or sequence of float): the lattice spacing, one for all axes or one per axis
            (default: ``1.0``).
        reduce (str): ``'sum'``, ``'mean'`` or ``'nearest'``: how several points on one tap of one target
            combine (default: ``'sum'``; see the module docstring).
        kernel_size, dilation: as in ``nn.Conv2d`` when ``conv`` is None.
        stride, padding, padding_mode: only ``1``, a padding that keeps the grid (the builders' default
            ``d(k-1)//2`` per side for an odd kernel; ``'same'`` for an even one) and ``'zeros'``: the outputs
            sit on the points, and a point set has no border to reflect, replicate or wrap at.
        batch (Tensor, optional): ``[N]`` long, the image (point set) of each point, as PyG's ``batch``;
            points of different images never connect (default: one image).
        num_images (int, optional): the number of images (default: the largest ``batch`` entry + 1).
        size (sequence of int, optional): the grid of the rasterised image that
            :func:`~gridgraph.graph_to_image` returns; every cell must lie in it (default: the cells'
            bounding box from the origin, shifted to start at 0 where cells are negative).

    Returns:
        PointGraph: ``x`` (source features: ``features``, then the virtual nodes of ``'mean'``),
        ``edge_index`` (a :class:`~gridgraph.PixelEdgeIndex`: target-major, taps ascending, then sources
        ascending), ``edge_type``, ``edge_attr`` (each edge's tap offset), ``pos``, ``cells``, ``batch``.

    Example:
        >>> pos = torch.tensor([[0.1, 0.0], [0.0, 0.9], [5.0, 5.0]])  # two neighbours and a loner
        >>> g = positions_to_graph(pos, torch.tensor([[1.0], [2.0], [3.0]]), kernel_size=3)
        >>> g.edge_index.tolist(), g.edge_type.tolist(), g.cells.tolist()
        ([[0, 1, 0, 1, 2], [0, 0, 1, 1, 2]], [4, 5, 3, 4, 4], [[0, 0], [0, 1], [5, 5]])
        >>> layer = GridConv2d(1, 1, 3, padding=1, bias=False)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.arange(9.0).view(1, 1, 3, 3))
        >>> layer(g.x, g.edge_index).flatten().tolist()  # 4*1 + 5*2, 3*1 + 4*2, 4*3
        [14.0, 11.0, 12.0]
    """
    pos, ndim = _check_pos(pos)
    geometry = _geometry(conv, ndim, kernel_size, stride, padding, dilation, padding_mode)
    check_point_features(features, pos, "pos", conv)
    spacing_t = _spacing(spacing, ndim, pos.device)
    if reduce not in REDUCES:
        raise ValueError(f"reduce must be one of {REDUCES} (got {reduce!r})")
    if reduce == "mean" and not (features.is_floating_point() or features.is_complex()):
        raise TypeError(f"reduce='mean' needs floating-point features (got dtype {features.dtype})")
    b, num_images, batched = _images(batch, num_images, pos)
    num_points = pos.size(0)
    device = pos.device
    work = torch.float64 if device.type != "mps" else torch.float32
    scaled = pos.to(work) / spacing_t.to(work)
    if num_points and bool((scaled.abs() > 2.0 ** 50).any()):
        raise ValueError(f"pos / spacing must lie within +-2**50 (got up to {scaled.abs().max().item():.3g}); "
                         "pass a larger spacing")
    cells = torch.floor(scaled + 0.5).long()
    in_size, keys = _raster(cells, b, size, num_images)

    src, dst, taps, pool, num_virtual = _edges(pos.to(work), spacing_t.to(work), cells, b, num_images, geometry,
                                               reduce)
    num_src = num_points + num_virtual
    part = GraphPart("sparse", geometry, in_size, num_images, num_src, num_points, taps.numel(), batched)
    edge_index = PixelEdgeIndex.make(torch.stack([src, dst]), taps, PixelStructure.single(part))
    ids = torch.arange(num_points, device=device)
    pool_index = torch.stack([ids, ids]) if pool is None else torch.cat([torch.stack([ids, ids]), pool], 1)
    edge_dtype = features.dtype if features.is_floating_point() else torch.get_default_dtype()
    edge_attr = geometry.offsets().to(device=device, dtype=edge_dtype)[taps]
    graph = PointGraph(x=features, edge_index=edge_index, edge_attr=edge_attr, pos=pos, out_pos=pos, cells=cells,
                       pool_index=pool_index, in_keys=keys, out_keys=keys)
    graph.batch, graph.out_batch = b, b  # the image of each point
    if num_virtual:
        graph.x = graph.source_features(features)
    return graph


# ------------------------------------------------------------------------------------- checks
def _check_pos(pos: Any) -> tuple[Tensor, int]:
    if not isinstance(pos, Tensor):
        raise TypeError(f"pos must be a torch.Tensor of positions (got {type(pos).__name__})")
    if pos.dtype == torch.bool or pos.is_complex():
        raise TypeError(f"pos must hold real numbers, float or integer (got dtype {pos.dtype})")
    if pos.dim() != 2 or pos.size(1) < 1:
        raise ValueError(f"expected pos of shape [N, ndim] (row, col in 2-D) (got {tuple(pos.shape)})")
    if not pos.is_floating_point():
        pos = pos.to(torch.get_default_dtype())
    if pos.numel() and not bool(torch.isfinite(pos).all()):
        bad = int((~torch.isfinite(pos)).any(1).nonzero()[0, 0])
        raise ValueError(f"pos must be finite (got {pos[bad].tolist()} at point {bad})")
    return pos, pos.size(1)


def _geometry(conv: Any, ndim: int, kernel_size: Any, stride: Any, padding: Any, dilation: Any,
              padding_mode: str) -> ConvGeometry:
    if conv is None:
        geometry = ConvGeometry.from_keywords(ndim, kernel_size, stride, padding, dilation, padding_mode)
    else:
        if isinstance(getattr(conv, "geometry", None), TransposedGeometry) or getattr(conv, "transposed", False):
            raise TypeError(f"conv must be a convolution, not a transposed one (got {type(conv).__name__}): its "
                            "outputs do not sit on its input points")
        geometry = ConvGeometry.from_module(conv)
        if geometry.ndim != ndim:
            raise ValueError(f"conv is a {geometry.ndim}-d convolution; expected a {ndim}-d one for pos of shape "
                             f"[N, {ndim}]")
    if any(s != 1 for s in geometry.stride):
        raise ValueError(f"stride must be 1: the outputs of positions_to_graph sit on the input points (got stride="
                         f"{geometry.stride})")
    if geometry.padding_mode != "zeros":
        raise ValueError(f"padding_mode must be 'zeros' for a point set, which has no border to reflect, replicate "
                         f"or wrap at (got padding_mode={geometry.padding_mode!r})")
    keeps = all(lo + hi == d * (k - 1) for (lo, hi), d, k in zip(geometry.padding, geometry.dilation,
                                                                  geometry.kernel_size))
    if not keeps:
        raise ValueError(f"padding must keep the grid ('same', or dilation*(kernel_size-1)/2 per side): the outputs "
                         f"sit on the input points (got padding={tuple(p for p in geometry.padding)} for kernel_size="
                         f"{geometry.kernel_size}, dilation={geometry.dilation})")
    return geometry


def _spacing(spacing: Any, ndim: int, device: torch.device) -> Tensor:
    values = list(spacing) if isinstance(spacing, (tuple, list)) else [spacing]
    if isinstance(spacing, Tensor) or not all(isinstance(v, numbers.Real) and not isinstance(v, bool)
                                              for v in values):
        raise TypeError(f"spacing must be a positive number or a sequence of {ndim} (got {spacing!r})")
    if len(values) not in (1, ndim) or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing must be a positive finite number or a sequence of {ndim} (got {spacing!r})")
    values = values * ndim if len(values) == 1 else values
    return torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)


def _images(batch: Any, num_images: Optional[int], pos: Tensor) -> tuple[Tensor, int, bool]:
    n = pos.size(0)
    if batch is None:
        if num_images not in (None, 1):
            raise ValueError(f"num_images={num_images} needs a batch vector (the image of each point)")
        return torch.zeros(n, dtype=torch.long, device=pos.device), 1, False
    if not isinstance(batch, Tensor) or batch.dtype != torch.long:
        got = type(batch).__name__ if not isinstance(batch, Tensor) else f"dtype {batch.dtype}"
        raise TypeError(f"batch must be a torch.int64 tensor, the image of each point (got {got})")
    if tuple(batch.shape) != (n,):
        raise ValueError(f"expected batch of shape [{n}], one image index per point (got {tuple(batch.shape)})")
    if batch.device != pos.device:
        raise ValueError(f"batch is on {batch.device} but pos is on {pos.device}")
    if n and int(batch.min()) < 0:
        raise ValueError(f"batch entries must be non-negative image indices (got {int(batch.min())})")
    top = int(batch.max()) + 1 if n else 0
    if num_images is None:
        num_images = top
    elif not isinstance(num_images, int) or isinstance(num_images, bool) or num_images < top:
        raise ValueError(f"num_images must be an int of at least the largest batch entry + 1 ({top}) "
                         f"(got {num_images!r})")
    return batch, num_images, True


def _raster(cells: Tensor, b: Tensor, size: Any, num_images: int) -> tuple[tuple[int, ...], Tensor]:
    """The rasterised grid and each point's pixel key ``b*prod(grid) + row-major(cell - origin)``."""
    ndim = cells.size(1)
    if size is not None:
        if not isinstance(size, (tuple, list, torch.Size)) or len(size) != ndim or \
                not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in size):
            raise ValueError(f"size must be a tuple of {ndim} positive ints, the rasterised grid (got {size!r})")
        grid = tuple(size)
        if cells.numel():
            lo, hi = cells.min(0).values, cells.max(0).values
            if bool((lo < 0).any()) or any(int(h) >= n for h, n in zip(hi, grid)):
                raise ValueError(f"the points' cells must lie inside size={grid} (got cells from {lo.tolist()} to "
                                 f"{hi.tolist()})")
        return grid, ravel(b, cells, grid)
    if not cells.numel():
        return (1,) * ndim, cells.new_zeros(0)
    origin = cells.min(0).values.clamp(max=0)
    grid = tuple(int(n) for n in (cells.max(0).values - origin + 1).clamp(min=1))
    if num_images * math.prod(grid) >= _MAX_CELLS:
        raise ValueError(f"the points span {grid} cells: too many to number (pass a larger spacing)")
    return grid, ravel(b, cells - origin, grid)


# ------------------------------------------------------------------------------------ edges
def _edges(pos: Tensor, spacing: Tensor, cells: Tensor, b: Tensor, num_images: int, geometry: ConvGeometry,
           reduce: str) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor], int]:
    """``(src, dst, tap, pool, num_virtual)`` of the graph; ``pool`` ``[2, M]`` (point, virtual node) for
    ``'mean'``, whose virtual nodes are numbered from ``N``."""
    device = pos.device
    n, ndim = cells.shape
    empty = torch.zeros(0, dtype=torch.long, device=device)
    if n == 0:
        return empty, empty, empty, (None if reduce != "mean" else empty.view(2, 0)), 0
    offsets = geometry.offsets().to(device)  # [T, ndim]
    # Cell offsets a tap can reach: |c_j - c_i - o_t| <= 1 per axis (|delta - o_t| <= 1/2 and a point
    # is within 1/2 of its cell); the margin keeps every looked-up cell inside the numbered box.
    unit = torch.stack(torch.meshgrid(*[torch.arange(-1, 2, device=device)] * ndim, indexing="ij"), -1).view(-1, ndim)
    reach = torch.unique((offsets[:, None, :] + unit[None, :, :]).view(-1, ndim), dim=0)
    margin = reach.abs().max(0).values
    low = cells.min(0).values - margin
    box = tuple(int(v) for v in cells.max(0).values + margin - low + 1)
    total = num_images * math.prod(box)
    if total >= _MAX_CELLS:
        raise ValueError(f"the points span {box} cells: too many to hash (pass a larger spacing)")
    keys = ravel(b, cells - low, box)
    shifts = ravel(torch.zeros(reach.size(0), dtype=torch.long, device=device), reach, box)
    sorted_keys, order = torch.sort(keys, stable=True)
    if total <= max(DENSE_MAP_LIMIT, _DENSE_PER_POINT * n):  # a dense cell map: first point and count per cell
        counts = torch.bincount(keys, minlength=total)
        starts = torch.cumsum(counts, 0) - counts

        def lookup(query: Tensor) -> tuple[Tensor, Tensor]:
            return starts[query], counts[query]
    else:  # binary search in the sorted keys

        def lookup(query: Tensor) -> tuple[Tensor, Tensor]:
            first = torch.searchsorted(sorted_keys, query)
            return first, torch.searchsorted(sorted_keys, query, right=True) - first

    kernel = torch.tensor(geometry.kernel_size, device=device)
    dil = torch.tensor(geometry.dilation, device=device)
    pad = torch.tensor([lo for lo, _ in geometry.padding], device=device)
    num_taps = geometry.num_taps
    chunk = max(1, _LOOKUPS_PER_CHUNK // reach.size(0))
    pieces, next_virtual = [], n
    for first_target in range(0, n, chunk):
        targets = torch.arange(first_target, min(n, first_target + chunk), device=device)
        start, count = lookup(keys[targets, None] + shifts[None, :])  # [n_c, Q]
        count = count.reshape(-1)
        num = int(count.sum())
        query = torch.repeat_interleave(torch.arange(count.numel(), device=device), count, output_size=num)
        within = torch.arange(num, device=device) - (torch.cumsum(count, 0) - count)[query]
        src = order[start.reshape(-1)[query] + within]
        dst = targets[query // reach.size(0)]
        delta = (pos[src] - pos[dst]) / spacing
        nearest = torch.floor(delta + 0.5)
        shifted = nearest.long() + pad  # u * d for the tap u, if any
        ok = ((shifted % dil == 0) & (shifted >= 0) & (shifted <= dil * (kernel - 1))).all(1)
        src, dst, shifted = src[ok], dst[ok], shifted[ok]
        tap = ravel(torch.zeros_like(src), torch.div(shifted, dil, rounding_mode="floor"), geometry.kernel_size)
        slot = dst * num_taps + tap
        if reduce == "nearest":
            distance = ((delta[ok] - nearest[ok]) ** 2).sum(1)
            keys_in_order = (src, (src != dst).long(), distance, slot)  # the last key sorts first
        else:
            keys_in_order = (src, slot)
        perm = torch.arange(src.numel(), device=device)
        for key in keys_in_order:
            perm = perm[torch.sort(key[perm], stable=True).indices]
        src, dst, tap, slot = src[perm], dst[perm], tap[perm], slot[perm]
        first = torch.ones_like(slot, dtype=torch.bool)
        first[1:] = slot[1:] != slot[:-1]
        if reduce == "nearest":
            pieces.append((src[first], dst[first], tap[first], None))
        elif reduce == "sum":
            pieces.append((src, dst, tap, None))
        else:  # 'mean': one virtual node per slot that several points share
            group = torch.cumsum(first, 0) - 1
            size = torch.bincount(group)
            shared = size[group] > 1
            lead = first & shared  # the first edge of every shared slot
            virtual_of_group = torch.cumsum(lead[first].long(), 0) - 1 + next_virtual  # per group
            virtual = virtual_of_group[group]
            next_virtual += int(lead.sum())
            edge_src = torch.where(shared, virtual, src)[first]
            pool = torch.stack([src[shared], virtual[shared]])
            pieces.append((edge_src, dst[first], tap[first], pool))
    src, dst, tap = (torch.cat([p[i] for p in pieces]) for i in range(3))
    pool = torch.cat([p[3] for p in pieces], 1) if reduce == "mean" else None
    return src, dst, tap, pool, next_virtual - n

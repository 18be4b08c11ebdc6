"""The computing kernels of the graph layers: plain tensor code, no autograd (see :mod:`gridgraph.nn.ops`).

Every layer computes the same sum, ``x'_i = b + sum over edges (j -> i) of W[:, :, tap(j -> i)] x_j``, with
``W`` block-diagonal over ``groups``. Its three bilinear maps are the forward ``F(x, W)``, the input
gradient ``Ft(g, W)`` (the adjoint in ``x``: ``Ft(g, W)_j = sum over edges (j -> i) of W_tap^T g_i``) and
the weight gradient ``G(x, g)`` (``G_t = sum over edges of tap t of g_i x_j^T``). None conjugates: the
autograd formulas pass conjugates where complex numbers need them. Two layouts of the edges:

**Grid kernels** (a pixel graph whose edges follow from its geometry: a full grid, or the reversed graph
of a strided convolution): the edges of one tap are one shifted, strided view of the node features, so
:mod:`gridgraph.nn.lattice` gathers each block of targets' taps from those views and multiplies once by the
stacked tap weights (depthwise layers: one multiply-add per tap), computes the input gradient per stride
phase of the sources (the same gather on the gradient, weights transposed) and the weight gradient from the
forward's blocks. A transposed part's forward is the input gradient of the convolution it reverses.

**Edge kernels** (any edge list: a masked or sparse pixel graph, or a plain graph): per tap, the pairs
``(src, dst)`` it joins, a gather of the sources, one GEMM with the tap's weight and an add into the
targets. A tap that joins every node to itself (the centre of a submanifold graph) is one GEMM on ``x``.
Work and memory scale with the edges; temporaries are one tap's ``[E_t, C]`` at a time.

The edge kernels' index tensors (slot tables, reverse tables, per-tap pairs) are built once per structure
and kept in :data:`~gridgraph.structure.REGISTRY`. No convolution or unfold primitive appears here: gathers,
strided views, GEMMs and scatters only.
"""
from __future__ import annotations

import bisect
import math
import weakref
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from ..structure import REGISTRY, parse_key, table_edges, tensor_bytes
from . import lattice, layout

__all__ = ["tap_weights", "apply_tap", "grid_forward", "grid_input_grad", "grid_weight_grad", "edge_forward",
           "edge_input_grad", "edge_weight_grad", "CPU_BLOCK_BYTES", "DEVICE_BLOCK_BYTES"]

#: Bytes of gathered rows per block on CPU (fits the caches; one buffer reused across blocks).
CPU_BLOCK_BYTES = 4 << 20
#: Bytes of gathered rows per block on an accelerator (few, large blocks: kernel launches cost more).
DEVICE_BLOCK_BYTES = 512 << 20


def tap_weights(weight: Tensor, groups: int) -> Tensor:
    """``weight`` ``(C_out, C_in/groups, *kernel)`` as ``[num_taps, groups, C_out/groups, C_in/groups]``."""
    c_out, c_in_g = weight.shape[:2]
    return weight.reshape(groups, c_out // groups, c_in_g, -1).permute(3, 0, 1, 2)


def apply_tap(x: Tensor, w: Tensor) -> Tensor:
    """Mix channels of ``x`` ``[..., C_in]`` with one tap's block-diagonal weight ``[G, C_out/G, C_in/G]``."""
    groups, c_out_g, c_in_g = w.shape
    if groups == 1:
        return x @ w[0].t()
    if c_in_g == 1 and c_out_g == 1:  # depthwise: a per-channel scale
        return x * w.view(groups)
    lead = x.shape[:-1]
    xg = x.reshape(-1, groups, c_in_g).transpose(0, 1)  # [G, n, C_in/G]
    out = torch.bmm(xg, w.transpose(1, 2))  # [G, n, C_out/G]
    return out.transpose(0, 1).reshape(*lead, groups * c_out_g)


def _hole_values(m_taps: Tensor) -> Tensor:
    """``[T, G*b]``: what one absent edge of each tap adds, ``M_t^T 0``: zero, or NaN where the tap's weights
    hold an Inf or NaN (``nn.Conv2d`` multiplies zero padding by its weights: ``Inf * 0 = NaN``)."""
    t, g, a, b = m_taps.shape
    return (m_taps * 0).sum(2).reshape(t, g * b)


def _all_finite(t: Tensor) -> bool:
    return bool(torch.isfinite(t).all()) if (t.is_floating_point() or t.is_complex()) else True


# ------------------------------------------------------------------------------------ grid kernels
# A full grid's pixel graph is regular: its three maps run on the per-tap shifted views of the node features
# (:mod:`gridgraph.nn.lattice`). A transposed part is the reversed graph of the strided convolution it comes
# from: its forward is that convolution's input gradient, its input gradient that convolution's forward.

_ONEDNN = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
#: Use oneDNN's matrix product (the library behind nn.Conv2d on CPU) for float32/bfloat16 on the CPU: on CPUs
#: where MKL's sgemm runs a generic code path (AMD) it is 2-4x faster. False: torch.mm everywhere.
USE_ONEDNN = True


def _linear(x: Tensor, w_nk: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ w_nk^T (+ bias)``: a GEMM (``x`` ``[M, K]``, ``w_nk`` ``[N, K]``, any strides)."""
    if (USE_ONEDNN and _ONEDNN is not None and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and x.size(0) and x.size(1)):
        with torch.no_grad():  # the kernels run inside operators: autograd is the operators' own
            return _ONEDNN(x, w_nk, bias, "none", [], "")
    return torch.addmm(bias, x, w_nk.t()) if bias is not None else x @ w_nk.t()



def grid_lattice(key: str, num_images: Optional[int] = None) -> tuple[lattice.Lattice, bool]:
    """The :class:`~gridgraph.nn.lattice.Lattice` of a grid part's key, and whether the part is transposed
    (then the lattice is the strided convolution whose edges it reverses, on the part's output grid).
    ``num_images`` overrides the key's image count (the image operators read it off their input)."""
    kind, geometry, in_size, key_images = parse_key(key)
    num_images = key_images if num_images is None else num_images
    if kind == "transposed":
        return lattice.lattice(geometry.conv, geometry.output_size(in_size), num_images, tuple(in_size)), True
    return lattice.lattice(geometry, in_size, num_images), False


def _conv_weight_of_reversed(weight: Tensor, groups: int) -> Tensor:
    """A reversed graph's weight ``(G*o, i, *k)`` (:meth:`~gridgraph.GridConvTransposeNd.conv_weight`) as the
    weight of the convolution it reverses ``(G*i, o, *k)`` (the transposed layer's own weight), and back."""
    a, b = weight.shape[:2]
    return weight.reshape(groups, a // groups, b, -1).transpose(1, 2).reshape(groups * b, a // groups,
                                                                              *weight.shape[2:])


def _check_rows(t: Tensor, expected: int, what: str, key: str) -> None:
    if t.size(0) != expected:
        raise ValueError(f"expected {what} with {expected} rows, the nodes of the pixel graph {key!r} (got {t.size(0)}): "
                         "a traced or exported program runs on the graph it was traced with")


def grid_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], key: str, groups: int) -> Tensor:
    """``F(x, W) + b`` on the grid part ``key``: ``[N_dst, C_out]``."""
    lat, transposed = grid_lattice(key)
    _check_rows(x, lat.num_out if transposed else lat.num_in, "x", key)
    x = x.contiguous()
    if not transposed:
        return lattice.forward(x, weight, bias, lat, groups)
    out = lattice.input_grad(x, _conv_weight_of_reversed(weight, groups), lat, groups)
    return out.add_(bias) if bias is not None else out


def grid_input_grad(g: Tensor, weight: Tensor, key: str, groups: int) -> Tensor:
    """``Ft(g, W)`` on the grid part ``key``: ``[N_src, C_in]``."""
    lat, transposed = grid_lattice(key)
    _check_rows(g, lat.num_in if transposed else lat.num_out, "grad_out", key)
    g = g.contiguous()
    if not transposed:
        return lattice.input_grad(g, weight, lat, groups)
    return lattice.forward(g, _conv_weight_of_reversed(weight, groups), None, lat, groups)


def grid_weight_grad(x: Tensor, g: Tensor, key: str, groups: int, weight_shape: list[int]) -> Tensor:
    """``G(x, g)`` on the grid part ``key``, shaped like the weight ``(C_out, C_in/G, *kernel)``."""
    lat, transposed = grid_lattice(key)
    _check_rows(x, lat.num_out if transposed else lat.num_in, "x", key)
    _check_rows(g, lat.num_in if transposed else lat.num_out, "grad_out", key)
    x, g = x.contiguous(), g.contiguous()
    if not transposed:
        return lattice.weight_grad(x, g, lat, groups, weight_shape)
    a, b = weight_shape[:2]  # the reversed graph's (G*o, i): the convolution's weight is (G*i, o)
    conv_shape = [groups * b, a // groups, *weight_shape[2:]]
    grad = lattice.weight_grad(g, x, lat, groups, conv_shape)
    return _conv_weight_of_reversed(grad, groups).contiguous()


# ------------------------------------------------------------------------------------ image kernels
# The same maps on images ``(B, C, *grid)`` of any memory format, for the image-facing layers: node features
# in (a view of a channels-last image, else one copy), results out with the strides torch's convolution
# would give them (:mod:`gridgraph.nn.layout`). ``lat`` is the lattice of the convolution; a transposed layer
# (``transposed``) computes that convolution's input gradient, its weight ``(C_in, C_out/G, *k)`` being the
# convolution's ``(C_out, C_in/G, *k)``.

def _check_grid(images: Tensor, grid: Sequence[int], what: str) -> None:
    if tuple(images.shape[2:]) != tuple(grid):
        raise ValueError(f"expected {what} images of size {tuple(grid)} (got {tuple(images.shape[2:])}): a traced or "
                         "exported program runs on images of the size it was traced with (the batch size may vary)")


def image_forward(images: Tensor, weight: Tensor, bias: Optional[Tensor], lat: "lattice.Lattice", transposed: bool,
                  groups: int, out_strides: Sequence[int], out_view: Optional[bool] = None) -> Tensor:
    """The layer's output image (strides ``out_strides``) from ``images`` ``(B, C_in, *grid)``."""
    _check_grid(images, lat.out_size if transposed else lat.in_size, "input")
    x = layout.to_nodes(images)
    if transposed:
        y = lattice.input_grad(x, weight, lat, groups)
        if bias is not None:
            y.add_(bias)
        grid = lat.in_size
    else:
        y = lattice.forward(x, weight, bias, lat, groups)
        grid = lat.out_size
    return layout.to_image(y, lat.num_images, grid, out_strides, out_view)


def image_input_grad(grad_out: Tensor, weight: Tensor, lat: "lattice.Lattice", transposed: bool, groups: int,
                     in_strides: Sequence[int], in_view: Optional[bool] = None) -> Tensor:
    """The gradient of the layer's input image (strides ``in_strides``) from the output's gradient."""
    _check_grid(grad_out, lat.in_size if transposed else lat.out_size, "grad_out")
    g = layout.to_nodes(grad_out)
    if transposed:
        gx, grid = lattice.forward(g, weight, None, lat, groups), lat.out_size
    else:
        gx, grid = lattice.input_grad(g, weight, lat, groups), lat.in_size
    return layout.to_image(gx, lat.num_images, grid, in_strides, in_view)


def image_weight_grad(images: Tensor, grad_out: Tensor, lat: "lattice.Lattice", transposed: bool, groups: int,
                      weight_shape: Sequence[int], weight_strides: Sequence[int]) -> Tensor:
    """The gradient of the layer's weight (strides ``weight_strides``) from its input image and the output's
    gradient."""
    x, g = layout.to_nodes(images), layout.to_nodes(grad_out)
    grad = lattice.weight_grad(g, x, lat, groups, list(weight_shape)) if transposed else \
        lattice.weight_grad(x, g, lat, groups, list(weight_shape))
    if tuple(grad.stride()) == tuple(weight_strides):
        return grad
    return grad.new_empty_strided(tuple(weight_shape), tuple(weight_strides)).copy_(grad)


# ----------------------------------------------------------------------------- edge kernels
#: Table kernels for an edge list whose (target, tap) slots are unique (a masked / sparse pixel graph) once
#: at least this fraction of the ``[N_dst, T]`` slots holds an edge: one blocked gather-GEMM over the whole
#: table (holes gather a zero row) beats per-tap gathers, GEMMs and scatter-adds. Measured on a 1024x1024
#: image, 32 -> 32 channels, 3x3, 1 thread (benchmarks/sparse.py): per-tap 8.9 ms against 12.1 ms for the
#: table at 10% occupancy (fill 0.2), 204 ms against 87-98 ms at 50% (fill 0.55). 0 or less: always the table
#: kernel; above 1: never (tests force each).
TABLE_MIN_FILL = 0.3
#: The general per-tap kernels also build a slot table when the slots would number at most this many per edge.
_TABLE_PER_EDGE = 8


class _TableBlocks:
    """A blocked gather over a slot table ``index [R, S]`` (``-1``: hole) that reads source rows from a
    block-local copy: block ``k`` (rows ``starts[k]:starts[k+1]``) reads sources ``lo[k]:hi[k]`` only, so its
    indices are stored relative to ``lo[k]`` (int32) and a hole reads the zero row appended after the copy.
    The copy (contiguous rows, cache-sized) replaces zero-filling the holes after a global gather.
    ``local`` is None when the blocks' source ranges are so wide that copying them would cost more than
    the gather itself; then ``index`` holds the global sources (holes read row 0) and ``holes`` the flat
    positions to zero."""

    def __init__(self, index: Tensor, block_rows: int) -> None:
        rows, slots = index.shape
        self.rows, self.slots, self.block_rows = rows, slots, block_rows
        self.starts = list(range(0, rows, block_rows)) + [rows]
        index = index.contiguous()
        big = torch.iinfo(index.dtype).max
        self.lo, self.hi = [], []
        for start, stop in zip(self.starts[:-1], self.starts[1:]):  # cache-sized pieces
            block = index[start:stop]
            hi = int(block.max()) + 1
            lo = int(block.masked_fill(block < 0, big).min()) if hi > 0 else 0
            self.lo.append(lo)
            self.hi.append(max(hi, lo))
        widths = [h - l for l, h in zip(self.lo, self.hi)]
        self.width = max(widths, default=0) + 1
        self.local = self.index = self.holes = None
        if sum(widths) <= rows * slots:
            local = torch.empty(rows, slots, dtype=torch.int32, device=index.device)
            for k, (start, stop) in enumerate(zip(self.starts[:-1], self.starts[1:])):
                block, out = index[start:stop], local[start:stop]
                torch.sub(block, self.lo[k], out=out)
                out.masked_fill_(block < 0, widths[k])
            self.local = local.view(-1)
        else:
            flat = index.view(-1)
            holes = (flat < 0).nonzero().squeeze(1)
            self.index = flat.clamp(min=0)
            if rows * slots and int(self.index.max()) < 2 ** 31 - 1:
                self.index = self.index.to(torch.int32)
            self.holes = holes if holes.numel() else None
            edges = torch.tensor(self.starts, device=index.device) * slots
            self._cuts = torch.searchsorted(holes, edges).tolist() if self.holes is not None else None

    def tensors(self) -> list[Optional[Tensor]]:
        return [self.local, self.index, self.holes]

    def gather(self, src: Tensor):
        """Yield ``(start, stop, cols)``: the gathered rows of each block ``[stop - start, S * C]``."""
        c = src.size(1)
        buf = src.new_empty(min(self.block_rows, self.rows) * self.slots, c)
        copy = src.new_empty(self.width, c) if self.local is not None else None
        for k in range(len(self.starts) - 1):
            start, stop = self.starts[k], self.starts[k + 1]
            cols = buf[:(stop - start) * self.slots]
            span = slice(start * self.slots, stop * self.slots)
            if self.local is not None:
                lo, w = self.lo[k], self.hi[k] - self.lo[k]
                copy[:w].copy_(src[lo:lo + w])
                copy[w].zero_()
                torch.index_select(copy, 0, self.local[span], out=cols)
            else:
                torch.index_select(src, 0, self.index[span], out=cols)
                if self.holes is not None and self._cuts[k + 1] > self._cuts[k]:
                    cols.index_fill_(0, self.holes[self._cuts[k]:self._cuts[k + 1]] - start * self.slots, 0)
            yield start, stop, cols.view(stop - start, -1)


class _Pairs:
    """The edges grouped by tap: tap ``taps[k]`` joins ``src[bounds[k]:bounds[k+1]]`` to
    ``dst[bounds[k]:bounds[k+1]]`` (long); ``identity`` is the tap that joins every node to itself (the
    centre of a submanifold graph: one GEMM on ``x``, no gather), if any, and is not among ``taps``.
    ``dst_unique`` / ``src_unique``: whether the targets (sources) of each tap are distinct."""

    def __init__(self, src: Tensor, dst: Tensor, taps: list[int], bounds: list[int], identity: Optional[int],
                 dst_unique: list[bool], src_unique: Optional[list[bool]]) -> None:
        self.src, self.dst, self.taps, self.bounds, self.identity = src, dst, taps, bounds, identity
        self.dst_unique, self._src_unique = dst_unique, src_unique

    @property
    def src_unique(self) -> list[bool]:
        """Per tap, whether its sources are distinct (computed on first use: only the threaded scatter of
        the input gradient asks). A zero-padded tap is a fixed shift of the row-major keys, so its sources
        ascend with its targets unless a descent falls strictly inside its range (then they are checked)."""
        if self._src_unique is None:
            src = self.src
            descents = (src[1:] <= src[:-1]).nonzero().squeeze(1).add_(1).tolist() if src.numel() > 1 else []
            flags = []
            for k in range(len(self.taps)):
                a, b = self.bounds[k], self.bounds[k + 1]
                inside = bisect.bisect_right(descents, a) < bisect.bisect_left(descents, b)
                flags.append(not inside or _unique(src[a:b]))
            self._src_unique = flags
        return self._src_unique

    @property
    def num_edges(self) -> int:
        return self.bounds[-1] if self.bounds else 0

    def tensors(self) -> list[Tensor]:
        return [self.src, self.dst]

    def __iter__(self):
        """``(tap, src, dst)`` per tap, the identity tap first (``src = dst = None``)."""
        if self.identity is not None:
            yield self.identity, None, None
        for k, t in enumerate(self.taps):
            a, b = self.bounds[k], self.bounds[k + 1]
            yield t, self.src[a:b], self.dst[a:b]


def _ascending(ids: Tensor) -> bool:
    return ids.numel() < 2 or bool((ids[1:] > ids[:-1]).all())


def _pairs_of_tap_major(columns: Tensor, num_src: int, identity: Optional[int] = None) -> _Pairs:
    """The pairs of a slot table given tap-major (``columns [T, N_dst]``, -1: no edge), for all taps at
    once (a handful of operations, whatever the number of taps). Each tap's targets ascend (unique).
    ``identity``: a tap the builder knows joins every node to itself (left out without a check)."""
    num_taps, num_dst = columns.shape
    device = columns.device
    flat = columns.reshape(-1)
    valid = flat >= 0
    if identity is not None:
        valid[identity * num_dst:(identity + 1) * num_dst] = False
    pos = valid.nonzero().squeeze(1)
    bounds = torch.searchsorted(pos, torch.arange(num_taps + 1, device=device) * num_dst).tolist()
    if identity is None and num_dst == num_src:
        for t in range(num_taps):  # a full column that reads each row itself: the centre of a submanifold graph
            a, b = bounds[t], bounds[t + 1]
            column = flat[t * num_dst:(t + 1) * num_dst]
            if b - a == num_dst and bool((column == torch.arange(num_dst, device=device)).all()):
                identity = t
                pos = torch.cat([pos[:a], pos[b:]])
                bounds = bounds[:t + 1] + [c - num_dst for c in bounds[t + 1:]]
                break
    src = flat.index_select(0, pos).long()
    dst = pos.remainder_(num_dst)
    taps, cuts = [], [0]
    for t in range(num_taps):
        if bounds[t + 1] > bounds[t] and t != identity:
            taps.append(t)
            cuts.append(bounds[t + 1])
    return _Pairs(src, dst, taps, cuts, identity, [True] * len(taps), None)


def _pairs_of_edges(edge_index: Tensor, edge_type: Tensor, num_src: int, num_dst: int, num_taps: int) -> _Pairs:
    """The pairs of a general edge list (sorted by tap, stable)."""
    if edge_type.numel() == 0:
        return _Pairs(edge_index[0], edge_index[1], [], [0], None, [], [])
    order = torch.argsort(edge_type, stable=True)
    counts = torch.bincount(edge_type, minlength=num_taps).tolist()
    src_all, dst_all = edge_index[0][order], edge_index[1][order]
    taps, cuts, identity, src_unique, dst_unique = [], [0], None, [], []
    keep = []
    start = 0
    for t, n in enumerate(counts):
        if not n:
            continue
        src, dst = src_all[start:start + n], dst_all[start:start + n]
        if n == num_dst == num_src and identity is None:
            ids = torch.arange(n, device=src.device)
            if bool((src == ids).all()) and bool((dst == ids).all()):
                identity = t
                start += n
                continue
        keep.append((start, start + n))
        start += n
        taps.append(t)
        cuts.append(cuts[-1] + n)
        src_unique.append(_unique(src))
        dst_unique.append(_unique(dst))
    if identity is not None:
        src_all = torch.cat([src_all[a:b] for a, b in keep]) if keep else src_all[:0]
        dst_all = torch.cat([dst_all[a:b] for a, b in keep]) if keep else dst_all[:0]
    return _Pairs(src_all.contiguous(), dst_all.contiguous(), taps, cuts, identity, dst_unique, src_unique)


class _EdgePlan:
    """What the edge kernels need of one edge list, built once per structure (cached in the registry).

    Two layouts, each built on first use:

    * ``pairs`` (:class:`_Pairs`): the edges grouped by tap, for the per-tap kernels; any edge list has them.
    * ``table``: when every (target, tap) slot holds at most one edge (a masked or sparse pixel graph),
      the slot table ``index [N_dst, T]`` (``-1``: no edge) and, for the input gradient, its reverse
      ``[N_src, T]`` (which target reads source ``j`` through tap ``t``; None when a source feeds two
      targets through one tap: reflect / replicate padding). The forward of a well-filled table is one
      blocked gather-GEMM (:data:`TABLE_MIN_FILL`); the pairs are read off its columns.

    A masked or sparse graph's builder seeds the plan from the table it computed
    (:func:`seed_edge_plan`), so the first forward neither sorts nor scatters its edges.
    """

    def __init__(self, num_src: int, num_dst: int, num_taps: int, num_edges: int,
                 table: Optional[Tensor] = None, edge_index: Optional[Tensor] = None,
                 edge_type: Optional[Tensor] = None, identity: Optional[int] = None) -> None:
        self.num_src, self.num_dst, self.num_taps, self.num_edges = num_src, num_dst, num_taps, num_edges
        self._identity = identity  # a tap the builder knows joins every node to itself (table plans only)
        # the slot table row-major ([N_dst, T] contiguous) and / or tap-major ([T, N_dst] contiguous): a
        # builder hands whichever it wrote; the other is made when a kernel needs it
        self._table = self._columns = None
        if table is not None:
            if table.is_contiguous():
                self._table = table
            elif table.t().is_contiguous():
                self._columns = table.t()
            else:
                self._table = table.contiguous()
        self._edges = None if table is not None else (edge_index, edge_type)
        self._pairs: Optional[_Pairs] = None
        self._reverse: Optional[Tensor] = None
        self._reverse_known = False
        self._blocks: dict = {}
        self.charge: Optional[Callable[[], None]] = None  # set by the cache: re-counts the bytes after growing
        if table is None and edge_type is not None and num_edges and num_dst * num_taps <= _TABLE_PER_EDGE * num_edges:
            self._table = _slot_table(edge_index, edge_type, num_dst, num_taps)
            if self._table is not None:
                self._edges = None

    @property
    def has_table(self) -> bool:
        return self._table is not None or self._columns is not None

    @property
    def table(self) -> Optional[Tensor]:
        """The slot table ``[N_dst, T]`` (row-major), or None for an edge list with a slot held twice."""
        if self._table is None and self._columns is not None:
            self._table = self._columns.t().contiguous()
            self._grew()
        return self._table

    @property
    def fill(self) -> float:
        return self.num_edges / max(1, self.num_dst * self.num_taps)

    def use_table(self, groups: int) -> bool:
        """Whether the forward and weight gradient run the blocked table kernel."""
        return self.has_table and groups == 1 and self.num_edges > 0 and self.fill >= TABLE_MIN_FILL

    @property
    def pairs(self) -> _Pairs:
        if self._pairs is None:
            if self.has_table:
                columns = self._columns if self._columns is not None else self._table.t().contiguous()
                self._pairs = _pairs_of_tap_major(columns, self.num_src, self._identity)
            else:
                self._pairs = _pairs_of_edges(*self._edges, self.num_src, self.num_dst, self.num_taps)
            self._edges = None
            self._grew()
        return self._pairs

    def reverse(self) -> Optional[Tensor]:
        """``[N_src, T]``: the target that reads source ``j`` through tap ``t`` (-1: none), or None."""
        if not self._reverse_known:
            self._reverse_known = True
            table = self.table
            (src, dst), tap = table_edges(table)
            rev = torch.full((self.num_src * self.num_taps,), -1, dtype=table.dtype, device=table.device)
            rev[src.mul_(self.num_taps).add_(tap)] = dst.to(table.dtype)
            if int((rev >= 0).sum()) == dst.numel():  # else a (source, tap) pair feeds two targets
                self._reverse = rev.view(self.num_src, self.num_taps)
                self._grew()
        return self._reverse

    def blocks(self, which: str, channels: int, element_size: int, device: torch.device) -> _TableBlocks:
        """The blocked gather of the table (``'forward'``) or of its reverse (``'reverse'``)."""
        budget = CPU_BLOCK_BYTES if device.type == "cpu" else DEVICE_BLOCK_BYTES
        rows = max(64, budget // max(1, self.num_taps * channels * element_size))
        key = (which, rows)
        if key not in self._blocks:
            self._blocks[key] = _TableBlocks(self.table if which == "forward" else self.reverse(), rows)
            self._grew()
        return self._blocks[key]

    def _grew(self) -> None:
        if self.charge is not None:
            self.charge()

    def tensors(self) -> list[Tensor]:
        out = [self._table, self._reverse, self._columns]
        if self._edges is not None:
            out += list(self._edges)
        if self._pairs is not None:
            out += self._pairs.tensors()
        for b in self._blocks.values():
            out += b.tensors()
        return [t for t in out if t is not None]

    def missing(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """``[N_dst, T]``: 1 where target ``i`` has no edge through tap ``t``."""
        if self.has_table:
            return (self.table < 0).to(device=device, dtype=dtype)
        present = torch.zeros(self.num_dst, self.num_taps, dtype=dtype, device=device)
        for t, _, dst in self.pairs:
            if dst is None:
                present[:, t] = 1
            else:
                present[:, t].index_fill_(0, dst, 1)
        return 1 - present


def _slot_table(edge_index: Tensor, edge_type: Tensor, num_dst: int, num_taps: int) -> Optional[Tensor]:
    """``[N_dst, T]`` with the source of each (target, tap) slot, or None when a slot holds two edges."""
    src, dst = edge_index[0], edge_index[1]
    table = torch.full((num_dst * num_taps,), -1, dtype=torch.long, device=src.device)
    table[dst * num_taps + edge_type] = src
    if int((table >= 0).sum()) != src.numel():
        return None
    return table.view(num_dst, num_taps)


def _unique(ids: Tensor) -> bool:
    return ids.numel() < 2 or bool(torch.unique(ids).numel() == ids.numel())


def _edge_plan(edge_index: Tensor, edge_type: Tensor, num_src: int, num_dst: int, num_taps: int,
               cache: bool) -> _EdgePlan:
    if not cache:
        return _EdgePlan(num_src, num_dst, num_taps, edge_type.numel(), edge_index=edge_index, edge_type=edge_type)
    tag = _plan_tag(num_src, num_dst, num_taps)

    def build():
        plan = _EdgePlan(num_src, num_dst, num_taps, edge_type.numel(), edge_index=edge_index, edge_type=edge_type)
        return _charged(plan, REGISTRY.key_for(edge_index, tag)), plan.tensors()
    return REGISTRY.get_for(edge_index, tag, build, edge_type)


def _charged(plan: _EdgePlan, key: Any) -> _EdgePlan:
    """``plan``, re-counted by the cache entry ``key`` whenever it builds a part of itself (the bound counts
    what the plan holds, not what it held when it was cached). The hook holds the plan weakly."""
    ref = weakref.ref(plan)

    def charge() -> None:
        held = ref()
        if held is not None:
            REGISTRY.recharge(key, held, tensor_bytes(held.tensors()))
    plan.charge = charge
    return plan


def _plan_tag(num_src: int, num_dst: int, num_taps: int) -> str:
    return f"edge-plan {num_src} {num_dst} {num_taps}"


def seed_edge_plan(edge_index: Tensor, edge_type: Tensor, table: Tensor, num_src: int,
                   identity: Optional[int] = None) -> None:
    """Cache the plan of the edges ``edge_index`` / ``edge_type`` of a masked or sparse pixel graph from the
    slot table they were read off (``table [N_dst, T]``, row-major or a transposed tap-major buffer, -1 = no
    edge; it must hold exactly those edges): the first forward then needs no sort and no scatter.
    ``identity``: the tap whose column is ``0 .. N-1`` (the centre of a submanifold graph), if known."""
    num_dst, num_taps = table.shape

    tag = _plan_tag(num_src, num_dst, num_taps)

    def build():
        plan = _EdgePlan(num_src, num_dst, num_taps, edge_type.numel(), table=table, identity=identity)
        return _charged(plan, REGISTRY.key_for(edge_index, tag)), plan.tensors()
    REGISTRY.get_for(edge_index, tag, build, edge_type)


def _add_rows(out: Tensor, rows: Tensor, values: Tensor, unique: bool) -> None:
    """``out[rows] += values``: with unique rows and several threads a gather, an add and a copy (each
    parallel on CPU, about twice as fast as ``index_add_`` there); otherwise ``index_add_`` (which sums
    repeated rows, and on one thread is the faster of the two: 13 against 28 ms for 262k rows of 32)."""
    if unique and torch.get_num_threads() > 1:
        out.index_copy_(0, rows, out.index_select(0, rows).add_(values))
    else:
        out.index_add_(0, rows, values)


#: Below this many rows a tap's GEMM runs through ``torch.mm``: oneDNN builds a primitive for every new
#: shape (~15 us for 100 rows of 32 -> 32, against 4.5 us for ``torch.mm``; even at 1,000 rows).
_SMALL_GEMM_ROWS = 1024


def _mm_nk(x: Tensor, w_nk: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ w_nk^T (+ bias)`` for one tap's ``[C_out, C_in]`` weight (oneDNN for large CPU float32/bfloat16)."""
    if x.size(0) < _SMALL_GEMM_ROWS:
        return torch.addmm(bias, x, w_nk.t()) if bias is not None else x @ w_nk.t()
    return _linear(x, w_nk.contiguous(), bias)


def _tap_products(x: Tensor, taps: Tensor, pairs: _Pairs, num_rows: int, c_out: int, bias: Optional[Tensor],
                  reverse: bool) -> Tensor:
    """``bias + sum_t`` of ``out[dst] += M_t x[src]`` over every tap's pairs (``reverse``:
    ``out[src] += M_t^T x[dst]``). The identity tap writes the output first (one GEMM, bias fused, no zero
    fill). When all other edges fit one cache-sized buffer they are gathered at once, multiplied tap by tap
    into one message buffer and added with one scatter; otherwise tap by tap, in chunks of one buffer."""
    groups = taps.size(1)
    # every tap's [G, rows out / G, rows in / G] weight, contiguous once
    taps = (taps.transpose(2, 3) if reverse else taps).contiguous()
    if pairs.identity is not None:
        w = taps[pairs.identity]
        out = _mm_nk(x, w[0], bias) if groups == 1 else apply_tap(x, w)
        if groups > 1 and bias is not None:
            out += bias
    else:
        out = x.new_zeros(num_rows, c_out)
        if bias is not None:
            out += bias
    n = pairs.num_edges
    if not n:
        return out
    read_all, write_all = (pairs.dst, pairs.src) if reverse else (pairs.src, pairs.dst)
    budget = CPU_BLOCK_BYTES if x.device.type == "cpu" else DEVICE_BLOCK_BYTES
    step = max(64, budget // max(1, max(x.size(1), c_out) * x.element_size()))
    if n <= step:  # one gather, one GEMM per tap into one buffer, one scatter-add
        rows = x.index_select(0, read_all)
        messages = x.new_empty(n, c_out)
        for k, t in enumerate(pairs.taps):
            a, b = pairs.bounds[k], pairs.bounds[k + 1]
            if groups == 1 and b - a < _SMALL_GEMM_ROWS:
                torch.mm(rows[a:b], taps[t][0].t(), out=messages[a:b])
            elif groups == 1:
                messages[a:b] = _linear(rows[a:b], taps[t][0])
            else:
                messages[a:b] = apply_tap(rows[a:b], taps[t])
        out.index_add_(0, write_all, messages)
        return out
    buf = x.new_empty(step, x.size(1))
    for k, t in enumerate(pairs.taps):
        w = taps[t]
        a, b = pairs.bounds[k], pairs.bounds[k + 1]
        unique = pairs.src_unique[k] if reverse else pairs.dst_unique[k]
        for s in range(a, b, step):
            e = min(b, s + step)
            rows = torch.index_select(x, 0, read_all[s:e], out=buf[:e - s])
            _add_rows(out, write_all[s:e], _mm_nk(rows, w[0]) if groups == 1 else apply_tap(rows, w), unique)
    return out


def edge_forward(x: Tensor, edge_index: Tensor, edge_type: Tensor, weight: Tensor, bias: Optional[Tensor],
                 num_dst: int, groups: int, holes: bool, cache: bool) -> Tensor:
    """``F(x, W) + b`` over an edge list: ``[num_dst, C_out]``. With ``holes`` (a pixel graph: every
    target expects every tap), an absent tap adds what ``nn.Conv2d``'s zero padding adds (zero, or NaN
    for non-finite weights)."""
    x = x.contiguous()
    taps = tap_weights(weight, groups)
    plan = _edge_plan(edge_index, edge_type, x.size(0), num_dst, taps.size(0), cache)
    if plan.use_table(groups):
        out = _table_forward(plan.blocks("forward", x.size(1), x.element_size(), x.device), x,
                             weight.reshape(weight.size(0), -1, taps.size(0)).transpose(1, 2), bias, num_dst)
    else:
        out = _tap_products(x, taps, plan.pairs, num_dst, weight.size(0), bias, reverse=False)
    # An absent tap of a masked graph is an inactive pixel, a zero of the image that torch multiplies (0 * Inf =
    # NaN) in every dtype; at the image's border it is torch's padding, which its float32 kernels leave out
    # instead: the one place where a masked graph's NaN pattern can differ (the edges do not say which is which).
    if holes and num_dst and not _all_finite(weight):
        bad = _hole_values(taps.transpose(2, 3)).isnan()  # [K, C_out]: an absent tap t gives NaN there
        hit = plan.missing(x.device, torch.float32) @ bad.to(torch.float32) > 0
        out = out.masked_fill(hit, float("nan"))
    return out


def _table_forward(blocks: _TableBlocks, x: Tensor, w: Tensor, bias: Optional[Tensor], num_rows: int) -> Tensor:
    """``out[i] = bias + sum_t w[:, t] x[index[i, t]]`` block by block: one gather ``[n, T*C_in]`` (holes
    read a zero row) and one GEMM with the taps' weights ``w [C_out, T, C_in]`` stacked."""
    w_nk = w.reshape(w.size(0), -1).contiguous()
    out = x.new_empty(num_rows, w.size(0))
    for start, stop, cols in blocks.gather(x):
        out[start:stop] = _linear(cols, w_nk, bias)
    return out


def edge_input_grad(g: Tensor, edge_index: Tensor, edge_type: Tensor, weight: Tensor, num_src: int, groups: int,
                    cache: bool) -> Tensor:
    """``Ft(g, W)`` over an edge list: ``[num_src, C_in]``."""
    g = g.contiguous()
    taps = tap_weights(weight, groups)  # [K, G, C_out/G, C_in/G]
    plan = _edge_plan(edge_index, edge_type, num_src, g.size(0), taps.size(0), cache)
    if plan.use_table(groups) and plan.reverse() is not None:
        # the reverse table: source j gathers the gradients of the targets that read it, weights transposed
        w_rev = weight.reshape(weight.size(0), weight.size(1), -1).permute(1, 2, 0)  # [C_in, T, C_out]
        return _table_forward(plan.blocks("reverse", g.size(1), g.element_size(), g.device), g, w_rev, None,
                              num_src)
    return _tap_products(g, taps, plan.pairs, num_src, weight.size(1) * groups, None, reverse=True)


def edge_weight_grad(x: Tensor, g: Tensor, edge_index: Tensor, edge_type: Tensor, groups: int,
                     weight_shape: list[int], cache: bool) -> Tensor:
    """``G(x, g)`` over an edge list, shaped like the weight ``(C_out, C_in/G, *kernel)``."""
    x, g = x.contiguous(), g.contiguous()
    c_out, c_in_g = weight_shape[0], weight_shape[1]
    k = math.prod(weight_shape[2:])
    c_out_g = c_out // groups
    plan = _edge_plan(edge_index, edge_type, x.size(0), g.size(0), k, cache)
    if plan.use_table(groups):
        acc = x.new_zeros(k * c_in_g, c_out)  # [T*C_in, C_out]
        for start, stop, cols in plan.blocks("forward", x.size(1), x.element_size(), x.device).gather(x):
            acc.addmm_(cols.t(), g[start:stop])
        return acc.view(k, c_in_g, c_out).permute(2, 1, 0).reshape(weight_shape).contiguous()
    grad_taps = x.new_zeros(k, groups, c_out_g, c_in_g)
    for t, src, dst in plan.pairs:
        go = g if dst is None else g.index_select(0, dst)
        xs = x if src is None else x.index_select(0, src)
        go = go.reshape(-1, groups, c_out_g).transpose(0, 1)  # [G, E, C_out/G]
        xs = xs.reshape(-1, groups, c_in_g).transpose(0, 1)  # [G, E, C_in/G]
        grad_taps[t] = torch.bmm(go.transpose(1, 2), xs)
    # back to (C_out, C_in/G, *kernel): taps were weight.reshape(G, C_out/G, C_in/G, K).permute(3, 0, 1, 2)
    return grad_taps.permute(1, 2, 3, 0).reshape(weight_shape).contiguous()

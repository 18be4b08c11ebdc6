"""The computing kernels of the graph layers: plain tensor code, no autograd (see :mod:`gridgraph.nn.ops`).

Every layer computes the same sum, ``x'_i = b + sum over edges (j -> i) of W[:, :, tap(j -> i)] x_j``, with
``W`` block-diagonal over ``groups``. Its three bilinear maps are the forward ``F(x, W)``, the input
gradient ``Ft(g, W)`` (the adjoint in ``x``: ``Ft(g, W)_j = sum over edges (j -> i) of W_tap^T g_i``) and
the weight gradient ``G(x, g)`` (``G_t = sum over edges of tap t of g_i x_j^T``). None conjugates: the
autograd formulas pass conjugates where complex numbers need them. Two layouts of the edges:

**Grid kernels** (a pixel graph whose edges follow from its geometry: at most one edge per (target, tap),
a fixed-slot table ``index[i, t]``). They run block by block of targets (a block's temporaries stay in
cache and are reused, so nothing of size ``E x C`` is ever allocated):

* ``F``: gather the block's ``S`` source rows per target into one buffer ``[n, S*C_in]`` (absent edges
  zeroed), then one GEMM with the taps' weights stacked ``[S*C_in, C_out]`` (bias fused); when ``C_out``
  is much smaller than ``C_in`` (``2*T*C_out <= C_in``), transform-then-gather instead (one GEMM gives
  each source's message for every tap; targets gather and sum ``C_out``-wide messages). Depthwise weights
  mix by a per-tap multiply-add, other groupings by a batched GEMM. In a stride-1 graph whose grids
  coincide, the centre tap reads the target's own row: depthwise and 1x1 layers take it from ``x``
  without a gather.
* ``Ft``: the same gather-then-GEMM on the *reverse* table (``rev[j, t]`` = the target that reads source
  ``j`` through tap ``t``) with the weights transposed, where that table has one slot per (source, tap)
  (zero and circular padding); sources are split by stride phase so a strided graph gathers only the taps
  that reach each phase. Reflect and replicate padding (a border pixel can feed one target twice through
  one tap) and strided dense graphs use a blocked scatter-add.
* ``G``: re-gathers the same blocks (``g^T @ cols``).

**Edge kernels** (any edge list: a masked or sparse pixel graph, or a plain graph): per tap, the pairs
``(src, dst)`` it joins, a gather of the sources, one GEMM with the tap's weight and an add into the
targets. A tap that joins every node to itself (the centre of a submanifold graph) is one GEMM on ``x``.
Work and memory scale with the edges; temporaries are one tap's ``[E_t, C]`` at a time.

The index tensors (batched gather indices, int32 where they fit, hole positions, reverse tables, per-tap
pairs) are built once per structure and kept in :data:`~gridgraph.structure.REGISTRY`. No convolution or
unfold primitive appears here: gathers, GEMMs and scatters only.
"""
from __future__ import annotations

import bisect
import math
import weakref
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..structure import REGISTRY, NeighbourTable, cached_table, parse_key, table_edges, tensor_bytes
from . import compiled

__all__ = ["tap_weights", "apply_tap", "grid_forward", "grid_input_grad", "grid_weight_grad", "edge_forward",
           "edge_input_grad", "edge_weight_grad", "CPU_BLOCK_BYTES", "DEVICE_BLOCK_BYTES"]

#: Rows of at most this many channels are gathered by the compiled loop (:mod:`gridgraph.nn.compiled`).
NARROW = 16
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


# ------------------------------------------------------------------------------------ index plans
class _Gather:
    """A blocked gather: output row ``r`` reads source rows ``index[r, :]`` (``slots`` of them).

    ``index`` is stored flat (``[rows * slots]``, int32 when the ids fit) with absent entries
    replaced by row 0; ``holes`` lists their flat positions, zeroed after each gather.
    ``taps`` names the kernel tap of each slot; ``centre`` is the tap (if any) that reads the
    output row's own id, handled without a gather; ``rows`` are the output rows (None: ``0..n-1``).
    """

    def __init__(self, index: Tensor, taps: list[int], centre: Optional[int], rows: Optional[Tensor],
                 num_src: int) -> None:
        num_rows, slots = index.shape
        holes = index < 0
        self.num_rows, self.slots, self.taps, self.centre, self.rows = num_rows, slots, taps, centre, rows
        flat = index.masked_fill(holes, 0).reshape(-1)
        self.index = flat.to(torch.int32) if num_src < 2 ** 31 - 1 else flat
        self.holes = holes.reshape(-1).nonzero().squeeze(1) if bool(holes.any()) else None
        # The same table for the compiled loops: int32, -1 where a slot is empty (CPU only).
        self.table = index.to(torch.int32) if index.device.type == "cpu" and num_src < 2 ** 31 - 1 else None
        self._cuts: dict[int, list[int]] = {}  # block size -> hole ranges per block (plain ints)

    def tensors(self) -> tuple[Optional[Tensor], ...]:
        return self.index, self.holes, self.rows, self.table

    def blocks(self, block_rows: int) -> list[tuple[int, int, Optional[Tensor]]]:
        """``(start, stop, holes)`` per block of ``block_rows`` rows; holes relative to the block."""
        starts = list(range(0, self.num_rows, block_rows))
        bounds = starts + [self.num_rows]
        if self.holes is None:
            return [(s, e, None) for s, e in zip(bounds[:-1], bounds[1:])]
        cuts = self._cuts.get(block_rows)
        if cuts is None:
            edges = torch.tensor(bounds, device=self.holes.device) * self.slots
            cuts = self._cuts[block_rows] = torch.searchsorted(self.holes, edges).tolist()
        out = []
        for k, start in enumerate(starts):
            holes = None
            if cuts[k + 1] > cuts[k]:
                holes = self.holes[cuts[k]:cuts[k + 1]] - start * self.slots
            out.append((start, bounds[k + 1], holes))
        return out

    def gather(self, src: Tensor, start: int, stop: int, holes: Optional[Tensor], buf: Tensor,
               fill: Optional[Tensor] = None) -> Tensor:
        """Rows ``start:stop`` gathered from ``src`` into ``buf``, as ``[stop-start, slots*C]``; absent
        entries zero, or ``fill[slot]`` (the absent edge's value for its tap) when given."""
        n = stop - start
        cols = buf[:n * self.slots]
        if fill is None and self.table is not None and src.size(1) <= NARROW and compiled.available(src):
            # narrow rows (a few channels): one compiled pass instead of a copy per row
            return compiled.gather_rows(src, self.table[start:stop], cols.view(n, -1))
        torch.index_select(src, 0, self.index[start * self.slots:stop * self.slots], out=cols)
        if holes is not None:
            if fill is None:
                cols.index_fill_(0, holes, 0)
            else:
                cols.index_copy_(0, holes, fill[holes % self.slots])
        return cols.view(n, -1)


def _centre_tap(index: Tensor) -> Optional[int]:
    """The tap that maps every row to itself (a stride-1 graph's centre), if any."""
    ids = torch.arange(index.size(0), device=index.device)
    for t in range(index.size(1)):
        if bool((index[:, t] == ids).all()):
            return t
    return None


def _batched(index: Tensor, num_images: int, src_stride: int) -> Tensor:
    """Repeat a per-image table for ``num_images`` images (source ids offset, holes kept)."""
    offs = (torch.arange(num_images, device=index.device) * src_stride).view(-1, 1, 1)
    out = torch.where(index[None] >= 0, index[None] + offs, -1)
    return out.reshape(num_images * index.size(0), index.size(1))


class _Reverse:
    """The input gradient's gathers (None: the reverse table needs two slots for one (source, tap))."""

    def __init__(self, gathers: Optional[list[_Gather]]) -> None:
        self.gathers = gathers

    def tensors(self) -> list[Optional[Tensor]]:
        return [t for g in self.gathers or () for t in g.tensors()]


class _Part:
    """A grid part's table, batch size and centre tap, resolved from its key (cheap; not cached)."""

    def __init__(self, key: str, device: torch.device) -> None:
        kind, geometry, in_size, num_images = parse_key(key)
        self.key, self.device, self.num_images, self.kind = key, device, num_images, kind
        self.table: NeighbourTable = cached_table(geometry, in_size, device)
        self.num_src = num_images * self.table.num_src
        self.num_dst = num_images * self.table.num_dst
        stride = self.table.geometry.stride
        same_grid = kind == "grid" and self.table.in_size == self.table.out_size and all(s == 1 for s in stride)
        self._same_grid = same_grid

    @property
    def centre(self) -> Optional[int]:
        if not self._same_grid:
            return None
        return REGISTRY.get(("centre", self.table.geometry, self.table.in_size, self.device),
                            lambda: (_centre_tap(self.table.index), ()))

    def split_centre(self, kind: str) -> bool:
        """Whether to run the centre tap without a gather: always for per-tap multiply-adds and for a
        1x1 graph; for a GEMM, gathering it too keeps one GEMM per block (fewer, larger operations)."""
        return self.centre is not None and (kind != "dense" or self.table.num_taps == 1)

    def _cached(self, what: tuple, build) -> object:
        def wrapped():
            value = build()
            return value, value.tensors()
        return REGISTRY.get(("plan", self.key, self.device) + what, wrapped)

    def forward(self, split_centre: bool) -> _Gather:
        def build():
            centre = self.centre if split_centre else None
            taps = [t for t in range(self.table.num_taps) if t != centre]
            index = _batched(self.table.index[:, taps], self.num_images, self.table.num_src)
            return _Gather(index, taps, centre, None, self.num_src)
        return self._cached(("forward", split_centre), build)

    def transformed(self) -> _Gather:
        """The gather of transform-then-gather: entry ``(i, t)`` reads row ``index[i, t] * T + t`` of the
        per-tap transformed features ``[N_src * T, C_out]``."""
        def build():
            index, num_taps = self.table.index, self.table.num_taps
            taps = torch.arange(num_taps, device=index.device)
            shifted = torch.where(index >= 0, index * num_taps + taps, -1)
            batched = _batched(shifted, self.num_images, self.table.num_src * num_taps)
            return _Gather(batched, list(range(num_taps)), None, None, self.num_src * num_taps)
        return self._cached(("transformed",), build)

    def transformed_reverse(self) -> Optional[list[_Gather]]:
        """The input gradient's transform-then-gather, one gather per stride phase of the sources: entry
        ``(j, s)`` reads row ``rev[j, t] * T + t`` (``t`` the slot's tap) of the per-tap messages
        ``[N_dst * T, C_in]``, ``rev[j, t]`` being the target that reads source ``j`` through tap ``t``.
        None when a (source, tap) pair feeds several targets (reflect / replicate padding)."""
        def build():
            return _Reverse(self._build_reverse(None, message_rows=True))
        return self._cached(("transformed-reverse",), build).gathers

    def reverse(self, split_centre: bool) -> Optional[list[_Gather]]:
        """The input gradient's gathers, one per stride phase of the sources, or None when the reverse
        table would need two slots for one (source, tap) pair (reflect / replicate padding)."""
        def build():
            return _Reverse(self._build_reverse(self.centre if split_centre else None))
        return self._cached(("reverse", split_centre), build).gathers

    def _build_reverse(self, centre: Optional[int], message_rows: bool = False) -> Optional[list[_Gather]]:
        table = self.table
        index, n_src, n_dst, num_taps = table.index, table.num_src, table.num_dst, table.num_taps
        device = index.device
        dst, tap = (index >= 0).nonzero(as_tuple=True)
        src = index[dst, tap]
        key = src * num_taps + tap
        if key.numel() and int(torch.bincount(key, minlength=n_src * num_taps).max()) > 1:
            return None  # reflect / replicate: a (source, tap) pair feeds several targets
        rev = torch.full((n_src * num_taps,), -1, dtype=torch.long, device=device)
        rev[key] = dst * num_taps + tap if message_rows else dst  # the target, or its message row for tap t
        rev = rev.view(n_src, num_taps)
        # Stride phase of every source pixel: a phase only receives from the taps that land on it.
        phase = torch.zeros(n_src, dtype=torch.long, device=device)
        ids = torch.arange(n_src, device=device)
        inner = 1
        stride = tuple(table.geometry.stride) if self.key.startswith("grid|") else (1,) * len(table.in_size)
        for size, s in zip(reversed(table.in_size), reversed(stride)):
            coord = (ids // inner) % size
            phase = phase * s + coord % s
            inner *= size
        num_phases = math.prod(stride)
        gathers = []
        for p in range(num_phases):
            rows = None if num_phases == 1 else (phase == p).nonzero().squeeze(1)
            sub = rev if rows is None else rev[rows]
            if sub.size(0) == 0:
                continue
            present = (sub >= 0).any(0)
            if centre is not None:
                present[centre] = False
            taps = present.nonzero().squeeze(1).tolist()
            if not taps and centre is None:
                continue
            sub = sub[:, taps]
            batched_rows = None
            if rows is not None:
                offs = torch.arange(self.num_images, device=device)[:, None] * n_src
                batched_rows = (rows[None, :] + offs).reshape(-1)
            scale = num_taps if message_rows else 1
            gathers.append(_Gather(_batched(sub, self.num_images, n_dst * scale), taps, centre, batched_rows,
                                   self.num_dst * scale))
        return gathers


# ------------------------------------------------------------------------------- block kernels
# A "mix" applies stacked tap weights ``M`` ``[S, G, a, b]`` to gathered rows ``cols`` ``[n, S*G*a]``
# (slot-major, then group, then channel), giving ``[n, G*b]``: out[n, g, k] = sum_{s, c} cols[n, s, g, c] M[s, g, c, k].
# Forward: ``M = W^T`` per tap (a = C_in/G, b = C_out/G); input gradient: ``M = W`` per tap.

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


def _kind(groups: int, a: int, b: int) -> str:
    if groups == 1:
        return "dense"
    if a == 1 or b == 1:
        return "elementwise"  # depthwise and its transpose: a per-tap multiply-add
    return "grouped"


def _prepare(m: Tensor, kind: str) -> Tensor:
    """``M`` ``[S, G, a, b]`` in the layout its kind multiplies with."""
    s, g, a, b = m.shape
    if kind == "dense":
        return m.reshape(s * a, b).t().contiguous()  # [b, S*a]: the layout of a linear layer's weight
    if kind == "grouped":
        return m.permute(1, 0, 2, 3).reshape(g, s * a, b)
    return m.contiguous()


def _mix(cols: Tensor, m: Tensor, kind: str, shape: tuple[int, int, int, int], out: Tensor,
         accumulate: bool = False, bias: Optional[Tensor] = None) -> None:
    """``out = bias + mix(cols, M)`` (``out +=`` when ``accumulate``); ``m`` from :func:`_prepare`,
    ``shape`` = ``(S, G, a, b)``."""
    s, g, a, b = shape
    n = cols.size(0)
    if kind == "dense":
        if accumulate:
            out.add_(_linear(cols, m))
        else:
            out.copy_(_linear(cols, m, bias))
        return
    if kind == "elementwise":
        if a == 1 and b == 1:  # depthwise: a multiply-add per tap, straight into ``out``
            c3, m2 = cols.view(n, s, g), m.view(s, g)
            first = 0
            if not accumulate:
                torch.mul(c3[:, 0], m2[0], out=out)
                first = 1
            for t in range(first, s):
                out.addcmul_(c3[:, t], m2[t])
            if bias is not None:
                out.add_(bias)
            return
        if a == 1:
            res = (cols.view(n, s, g, 1) * m.view(s, g, b)).sum(1)
        else:
            res = (cols.view(n, s, g, a) * m.view(s, g, a)).sum((1, 3))
        res = res.reshape(n, g * b)
    else:
        cg = cols.view(n, s, g, a).permute(2, 0, 1, 3).reshape(g, n, s * a)
        res = torch.bmm(cg, m).transpose(0, 1).reshape(n, g * b)
    if bias is not None:
        res = res + bias
    if accumulate:
        out.add_(res)
    else:
        out.copy_(res)


def _mix_grad(cols: Tensor, gout: Tensor, kind: str, shape: tuple[int, int, int, int], acc: Tensor) -> None:
    """``acc += d(sum gout * mix(cols, M)) / dM``, in the layout of :func:`_prepare` (no conjugation)."""
    s, g, a, b = shape
    n = cols.size(0)
    if kind == "dense":
        acc.add_(_linear(gout.t(), cols.t()))  # [b, S*a], as _prepare lays it out (oneDNN reads the strides)
    elif kind == "elementwise":
        acc.add_((cols.view(n, s, g, a, 1) * gout.view(n, 1, g, 1, b)).sum(0))
    else:
        cg = cols.view(n, s, g, a).permute(2, 1, 3, 0).reshape(g, s * a, n)
        acc.baddbmm_(cg, gout.view(n, g, b).transpose(0, 1))


def _unprepare(acc: Tensor, kind: str, shape: tuple[int, int, int, int]) -> Tensor:
    """A gradient accumulated in :func:`_prepare`'s layout, back as ``[S, G, a, b]``."""
    s, g, a, b = shape
    if kind == "grouped":
        return acc.view(g, s, a, b).permute(1, 0, 2, 3)
    if kind == "dense":
        return acc.t().reshape(s, g, a, b)
    return acc.view(s, g, a, b)


def _block_rows(slots: int, channels: int, element_size: int, device: torch.device) -> int:
    budget = CPU_BLOCK_BYTES if device.type == "cpu" else DEVICE_BLOCK_BYTES
    return max(64, budget // max(1, slots * channels * element_size))


def _identity_gemm(gather: _Gather, src: Tensor, m_taps: Tensor, kind: str, num_out: int,
                   bias: Optional[Tensor]) -> Optional[Tensor]:
    """A dense gather that is the centre tap alone, row ``i`` reading source ``i`` for every row (a 1x1
    convolution at stride 1): the whole result is one GEMM, returned as it comes (``None``: not this case).
    Written into a preallocated output it would cost a copy of the output per call."""
    if kind != "dense" or gather.taps or gather.centre is None or gather.rows is not None \
            or gather.num_rows != num_out or src.size(0) != num_out:
        return None
    m = _prepare(m_taps[gather.centre:gather.centre + 1], kind)
    return _linear(src, m, bias)


def _run(gather: _Gather, src: Tensor, m_taps: Tensor, kind: str, out: Tensor, bias: Optional[Tensor]) -> None:
    """``out[rows] = bias + sum_t M_t src[index[rows, t]]`` over every block of ``gather``.

    ``m_taps`` is ``[T, G, a, b]`` for all kernel taps; ``src`` ``[N, G*a]``; ``out`` ``[*, G*b]``.
    """
    _, g, a, b = m_taps.shape
    taps = gather.taps
    shape = (len(taps), g, a, b)
    m = _prepare(m_taps[taps], kind) if taps else None
    centre_shape = (1, g, a, b)
    mc = _prepare(m_taps[gather.centre:gather.centre + 1], kind) if gather.centre is not None else None
    rows_out = gather.rows
    n_rows = max(1, _block_rows(gather.slots, src.size(1), src.element_size(), src.device))
    buf = src.new_empty(min(n_rows, gather.num_rows) * gather.slots, src.size(1)) if taps else None
    direct = rows_out is None
    tmp = None if direct else out.new_empty(min(n_rows, gather.num_rows), out.size(1))
    for start, stop, holes in gather.blocks(n_rows):
        target = out[start:stop] if direct else tmp[:stop - start]
        filled = False
        if mc is not None:
            _mix(src[start:stop], mc, kind, centre_shape, target, bias=bias)
            filled = True
        if m is not None:
            cols = gather.gather(src, start, stop, holes, buf)
            _mix(cols, m, kind, shape, target, accumulate=filled, bias=None if filled else bias)
            filled = True
        if not filled:
            target.zero_()
            if bias is not None:
                target.add_(bias)
        if not direct:
            out.index_copy_(0, rows_out[start:stop], target)


def _transform_then_gather(gather: _Gather, x: Tensor, m_taps: Tensor, out: Tensor, bias: Optional[Tensor]) -> None:
    """Dense forward when ``C_out`` is much smaller than ``C_in``: one GEMM gives every source's
    message for every tap (``[N_src, T*C_out]``, no larger than half of ``x``), then each target
    gathers and sums its ``T`` messages: the gather moves ``C_out`` channels instead of ``C_in``.
    An absent edge adds what ``nn.Conv2d`` adds for zero padding (zero, or NaN for non-finite weights)."""
    num_taps, _, c_in, c_out = m_taps.shape
    messages = _linear(x, m_taps[:, 0].permute(0, 2, 1).reshape(num_taps * c_out, c_in).contiguous())
    messages = messages.view(-1, c_out)  # row j*T + t: tap t's message from source j
    fill = None if _all_finite(m_taps) else _hole_values(m_taps)
    _gather_sum(gather, messages, out, fill)
    if bias is not None:
        out.add_(bias)


def _gather_sum(gather: _Gather, rows: Tensor, out: Tensor, fill: Optional[Tensor] = None) -> None:
    """``out[i] = sum_s rows[index[i, s]]``; an empty slot adds nothing, or ``fill[s]`` when given."""
    if fill is None and gather.table is not None and compiled.available(rows):
        compiled.gather_sum(rows, gather.table, out)
        return
    num_taps, c = gather.slots, rows.size(1)
    n_rows = _block_rows(num_taps, c, rows.element_size(), rows.device)
    buf = rows.new_empty(min(n_rows, gather.num_rows) * num_taps, c)
    for start, stop, holes in gather.blocks(n_rows):
        cols = gather.gather(rows, start, stop, holes, buf, fill).view(stop - start, num_taps, c)
        torch.sum(cols, 1, out=out[start:stop])


def _weight_grad(gather: _Gather, x: Tensor, g: Tensor, m_shape: tuple[int, int, int, int], kind: str) -> Tensor:
    """``G`` as ``[T, G, a, b]`` (forward direction), re-gathering ``x`` block by block."""
    num_taps, groups, a, b = m_shape
    grad = x.new_zeros(m_shape)
    n_rows = _block_rows(gather.slots, x.size(1), x.element_size(), x.device)
    taps, centre = gather.taps, gather.centre
    buf = x.new_empty(min(n_rows, gather.num_rows) * gather.slots, x.size(1)) if taps else None
    shape = (len(taps), groups, a, b)
    acc = x.new_zeros(_prepare(grad[taps], kind).shape) if taps else None
    acc_c = x.new_zeros(_prepare(grad[:1], kind).shape) if centre is not None else None
    for start, stop, holes in gather.blocks(n_rows):
        gb = g[start:stop]
        if acc is not None:
            _mix_grad(gather.gather(x, start, stop, holes, buf), gb, kind, shape, acc)
        if acc_c is not None:
            _mix_grad(x[start:stop], gb, kind, (1, groups, a, b), acc_c)
    if acc is not None:
        grad[taps] = _unprepare(acc, kind, shape)
    if acc_c is not None:
        grad[centre] = _unprepare(acc_c, kind, (1, groups, a, b))[0]
    return grad


def _input_grad_scatter(gather: _Gather, g: Tensor, m_taps: Tensor, kind: str, num_src: int) -> Tensor:
    """``Ft`` by scatter-add: each block's column gradients are added to their source rows."""
    num_taps, groups, a, b = m_taps.shape  # forward direction: a = C_in/G, b = C_out/G
    c_in = groups * a
    grad_x = g.new_zeros(num_src, c_in)
    taps, centre = gather.taps, gather.centre
    s = len(taps)
    # d cols = mix(g, M'), M' [1, G, b, S*a]: one "tap" mapping C_out/G -> S*C_in/G per group.
    mt = m_taps[taps].permute(1, 3, 0, 2).reshape(1, groups, b, s * a)
    kind_t = _kind(groups, b, s * a)
    mt_p = _prepare(mt, kind_t) if s else None
    mc = _prepare(m_taps[centre:centre + 1].transpose(2, 3), _kind(groups, b, a)) if centre is not None else None
    n_rows = _block_rows(max(1, s), c_in, g.element_size(), g.device)
    buf = g.new_empty(min(n_rows, gather.num_rows), groups * s * a)
    for start, stop, holes in gather.blocks(n_rows):
        gb = g[start:stop]
        n = stop - start
        if s:
            cols = buf[:n]
            _mix(gb, mt_p, kind_t, (1, groups, b, s * a), cols)
            if groups > 1:
                cols = cols.view(n, groups, s, a).transpose(1, 2).reshape(n * s, c_in)
            else:
                cols = cols.view(n * s, c_in)
            if holes is not None:
                cols.index_fill_(0, holes, 0)
            grad_x.index_add_(0, gather.index[start * s:stop * s], cols)
        if mc is not None:
            _mix(gb, mc, _kind(groups, b, a), (1, groups, b, a), grad_x[start:stop], accumulate=True)
    return grad_x


# ----------------------------------------------------------------------------- compiled depthwise
def _depthwise(kind: str, m: Tensor) -> bool:
    """One input channel per output channel (depthwise, multiplier 1): the weights are a ``[T, C]`` table."""
    return kind == "elementwise" and m.size(2) == 1 and m.size(3) == 1


def _compiled_depthwise(gathers: list[_Gather], src: Tensor, w: Tensor, bias: Optional[Tensor], out: Tensor) -> bool:
    """``out[rows] = bias + sum_t src[table[rows, t]] * w[t]`` in one compiled pass per gather (False: not here)."""
    if not gathers or any(gth.table is None for gth in gathers) or not compiled.available(src, w) or \
            not _all_finite(w):  # non-finite weights: the torch path, which keeps nn.Conv2d's NaNs at holes
        return False
    covered = 0
    for gather in gathers:
        w_slots = w[gather.taps].contiguous()
        if gather.rows is None:
            compiled.depthwise(src, gather.table, w_slots, bias, out[:gather.num_rows])
        else:
            tmp = out.new_empty(gather.num_rows, out.size(1))
            out.index_copy_(0, gather.rows, compiled.depthwise(src, gather.table, w_slots, bias, tmp))
        covered += gather.num_rows
    if covered < out.size(0):  # rows no gather wrote (sources no tap reads): zero
        seen = torch.zeros(out.size(0), dtype=torch.bool, device=out.device)
        for gather in gathers:
            seen[gather.rows if gather.rows is not None else slice(0, gather.num_rows)] = True
        out[~seen] = 0
    return True


# ----------------------------------------------------------------------------- grid entry points
def grid_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], key: str, groups: int) -> Tensor:
    """``F(x, W) + b`` on the grid part ``key``: ``[N_dst, C_out]``."""
    part = _Part(key, x.device)
    x = x.contiguous()
    m_fwd = tap_weights(weight, groups).transpose(2, 3)  # [T, G, a = C_in/G, b = C_out/G]
    kind = _kind(groups, m_fwd.size(2), m_fwd.size(3))
    num_taps, c_out, c_in = m_fwd.size(0), weight.size(0), x.size(1)
    if part.num_dst and kind == "dense" and num_taps == 1:
        whole = _identity_gemm(part.forward(part.split_centre(kind)), x, m_fwd, kind, part.num_dst, bias)
        if whole is not None:
            return whole
    out = x.new_empty(part.num_dst, weight.size(0))
    if part.num_dst == 0:
        return out
    if _depthwise(kind, m_fwd) and _compiled_depthwise([part.forward(False)], x, m_fwd.reshape(num_taps, c_out),
                                                        bias, out):
        return out
    if kind == "dense" and num_taps > 1 and 2 * num_taps * c_out <= c_in:
        _transform_then_gather(part.transformed(), x, m_fwd, out, bias)
    else:
        _run(part.forward(part.split_centre(kind)), x, m_fwd, kind, out, bias)
    return out


def grid_input_grad(g: Tensor, weight: Tensor, key: str, groups: int) -> Tensor:
    """``Ft(g, W)`` on the grid part ``key``: ``[N_src, C_in]``."""
    part = _Part(key, g.device)
    g = g.contiguous()
    taps = tap_weights(weight, groups)  # [T, G, C_out/G, C_in/G]
    m_fwd = taps.transpose(2, 3)
    kind = _kind(groups, m_fwd.size(2), m_fwd.size(3))
    c_in = weight.size(1) * groups
    if part.num_dst == 0:
        return g.new_zeros(part.num_src, c_in)
    if _depthwise(kind, m_fwd):
        reverse = part.reverse(False)
        grad_x = g.new_empty(part.num_src, c_in)
        if reverse is not None and _compiled_depthwise(reverse, g, taps.reshape(taps.size(0), c_in), None, grad_x):
            return grad_x
    if kind == "dense" and taps.size(0) > 1 and c_in * 4 <= weight.size(0):
        # C_in much smaller than C_out (a stem): each target's messages to its sources first
        # ([N_dst, T*C_in], one GEMM), then each source sums the few that reach it.
        gathers = part.transformed_reverse()
        if gathers is not None:
            num_taps = taps.size(0)
            messages = _linear(g, taps[:, 0].permute(0, 2, 1).reshape(num_taps * c_in, weight.size(0)).contiguous())
            messages = messages.view(-1, c_in)  # row i*T + t: what target i sends back through tap t
            covered = sum(gth.num_rows for gth in gathers) == part.num_src
            grad_x = (g.new_empty if covered else g.new_zeros)(part.num_src, c_in)
            for gather in gathers:
                if gather.rows is None:
                    _gather_sum(gather, messages, grad_x)
                else:
                    part_x = g.new_empty(gather.num_rows, c_in)
                    _gather_sum(gather, messages, part_x)
                    grad_x.index_copy_(0, gather.rows, part_x)
            return grad_x
    split = part.split_centre(kind)
    reverse = part.reverse(split)
    if reverse is None:
        return _input_grad_scatter(part.forward(split), g, m_fwd, kind, part.num_src)
    if kind == "dense" and taps.size(0) == 1 and len(reverse) == 1:
        whole = _identity_gemm(reverse[0], g, taps, kind, part.num_src, None)
        if whole is not None:
            return whole
    covered = sum(r.num_rows for r in reverse) == part.num_src
    grad_x = (g.new_empty if covered else g.new_zeros)(part.num_src, c_in)
    m_rev = taps.contiguous()  # [T, G, a = C_out/G, b = C_in/G]
    kind_rev = _kind(groups, m_rev.size(2), m_rev.size(3))
    for gather in reverse:
        _run(gather, g, m_rev, kind_rev, grad_x, None)
    return grad_x


def grid_weight_grad(x: Tensor, g: Tensor, key: str, groups: int, weight_shape: list[int]) -> Tensor:
    """``G(x, g)`` on the grid part ``key``, shaped like the weight ``(C_out, C_in/G, *kernel)``."""
    part = _Part(key, x.device)
    x, g = x.contiguous(), g.contiguous()
    c_out, c_in_g = weight_shape[0], weight_shape[1]
    num_taps = math.prod(weight_shape[2:])
    m_shape = (num_taps, groups, c_in_g, c_out // groups)
    kind = _kind(groups, c_in_g, c_out // groups)
    if part.num_dst == 0:
        return x.new_zeros(weight_shape)
    if c_in_g == 1 and c_out == groups and compiled.available(x, g):  # depthwise: one compiled pass
        gather = part.forward(False)
        if gather.table is not None:
            grad = x.new_zeros(num_taps, c_out)
            grad[gather.taps] = compiled.depthwise_weight_grad(x, gather.table, g)
            return grad.t().reshape(weight_shape).contiguous()
    grad_m = _weight_grad(part.forward(part.split_centre(kind)), x, g, m_shape, kind)
    # grad_m [T, G, C_in/G, C_out/G] -> weight (C_out, C_in/G, *kernel)
    return grad_m.permute(1, 3, 2, 0).reshape(weight_shape).contiguous()


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

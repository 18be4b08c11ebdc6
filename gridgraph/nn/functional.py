"""The maths of every gridgraph layer, in two layouts of the same edges.

``x'_i = b + sum over edges (j -> i) of W[:, :, tap(j -> i)] x_j``, with ``W`` block-diagonal over
``groups``. :func:`tap_messages` computes the messages of an edge list (any graph, any number of
edges per tap); :func:`table_conv` computes the same sum from a :class:`~gridgraph.graph.NeighbourTable`
(a pixel graph: at most one edge per target and tap). Both are gathers, GEMMs and scatters: no
convolution or unfold primitive appears here.

The table path (the fast one)
-----------------------------
A pixel graph has at most one edge per (target, tap), so its edge list is a fixed-slot table
``index[i, t]``. :func:`table_conv` runs a custom autograd function over it, block by block of
targets (a block's temporaries stay in cache and are reused, so nothing of size ``E x C`` is ever
allocated or kept for backward):

* **forward**: gather the block's ``S`` source rows per target into one buffer ``[n, S*C_in]``
  (absent edges zeroed), then one GEMM with the taps' weights stacked ``[S*C_in, C_out]``
  (gather-then-GEMM, bias included); when ``C_out`` is much smaller than ``C_in``
  (``2*T*C_out <= C_in``), transform-then-gather instead: one GEMM gives each source's message for
  every tap, and targets gather and sum ``C_out``-wide messages. Depthwise weights (one input channel per group) mix by a per-tap
  multiply-add instead of a GEMM; other groupings by a batched GEMM. In a stride-1 graph whose input
  and output grids coincide, the centre tap reads the target's own row: depthwise and 1x1 layers take
  it straight from ``x`` with no gather, while a GEMM gathers it with the others (one GEMM per block:
  fewer, larger operations are faster on a busy CPU than saving a ninth of the gather).
* **backward**: the weight gradient re-gathers the same blocks (``g^T @ cols``); the input gradient
  runs the same gather-then-GEMM on the *reverse* table (``rev[j, t]`` = the target that reads
  source ``j`` through tap ``t``) with the weights transposed, whenever that table has one slot per
  (source, tap), i.e. zero and circular padding. Sources are split by stride phase so that a strided
  graph gathers only the taps that reach each phase. Reflect and replicate padding, where a border
  pixel can feed one target twice through the same tap, fall back to a scatter-add.

The index tensors of a graph (batched gather indices, int32 where they fit, hole positions and the
reverse table) are built once per (graph, batch size) and cached with it (:func:`table_plan`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..graph import _CLEAR_HOOKS, NeighbourTable, _Cache

__all__ = ["tap_weights", "apply_tap", "tap_messages", "table_conv", "table_plan", "TablePlan"]

#: Bytes of gathered rows per block on CPU (fits the caches; one buffer reused across blocks).
CPU_BLOCK_BYTES = 8 << 20
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


def tap_messages(x_j: Tensor, edge_type: Tensor, weight: Tensor, groups: int) -> Tensor:
    """Messages ``W[:, :, tap_e] x_j`` of every edge ``e``: edges grouped by tap, one GEMM per tap."""
    taps = tap_weights(weight, groups)
    num_taps = taps.size(0)
    c_out = weight.size(0)
    if x_j.size(0) == 0:
        # No edges: zero messages that still carry (zero) gradients to x and weight, as Conv2d does.
        return x_j.new_zeros(0, c_out) + 0 * (x_j.sum() + weight.sum())
    order = torch.argsort(edge_type, stable=True)
    counts = torch.bincount(edge_type, minlength=num_taps).tolist()
    pieces = [apply_tap(chunk, taps[t]) for t, chunk in enumerate(x_j[order].split(counts)) if counts[t]]
    sorted_messages = torch.cat(pieces, dim=0)
    return sorted_messages.new_empty(sorted_messages.shape).index_copy(0, order, sorted_messages)


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
        self._blocks: dict[int, list[tuple[int, int, Optional[Tensor]]]] = {}

    def blocks(self, block_rows: int) -> list[tuple[int, int, Optional[Tensor]]]:
        """``(start, stop, holes)`` per block of ``block_rows`` rows; holes relative to the block."""
        blocks = self._blocks.get(block_rows)
        if blocks is None:
            starts = list(range(0, self.num_rows, block_rows))
            bounds = starts + [self.num_rows]
            cuts = None
            if self.holes is not None:
                edges = torch.tensor(bounds, device=self.holes.device) * self.slots
                cuts = torch.searchsorted(self.holes, edges).tolist()
            blocks = []
            for k, start in enumerate(starts):
                stop = bounds[k + 1]
                holes = None
                if cuts is not None and cuts[k + 1] > cuts[k]:
                    holes = self.holes[cuts[k]:cuts[k + 1]] - start * self.slots
                blocks.append((start, stop, holes))
            self._blocks[block_rows] = blocks
        return blocks

    def gather(self, src: Tensor, start: int, stop: int, holes: Optional[Tensor], buf: Tensor) -> Tensor:
        """Rows ``start:stop`` gathered from ``src`` into ``buf``, as ``[stop-start, slots*C]``."""
        n = stop - start
        cols = buf[:n * self.slots]
        torch.index_select(src, 0, self.index[start * self.slots:stop * self.slots], out=cols)
        if holes is not None:
            cols.index_fill_(0, holes, 0)
        return cols.view(n, -1)


def _centre_tap(index: Tensor) -> Optional[int]:
    """The tap that maps every row to itself (a stride-1 graph's centre), if any."""
    ids = torch.arange(index.size(0), device=index.device)
    for t in range(index.size(1)):
        if bool((index[:, t] == ids).all()):
            return t
    return None


def _batched(index: Tensor, num_images: int, src_stride: int, rows_stride: int) -> Tensor:
    """Repeat a per-image table for ``num_images`` images (source ids offset, holes kept)."""
    offs = (torch.arange(num_images, device=index.device) * src_stride).view(-1, 1, 1)
    out = torch.where(index[None] >= 0, index[None] + offs, -1)
    return out.reshape(num_images * index.size(0), index.size(1))


class TablePlan:
    """The index tensors :func:`table_conv` runs on, for one pixel graph and batch size.

    ``forward(split_centre)``: a :class:`_Gather` over the targets, with or without the centre tap.
    ``reverse(split_centre)`` (built on first backward): the input gradient's gathers, one per stride
    phase of the sources, or None when the reverse table would need two slots for one (source, tap)
    pair. Both are built on first use and kept.
    """

    def __init__(self, table: NeighbourTable, num_images: int) -> None:
        self.table, self.num_images = table, num_images
        geometry = table.geometry
        stride = getattr(geometry, "stride", None)
        same_grid = table.in_size == table.out_size and stride is not None and all(s == 1 for s in stride)
        self.centre = _centre_tap(table.index) if same_grid else None
        self.num_src = num_images * table.num_src
        self.num_dst = num_images * table.num_dst
        self._forward: dict = {}
        self._reverse: dict[bool, Optional[list[_Gather]]] = {}

    def split_centre(self, kind: str) -> bool:
        """Whether to run the centre tap without a gather: always for per-tap multiply-adds and for a
        1x1 graph; for a GEMM, gathering it too keeps one GEMM per block (fewer, larger operations)."""
        return self.centre is not None and (kind != "dense" or self.table.num_taps == 1)

    def forward(self, split_centre: bool) -> _Gather:
        gather = self._forward.get(split_centre)
        if gather is None:
            centre = self.centre if split_centre else None
            taps = [t for t in range(self.table.num_taps) if t != centre]
            index = _batched(self.table.index[:, taps], self.num_images, self.table.num_src, self.table.num_dst)
            gather = self._forward[split_centre] = _Gather(index, taps, centre, None, self.num_src)
        return gather

    def transformed(self) -> _Gather:
        """The gather of transform-then-gather: entry ``(i, t)`` reads row ``index[i, t] * T + t`` of the
        per-tap transformed features ``[N_src * T, C_out]``."""
        gather = self._forward.get("transformed")
        if gather is None:
            index, num_taps = self.table.index, self.table.num_taps
            taps = torch.arange(num_taps, device=index.device)
            shifted = torch.where(index >= 0, index * num_taps + taps, -1)
            batched = _batched(shifted, self.num_images, self.table.num_src * num_taps, self.table.num_dst)
            gather = self._forward["transformed"] = _Gather(batched, list(range(num_taps)), None, None,
                                                            self.num_src * num_taps)
        return gather

    def reverse(self, split_centre: bool) -> Optional[list[_Gather]]:
        if split_centre not in self._reverse:
            self._reverse[split_centre] = self._build_reverse(self.centre if split_centre else None)
        return self._reverse[split_centre]

    def _build_reverse(self, centre: Optional[int]) -> Optional[list[_Gather]]:
        table, geometry = self.table, self.table.geometry
        index, n_src, n_dst, num_taps = table.index, table.num_src, table.num_dst, table.num_taps
        device = index.device
        valid = index >= 0
        dst, tap = valid.nonzero(as_tuple=True)
        src = index[dst, tap]
        key = src * num_taps + tap
        if key.numel() and int(torch.bincount(key, minlength=n_src * num_taps).max()) > 1:
            return None  # reflect / replicate: a (source, tap) pair feeds several targets
        rev = torch.full((n_src * num_taps,), -1, dtype=torch.long, device=device)
        rev[key] = dst
        rev = rev.view(n_src, num_taps)
        # Stride phase of every source pixel: a phase only receives from the taps that land on it.
        phase = torch.zeros(n_src, dtype=torch.long, device=device)
        ids = torch.arange(n_src, device=device)
        inner = 1
        stride = tuple(getattr(geometry, "stride", ()))
        if len(stride) != len(table.in_size):
            stride = (1,) * len(table.in_size)  # any partition of the sources is correct; this one is whole
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
            gathers.append(_Gather(_batched(sub, self.num_images, n_dst, n_src), taps, centre, batched_rows,
                                   self.num_dst))
        return gathers


_PLANS = _Cache(maxsize=64, max_bytes=1 << 30)
_CLEAR_HOOKS.append(_PLANS.clear)


def table_plan(table: NeighbourTable, num_images: int) -> TablePlan:
    """The cached :class:`TablePlan` of ``table`` for a batch of ``num_images`` images.

    Keyed by the table object (which the plan holds, so its id stays unique while cached) and
    rebuilt if the table's index tensor was modified in place.
    """
    def build():
        return TablePlan(table, num_images), (table.index,)

    return _PLANS.get((id(table), num_images), build)


# ------------------------------------------------------------------------------- block kernels
# A "mix" applies stacked tap weights ``M`` ``[S, G, a, b]`` to gathered rows ``cols`` ``[n, S*G*a]``
# (slot-major, then group, then channel), giving ``[n, G*b]``: out[n, g, k] = sum_{s, c} cols[n, s, g, c] M[s, g, c, k].
# Forward: ``M = W^T`` per tap (a = C_in/G, b = C_out/G); input gradient: ``M = W`` per tap.

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
        return m.reshape(s * a, b)
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
            out.addmm_(cols, m)
        elif bias is not None:
            torch.addmm(bias, cols, m, out=out)
        else:
            torch.mm(cols, m, out=out)
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
    """``acc += d(sum gout * mix(cols, M)) / dM``, in the layout of :func:`_prepare`."""
    s, g, a, b = shape
    n = cols.size(0)
    if kind == "dense":
        acc.addmm_(cols.t(), gout)
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
    return acc.view(s, g, a, b)


def _block_rows(slots: int, channels: int, element_size: int, device: torch.device) -> int:
    budget = CPU_BLOCK_BYTES if device.type == "cpu" else DEVICE_BLOCK_BYTES
    return max(64, budget // max(1, slots * channels * element_size))


def _run(gather: _Gather, src: Tensor, m_taps: Tensor, kind: str, out: Tensor,
         bias: Optional[Tensor]) -> None:
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
    gathers and sums its ``T`` messages: the gather moves ``C_out`` channels instead of ``C_in``."""
    num_taps, _, c_in, c_out = m_taps.shape
    messages = x @ m_taps[:, 0].permute(1, 0, 2).reshape(c_in, num_taps * c_out)
    messages = messages.view(-1, c_out)  # row j*T + t: tap t's message from source j
    n_rows = _block_rows(num_taps, c_out, x.element_size(), x.device)
    buf = x.new_empty(min(n_rows, gather.num_rows) * num_taps, c_out)
    for start, stop, holes in gather.blocks(n_rows):
        cols = gather.gather(messages, start, stop, holes, buf).view(stop - start, num_taps, c_out)
        torch.sum(cols, 1, out=out[start:stop])
        if bias is not None:
            out[start:stop].add_(bias)


def _weight_grad(gather: _Gather, x: Tensor, g: Tensor, m_shape: tuple[int, int, int, int], kind: str,
                 dtype: torch.dtype) -> Tensor:
    """``d loss / d M`` ``[T, G, a, b]`` (forward direction), re-gathering ``x`` block by block."""
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
    """``d loss / d x`` by scatter-add: each block's column gradients are added to their source rows."""
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


class _TableConv(torch.autograd.Function):
    """Autograd of :func:`table_conv`: forward and backward both gather block by block from the table."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], plan: TablePlan, groups: int) -> Tensor:
        x = x.contiguous()
        taps = tap_weights(weight, groups)  # [T, G, C_out/G, C_in/G]
        m_fwd = taps.transpose(2, 3)  # [T, G, a = C_in/G, b = C_out/G]
        kind = _kind(groups, m_fwd.size(2), m_fwd.size(3))
        out = x.new_empty(plan.num_dst, weight.size(0))
        num_taps, c_out, c_in = m_fwd.size(0), weight.size(0), x.size(1)
        if plan.num_dst and kind == "dense" and num_taps > 1 and 2 * num_taps * c_out <= c_in:
            _transform_then_gather(plan.transformed(), x, m_fwd, out, bias)
        elif plan.num_dst:
            _run(plan.forward(plan.split_centre(kind)), x, m_fwd, kind, out, bias)
        ctx.save_for_backward(x, weight)
        ctx.plan, ctx.groups, ctx.has_bias = plan, groups, bias is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        plan, groups = ctx.plan, ctx.groups
        g = grad_out.contiguous()
        taps = tap_weights(weight, groups)
        m_fwd = taps.transpose(2, 3)
        kind = _kind(groups, m_fwd.size(2), m_fwd.size(3))
        grad_x = grad_w = grad_b = None
        split = plan.split_centre(kind)
        if ctx.needs_input_grad[0]:
            reverse = plan.reverse(split) if plan.num_dst else []
            if reverse is not None and len(reverse) > 1 and kind == "dense":
                reverse = None  # strided dense graph: one scatter-add beats a gather per stride phase
            if reverse is None:
                grad_x = _input_grad_scatter(plan.forward(split), g, m_fwd, kind, plan.num_src)
            else:
                covered = sum(r.num_rows for r in reverse) == plan.num_src
                grad_x = (x.new_empty if covered else x.new_zeros)(plan.num_src, x.size(1))
                m_rev = taps.contiguous()  # [T, G, a = C_out/G, b = C_in/G]
                kind_rev = _kind(groups, m_rev.size(2), m_rev.size(3))
                for gather in reverse:
                    _run(gather, g, m_rev, kind_rev, grad_x, None)
        if ctx.needs_input_grad[1]:
            if plan.num_dst:
                grad_m = _weight_grad(plan.forward(split), x, g, tuple(m_fwd.shape), kind, x.dtype)
                # grad_m [T, G, C_in/G, C_out/G] -> weight (C_out, C_in/G, *kernel)
                grad_w = grad_m.permute(1, 3, 2, 0).reshape(weight.shape)
            else:
                grad_w = torch.zeros_like(weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b, None, None


def table_conv(x: Tensor, table: NeighbourTable, num_images: int, weight: Tensor,
               bias: Optional[Tensor], groups: int) -> Tensor:
    """The layer's output ``[B*N_out, C_out]`` on a pixel graph given as a neighbour table.

    .. math::
        \\mathbf{x}'_i = \\mathbf{b} + \\sum_{t} \\mathbf{W}_t \\, \\mathbf{x}_{\\mathrm{index}[i, t]}
        \\quad (\\text{absent entries contribute nothing})

    Gathers each block of targets' neighbours through the table and mixes them with one GEMM
    (a multiply-add for depthwise weights); forward and backward run in a custom autograd function
    that keeps no per-edge tensors (double backward is not supported and raises).

    Args:
        x (Tensor): source node features ``[B*N_in, C_in]``.
        table (NeighbourTable): the per-image table of the pixel graph.
        num_images (int): ``B``.
        weight (Tensor): ``(C_out, C_in/groups, *kernel)``.
        bias (Tensor, optional): ``(C_out)``.
        groups (int): block-diagonal channel groups.

    Shapes:
        - **input:** ``[B*N_in, C_in]``
        - **output:** ``[B*N_out, C_out]``

    Example:
        >>> geo = ConvGeometry.from_keywords(2, kernel_size=3, padding=1)
        >>> table = neighbour_table(geo, (2, 2))
        >>> x = torch.tensor([[1.], [2.], [3.], [4.]])
        >>> table_conv(x, table, 1, torch.ones(1, 1, 3, 3), None, 1).flatten().tolist()
        [10.0, 10.0, 10.0, 10.0]
    """
    plan = table_plan(table, num_images)
    return _TableConv.apply(x, weight, bias, plan, groups)

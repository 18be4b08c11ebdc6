"""Lattice kernels: the convolution of a full grid, computed from its per-tap shifted views.

On a full grid the pixel graph of a convolution is regular: the tap ``t`` joins every target ``o`` to the
source ``s * o + e_t`` (``s`` the stride, ``e_t`` the tap's offset from the anchor, per spatial axis), or to
nothing where that lies outside the grid (zero padding). So the edges of one tap are one *shifted, strided
view* of the node features (a diagonal of the adjacency matrix), and the neighbour table ``index[o, t]`` is
``s * o + e_t`` wherever it is not ``-1``. These kernels read the node features through those views instead
of through the table: the same edges, the same sum

.. math::
    \\mathbf{x}'_o = \\mathbf{b} + \\sum_t \\mathbf{W}_t \\, \\mathbf{x}_{s o + e_t}

(no convolution or unfold primitive: strided views, copies, GEMMs and multiply-adds only). The offsets come
from the :class:`~gridgraph.geometry.ConvGeometry` that builds the table, and the tests check these kernels
against the edge-list kernels on the graph's own edges.

Node features are ``[B * prod(grid), C]`` row-major (``b, *grid``), so a channels-last image *is* its node
features. Three maps, as in :mod:`gridgraph.nn.kernels`:

* forward ``F``: gather each block of targets' ``T`` shifted rows into ``[m, T*C_in]`` (zeros outside the
  grid) and multiply once by the stacked tap weights (depthwise layers: one multiply-add per tap);
* input gradient ``Ft``: a source ``j = s * q + r`` (``r`` its stride phase) is read by the taps whose offset
  is congruent to ``r``, from the targets ``q + (r - e_t) / s``: per phase, the same gather on the gradient
  with those taps and their weights transposed (no scatter, no atomics);
* weight gradient ``G``: the forward's gathered blocks, transposed, times the gradient.

Reflect, replicate and circular padding first read the padded grid through the per-axis source maps of
:func:`gridgraph.structure._remap` (the same rule the tables use); their input gradient folds it back.
Where numba is available, 2-D float32/float64 tensors on the CPU run compiled loops for the gathers and the
depthwise sums (:mod:`gridgraph.nn.compiled`); everything else runs the same arithmetic in torch.
"""
from __future__ import annotations

import math
import threading
import weakref
from typing import Iterator, Optional

import torch
from torch import Tensor

from ..geometry import ConvGeometry
from ..structure import REGISTRY, _remap, tensor_bytes
from . import compiled

__all__ = ["Lattice", "lattice", "forward", "input_grad", "weight_grad", "workspace", "workspace_bytes", "release_workspace", "BLOCK_BYTES",
           "DEVICE_BLOCK_BYTES", "SMALL"]

#: Bytes of gathered rows per block on the CPU: the GEMM is the most efficient on large blocks, and the
#: block's buffer is reused from call to call (:func:`workspace`).
BLOCK_BYTES = 16 << 20
#: Bytes of gathered rows per block on an accelerator (few large blocks: launches cost more there).
DEVICE_BLOCK_BYTES = 512 << 20
#: Gathered elements (targets x slots x channels) up to which a gather is one ``index_select`` by a cached
#: index (four torch calls per map, whatever the geometry) instead of the strided-view blocks.
SMALL = 1 << 15
#: Gather dense layers' rows with the compiled loop (else torch's strided copy, on torch's own threads:
#: numba's thread pool is another OpenMP runtime, and switching between the two costs more than it saves).
COMPILED_GATHER = False


class Gather:
    """A gather from a source grid: ``cols[(b, o), (k, c)] = src[b, A * o + E[k], c]`` (per axis), zero where
    that lies outside the source grid. ``offsets[a]`` ascend in equal steps (an arithmetic progression);
    ``taps`` are the kernel taps (flat, row-major) in the order of the gathered slots."""

    __slots__ = ("src_size", "out_size", "anchor", "offsets", "taps", "num_images", "num_slots", "num_rows",
                 "num_src", "identity", "pad_lo", "pad_hi", "steps", "inside", "np_offsets", "recipes", "charge")

    def __init__(self, src_size: tuple[int, ...], out_size: tuple[int, ...], anchor: tuple[int, ...],
                 offsets: tuple[tuple[int, ...], ...], taps: tuple[int, ...], num_images: int) -> None:
        self.src_size, self.out_size, self.anchor, self.offsets, self.taps = src_size, out_size, anchor, offsets, taps
        self.num_images = num_images
        self.num_slots = len(taps)
        self.num_rows = num_images * math.prod(out_size)  # targets (rows of the gathered matrix)
        self.num_src = num_images * math.prod(src_size)
        self.recipes: dict = {}  # (channels, groups, device) -> _Recipe
        self.charge = None  # the cache's callback: re-count the lattice's bytes after a recipe was added
        # one slot reading the source itself, row for row: the gather is the identity (a 1x1 kernel)
        self.identity = (self.num_slots == 1 and src_size == out_size and all(a == 1 for a in anchor)
                         and all(e == (0,) for e in offsets))
        # zero padding the torch gather needs around the source so that every slot's view lies inside
        self.pad_lo = tuple(max(0, -e[0]) for e in offsets)
        self.pad_hi = tuple(max(0, a * (o - 1) + e[-1] - (n - 1)) for a, o, e, n in
                            zip(anchor, out_size, offsets, src_size))
        self.steps = tuple(e[1] - e[0] if len(e) > 1 else 1 for e in offsets)
        self.inside = not any(self.pad_lo) and not any(self.pad_hi)
        self.np_offsets = None  # the offsets as arrays, for the compiled loops (made on first use)


class Phase:
    """The sources of one stride phase (``j = s * q + r`` per axis) and the gather that computes their input
    gradient: ``positions`` ``(start, count)`` per axis on the source grid, ``gather`` reading the gradient."""

    __slots__ = ("start", "count", "gather")

    def __init__(self, start: tuple[int, ...], count: tuple[int, ...], gather: Optional[Gather]) -> None:
        self.start, self.count, self.gather = start, count, gather


class Lattice:
    """A convolution on ``num_images`` full grids of ``in_size``: the gathers of its three maps, computed once.

    ``geometry`` is the convolution (for a transposed layer, the one whose input gradient it computes). With a
    padding mode other than zeros the kernels read the padded grid (``src_size``) through ``remap``: per
    axis, the input pixel behind each padded position. ``out_size`` keeps only the first targets of each
    axis (a transposed convolution with output padding reverses a convolution that has more targets than
    its input has pixels: those targets have no node).
    """

    def __init__(self, geometry: ConvGeometry, in_size: tuple[int, ...], num_images: int,
                 out_size: Optional[tuple[int, ...]] = None) -> None:
        self.geometry, self.in_size, self.num_images = geometry, tuple(in_size), num_images
        full = geometry.output_size(self.in_size)
        self.out_size = full if out_size is None else tuple(out_size)
        if any(o > f for o, f in zip(self.out_size, full)) or len(self.out_size) != len(full):
            raise ValueError(f"out_size {self.out_size} exceeds the convolution's output grid {full}")
        self.ndim = geometry.ndim
        self.num_in = num_images * math.prod(self.in_size)
        self.num_out = num_images * math.prod(self.out_size)
        self.num_taps = geometry.num_taps
        self.remapped = geometry.padding_mode != "zeros"
        kernel, stride, dilation = geometry.kernel_size, geometry.stride, geometry.dilation
        if self.remapped:  # the padded grid is read with no padding of its own
            self.src_size = geometry.padded_size(self.in_size)
            offsets = tuple(tuple(u * d for u in range(k)) for k, d in zip(kernel, dilation))
        else:
            self.src_size = self.in_size
            offsets = tuple(tuple(u * d - lo for u in range(k)) for k, d, (lo, _) in
                            zip(kernel, dilation, geometry.padding))
        self.forward = Gather(self.src_size, self.out_size, tuple(stride), offsets, tuple(range(self.num_taps)),
                              num_images)
        self.phases = self._phases(offsets)

    def _phases(self, offsets: tuple[tuple[int, ...], ...]) -> list[Phase]:
        """Per stride phase of the sources: the taps that reach it and the gather of its input gradient."""
        stride, kernel = self.geometry.stride, self.geometry.kernel_size
        per_axis = []
        for a in range(self.ndim):
            s, n = stride[a], self.src_size[a]
            options = []
            for r in range(min(s, n)):
                # taps u with e_u = r (mod s): source s*q + r reads target q + (r - e_u) / s; ascending offsets
                kept = sorted(((r - e) // s, u) for u, e in enumerate(offsets[a]) if (r - e) % s == 0)
                options.append((r, (n - r + s - 1) // s, tuple(e for e, _ in kept), tuple(u for _, u in kept)))
            per_axis.append(options)
        strides = [math.prod(kernel[a + 1:]) for a in range(self.ndim)]
        phases = []
        for combo in _product(per_axis):
            start = tuple(c[0] for c in combo)
            count = tuple(c[1] for c in combo)
            if any(not c[2] for c in combo):  # no tap reaches these sources: their gradient is zero
                phases.append(Phase(start, count, None))
                continue
            taps = tuple(sum(u * st for u, st in zip(us, strides)) for us in _product([c[3] for c in combo]))
            phases.append(Phase(start, count, Gather(self.out_size, count, (1,) * self.ndim,
                                                     tuple(c[2] for c in combo), taps, self.num_images)))
        return phases

    def gathers(self) -> list[Gather]:
        return [self.forward] + [p.gather for p in self.phases if p.gather is not None]

    def tensors(self) -> list[Tensor]:
        """The index tensors its gathers' recipes hold (what the cache charges it)."""
        out = []
        for gather in self.gathers():
            for rec in gather.recipes.values():
                index = rec.index if isinstance(rec, _Recipe) else rec
                if index is not None:
                    out.append(index)
        return out

    def describe(self) -> str:
        return f"{self.geometry.describe()} on {self.num_images} x {self.in_size}"


def _product(lists):
    out = [()]
    for options in lists:
        out = [prefix + (o,) for prefix in out for o in options]
    return out


def lattice(geometry: ConvGeometry, in_size: tuple[int, ...], num_images: int,
            out_size: Optional[tuple[int, ...]] = None) -> Lattice:
    """The :class:`Lattice` of ``geometry`` on ``num_images`` grids of ``in_size`` (kept in the one cache,
    :data:`~gridgraph.structure.REGISTRY`: it holds no tensors)."""
    key = ("lattice", geometry, tuple(in_size), num_images, out_size)

    def build():
        lat = Lattice(geometry, tuple(in_size), num_images, out_size)
        ref = weakref.ref(lat)

        def charge() -> None:  # a recipe added an index tensor: the cache counts what the lattice holds
            held = ref()
            if held is not None:
                REGISTRY.recharge(key, held, tensor_bytes(held.tensors()))
        for gather in lat.gathers():
            gather.charge = charge
        return lat, ()
    return REGISTRY.get(key, build)


def _remap_index(geometry: ConvGeometry, in_size: tuple[int, ...], device: torch.device) -> tuple[Tensor, ...]:
    """Per axis, the input coordinate behind every position of the padded grid (reflect / replicate / circular)."""
    def build():
        maps = []
        for n, (lo, hi) in zip(in_size, geometry.padding):
            pos = torch.arange(-lo, n + hi, device=device)
            maps.append(_remap(pos, n, geometry.padding_mode)[0])
        return tuple(maps), maps
    return REGISTRY.get(("remap", geometry, tuple(in_size), device), build)


# ------------------------------------------------------------------------------------ layouts
def _grid(x: Tensor, num_images: int, size: tuple[int, ...]) -> Tensor:
    """Node features ``[B * prod(size), C]`` as the view ``[B, *size, C]``."""
    return x.view(num_images, *size, x.size(-1))


def _pad_remapped(lat: Lattice, x: Tensor) -> Tensor:
    """The padded grid of a reflect / replicate / circular convolution, read through the per-axis maps."""
    grid = _grid(x, lat.num_images, lat.in_size)
    for a, index in enumerate(_remap_index(lat.geometry, lat.in_size, x.device)):
        grid = grid.index_select(a + 1, index)
    return grid.reshape(-1, x.size(-1))


def _fold_remapped(lat: Lattice, grad_padded: Tensor) -> Tensor:
    """The adjoint of :func:`_pad_remapped`: each padded position's gradient added back to its input pixel."""
    c = grad_padded.size(-1)
    grid = _grid(grad_padded, lat.num_images, lat.src_size)
    maps = _remap_index(lat.geometry, lat.in_size, grad_padded.device)
    for a in reversed(range(lat.ndim)):
        shape = list(grid.shape)
        shape[a + 1] = lat.in_size[a]
        grid = grid.new_zeros(shape).index_add_(a + 1, maps[a], grid)
    return grid.reshape(-1, c)


# ------------------------------------------------------------------------------------ workspace
_LOCAL = threading.local()


def workspace(numel: int, like: Tensor, slot: str) -> Tensor:
    """A flat buffer of ``numel`` elements for a kernel's temporaries, reused from call to call (per thread,
    device, dtype and ``slot``): a fresh multi-MiB buffer costs a page fault per 4 KiB at every call (0.5 ms
    of a 1.5 ms layer). Valid until the next call with the same slot; never saved for backward."""
    spaces = getattr(_LOCAL, "spaces", None)
    if spaces is None or _LOCAL.generation != REGISTRY.generation:
        spaces = _LOCAL.spaces = {}
        _LOCAL.generation = REGISTRY.generation
    key = (like.device, like.dtype, slot)
    buf = spaces.get(key)
    if buf is None or buf.numel() < numel:
        buf = spaces[key] = like.new_empty(max(numel, 1))
    return buf[:numel]


def release_workspace() -> None:
    """Free this thread's kernel workspace (the next call allocates it again, at the size it needs)."""
    _LOCAL.spaces = {}
    _LOCAL.generation = REGISTRY.generation


def workspace_bytes() -> int:
    """Bytes this thread's kernel workspace holds between calls (counted in the benchmarks' peak memory)."""
    spaces = getattr(_LOCAL, "spaces", None) or {}
    return sum(t.numel() * t.element_size() for t in spaces.values())


def _zero_padded(grid: Tensor, lo: tuple[int, ...], hi: tuple[int, ...]) -> Tensor:
    """``grid`` ``[B, *size, C]`` with ``lo``/``hi`` zeros around each spatial axis, in the workspace."""
    n = len(lo)
    shape = (grid.size(0), *(s + a + b for s, a, b in zip(grid.shape[1:n + 1], lo, hi)), grid.size(-1))
    out = workspace(math.prod(shape), grid, "padded").view(shape)
    for a in range(n):
        if lo[a]:
            out.narrow(a + 1, 0, lo[a]).zero_()
        if hi[a]:
            out.narrow(a + 1, shape[a + 1] - hi[a], hi[a]).zero_()
    inner = out
    for a in range(n):
        inner = inner.narrow(a + 1, lo[a], grid.size(a + 1))
    inner.copy_(grid)
    return out


# ------------------------------------------------------------------------------------ gathers
class _Recipe:
    """How one gather reads a source of ``channels`` channels in ``groups`` groups on one device, worked out
    once: a small gather is one ``index_select`` by ``index`` (the slot's source row, ``num_src`` -- a zero
    row -- where it lies outside the grid; group-major when grouped: row ``src * G + g`` of the ``[N*G, C/G]``
    view); a large one reads strided views of the zero-padded source, block by block (``blocks``)."""

    __slots__ = ("index", "blocks", "channels", "groups")

    def __init__(self, gather: Gather, channels: int, groups: int, device: torch.device, element_size: int) -> None:
        self.channels, self.groups = channels, groups
        self.index = None
        self.blocks: list[tuple[int, int]] = []
        if gather.num_rows * gather.num_slots * channels <= SMALL:
            self.index = _slot_index(gather, device, groups)
        else:
            self.blocks = _blocks(gather, channels, element_size, device)


def _small_index(gather: Gather, channels: int, groups: int, device: torch.device) -> Tensor:
    """The slot index of a gather from a source of ``channels`` channels (built even where that gather would
    run by blocks: the scatter of a small input gradient reads it)."""
    key = ("index", groups, device)
    index = gather.recipes.get(key)
    if index is None:
        index = gather.recipes[key] = _slot_index(gather, device, groups)
        if gather.charge is not None:
            gather.charge()
    return index


def recipe(gather: Gather, src: Tensor, groups: int = 1) -> _Recipe:
    key = (src.size(-1), groups, src.device)
    rec = gather.recipes.get(key)
    if rec is None:
        rec = gather.recipes[key] = _Recipe(gather, src.size(-1), groups, src.device, src.element_size())
        if gather.charge is not None and rec.index is not None:
            gather.charge()
    return rec


def _slot_index(gather: Gather, device: torch.device, groups: int) -> Tensor:
    """``[(G,) rows * slots]`` long: the source row of every (target, slot), ``num_src`` outside the grid (the
    zero row appended to the source); with ``groups > 1``, group-major rows of the ``[N*G, C/G]`` view."""
    n = len(gather.out_size)
    index = torch.zeros((), dtype=torch.long)
    valid = torch.ones((), dtype=torch.bool)
    stride = 1
    for a in reversed(range(n)):
        o = torch.arange(gather.out_size[a]) * gather.anchor[a]
        e = torch.tensor(gather.offsets[a])
        pos = o[:, None] + e[None, :]  # [O_a, K_a]
        shape = [1] * (2 * n)
        shape[a], shape[n + a] = gather.out_size[a], len(gather.offsets[a])
        index = index + (pos * stride).view(shape)
        valid = valid & ((pos >= 0) & (pos < gather.src_size[a])).view(shape)
        stride *= gather.src_size[a]
    per_image = torch.where(valid, index, -1).reshape(math.prod(gather.out_size), -1)
    images = torch.arange(gather.num_images)[:, None, None] * stride
    flat = torch.where(per_image[None] >= 0, per_image[None] + images, gather.num_src).reshape(-1)
    if groups > 1:
        flat = (flat[None, :] * groups + torch.arange(groups)[:, None]).reshape(-1)
    return flat.to(device)


def _block_rows(gather: Gather, channels: int, element_size: int, device: torch.device) -> int:
    """Target rows per block: the block's gathered rows fill about :data:`BLOCK_BYTES`."""
    budget = BLOCK_BYTES if device.type == "cpu" else DEVICE_BLOCK_BYTES
    return max(1, budget // max(1, gather.num_slots * channels * element_size))


def _blocks(gather: Gather, channels: int, element_size: int, device: torch.device) -> list[tuple[int, int]]:
    """Blocks of target rows: whole images, or whole rows of the first axis inside one image."""
    per_image = math.prod(gather.out_size)
    total = gather.num_rows
    if total == 0:
        return []
    rows = _block_rows(gather, channels, element_size, device)
    if rows >= total:
        return [(0, total)]
    if rows >= per_image:
        k = rows // per_image
        return [(b * per_image, min(gather.num_images, b + k) * per_image) for b in range(0, gather.num_images, k)]
    inner = per_image // gather.out_size[0] if gather.out_size[0] else per_image
    step = max(1, rows // max(1, inner)) * inner
    return [(b * per_image + r, b * per_image + min(per_image, r + step))
            for b in range(gather.num_images) for r in range(0, per_image, step)]


def _view(gather: Gather, src: Tensor, groups: int = 1) -> Tensor:
    """The gathered view of ``src`` ``[N, C]`` (zero-padded in the workspace where a slot leaves the grid):
    ``[B, *out, *slots, C]``, or ``[G, B, *out, *slots, C/G]`` when grouped. No copy of the rows."""
    grid = _grid(src, gather.num_images, gather.src_size)
    if not gather.inside:
        grid = _zero_padded(grid, gather.pad_lo, gather.pad_hi)
    strides = grid.stride()
    n = len(gather.out_size)
    base = grid.storage_offset() + sum((e[0] + lo) * st for e, lo, st in
                                       zip(gather.offsets, gather.pad_lo, strides[1:n + 1]))
    shape = (gather.num_images, *gather.out_size, *(len(e) for e in gather.offsets))
    view_strides = (strides[0], *(a * st for a, st in zip(gather.anchor, strides[1:n + 1])),
                    *(step * st for step, st in zip(gather.steps, strides[1:n + 1])))
    c = src.size(-1)
    if groups == 1:
        return grid.as_strided(shape + (c,), view_strides + (1,), base)
    return grid.as_strided((groups,) + shape + (c // groups,), (c // groups,) + view_strides + (1,), base)


def _rows(gather: Gather, view: Tensor, start: int, stop: int, out: Tensor, grouped: bool) -> Tensor:
    """Gathered rows ``start:stop`` (flat targets ``b * prod(out) + o``) of a :func:`_view` into ``out``
    (``[m, S*C]``, or ``[G, m, S*C/G]`` when grouped)."""
    per_image = math.prod(gather.out_size)
    b0 = start // per_image
    lead = 1 if grouped else 0
    if stop - start == gather.num_rows:
        piece = view
    elif start % per_image == 0 and stop % per_image == 0:  # whole images
        piece = view.narrow(lead, b0, (stop - start) // per_image)
    else:  # whole rows of the first axis inside one image
        inner = per_image // gather.out_size[0]
        r0 = (start - b0 * per_image) // inner
        piece = view.select(lead, b0).narrow(lead, r0, (stop - start) // inner)
    target = out.view(piece.shape)
    target.copy_(piece)
    return out


def _gathered(gather: Gather, rec: _Recipe, src: Tensor) -> Tensor:
    """All gathered rows of a small gather: ``[rows, S*C]`` (grouped: ``[G, rows, S*C/G]``)."""
    c, groups = src.size(-1), rec.groups
    padded = torch.constant_pad_nd(src, [0, 0, 0, 1])  # the zero row that slots outside the grid read
    if groups > 1:
        padded = padded.view(-1, c // groups)
        return padded.index_select(0, rec.index).view(groups, gather.num_rows, -1)
    return padded.index_select(0, rec.index).view(gather.num_rows, -1)


# ------------------------------------------------------------------------------------ weights
def _kind(groups: int, c_in_g: int, c_out_g: int) -> str:
    if groups == 1:
        return "dense"
    if c_in_g == 1 and c_out_g == 1:
        return "depthwise"
    return "grouped"


def _slot_weights(weight: Tensor, taps: tuple[int, ...], groups: int, transpose: bool) -> Tensor:
    """The weights of the gathered slots as ``[G, b, S * a]`` (a linear layer's weight per group; columns
    slot-major, then channel): forward ``a = C_in/G, b = C_out/G``; with ``transpose`` (input gradient)
    ``a = C_out/G, b = C_in/G``. A view of a channels-last weight's memory in the forward (no copy)."""
    c_out, c_in_g = weight.shape[:2]
    k = weight[0, 0].numel()
    w = weight.reshape(groups, c_out // groups, c_in_g, k)  # [G, o, i, T]
    if len(taps) != k or taps != tuple(range(k)):
        w = w[..., list(taps)]
    if transpose:  # [G, i, S, o]
        return w.permute(0, 2, 3, 1).reshape(groups, c_in_g, -1)
    return w.permute(0, 1, 3, 2).reshape(groups, c_out // groups, -1)  # [G, o, S, i]


def _depthwise_weights(weight: Tensor, taps: tuple[int, ...]) -> Tensor:
    """A depthwise weight ``(C, 1, *k)`` as ``[S, C]`` for the gathered slots."""
    w = weight.reshape(weight.size(0), -1)  # [C, T]
    if taps != tuple(range(w.size(1))):
        w = w[:, list(taps)]
    return w.t().contiguous()


_ONEDNN = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
#: Use oneDNN's matrix product (the library behind ``nn.Conv2d`` on the CPU) for large float32/bfloat16 blocks.
USE_ONEDNN = True
_ONEDNN_MIN_ROWS = 2048


def _gemm(cols: Tensor, w_nk: Tensor, bias: Optional[Tensor], out: Optional[Tensor] = None) -> Tensor:
    """``cols @ w_nk^T (+ bias)`` (``w_nk`` ``[N, K]``, a linear layer's weight), written into ``out`` when
    given."""
    if (USE_ONEDNN and _ONEDNN is not None and cols.device.type == "cpu" and cols.dtype in (torch.float32, torch.bfloat16)
            and cols.size(0) >= _ONEDNN_MIN_ROWS and cols.size(1) and w_nk.size(0) and not cols.requires_grad
            and w_nk.is_contiguous()):
        with torch.no_grad():
            res = _ONEDNN(cols, w_nk, bias, "none", [], "")
        return res if out is None else out.copy_(res)
    if bias is not None:
        return torch.addmm(bias, cols, w_nk.t(), out=out) if out is not None else torch.addmm(bias, cols, w_nk.t())
    return torch.mm(cols, w_nk.t(), out=out) if out is not None else torch.mm(cols, w_nk.t())


# ------------------------------------------------------------------------------------ one gather, one map
def _apply(gather: Gather, src: Tensor, w: Tensor, kind: str, bias: Optional[Tensor]) -> Tensor:
    """``out[(b, o)] = bias + sum_k M_k src[b, A o + E_k]`` for every target of ``gather``, with slot weights
    ``w`` (:func:`_slot_weights` ``[G, b, S*a]``; depthwise :func:`_depthwise_weights` ``[S, C]``)."""
    m, c = gather.num_rows, src.size(-1)
    if kind == "depthwise":
        return _depthwise(gather, src, w, bias)
    groups = w.size(0)
    c_out = groups * w.size(1)
    if m == 0:
        return src.new_empty(0, c_out)
    if gather.identity and kind == "dense":
        return _gemm(src, w[0], bias)
    rec = recipe(gather, src, groups if kind == "grouped" else 1)
    if kind == "dense":
        if rec.index is not None:
            return _gemm(_gathered(gather, rec, src), w[0], bias)
        view = _view(gather, src)
        buf = workspace(max(b - a for a, b in rec.blocks) * gather.num_slots * c, src, "cols")
        if len(rec.blocks) == 1:  # one block: the GEMM's result is the output
            return _gemm(_rows(gather, view, 0, m, buf.view(m, -1), False), w[0], bias)
        out = src.new_empty(m, c_out)
        for start, stop in rec.blocks:
            cols = _rows(gather, view, start, stop, buf[:(stop - start) * gather.num_slots * c].view(stop - start, -1),
                         False)
            _gemm(cols, w[0], bias, out[start:stop])
        return out
    # grouped: group-major gathered rows [G, m, S*a], one batched GEMM per block written straight into the
    # output's groups ([G, m, b] strided view of [m, G*b])
    out = src.new_empty(m, c_out)
    wt = w.transpose(1, 2)
    if rec.index is not None:
        torch.bmm(_gathered(gather, rec, src), wt, out=out.view(m, groups, -1).transpose(0, 1))
    else:
        fast = len(gather.src_size) == 2 and compiled.available(src)
        view = None if fast else _view(gather, src, groups)
        buf = workspace(max(b - a for a, b in rec.blocks) * gather.num_slots * c, src, "cols")
        for start, stop in rec.blocks:
            n = stop - start
            cols = buf[:n * gather.num_slots * c].view(groups, n, -1)
            if fast:
                compiled.gather2d_grouped(src, gather, groups, start, stop, cols)
            else:
                _rows(gather, view, start, stop, cols, True)
            torch.bmm(cols, wt, out=out[start:stop].view(n, groups, -1).transpose(0, 1))
    if bias is not None:
        out += bias
    return out


def padding_multiplies(dtype: torch.dtype, device: torch.device, kind: str = "dense") -> bool:
    """Whether torch's convolution multiplies the weights by its zero padding (so that an infinite or NaN
    weight gives NaN at the border) for this dtype, device and kind of layer, or leaves those taps out.

    Torch's float64 and complex kernels multiply. On the CPU it runs float32, float16 and bfloat16 with oneDNN,
    whose kernels decide for themselves: probed over 1,500 configurations (torch 2.13, AVX-512), float32 and
    float16 leave the taps out, bfloat16 only in depthwise layers. Where oneDNN's kernels disagree with one
    another (float32 1x1 kernels with padding, some grouped layers, in NCHW only) torch's result depends on the
    memory format of the input, and gridgraph's follows its channels-last one."""
    if device.type != "cpu" or not torch._C._get_mkldnn_enabled():
        return True
    return not (dtype in (torch.float32, torch.float16) or (dtype == torch.bfloat16 and kind == "depthwise"))


def _bands(gather: Gather, out: Tensor) -> list[Tensor]:
    """The rows of ``out`` ``[rows, C]`` whose window reaches into the zero padding, as strided views: per axis,
    the targets at its low and high ends that read outside the source grid."""
    n = len(gather.out_size)
    grid = out.view(gather.num_images, *gather.out_size, out.size(-1))
    bands = []
    for a in range(n):
        size, anchor, first, last = gather.out_size[a], gather.anchor[a], gather.offsets[a][0], gather.offsets[a][-1]
        lo = min(size, -(first // anchor)) if first < 0 else 0  # targets o with anchor * o + first < 0
        limit = gather.src_size[a] - 1 - last  # anchor * o + last <= limit inside
        hi = size - min(size, limit // anchor + 1) if limit >= 0 else size
        if lo:
            bands.append(grid.narrow(1 + a, 0, lo))
        if hi:
            bands.append(grid.narrow(1 + a, size - hi, hi))
    return bands


def _skip_padding(gather: Gather, src: Tensor, weight: Tensor, bias: Optional[Tensor], groups: int,
                  out: Tensor) -> None:
    """Where torch leaves padded taps out (:func:`padding_multiplies`) but the GEMM multiplied their zeros by an
    infinite or NaN weight, the NaN can only sit in the border rows: if any does, those rows are recomputed
    over their present taps alone (a rare path: non-finite weights or inputs)."""
    if out.numel() <= SMALL:
        found = bool(out.isnan().any())
    else:
        found = any(bool(band.isnan().any()) for band in _bands(gather, out))
    if not found:  # no NaN at the border: nothing was multiplied into one
        return
    rows, slots = gather.num_rows, gather.num_slots
    index = _slot_index(gather, src.device, 1).view(rows, slots)
    valid = index != gather.num_src
    frame = (~valid).any(1).nonzero().squeeze(1)
    idx, present = index[frame], valid[frame]
    c_out = weight.size(0)
    a, b = weight.size(1), c_out // groups
    cols = torch.constant_pad_nd(src, [0, 0, 0, 1])[idx].view(len(frame), slots, groups, a)
    w = weight.reshape(groups, b, a, -1)[..., list(gather.taps)]  # [G, b, a, S]
    prod = torch.einsum("nsga,gbas->nsgb", cols, w).reshape(len(frame), slots, c_out)
    rows_out = prod.masked_fill(~present[..., None], 0).sum(1)
    if bias is not None:
        rows_out = rows_out + bias
    out.index_copy_(0, frame, rows_out.to(out.dtype))


def _compiled_depthwise(gather: Gather, src: Tensor, w: Tensor) -> bool:
    """Whether :func:`_depthwise` runs the compiled loop (which leaves absent taps out by itself)."""
    return len(gather.src_size) == 2 and compiled.available(src, w)


def _depthwise(gather: Gather, src: Tensor, w: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``out[(b, o), c] = bias[c] + sum_k w[k, c] src[b, A o + E_k, c]``. An absent slot (zero padding)
    adds what torch's depthwise convolution adds there: nothing, or ``0 * w`` (:func:`padding_multiplies`)."""
    m, c = gather.num_rows, src.size(-1)
    skip = gather.inside or not padding_multiplies(src.dtype, src.device, "depthwise") or _finite(w)
    if m and skip and _compiled_depthwise(gather, src, w):
        return compiled.depthwise2d(src, gather, w, bias, src.new_empty(m, c))
    if m == 0:
        return src.new_empty(0, c)
    rec = recipe(gather, src)
    if rec.index is not None:  # [m, S, C] * [S, C], summed over the slots
        out = (_gathered(gather, rec, src).view(m, gather.num_slots, c) * w).sum(1)
    else:
        view = _view(gather, src)  # [B, *out, *slots, C]
        out = src.new_empty(m, c)
        target = out.view(gather.num_images, *gather.out_size, c)
        for k in range(gather.num_slots):
            piece = _slot(view, gather, k)
            if k == 0:
                torch.mul(piece, w[k], out=target)
            else:
                target.addcmul_(piece, w[k])
    if bias is not None:
        out += bias
    return out


def _finite(t: Tensor) -> bool:
    return bool(torch.isfinite(t).all()) if (t.is_floating_point() or t.is_complex()) else True


def _slot(view: Tensor, gather: Gather, k: int) -> Tensor:
    """Slot ``k`` (flat, row-major over the per-axis slots) of a gathered view ``[B, *out, *slots, C]``:
    ``[B, *out, C]``."""
    n = len(gather.out_size)
    for a in reversed(range(n)):
        k, r = divmod(k, len(gather.offsets[a]))
        view = view.select(n + 1 + a, r)
    return view


_WEIGHT_VIEWS: dict = {}


def _weights(weight: Tensor, groups: int, kind: str, taps: tuple[int, ...], transpose: bool) -> Tensor:
    """The slot weights of a gather (:func:`_slot_weights`, :func:`_depthwise_weights`). Where they are a view
    of the weight's memory (a channels-last weight in the forward), that view is remembered per weight
    layout and taken again with one ``as_strided``; otherwise they are rebuilt (a copy) at every call, so an
    edit of the weight always takes effect."""
    key = (weight.shape, weight.stride(), weight.dtype, groups, kind, taps, transpose)
    view = _WEIGHT_VIEWS.get(key)
    if view:
        return weight.as_strided(view[0], view[1], weight.storage_offset() + view[2])
    w = _depthwise_weights(weight, taps) if kind == "depthwise" else _slot_weights(weight, taps, groups, transpose)
    if view is None:
        shares = weight.numel() and w.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
        if len(_WEIGHT_VIEWS) > 4096:
            _WEIGHT_VIEWS.clear()
        _WEIGHT_VIEWS[key] = (tuple(w.shape), tuple(w.stride()), w.storage_offset() - weight.storage_offset()) \
            if shares else False
    return w


# ------------------------------------------------------------------------------------ the three maps
def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lat: Lattice, groups: int) -> Tensor:
    """``F(x, W) + b``: ``[num_out, C_out]`` from node features ``x`` ``[num_in, C_in]`` (contiguous)."""
    c_out, c_in_g = weight.shape[:2]
    kind = _kind(groups, c_in_g, c_out // groups)
    src = _pad_remapped(lat, x) if lat.remapped else x
    out = _apply(lat.forward, src, _weights(weight, groups, kind, lat.forward.taps, False), kind, bias)
    if not lat.forward.inside and lat.forward.num_rows and not padding_multiplies(x.dtype, x.device, kind) \
            and not (kind == "depthwise" and _compiled_depthwise(lat.forward, src, weight)) \
            and not weights_finite(weight):
        _skip_padding(lat.forward, src, weight, bias, groups, out)
    return out


_FINITE: dict = {}  # id(weight) -> (weakref to it, (version, data pointer), finite)


def weights_finite(weight: Tensor) -> bool:
    """Whether ``weight`` holds no Inf or NaN, remembered per tensor while its version and memory stay the
    same (a layer's weight is read once per edit, not at every call). An edit through ``.data`` keeps the
    version counter of the weight itself: such a weight is read again when its memory or version changes."""
    stamp = (weight._version, weight.data_ptr()) if not weight.is_inference() else None
    seen = _FINITE.get(id(weight)) if stamp is not None else None
    if seen is not None and seen[0]() is weight and seen[1] == stamp:
        return seen[2]
    finite = _finite(weight)
    if stamp is not None:
        if len(_FINITE) > 4096:
            _FINITE.clear()
        _FINITE[id(weight)] = (weakref.ref(weight), stamp, finite)
    return finite


def _scatter_small(lat: Lattice, channels: int) -> bool:
    """Whether the input gradient runs as one GEMM and one ``index_add`` by the forward's slot index (small
    problems on the CPU, where ``index_add`` is deterministic), instead of one gather per stride phase: fewer
    torch calls, and the forward's weights as they are."""
    gather = lat.forward
    return gather.num_rows * gather.num_slots * channels <= SMALL


def input_grad(g: Tensor, weight: Tensor, lat: Lattice, groups: int) -> Tensor:
    """``Ft(g, W)``: ``[num_in, C_in]`` from the output gradient ``g`` ``[num_out, C_out]`` (contiguous)."""
    c_out, c_in_g = weight.shape[:2]
    c_in = c_in_g * groups
    kind = _kind(groups, c_in_g, c_out // groups)
    num_src = lat.forward.num_src
    if lat.num_out and g.device.type == "cpu" and _scatter_small(lat, max(c_in, c_out)):
        grad = _input_grad_scatter(g, weight, lat, groups, kind)
    elif len(lat.phases) == 1 and lat.phases[0].gather is not None:  # stride 1: one phase covers every source
        gather = lat.phases[0].gather
        grad = _apply(gather, g, _weights(weight, groups, kind, gather.taps, True), kind, None)
    else:
        grad = g.new_zeros(num_src, c_in)
        grid = _grid(grad, lat.num_images, lat.src_size)
        for phase in lat.phases:
            if phase.gather is None or not math.prod(phase.count):
                continue
            part = _apply(phase.gather, g, _weights(weight, groups, kind, phase.gather.taps, True), kind, None)
            index = (slice(None),) + tuple(slice(st, None, s) for st, s in zip(phase.start, lat.geometry.stride))
            grid[index] = _grid(part, lat.num_images, phase.count)
    return _fold_remapped(lat, grad) if lat.remapped else grad


def _input_grad_scatter(g: Tensor, weight: Tensor, lat: Lattice, groups: int, kind: str) -> Tensor:
    """The input gradient of a small strided problem: every target's messages back to its sources (one GEMM)
    added into the sources by the forward's slot index (the zero row takes what falls outside the grid)."""
    gather = lat.forward
    m, s = gather.num_rows, gather.num_slots
    c_out = weight.size(0)
    c_in = weight.size(1) * groups
    if kind == "depthwise":
        w = _weights(weight, groups, kind, gather.taps, False)  # [S, C]
        messages = (g.view(m, 1, c_out) * w).view(m * s, c_in)
        index = recipe(gather, g).index
    elif kind == "dense":
        w = _weights(weight, groups, kind, gather.taps, False)[0]  # [C_out, S*C_in]
        messages = torch.mm(g, w).view(m * s, c_in)
        index = _small_index(gather, c_in, 1, g.device)
    else:
        w = _weights(weight, groups, kind, gather.taps, False)  # [G, b, S*a]
        b = c_out // groups
        messages = torch.bmm(g.view(m, groups, b).transpose(0, 1), w).view(groups * m * s, c_in // groups)
        index = _small_index(gather, c_in, groups, g.device)
    width = c_in // groups if kind == "grouped" else c_in
    rows = (gather.num_src + 1) * (groups if kind == "grouped" else 1)
    grad = g.new_zeros(rows, width).index_add_(0, index, messages)
    return grad.view(gather.num_src + 1, c_in)[:gather.num_src]


def weight_grad(x: Tensor, g: Tensor, lat: Lattice, groups: int, weight_shape: list[int]) -> Tensor:
    """``G(x, g)``, shaped like the weight ``(C_out, C_in/G, *kernel)``."""
    c_out, c_in_g = weight_shape[0], weight_shape[1]
    num_taps = lat.num_taps
    kind = _kind(groups, c_in_g, c_out // groups)
    gather = lat.forward
    if lat.num_out == 0:
        return x.new_zeros(weight_shape)
    src = _pad_remapped(lat, x) if lat.remapped else x
    m, c = gather.num_rows, src.size(-1)
    if kind == "depthwise":
        if len(gather.src_size) == 2 and compiled.available(src, g):
            grad = compiled.depthwise_weight_grad2d(src, gather, g)  # [T, C]
        else:
            rec = recipe(gather, src)
            if rec.index is not None:
                grad = (_gathered(gather, rec, src).view(m, num_taps, c) * g.view(m, 1, c)).sum(0)
            else:
                view = _view(gather, src)
                gg = _grid(g, lat.num_images, gather.out_size)
                dims = tuple(range(lat.ndim + 1))
                grad = torch.stack([(_slot(view, gather, k) * gg).sum(dims) for k in range(num_taps)])
        return grad.t().reshape(weight_shape).contiguous()
    if kind == "dense" and gather.identity:
        return (g.t() @ src).reshape(weight_shape)  # [C_out, C_in]
    grouped = kind == "grouped"
    rec = recipe(gather, src, groups if grouped else 1)
    if kind == "dense":
        if rec.index is not None:
            acc = g.t() @ _gathered(gather, rec, src)
        else:
            view = _view(gather, src)
            buf = workspace(max(b - a for a, b in rec.blocks) * num_taps * c, src, "cols")
            acc = x.new_zeros(c_out, num_taps * c)
            for start, stop in rec.blocks:
                cols = _rows(gather, view, start, stop, buf[:(stop - start) * num_taps * c].view(stop - start, -1),
                             False)
                acc.addmm_(g[start:stop].t(), cols)
        # acc[o, (t, i)] -> weight (o, i, *kernel)
        return acc.view(c_out, num_taps, c).transpose(1, 2).reshape(weight_shape).contiguous()
    a, b = c // groups, c_out // groups
    gt = g.view(m, groups, b).permute(1, 2, 0)  # [G, b, m]
    if rec.index is not None:
        acc = torch.bmm(gt, _gathered(gather, rec, src))
    else:
        fast = len(gather.src_size) == 2 and compiled.available(src)
        view = None if fast else _view(gather, src, groups)
        buf = workspace(max(e - s for s, e in rec.blocks) * num_taps * c, src, "cols")
        acc = x.new_zeros(groups, b, num_taps * a)
        for start, stop in rec.blocks:
            n = stop - start
            cols = buf[:n * num_taps * c].view(groups, n, -1)
            if fast:
                compiled.gather2d_grouped(src, gather, groups, start, stop, cols)
            else:
                _rows(gather, view, start, stop, cols, True)
            acc.baddbmm_(gt[:, :, start:stop], cols)
    # acc[G, o, (t, i)] -> weight (G*o, i, *kernel)
    return acc.view(groups, b, num_taps, a).permute(0, 1, 3, 2).reshape(weight_shape).contiguous()

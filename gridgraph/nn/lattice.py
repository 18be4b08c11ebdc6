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
from typing import Iterator, Optional

import torch
from torch import Tensor

from ..geometry import ConvGeometry
from ..structure import REGISTRY, _remap
from . import compiled

__all__ = ["Lattice", "lattice", "forward", "input_grad", "weight_grad", "BLOCK_BYTES", "DEVICE_BLOCK_BYTES"]

#: Bytes of gathered rows per block on the CPU: a block's gather and GEMM stay in the caches.
BLOCK_BYTES = 6 << 20
#: Bytes of gathered rows per block on an accelerator (few large blocks: launches cost more there).
DEVICE_BLOCK_BYTES = 512 << 20


class Gather:
    """A gather from a source grid: ``cols[(b, o), (k, c)] = src[b, A * o + E[k], c]`` (per axis), zero where
    that lies outside the source grid. ``offsets[a]`` ascend in equal steps (an arithmetic progression);
    ``taps`` are the kernel taps (flat, row-major) in the order of the gathered slots."""

    __slots__ = ("src_size", "out_size", "anchor", "offsets", "taps", "num_slots", "identity", "pad_lo", "pad_hi",
                 "steps", "inside", "np_offsets")

    def __init__(self, src_size: tuple[int, ...], out_size: tuple[int, ...], anchor: tuple[int, ...],
                 offsets: tuple[tuple[int, ...], ...], taps: tuple[int, ...]) -> None:
        self.src_size, self.out_size, self.anchor, self.offsets, self.taps = src_size, out_size, anchor, offsets, taps
        self.num_slots = len(taps)
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
        self.forward = Gather(self.src_size, self.out_size, tuple(stride), offsets, tuple(range(self.num_taps)))
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
                                                     tuple(c[2] for c in combo), taps)))
        return phases

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
    return REGISTRY.get(key, lambda: (Lattice(geometry, tuple(in_size), num_images, out_size), ()))


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


# ------------------------------------------------------------------------------------ gathers
def _block_rows(gather: Gather, channels: int, element_size: int, device: torch.device) -> int:
    """Target rows per block: the block's gathered rows fill about :data:`BLOCK_BYTES`."""
    budget = BLOCK_BYTES if device.type == "cpu" else DEVICE_BLOCK_BYTES
    return max(1, budget // max(1, gather.num_slots * channels * element_size))


class _Source:
    """A source grid ready to be gathered from: zero-padded once for the torch gather (or the raw rows for a
    compiled one), with the strided view of every slot."""

    def __init__(self, gather: Gather, src: Tensor, num_images: int, allow_compiled: bool = True) -> None:
        self.gather, self.num_images, self.channels = gather, num_images, src.size(-1)
        self.compiled = allow_compiled and len(gather.src_size) == 2 and compiled.available(src)
        self.src = src
        if self.compiled:
            return
        grid = _grid(src, num_images, gather.src_size)
        if not gather.inside:
            pads = []
            for lo, hi in zip(reversed(gather.pad_lo), reversed(gather.pad_hi)):
                pads += [lo, hi]
            grid = torch.nn.functional.pad(grid, [0, 0] + pads)
        strides = grid.stride()
        n = len(gather.out_size)
        base = grid.storage_offset() + sum((e[0] + lo) * st for e, lo, st in
                                           zip(gather.offsets, gather.pad_lo, strides[1:n + 1]))
        shape = (num_images, *gather.out_size, *(len(e) for e in gather.offsets), self.channels)
        view_strides = (strides[0], *(a * st for a, st in zip(gather.anchor, strides[1:n + 1])),
                        *(step * st for step, st in zip(gather.steps, strides[1:n + 1])), strides[-1])
        self.view = grid.as_strided(shape, view_strides, base)  # [B, *out, *slots, C]

    def rows(self, start: int, stop: int, out: Tensor) -> Tensor:
        """Gathered rows ``start:stop`` (flat targets ``b * prod(out) + o``) into ``out`` ``[stop-start, S*C]``."""
        gather = self.gather
        if self.compiled:
            return compiled.gather2d(self.src, self.num_images, gather, start, stop, out)
        per_image = math.prod(gather.out_size)
        b0, b1 = start // per_image, (stop - 1) // per_image
        if b0 == b1:  # inside one image: rows of its first axis
            inner = per_image // gather.out_size[0]
            r0, r1 = (start - b0 * per_image) // inner, (stop - b0 * per_image) // inner
            if (r1 - r0) * inner == stop - start and (start - b0 * per_image) % inner == 0:
                out.view(r1 - r0, *self.view.shape[2:]).copy_(self.view[b0, r0:r1])
                return out
        if start % per_image == 0 and stop % per_image == 0:  # whole images
            out.view(b1 - b0 + 1, *self.view.shape[1:]).copy_(self.view[b0:b1 + 1])
            return out
        raise AssertionError("blocks are whole rows of one image or whole images")


def _blocks(gather: Gather, num_images: int, channels: int, element_size: int,
            device: torch.device) -> list[tuple[int, int]]:
    """Blocks of target rows: whole images, or whole rows of the first axis inside one image."""
    per_image = math.prod(gather.out_size)
    total = num_images * per_image
    if total == 0:
        return []
    rows = _block_rows(gather, channels, element_size, device)
    if rows >= total:
        return [(0, total)]
    if rows >= per_image:
        k = rows // per_image
        return [(b * per_image, min(num_images, b + k) * per_image) for b in range(0, num_images, k)]
    inner = per_image // gather.out_size[0] if gather.out_size[0] else per_image
    step = max(1, rows // max(1, inner)) * inner
    return [(b * per_image + r, b * per_image + min(per_image, r + step))
            for b in range(num_images) for r in range(0, per_image, step)]


# ------------------------------------------------------------------------------------ weights
def _kind(groups: int, c_in_g: int, c_out_g: int) -> str:
    if groups == 1:
        return "dense"
    if c_in_g == 1 and c_out_g == 1:
        return "depthwise"
    return "grouped"


def _slot_weights(weight: Tensor, taps: tuple[int, ...], groups: int, transpose: bool) -> Tensor:
    """The weights of the gathered slots as ``[G, S * a, b]`` (rows: slot-major, then channel): forward
    ``a = C_in/G, b = C_out/G``; with ``transpose`` (input gradient) ``a = C_out/G, b = C_in/G``."""
    c_out, c_in_g = weight.shape[:2]
    k = weight[0, 0].numel()
    w = weight.reshape(groups, c_out // groups, c_in_g, k)  # [G, o, i, T]
    if len(taps) != k or taps != tuple(range(k)):
        w = w[..., list(taps)]
    if transpose:  # [G, S, o, i]
        return w.permute(0, 3, 1, 2).reshape(groups, -1, c_in_g)
    return w.permute(0, 3, 2, 1).reshape(groups, -1, c_out // groups)  # [G, S, i, o]


_ONEDNN = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
#: Use oneDNN's matrix product (the library behind ``nn.Conv2d`` on the CPU) for large float32/bfloat16 blocks.
USE_ONEDNN = True
_ONEDNN_MIN_ROWS = 2048


def _gemm(cols: Tensor, w_kn: Tensor, bias: Optional[Tensor], out: Optional[Tensor]) -> Tensor:
    """``cols @ w_kn (+ bias)``, written into ``out`` when given."""
    if (USE_ONEDNN and _ONEDNN is not None and cols.device.type == "cpu" and cols.dtype in (torch.float32, torch.bfloat16)
            and cols.size(0) >= _ONEDNN_MIN_ROWS and cols.size(1) and w_kn.size(1) and not cols.requires_grad):
        with torch.no_grad():
            res = _ONEDNN(cols, w_kn.t(), bias, "none", [], "")
        if out is None:
            return res
        return out.copy_(res)
    if bias is not None:
        return torch.addmm(bias, cols, w_kn, out=out) if out is not None else torch.addmm(bias, cols, w_kn)
    return torch.mm(cols, w_kn, out=out) if out is not None else cols @ w_kn


# ------------------------------------------------------------------------------------ the three maps
def _apply(gather: Gather, src: Tensor, num_images: int, w: Tensor, kind: str, bias: Optional[Tensor],
           out: Tensor) -> Tensor:
    """``out[(b, o)] = bias + sum_k M_k src[b, A o + E_k]`` with slot weights ``w`` (:func:`_slot_weights`,
    ``[G, S*a, b]``; depthwise ``[S, C]``)."""
    n_rows, c = out.size(0), src.size(-1)
    if n_rows == 0:
        return out
    if kind == "depthwise":
        return _depthwise(gather, src, num_images, w, bias, out)
    groups = w.size(0)
    if gather.identity and kind == "dense":
        return _gemm(src, w[0], bias, out)
    source = _Source(gather, src, num_images)
    blocks = _blocks(gather, num_images, c, src.element_size(), src.device)
    buf = src.new_empty(max(b - a for a, b in blocks) * gather.num_slots * c)
    for start, stop in blocks:
        cols = source.rows(start, stop, buf[:(stop - start) * gather.num_slots * c].view(stop - start, -1))
        if kind == "dense":
            _gemm(cols, w[0], bias, out[start:stop])
            continue
        a = c // groups
        cg = cols.view(stop - start, gather.num_slots, groups, a).permute(2, 0, 1, 3).reshape(groups, stop - start, -1)
        res = torch.bmm(cg, w)  # [G, m, b]
        target = out[start:stop].view(stop - start, groups, -1)
        target.copy_(res.transpose(0, 1))
        if bias is not None:
            out[start:stop] += bias
    return out


def padding_multiplies(dtype: torch.dtype, device: torch.device, kind: str) -> bool:
    """Whether torch's convolution multiplies the weights by its zero padding (so that an infinite weight
    gives NaN at the border) for this dtype, device and kind of layer, or leaves those taps out. On the CPU
    its oneDNN depthwise kernels (float32, bfloat16) leave them out; its other kernels multiply."""
    return not (kind == "depthwise" and device.type == "cpu" and dtype in (torch.float32, torch.bfloat16,
                                                                          torch.float16))


def _depthwise(gather: Gather, src: Tensor, num_images: int, w: Tensor, bias: Optional[Tensor],
               out: Tensor) -> Tensor:
    """``out[(b, o), c] = bias[c] + sum_k w[k, c] src[b, A o + E_k, c]``. An absent slot (zero padding)
    adds what torch's depthwise convolution adds there: nothing, or ``0 * w`` (:func:`padding_multiplies`)."""
    skip = gather.inside or not padding_multiplies(src.dtype, src.device, "depthwise") or _finite(w)
    if skip and len(gather.src_size) == 2 and compiled.available(src, w):
        return compiled.depthwise2d(src, num_images, gather, w, bias, out)
    view = _Source(gather, src, num_images, allow_compiled=False).view  # [B, *out, *slots, C]
    target = out.view(num_images, *gather.out_size, out.size(-1))
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


def _weights_for(weight: Tensor, groups: int, kind: str, taps: tuple[int, ...], transpose: bool) -> Tensor:
    if kind == "depthwise":
        w = weight.reshape(weight.size(0), -1)  # [C, T]
        return w[:, list(taps)].t().contiguous() if taps != tuple(range(w.size(1))) else w.t().contiguous()
    return _slot_weights(weight, taps, groups, transpose).contiguous()


def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lat: Lattice, groups: int) -> Tensor:
    """``F(x, W) + b``: ``[num_out, C_out]`` from node features ``x`` ``[num_in, C_in]`` (contiguous)."""
    c_out, c_in_g = weight.shape[:2]
    kind = _kind(groups, c_in_g, c_out // groups)
    src = _pad_remapped(lat, x) if lat.remapped else x
    w = _weights_for(weight, groups, kind, lat.forward.taps, transpose=False)
    if kind == "dense" and lat.forward.identity and lat.num_out:
        return _gemm(src, w[0], bias, None)  # a 1x1 convolution: one GEMM, its result is the output
    out = x.new_empty(lat.num_out, c_out)
    return _apply(lat.forward, src, lat.num_images, w, kind, bias, out)


def input_grad(g: Tensor, weight: Tensor, lat: Lattice, groups: int) -> Tensor:
    """``Ft(g, W)``: ``[num_in, C_in]`` from the output gradient ``g`` ``[num_out, C_out]`` (contiguous)."""
    c_out, c_in_g = weight.shape[:2]
    c_in = c_in_g * groups
    kind = _kind(groups, c_in_g, c_out // groups)
    num_src = lat.num_images * math.prod(lat.src_size)
    if len(lat.phases) == 1 and lat.phases[0].gather is not None:  # stride 1: one phase covers every source
        gather = lat.phases[0].gather
        w = _weights_for(weight, groups, kind, gather.taps, transpose=True)
        if kind == "dense" and gather.identity and num_src:
            grad = _gemm(g, w[0], None, None)
        else:
            grad = _apply(gather, g, lat.num_images, w, kind, None, g.new_empty(num_src, c_in))
    else:
        grad = g.new_zeros(num_src, c_in)
        grid = _grid(grad, lat.num_images, lat.src_size)
        for phase in lat.phases:
            if phase.gather is None or not math.prod(phase.count):
                continue
            w = _weights_for(weight, groups, kind, phase.gather.taps, transpose=True)
            part = _apply(phase.gather, g, lat.num_images, w, kind, None,
                          g.new_empty(lat.num_images * math.prod(phase.count), c_in))
            index = (slice(None),) + tuple(slice(st, None, s) for st, s in zip(phase.start, lat.geometry.stride))
            grid[index] = _grid(part, lat.num_images, phase.count)
    return _fold_remapped(lat, grad) if lat.remapped else grad


def weight_grad(x: Tensor, g: Tensor, lat: Lattice, groups: int, weight_shape: list[int]) -> Tensor:
    """``G(x, g)``, shaped like the weight ``(C_out, C_in/G, *kernel)``."""
    c_out, c_in_g = weight_shape[0], weight_shape[1]
    num_taps = lat.num_taps
    kind = _kind(groups, c_in_g, c_out // groups)
    gather = lat.forward
    if lat.num_out == 0:
        return x.new_zeros(weight_shape)
    src = _pad_remapped(lat, x) if lat.remapped else x
    if kind == "depthwise":
        if len(gather.src_size) == 2 and compiled.available(src, g):
            grad = compiled.depthwise_weight_grad2d(src, lat.num_images, gather, g)  # [T, C]
        else:
            view = _Source(gather, src, lat.num_images, allow_compiled=False).view
            gg = _grid(g, lat.num_images, gather.out_size)
            dims = tuple(range(lat.ndim + 1))
            grad = torch.stack([(_slot(view, gather, k) * gg).sum(dims) for k in range(num_taps)])
        return grad.t().reshape(weight_shape).contiguous()
    c = src.size(-1)
    if kind == "dense" and gather.identity:
        acc = g.t() @ src  # [C_out, C_in]
        return acc.reshape(weight_shape)
    source = _Source(gather, src, lat.num_images)
    blocks = _blocks(gather, lat.num_images, c, src.element_size(), src.device)
    buf = src.new_empty(max(b - a for a, b in blocks) * gather.num_slots * c)
    if kind == "dense":
        acc = x.new_zeros(c_out, num_taps * c)
        for start, stop in blocks:
            cols = source.rows(start, stop, buf[:(stop - start) * num_taps * c].view(stop - start, -1))
            acc.addmm_(g[start:stop].t(), cols)
        # acc[o, (t, i)] -> weight (o, i, *kernel)
        return acc.view(c_out, num_taps, c).transpose(1, 2).reshape(weight_shape).contiguous()
    a, b = c // groups, c_out // groups
    acc = x.new_zeros(groups, b, num_taps * a)
    for start, stop in blocks:
        m = stop - start
        cols = source.rows(start, stop, buf[:m * num_taps * c].view(m, -1))
        cg = cols.view(m, num_taps, groups, a).permute(2, 0, 1, 3).reshape(groups, m, -1)
        acc.baddbmm_(g[start:stop].view(m, groups, b).transpose(0, 1).transpose(1, 2), cg)
    # acc[G, o, (t, i)] -> weight (G*o, i, *kernel)
    return acc.view(groups, b, num_taps, a).permute(0, 1, 3, 2).reshape(weight_shape).contiguous()

"""The structure of pixel graphs: neighbour tables, the description a graph carries, and the one cache.

A pixel graph is the edge list of a convolution's taps. Its *structure* is what determines those edges
without reading them: the geometry, the grid size and the number of images (a masked domain adds which
pixels are active). This module holds that structure in three forms, from the bottom up:

* **tables**: a :class:`NeighbourTable` is the edge list of one image as a fixed-slot table,
  ``index[i, t]`` = the source that tap ``t`` of target ``i`` reads (``-1``: no edge); built vectorised
  from a :class:`~gridgraph.geometry.ConvGeometry` (:func:`neighbour_table`) or a
  :class:`~gridgraph.geometry.TransposedGeometry` (the reversed edges of the strided convolution). A
  :class:`SparseTable` is the same for the active pixels of a mask (:func:`sparse_table`).
* **descriptions**: a :class:`GraphPart` describes one pixel graph (kind, geometry, grid size, number of
  images, node and edge counts) and a :class:`PixelStructure` a graph made of parts, as a batch of pixel
  graphs is. They are immutable, hashable and hold no tensors, so they travel with a graph through
  ``clone``, ``.to(device)``, ``torch.save`` and PyG batching, and under ``torch.compile`` they are
  constants. A grid part has a canonical string :attr:`GraphPart.key`: the form in which the registered
  torch operators (:mod:`gridgraph.nn.ops`) receive it.
* **the registry**: every cached object (tables, per-image edge templates, the kernels' index plans)
  lives in one LRU cache, :data:`REGISTRY`, bounded by the bytes of the tensors each entry actually holds
  and emptied by :func:`clear_cache`. Nothing in it is ever handed to a user without a copy, so no edit of
  a graph's tensors can change another graph or a cached table.
"""
from __future__ import annotations

import math
import threading
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor

from .geometry import ConvGeometry, TransposedGeometry

__all__ = ["NeighbourTable", "SparseTable", "GraphPart", "PixelStructure", "Registry", "REGISTRY", "clear_cache",
           "cache_info", "neighbour_table", "transposed_table", "sparse_table", "cached_table", "edge_template",
           "parse_key", "DENSE_MAP_LIMIT", "table_edges"]


# ------------------------------------------------------------------------------------ the registry
def tensor_bytes(tensors: Iterable[Optional[Tensor]]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage are counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


class Registry:
    """The one cache of gridgraph: an LRU of built structure, bounded by the bytes its entries hold.

    ``get(key, build)`` returns the cached value of ``key`` or calls ``build()``, which returns
    ``(value, tensors)``: the entry is charged the bytes of the distinct storages of ``tensors``
    (everything the value holds). At most ``max_entries`` entries and ``max_bytes`` bytes are kept;
    the least recently used go first, but the newest entry always stays. ``get_for(tensor, tag, build)``
    keys an entry by a tensor's identity: it is rebuilt if the tensor was modified in place, and dropped
    when the tensor is freed. Thread-safe.

    When the bound is below one call's working set (a huge image), each call would evict what the last one
    built and rebuild it: the first such eviction warns (once per process), naming
    :func:`set_cache_limit`.
    """

    def __init__(self, max_bytes: int = 2 << 30, max_entries: int = 512) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._items: OrderedDict[Any, tuple[Any, int, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()
        self._puts = 0  # entries built so far; each entry remembers its number
        self._warned = False
        #: Bumped by :meth:`clear`: caches above this one (the image layers' call plans) compare it to know
        #: that they must forget what they derived from the old entries.
        self.generation = 0

    def get(self, key: Any, build: Callable[[], tuple[Any, Iterable[Optional[Tensor]]]]) -> Any:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
                return item[0]
        value, tensors = build()
        self.put(key, value, tensor_bytes(tensors))
        return value

    def put(self, key: Any, value: Any, nbytes: int) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._puts += 1
            self._items[key] = (value, nbytes, self._puts)
            self._bytes += nbytes
            self._evict(warn=True)

    def recharge(self, key: Any, value: Any, nbytes: int) -> None:
        """Charge the entry ``key`` ``nbytes`` from now on: for a value that builds parts of itself on first
        use (an edge plan's per-tap pairs, reverse table, blocks), so that the bound counts what it holds.
        Nothing happens when ``key`` no longer holds ``value``."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return
            held = item[0]
            if held is not value and not (isinstance(held, tuple) and held and held[-1] is value):
                return
            self._items[key] = (held, nbytes, item[2])
            self._bytes += nbytes - item[1]
            self._evict(warn=True)

    def _evict(self, warn: bool) -> None:
        """Drop the least recently used entries until the bounds hold (the newest always stays)."""
        while len(self._items) > 1 and (len(self._items) > self.max_entries or self._bytes > self.max_bytes):
            _, (_, evicted, built) = self._items.popitem(last=False)
            self._bytes -= evicted
            if warn and self._puts - built < THRASH_WINDOW and not self._warned:
                self._warned = True
                warnings.warn(
                    f"gridgraph's structure cache evicted one of the {THRASH_WINDOW} entries built last: its "
                    f"bound ({_mib(self.max_bytes)}, {self.max_entries} entries) is below what one call uses "
                    f"({_mib(self._bytes + evicted)} or more), so every call rebuilds its tables. "
                    f"Raise it with gridgraph.set_cache_limit(max_bytes=...).", ResourceWarning, stacklevel=4)

    @staticmethod
    def key_for(tensor: Tensor, tag: str) -> Any:
        """The key of :meth:`get_for`'s entry ``(tag, tensor)``."""
        return tag, id(tensor)

    def get_for(self, tensor: Tensor, tag: str, build: Callable[[], tuple[Any, Iterable[Optional[Tensor]]]],
                *others: Tensor) -> Any:
        """The entry of ``(tag, tensor)``; valid while ``tensor`` and ``others`` keep their identity and version."""
        if any(t.is_inference() for t in (tensor, *others)):  # no version counter: nothing to key a plan on
            return build()[0]
        key = self.key_for(tensor, tag)
        stamp = tuple((id(t), t._version) for t in (tensor, *others))
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                ref, seen, value = item[0]
                if ref() is tensor and seen == stamp:
                    self._items.move_to_end(key)
                    return value
        value, tensors = build()
        fresh = key not in self._items
        self.put(key, (weakref.ref(tensor), stamp, value), tensor_bytes(tensors))
        if fresh:
            weakref.finalize(tensor, self._forget, key, weakref.ref(tensor))
        return value

    def _forget(self, key: Any, ref: Any) -> None:
        with self._lock:
            item = self._items.get(key)
            if item is not None and item[0][0] is not None and item[0][0]() is None:
                self._bytes -= self._items.pop(key)[1]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0
            self._warned = False
            self.generation += 1

    @property
    def nbytes(self) -> int:
        """Bytes held by all entries."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return (f"Registry({len(self)} entries, {self._bytes / 2 ** 20:.1f} MiB of "
                f"{self.max_bytes / 2 ** 20:.0f} MiB, at most {self.max_entries} entries)")


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes < 2**30 else f"{nbytes / 2**30:.2f} GiB"


#: An eviction of one of the last this-many entries built means the cache thrashes (see :class:`Registry`).
THRASH_WINDOW = 4

#: The one cache of gridgraph (tables, edge templates, the kernels' index plans).
REGISTRY = Registry()


def set_cache_limit(max_bytes: Optional[int] = None, max_entries: Optional[int] = None) -> dict:
    """Bound the cache: at most ``max_bytes`` bytes (default 2 GiB) and ``max_entries`` entries (default
    512); ``None`` leaves a bound as it is. Lowering a bound evicts at once. Returns the previous bounds
    (``{'max_bytes', 'max_entries'}``), so a caller can restore them.

    One 4096 x 4096 image's structure for a 3x3 convolution (its table and the forward and backward index
    plans) takes about 3.4 GiB: raise the bound for images that large, or every call rebuilds it (the
    cache warns when that happens; measured: 29 s a forward+backward at C=8 instead of 3 s).

    Example:
        >>> old = set_cache_limit(max_bytes=4 << 30)
        >>> cache_info()['max_bytes'] == 4 << 30
        True
        >>> _ = set_cache_limit(**old)
    """
    for name, value in (("max_bytes", max_bytes), ("max_entries", max_entries)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"set_cache_limit: {name} must be a positive int, got {value!r}")
    with REGISTRY._lock:
        old = {"max_bytes": REGISTRY.max_bytes, "max_entries": REGISTRY.max_entries}
        if max_bytes is not None:
            REGISTRY.max_bytes = max_bytes
        if max_entries is not None:
            REGISTRY.max_entries = max_entries
        REGISTRY._evict(warn=False)  # the user asked for it: no thrash warning
    return old


def clear_cache() -> None:
    """Forget every cached table, edge template and index plan (they are rebuilt on demand).

    Example:
        >>> _ = image_to_graph(torch.randn(1, 3, 8, 8), kernel_size=3)
        >>> clear_cache()
        >>> cache_info()["entries"]
        0
    """
    REGISTRY.clear()


def cache_info() -> dict:
    """``{'entries', 'bytes', 'max_bytes', 'max_entries'}`` of the cache (``gridgraph.structure.REGISTRY``).

    Example:
        >>> clear_cache(); cache_info()['entries']
        0
    """
    return {"entries": len(REGISTRY), "bytes": REGISTRY.nbytes, "max_bytes": REGISTRY.max_bytes,
            "max_entries": REGISTRY.max_entries}


def _device(device: Any) -> torch.device:
    device = torch.device(device if device is not None else "cpu")
    if device.type not in ("cpu", "meta") and device.index is None:
        device = torch.device(device.type, torch.empty(0, device=device).device.index)
    return device


# ----------------------------------------------------------------------------------------- tables
class _SlotIndex:
    """What a table of slots ``index [N_out, T]`` (``-1``: no edge) says by its shape and device."""

    @property
    def num_taps(self) -> int:
        return self.index.size(1)

    @property
    def device(self) -> torch.device:
        return self.index.device


@dataclass(frozen=True, eq=False)
class NeighbourTable(_SlotIndex):
    """The pixel graph of one image as a fixed-slot table: ``index[i, t]`` is the source pixel that
    the tap ``t`` of target pixel ``i`` reads, or ``-1`` where that edge is absent (zero padding).

    It is the edge list of a grid graph in another layout: at most one edge per (target, tap).
    Node ids are per image; a batch of ``B`` images repeats the table with offsets. ``geometry`` is the
    convolution whose taps the table holds (for a transposed convolution: the strided convolution whose
    edges it reverses).

    Example:
        >>> table = neighbour_table(ConvGeometry.from_keywords(2, kernel_size=3, padding=1), (3, 3))
        >>> type(table).__name__, tuple(table.index.shape), table.index[4].tolist()   # the centre pixel's 9 sources
        ('NeighbourTable', (9, 9), [0, 1, 2, 3, 4, 5, 6, 7, 8])
    """

    index: Tensor  # [num_dst, num_taps] long, -1 = no edge
    geometry: ConvGeometry
    in_size: tuple[int, ...]
    out_size: tuple[int, ...]
    complete: bool  # True when no entry is -1 (every target receives num_taps messages)

    @property
    def num_src(self) -> int:
        return math.prod(self.in_size)

    @property
    def num_dst(self) -> int:
        return math.prod(self.out_size)


    def copy(self) -> "NeighbourTable":
        """An independent copy (the index cloned)."""
        return replace(self, index=self.index.clone())


def _axis_sources(n_in: int, n_out: int, k: int, s: int, d: int, pad: int, mode: str,
                  device: torch.device) -> tuple[Tensor, Tensor]:
    """Source coordinate ``[n_out, k]`` along one axis, and whether the edge exists."""
    pos = (torch.arange(n_out, device=device) * s)[:, None] + (torch.arange(k, device=device) * d - pad)[None, :]
    src, ok = _remap(pos, n_in, mode)
    return src, ok


def _remap(pos: Tensor, n: int, mode: str) -> tuple[Tensor, Tensor]:
    """Nominal coordinates along one axis -> (the input pixel they read, whether that edge exists)."""
    inside = (pos >= 0) & (pos < n)
    if mode == "zeros":
        return pos.clamp(0, n - 1), inside
    if mode == "replicate":
        src = pos.clamp(0, n - 1)
    elif mode == "circular":
        src = torch.remainder(pos, n)
    else:  # reflect (the geometry validates the mode)
        src = torch.where(pos < 0, -pos, pos)
        src = torch.where(src >= n, 2 * (n - 1) - src, src)
    return src, torch.ones_like(inside)


def _build_table(geometry: ConvGeometry, in_size: tuple[int, ...], device: torch.device) -> NeighbourTable:
    """The table of one image, written by broadcasting the per-axis sources (``O(N_out * T)``)."""
    out_size = geometry.output_size(in_size)
    n = geometry.ndim
    strides = [math.prod(in_size[a + 1:]) for a in range(n)]
    index = torch.zeros((), dtype=torch.long, device=device)
    valid = torch.ones((), dtype=torch.bool, device=device)
    for a in range(n):
        src, ok = _axis_sources(in_size[a], out_size[a], geometry.kernel_size[a], geometry.stride[a],
                                geometry.dilation[a], geometry.padding[a][0], geometry.padding_mode, device)
        shape = [1] * (2 * n)
        shape[a], shape[n + a] = out_size[a], geometry.kernel_size[a]
        index = index + (src * strides[a]).view(shape)
        valid = valid & ok.view(shape)
    full = (*out_size, *geometry.kernel_size)
    index = torch.where(valid, index, -1).expand(full).reshape(math.prod(out_size), geometry.num_taps)
    complete = bool(valid.all()) if device.type != "meta" else False
    return NeighbourTable(index.contiguous(), geometry, tuple(in_size), tuple(out_size), complete)


def _build_transposed_table(geometry: TransposedGeometry, in_size: tuple[int, ...],
                            device: torch.device) -> NeighbourTable:
    """``index[q, t]`` = the input pixel ``i`` whose tap ``t`` reaches output pixel ``q = i*s + t*d - p``."""
    out_size = geometry.output_size(in_size)
    conv, n = geometry.conv, geometry.ndim
    fwd = torch.zeros((), dtype=torch.long, device=device)
    valid = torch.ones((), dtype=torch.bool, device=device)
    out_strides = [math.prod(out_size[a + 1:]) for a in range(n)]
    for a in range(n):
        q = (torch.arange(in_size[a], device=device) * conv.stride[a])[:, None] + \
            (torch.arange(conv.kernel_size[a], device=device) * conv.dilation[a] - conv.padding[a][0])[None, :]
        shape = [1] * (2 * n)
        shape[a], shape[n + a] = in_size[a], conv.kernel_size[a]
        fwd = fwd + (q.clamp(0, out_size[a] - 1) * out_strides[a]).view(shape)
        valid = valid & ((q >= 0) & (q < out_size[a])).view(shape)
    num_src, num_taps = math.prod(in_size), conv.num_taps
    fwd = fwd.expand(*in_size, *conv.kernel_size).reshape(num_src, num_taps)
    valid = valid.expand(*in_size, *conv.kernel_size).reshape(num_src, num_taps)
    src, tap = valid.nonzero(as_tuple=True)  # for a fixed tap, i -> q is one-to-one: one source per slot
    index = torch.full((math.prod(out_size), num_taps), -1, dtype=torch.long, device=device)
    index[fwd[src, tap], tap] = src
    return NeighbourTable(index, conv, tuple(in_size), tuple(out_size), bool((index >= 0).all()))


Geometry = Union[ConvGeometry, TransposedGeometry]


def cached_table(geometry: Geometry, in_size: Sequence[int], device: Any = None) -> NeighbourTable:
    """The cached table of one image (internal: the library never hands it out without a copy)."""
    in_size = tuple(int(n) for n in in_size)
    device = _device(device)

    def build():
        geometry.output_size(in_size)  # validates before caching anything
        if isinstance(geometry, TransposedGeometry):
            table = _build_transposed_table(geometry, in_size, device)
        else:
            table = _build_table(geometry, in_size, device)
        return table, (table.index,)

    return REGISTRY.get(("table", geometry, in_size, device), build)


def neighbour_table(geometry: Geometry, in_size: Sequence[int], device: Any = None) -> NeighbourTable:
    """The :class:`NeighbourTable` of one image of spatial size ``in_size`` (a copy of the cached one).

    Example:
        >>> g = ConvGeometry.from_keywords(2, kernel_size=3, padding=1)
        >>> neighbour_table(g, (2, 2)).index.tolist()
        [[-1, -1, -1, -1, 0, 1, -1, 2, 3], [-1, -1, -1, 0, 1, -1, 2, 3, -1], [-1, 0, 1, -1, 2, 3, -1, -1, -1], [0, 1, -1, 2, 3, -1, -1, -1, -1]]
    """
    return cached_table(geometry, in_size, device).copy()


def transposed_table(geometry: TransposedGeometry, in_size: Sequence[int], device: Any = None) -> NeighbourTable:
    """The target-major table of a transposed convolution's graph on one image (a copy of the cached one).

    ``index[q, t]`` is the input pixel ``i`` whose tap ``t`` reaches the output pixel ``q``
    (``q = i*s + t*d - p`` per dimension), or ``-1``: the strided convolution's table reversed (for a
    fixed tap, ``i -> q`` is one-to-one, so every (target, tap) slot holds at most one source).

    Example:
        >>> t = TransposedGeometry.from_keywords(1, kernel_size=3, stride=2, padding=1)
        >>> transposed_table(t, (3,)).index.tolist()  # 3 inputs -> 5 outputs
        [[-1, 0, -1], [1, -1, 0], [-1, 1, -1], [2, -1, 1], [-1, 2, -1]]
    """
    if not isinstance(geometry, TransposedGeometry):
        raise TypeError(f"geometry must be a TransposedGeometry (got {type(geometry).__name__})")
    return neighbour_table(geometry, in_size, device)


def edge_template(geometry: Geometry, in_size: Sequence[int], device: Any = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(src, dst, tap)`` of one image's edges, target-major and taps ascending (cached; never hand it out)."""
    table = cached_table(geometry, in_size, device)

    def build():
        dst, tap = (table.index >= 0).nonzero(as_tuple=True)
        src = table.index[dst, tap]
        return (src, dst, tap), (src, dst, tap)

    return REGISTRY.get(("edges", geometry, table.in_size, table.device), build)


# ---------------------------------------------------------------------------- masked and sparse
#: Masked construction uses dense id / occupancy maps of the (padded) grid when the grid holds at most this
#: many pixels, or at most 16 per active pixel; otherwise only the active sites' coordinates (sorting and
#: binary search), so a huge, nearly empty grid never costs memory of its size.
DENSE_MAP_LIMIT = 1 << 22
_DENSE_PER_SITE = 16
#: Up to this many table slots the dense-map lookup gathers every tap at once (a [K, N] int64 temporary
#: of 2 MiB at most); above it, tap by tap.
_ONE_GATHER_SLOTS = 1 << 18


@dataclass(frozen=True, eq=False)
class SparseTable(_SlotIndex):
    """The neighbour table of a masked or sparse pixel graph: one table for all images' active sites.

    ``index[i, t]`` is the active source node that tap ``t`` of active target node ``i`` reads, or
    ``-1`` (an inactive pixel, or zero padding). Its size scales with the active pixels, never with
    ``H x W``; ``in_size``/``out_size`` are the node counts.

    Example:
        >>> g = image_to_graph(torch.randn(1, 1, 3, 3), kernel_size=3, mask=torch.eye(3, dtype=torch.bool))
        >>> table = g.table                                  # per active output pixel, its source per tap (or -1)
        >>> type(table).__name__, tuple(table.index.shape)
        ('SparseTable', (3, 9))
    """

    index: Tensor  # [num_dst, num_taps] long (or int32 when asked), -1 = no edge
    geometry: ConvGeometry
    num_src: int
    num_dst: int
    complete: bool

    @property
    def in_size(self) -> tuple[int]:
        return (self.num_src,)

    @property
    def out_size(self) -> tuple[int]:
        return (self.num_dst,)



def unravel(keys: Tensor, size: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Flat keys ``b*prod(size) + row-major(coords)`` -> ``(b [N], coords [N, ndim])``."""
    coords = []
    rest = keys
    for n in reversed(size):
        coords.append(rest % n)
        rest = rest // n
    return rest, torch.stack(coords[::-1], dim=1) if coords else keys.new_zeros(keys.numel(), 0)


def ravel(b: Tensor, coords: Tensor, size: Sequence[int]) -> Tensor:
    """``(b, coords)`` -> flat keys ``b*prod(size) + row-major(coords)``."""
    key = b
    for a, n in enumerate(size):
        key = key * n + coords[..., a]
    return key


def active_outputs(in_keys: Tensor, geometry: ConvGeometry, in_size: tuple[int, ...], out_size: tuple[int, ...],
                   num_images: int) -> Tensor:
    """Sorted flat keys of the output pixels whose window holds an active input pixel."""
    device = in_keys.device
    padded = tuple(n + lo + hi for n, (lo, hi) in zip(in_size, geometry.padding))
    num_out = num_images * math.prod(out_size)
    if geometry.padding_mode == "zeros" and \
            num_images * math.prod(padded) <= max(DENSE_MAP_LIMIT, _DENSE_PER_SITE * in_keys.numel()):
        # The grid is not much larger than the active set: scan every output anchor of an occupancy map
        # of the zero-padded grid, one shift per tap (O(B*H*W), cheaper than sorting N*K candidates).
        occupied = torch.zeros(num_images * math.prod(padded), dtype=torch.bool, device=device)
        b_in, c_in = unravel(in_keys, in_size)
        lo = torch.tensor([p for p, _ in geometry.padding], device=device)
        occupied[ravel(b_in, c_in + lo, padded)] = True
        b_out, o = unravel(torch.arange(num_out, device=device), out_size)
        anchor = ravel(b_out, o * torch.tensor(geometry.stride, device=device), padded)
        shifts = ravel(torch.zeros(geometry.num_taps, dtype=torch.long, device=device),
                       geometry.offsets().to(device) + lo, padded).tolist()
        active = torch.zeros(num_out, dtype=torch.bool, device=device)
        for shift in shifts:
            active |= occupied[anchor + shift]
        return active.nonzero().squeeze(1)
    if geometry.padding_mode == "zeros":
        # Invert the taps: output o reads input o*s + offset_t, so input c is read by o = (c - offset_t)/s.
        b, coords = unravel(in_keys, in_size)
        offsets = geometry.offsets().to(device)
        stride = torch.tensor(geometry.stride, device=device)
        nominal = coords[:, None, :] - offsets[None, :, :]  # [N, K, ndim]
        ok = (nominal % stride == 0).all(-1) & (nominal >= 0).all(-1)
        o = torch.div(nominal, stride, rounding_mode="floor")
        ok &= (o < torch.tensor(out_size, device=device)).all(-1)
        keys = ravel(b[:, None].expand_as(ok), o, out_size)[ok]
        return torch.unique(keys)  # sorted
    # Other padding modes: an output may read an active pixel through its padding (reflected, clamped,
    # wrapped), so scan the dense table of the output grid once (construction only).
    table = cached_table(geometry, in_size, device)
    mask = torch.zeros(num_images * table.num_src + 1, dtype=torch.bool, device=device)
    mask[in_keys] = True  # the last entry stays False: absent edges read it
    index = torch.where(table.index >= 0, table.index, num_images * table.num_src)
    offs = (torch.arange(num_images, device=device) * table.num_src).view(-1, 1, 1)
    index = torch.where(index[None] < table.num_src, index[None] + offs, num_images * table.num_src)
    active = mask[index].any(-1).reshape(-1)
    return active.nonzero().squeeze(1)


def sparse_table(in_keys: Tensor, out_keys: Tensor, geometry: ConvGeometry, in_size: tuple[int, ...],
                 out_size: tuple[int, ...], num_images: int, dtype: torch.dtype = torch.long,
                 out_coords: Optional[tuple[Tensor, Tensor]] = None) -> SparseTable:
    """For every active output site and tap, the active input node it reads: ``O(N_out * K)`` memory,
    through a dense id map of the (zero-padded) grid when it is small next to the active set, else by
    binary search in the sorted input keys (``O(N_out * K * log N_in)`` time).

    ``dtype``: of the index (``torch.int32`` halves its memory; it must hold ``num_src``). ``out_coords``:
    ``unravel(out_keys, out_size)`` when the caller has it already. With the dense map the table is
    written tap-major, so ``index`` is then the transposed view of a ``[K, N_out]`` buffer (``index.t()``
    is contiguous); call ``.contiguous()`` for row-major memory."""
    device = in_keys.device
    b, coords = out_coords if out_coords is not None else unravel(out_keys, out_size)
    num_src, num_dst, num_taps = in_keys.numel(), out_keys.numel(), geometry.num_taps
    padded = tuple(n + lo + hi for n, (lo, hi) in zip(in_size, geometry.padding))
    total_padded = num_images * math.prod(padded)
    if geometry.padding_mode == "zeros" and num_src and \
            total_padded <= max(DENSE_MAP_LIMIT, _DENSE_PER_SITE * out_keys.numel()):
        # An id map of the zero-padded grid (-1 = inactive or padding): every tap is one fixed shift of
        # the flat padded index, so each tap's column is one add and one gather (O(B*H*W) memory for the
        # map). Written tap-major, each gather straight into its row: no [N, K] temporary; ``index`` is
        # the transposed view (``index.t()`` contiguous).
        ids = torch.full((total_padded,), -1, dtype=dtype, device=device)
        shifts, origin = _map_shifts(geometry, padded)
        # output o reads the padded position o*s + u*d: anchor o*s, shift u*d
        strided = coords if all(s == 1 for s in geometry.stride) else \
            coords * torch.tensor(geometry.stride, device=device)
        anchor = ravel(b, strided, padded)
        if out_keys is in_keys:  # submanifold: the inputs' padded positions are the anchors shifted by lo
            at = anchor + origin
        else:
            b_in, c_in = unravel(in_keys, in_size)
            at = ravel(b_in, c_in, padded) + origin
        ids[at] = torch.arange(num_src, dtype=dtype, device=device)
        columns = torch.empty(num_taps, num_dst, dtype=dtype, device=device)
        if num_taps * num_dst <= _ONE_GATHER_SLOTS:  # few sites: one add and one gather for all taps
            where = anchor[None, :] + torch.tensor(shifts, device=device)[:, None]
            torch.index_select(ids, 0, where.view(-1), out=columns.view(-1))
        else:  # tap by tap: no [K, N] temporary of positions
            for t, shift in enumerate(shifts):
                torch.index_select(ids, 0, anchor + shift, out=columns[t])
        return SparseTable(columns.t(), geometry, num_src, num_dst, not num_dst or bool(columns.min() >= 0))
    offsets = geometry.offsets().to(device)
    nominal = coords[:, None, :] * torch.tensor(geometry.stride, device=device) + offsets[None, :, :]
    src = torch.empty_like(nominal)
    valid = torch.ones(nominal.shape[:2], dtype=torch.bool, device=device)
    for a, n in enumerate(in_size):
        src[..., a], ok = _remap(nominal[..., a], n, geometry.padding_mode)
        valid &= ok
    keys = ravel(b[:, None].expand_as(valid), src, in_size)
    total = num_images * math.prod(in_size)
    if num_src and total <= max(DENSE_MAP_LIMIT, _DENSE_PER_SITE * keys.numel()):
        # A dense id map is cheaper than a search when the grid is not much larger than the edge count.
        ids = torch.full((total,), -1, dtype=torch.long, device=device)
        ids[in_keys] = torch.arange(num_src, device=device)
        index = torch.where(valid, ids[keys.clamp(0, total - 1)], -1)
        valid = index >= 0
    elif num_src:
        found = torch.searchsorted(in_keys, keys).clamp_(max=num_src - 1)
        valid &= in_keys[found] == keys
        index = torch.where(valid, found, -1)
    else:
        index = torch.full_like(keys, -1)
    return SparseTable(index.to(dtype).contiguous(), geometry, num_src, num_dst, bool(valid.all()))


@lru_cache(maxsize=1024)
def _map_shifts(geometry: ConvGeometry, padded: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """In the flat zero-padded grid ``padded``: each tap's shift from an output's anchor (``u*d``), and the
    shift of an input pixel's own position (the low padding), as plain ints."""
    strides = [math.prod(padded[a + 1:]) for a in range(len(padded))]
    lo = [p for p, _ in geometry.padding]
    shifts = tuple(sum((o + l) * s for o, l, s in zip(row, lo, strides)) for row in geometry.offsets().tolist())
    return shifts, sum(l * s for l, s in zip(lo, strides))


@lru_cache(maxsize=1024)
def centre_tap(geometry: ConvGeometry) -> Optional[int]:
    """The tap whose offset from the anchor is zero in every dimension, if any (on a submanifold graph it
    joins every node to itself)."""
    rows = geometry.offsets().tolist()
    return rows.index([0] * geometry.ndim) if [0] * geometry.ndim in rows else None


@lru_cache(maxsize=1024)
def _cached_offsets(geometry: ConvGeometry, dtype: torch.dtype, device: torch.device) -> Tensor:
    return geometry.offsets().to(device=device, dtype=dtype)


def tap_offsets(geometry: ConvGeometry, tap: Tensor, dtype: torch.dtype) -> Tensor:
    """``[E, ndim]``: the offset of each edge's tap from its target's anchor (a graph's ``edge_attr``)."""
    return _cached_offsets(geometry, dtype, tap.device).index_select(0, tap)


def table_edges(index: Tensor) -> tuple[Tensor, Tensor]:
    """The edges of a slot table ``index [N_dst, T]`` (-1: no edge), target-major with taps ascending:
    ``(edge_index [2, E] long (source, target), tap [E] long)``, written straight into their tensors."""
    num_dst, num_taps = index.shape
    device = index.device
    if not index.is_contiguous() and index.t().is_contiguous():  # tap-major: no transposing copy
        dst_tap = (index >= 0).nonzero()  # [E, 2], row-major order: targets ascending, then taps
        data = torch.empty(2, dst_tap.size(0), dtype=torch.long, device=device)
        data[1].copy_(dst_tap[:, 0])
        tap = dst_tap[:, 1].contiguous()
        data[0].copy_(index.t().reshape(-1).index_select(0, (tap * num_dst).add_(data[1])))
        return data, tap
    flat = index.contiguous().view(-1)
    complete = not flat.numel() or bool(flat.min() >= 0)
    pos = torch.arange(flat.numel(), device=device) if complete else (flat >= 0).nonzero().squeeze(1)
    data = torch.empty(2, pos.numel(), dtype=torch.long, device=device)
    data[0].copy_(flat.index_select(0, pos))
    if flat.numel() < 2 ** 52:  # pos / T correctly rounded in float64 is never within 1/T of the next integer
        data[1].copy_(pos.double().div_(num_taps).floor_())
    else:
        torch.div(pos, num_taps, rounding_mode="floor", out=data[1])
    tap = pos.sub_(data[1], alpha=num_taps)  # in place: pos is not needed any more
    return data, tap


# ------------------------------------------------------------------------------ descriptions
KINDS = ("grid", "transposed", "sparse")


@dataclass(frozen=True)
class GraphPart:
    """One pixel graph (of ``num_images`` images) described without its tensors.

    ``kind`` is ``'grid'`` (every pixel a node: the graph of a :class:`~gridgraph.geometry.ConvGeometry`),
    ``'transposed'`` (the reversed graph of a :class:`~gridgraph.geometry.TransposedGeometry`) or
    ``'sparse'`` (the active pixels of a mask or point set: node and edge counts depend on the data).
    ``in_size``/``out_size`` are the grids of each image, ``num_src``/``num_dst``/``num_edges`` the
    graph's node and edge counts, ``batched`` whether the images came with a batch dimension.

    Example:
        >>> part = image_to_graph(torch.randn(2, 3, 4, 4), kernel_size=3, stride=2).edge_index.structure.parts[0]
        >>> part.kind, part.in_size, part.out_size, part.num_images, part.num_src, part.num_dst
        ('grid', (4, 4), (2, 2), 2, 32, 8)
    """

    kind: str
    geometry: Geometry
    in_size: tuple[int, ...]
    num_images: int
    num_src: int
    num_dst: int
    num_edges: int
    batched: bool = True

    @property
    def out_size(self) -> tuple[int, ...]:
        return self.geometry.output_size(self.in_size)

    @property
    def is_grid(self) -> bool:
        """True for the kinds whose edges follow from the description alone (``'grid'``, ``'transposed'``)."""
        return self.kind != "sparse"

    @property
    def conv_geometry(self) -> ConvGeometry:
        """The convolution whose taps the edges carry (for a transposed part, the one it reverses)."""
        return self.geometry.conv if isinstance(self.geometry, TransposedGeometry) else self.geometry

    @property
    def key(self) -> str:
        """The canonical string of a grid part, ``'<kind>|<geometry key>|<in_size>|<num_images>'``."""
        if not self.is_grid:
            raise ValueError("a sparse part has no key: its edges depend on the data")
        if torch.compiler.is_compiling():
            return self._key()
        key = self.__dict__.get("_cached_key")
        if key is None:
            key = self._key()
            object.__setattr__(self, "_cached_key", key)  # the part is immutable: its key never changes
        return key

    def _key(self) -> str:
        return f"{self.kind}|{self.geometry.key()}|{','.join(map(str, self.in_size))}|{self.num_images}"

    @classmethod
    def grid(cls, geometry: Geometry, in_size: Sequence[int], num_images: int, batched: bool = True,
             num_edges: int = -1) -> "GraphPart":
        """The part of ``num_images`` full grids of ``in_size`` (``num_edges``: -1 when not counted)."""
        in_size = tuple(int(n) for n in in_size)
        kind = "transposed" if isinstance(geometry, TransposedGeometry) else "grid"
        out_size = geometry.output_size(in_size)
        return cls(kind, geometry, in_size, num_images, num_images * math.prod(in_size),
                   num_images * math.prod(out_size), num_edges, batched)

    def describe(self) -> str:
        """E.g. ``'grid k3x3 s1x1 p1 d1x1 zeros on 2 x (9, 11)'``."""
        kind = "" if self.kind == "transposed" else f"{self.kind} "
        return f"{kind}{self.geometry.describe()} on {self.num_images} x {self.in_size}"


@lru_cache(maxsize=4096)
def parse_key(key: str) -> tuple[str, Geometry, tuple[int, ...], int]:
    """``(kind, geometry, in_size, num_images)`` of a grid part's :attr:`GraphPart.key`.

    Example:
        >>> part = GraphPart.grid(ConvGeometry.from_keywords(2, 3, padding=1), (4, 5), 2)
        >>> kind, geometry, in_size, b = parse_key(part.key)
        >>> kind, in_size, b, geometry == part.geometry
        ('grid', (4, 5), 2, True)
    """
    try:
        kind, geometry, in_size, num_images = key.split("|")
        geo = TransposedGeometry.from_key(geometry) if kind == "transposed" else ConvGeometry.from_key(geometry)
        if kind not in ("grid", "transposed"):
            raise ValueError(f"unknown kind {kind!r}")
        return kind, geo, tuple(int(n) for n in in_size.split(",")), int(num_images)
    except ValueError as error:
        raise ValueError(f"not a grid part key: {key!r} ({error})") from None


@dataclass(frozen=True)
class PixelStructure:
    """A graph made of pixel graphs: its :class:`GraphPart`\\ s and where each part's nodes start.

    Part ``k`` holds the source nodes ``src_offsets[k] .. + parts[k].num_src`` and the target nodes
    ``dst_offsets[k] .. + parts[k].num_dst``; its edges follow those of the parts before it. A single
    pixel graph is one part at offset 0; a PyG batch of pixel graphs is their parts one after the other
    (*canonical*: each part's nodes start where the previous part's end).

    Example:
        >>> from torch_geometric.data import Batch
        >>> batch = Batch.from_data_list([image_to_graph(torch.randn(1, 3, 4, 4), kernel_size=3),
        ...                               image_to_graph(torch.randn(1, 3, 6, 5), kernel_size=3)])
        >>> structure = batch.edge_index.structure
        >>> [part.in_size for part in structure.parts], structure.src_offsets
        ([(4, 4), (6, 5)], (0, 16))
    """

    parts: tuple[GraphPart, ...]
    src_offsets: tuple[int, ...]
    dst_offsets: tuple[int, ...]

    @classmethod
    def single(cls, part: GraphPart) -> "PixelStructure":
        return cls((part,), (0,), (0,))

    # Plain loops: these run under torch.compile, and dynamo cannot trace max() of a generator with a default.
    @property
    def num_src(self) -> int:
        n = 0
        for offset, part in zip(self.src_offsets, self.parts):
            n = max(n, offset + part.num_src)
        return n

    @property
    def num_dst(self) -> int:
        n = 0
        for offset, part in zip(self.dst_offsets, self.parts):
            n = max(n, offset + part.num_dst)
        return n

    @property
    def num_edges(self) -> int:
        return sum(p.num_edges for p in self.parts)

    @property
    def canonical(self) -> bool:
        """True when the parts' nodes tile ``0 .. num_src`` and ``0 .. num_dst`` in order."""
        src = dst = 0
        for part, s, d in zip(self.parts, self.src_offsets, self.dst_offsets):
            if s != src or d != dst:
                return False
            src, dst = src + part.num_src, dst + part.num_dst
        return True

    def shifted(self, src: int, dst: int) -> "PixelStructure":
        """Every node id moved by ``(src, dst)`` (what adding ``[[src], [dst]]`` to the edges does)."""
        return PixelStructure(self.parts, tuple(o + src for o in self.src_offsets),
                              tuple(o + dst for o in self.dst_offsets))

    @staticmethod
    def concat(structures: Sequence["PixelStructure"]) -> "PixelStructure":
        """The edges of ``structures`` one after the other (their node ids as they are)."""
        return PixelStructure(sum((s.parts for s in structures), ()), sum((s.src_offsets for s in structures), ()),
                              sum((s.dst_offsets for s in structures), ()))

    def edge_slice(self, start: int, stop: int) -> Optional["PixelStructure"]:
        """The parts whose edges are exactly ``start .. stop``, or None when the cut splits a part."""
        e, keep = 0, []
        for k, part in enumerate(self.parts):
            if e >= start and e + part.num_edges <= stop:
                keep.append(k)
            elif e < stop and e + part.num_edges > start and part.num_edges:
                return None
            e += part.num_edges
        if start < 0 or stop > e or (not keep and start != stop):
            return None
        return PixelStructure(tuple(self.parts[k] for k in keep), tuple(self.src_offsets[k] for k in keep),
                              tuple(self.dst_offsets[k] for k in keep))

    def runs(self) -> list[tuple[GraphPart, int, int, int]]:
        """``(part, src_offset, dst_offset, edge_offset)`` with consecutive parts of the same grid merged
        into one (their images one after the other): the calls a kernel needs. Canonical structures only."""
        runs: list[tuple[GraphPart, int, int, int]] = []
        e = 0
        for part, s, d in zip(self.parts, self.src_offsets, self.dst_offsets):
            if runs:
                last, ls, ld, le = runs[-1]
                if _mergeable(last, part):
                    runs[-1] = (_merge(last, part), ls, ld, le)
                    e += part.num_edges
                    continue
            runs.append((part, s, d, e))
            e += part.num_edges
        return runs

    def uniform(self) -> Optional[GraphPart]:
        """All parts merged into one when they are the same grid (or all sparse with one grid), else None."""
        if not self.parts:
            return None
        merged = self.parts[0]
        for part in self.parts[1:]:
            if not (_mergeable(merged, part) or (part.kind == merged.kind == "sparse" and
                                                  part.geometry == merged.geometry and
                                                  part.in_size == merged.in_size)):
                return None
            merged = _merge(merged, part)
        return merged

    def describe(self) -> str:
        if len(self.parts) == 1:
            return self.parts[0].describe()
        return f"{len(self.parts)} pixel graphs: " + "; ".join(p.describe() for p in self.parts)


def _mergeable(a: GraphPart, b: GraphPart) -> bool:
    return a.is_grid and b.is_grid and a.kind == b.kind and a.geometry == b.geometry and a.in_size == b.in_size


def _merge(a: GraphPart, b: GraphPart) -> GraphPart:
    edges = a.num_edges + b.num_edges if min(a.num_edges, b.num_edges) >= 0 else -1
    return GraphPart(a.kind, a.geometry, a.in_size, a.num_images + b.num_images, a.num_src + b.num_src,
                     a.num_dst + b.num_dst, edges, True)

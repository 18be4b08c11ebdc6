"""Pixel graphs that carry their structure with them: :class:`PixelEdgeIndex` and :class:`PixelGraph`.

A pixel graph's ``edge_index`` is a :class:`PixelEdgeIndex`: a :class:`torch_geometric.EdgeIndex` (a
``[2, E]`` long tensor with its sparse size and sort order) that also holds the edges' kernel taps and a
:class:`~gridgraph.structure.PixelStructure` describing the pixel graph(s) it is made of. What PyG and torch
do to graphs keeps both: ``clone``, ``copy.deepcopy``, ``torch.save``/``torch.load``, ``.to(device)``,
``pin_memory``, ``Batch.from_data_list`` and the ``DataLoader`` (concatenation with node offsets),
``Batch.to_data_list`` and ``index_select`` (slices). Any other operation gives an ordinary
``EdgeIndex``/tensor: an edited, merged or reordered edge list is no longer described by the structure.

:class:`PixelGraph` (a :class:`torch_geometric.data.Data`) reads everything structural from its
``edge_index``: ``edge_type`` (the taps, read-only), ``size()`` (``(N_src, N_dst)``, also for bipartite
batches), ``geometry``, ``in_size``, ``out_size``, ``num_images``; and tells PyG how to offset a strided
(bipartite) graph's targets in a batch (``__inc__``). A graph whose edges a transform merged or reordered
(``ToUndirected``, ``RemoveDuplicatedEdges``) has lost its structure: asking it for ``edge_type`` raises a
``ValueError`` instead of handing out taps that no longer match the edges.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Optional

import torch
from torch import Tensor
from torch_geometric import EdgeIndex
from torch_geometric.data import Data

from .geometry import ConvGeometry, TransposedGeometry
from .structure import (GraphPart, NeighbourTable, PixelStructure, SparseTable, cached_table, edge_template,
                        unravel)

__all__ = ["PixelEdgeIndex", "PixelGraph", "MaskedPixelGraph", "PointGraph", "TransposedPixelGraph", "pixel_structure",
           "check_image",
           "node_features", "full_grid_graph", "grid_pos", "outside_inference_mode"]

aten = torch.ops.aten


class _EdgeTypes(Tensor):
    """The taps a :class:`PixelEdgeIndex` hands out as ``edge_type``: a wrapper of its own taps whose every
    operation runs on them and returns a plain tensor, and whose ``.data`` is an alias sharing their version
    counter, so that an edit through ``edge_type.data`` is seen like any other in-place edit (torch's own
    ``.data`` would hide it behind a fresh version counter). torch.compile unwraps it like any traceable
    tensor subclass."""

    _t: Tensor

    @staticmethod
    def __new__(cls, taps: Tensor) -> "_EdgeTypes":
        out = Tensor._make_wrapper_subclass(cls, taps.shape, strides=taps.stride(), dtype=taps.dtype,
                                            device=taps.device, requires_grad=False)
        out._t = taps
        return out

    @property
    def data(self) -> Tensor:  # type: ignore[override]
        return self._t.detach()  # shares the version counter

    @data.setter
    def data(self, value: Any) -> None:
        raise AttributeError("a pixel graph's edge_type cannot be replaced through .data; edit it in place "
                             "(the graph then computes on its edges as a plain edge list) or build another graph")

    def __tensor_flatten__(self):
        return ["_t"], None

    @staticmethod
    def __tensor_unflatten__(inner: dict, ctx: Any, outer_size: Any, outer_stride: Any) -> "_EdgeTypes":
        return _EdgeTypes(inner["_t"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        def unwrap(t):
            return t._t if isinstance(t, _EdgeTypes) else t
        return func(*[unwrap(a) if not isinstance(a, (list, tuple)) else type(a)(unwrap(b) for b in a)
                      for a in args], **{k: unwrap(v) for k, v in (kwargs or {}).items()})

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        return repr(self._t)

    def numpy(self, *, force: bool = False):  # a read-only view, as PixelEdgeIndex.numpy
        array = self._t.numpy(force=force)
        array.flags.writeable = False
        return array

    def tolist(self):  # type: ignore[override]
        return self._t.tolist()

    def data_ptr(self) -> int:  # type: ignore[override]
        return self._t.data_ptr()

    def __deepcopy__(self, memo: dict) -> Tensor:
        return self._t.clone()

    def __reduce_ex__(self, protocol: Any):
        return self._t.__reduce_ex__(protocol)


class PixelEdgeIndex(EdgeIndex):
    """An ``edge_index`` that carries its pixel graph: the edges' taps and their :class:`PixelStructure`.

    Build one with :meth:`make` (the graph builders do). ``edge_type`` is the taps ``[E]``, ``structure``
    the description, :meth:`is_intact` whether neither tensor was modified in place since.

    Example:
        >>> g = image_to_graph(torch.randn(2, 3, 4, 4), kernel_size=3, padding=1)
        >>> type(g.edge_index).__name__, g.edge_index.structure.num_src, g.edge_index.clone().structure.num_dst
        ('PixelEdgeIndex', 32, 32)
    """

    # PyG's own methods (``sort_by``, ...) may build instances of this class without going through :meth:`make`:
    # those carry no taps and no structure, and count as edited (an ordinary EdgeIndex of their edges).
    _taps: Optional[Tensor] = None
    _edge_types: Optional[Tensor] = None
    _structure: Optional[PixelStructure] = None
    _stamp: tuple[int, int, int] = (-1, -1, -1)
    _edited: bool = False  # set on the instances torch.compile traces for an edited edge_index

    @staticmethod
    def make(data: Tensor, taps: Tensor, structure: PixelStructure,
             stamp: Optional[tuple[int, int, int]] = None) -> "PixelEdgeIndex":
        """Wrap ``data`` ``[2, E]`` and ``taps`` ``[E]`` (both owned by the result) with ``structure``."""
        if torch.is_inference_mode_enabled() or data.is_inference() or taps.is_inference():
            # under torch.inference_mode: tensors without a version counter could be edited unseen; normal ones
            with torch.inference_mode(False):
                return PixelEdgeIndex.make(data.clone() if data.is_inference() else data,
                                           taps.clone() if taps.is_inference() else taps, structure, stamp)
        canonical = structure.canonical
        out = EdgeIndex.__new__(PixelEdgeIndex, data,
                                sparse_size=(structure.num_src, structure.num_dst) if canonical else None,
                                sort_order="col" if canonical else None)
        out._taps = taps
        out._structure = structure
        out._stamp = (data._version, taps._version, out._version) if stamp is None else stamp
        return out

    # ------------------------------------------------------------------ what it carries
    @property
    def structure(self) -> PixelStructure:
        """The :class:`~gridgraph.structure.PixelStructure` of the pixel graph(s) these edges are."""
        return self._structure

    @property
    def edge_type(self) -> Tensor:
        """The kernel tap of every edge ``[E]`` (long)."""
        if self._edge_types is None:
            if torch.compiler.is_compiling() or self._taps is None:
                return self._taps
            with torch.inference_mode(False):  # a normal tensor (with a version counter) in any mode
                self._edge_types = _EdgeTypes(self._taps)
        return self._edge_types

    def is_intact(self) -> bool:
        """False once the edges or taps were modified in place (they then no longer follow the structure)."""
        if self._taps is None:
            return False
        if self._edge_types is not None and self._edge_types._version:  # edited through edge_type's views
            return False
        return (self._data._version, self._taps._version, self._version) == self._stamp

    @property
    def data(self) -> "EdgeIndex":  # type: ignore[override]
        """An alias of these edges (``detach()``): unlike torch's ``.data`` it shares the version counter, so an
        edit through it is seen (:meth:`is_intact`) and the layers compute on the edited edges."""
        return self.detach()

    @data.setter
    def data(self, value: Any) -> None:
        raise AttributeError("a pixel graph's edge_index cannot be replaced through .data; edit it in place (the "
                             "layers then compute on its edges as a plain edge list) or build another graph")

    def numpy(self, *, force: bool = False):  # a read-only view: edits through numpy would skip the version
        array = self._data.numpy(force=force)
        array.flags.writeable = False
        return array

    def share_memory_(self) -> "PixelEdgeIndex":
        self._data.share_memory_()
        self._taps.share_memory_()
        return self

    def __deepcopy__(self, memo: dict) -> "PixelEdgeIndex":
        return self.clone() if self.is_intact() else EdgeIndex(self._data.clone())

    def __reduce_ex__(self, protocol: Any):
        if not self.is_intact():  # edited: the structure no longer describes it
            return (EdgeIndex, (self._data.clone(),))
        return (_rebuild, (self._data, self._taps, self._structure))

    def __repr__(self) -> str:  # type: ignore[override]
        text = super().__repr__()
        if self._structure is None:
            return text
        edited = "" if self.is_intact() else ", edited in place: no longer described by"
        return f"{text[:-1]}{edited}, {self._structure.describe()})"

    # ------------------------------------------------------------------ torch integration
    # Whether the edges are intact is part of the metadata torch.compile guards on (it flattens its inputs at
    # every call): an in-place edit after compiling recompiles. Flattening also records the answer in
    # ``_edited``, the attribute compiled code reads (it cannot read version counters), so the recompiled
    # program runs the edited edges as a plain edge list.
    def __tensor_flatten__(self):
        intact = self.is_intact()
        self._edited = not intact
        return ["_data", "_taps"], (self._structure, intact)

    @staticmethod
    def __tensor_unflatten__(inner: dict, ctx: tuple, outer_size: Any, outer_stride: Any) -> "PixelEdgeIndex":
        out = PixelEdgeIndex.make(inner["_data"], inner["_taps"], ctx[0])
        out._edited = not ctx[1]
        return out

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        handler = _HANDLERS.get(func)
        if handler is not None:
            out = handler(*args, **(kwargs or {}))
            if out is not NotImplemented:
                return out
        # Anything else is an ordinary EdgeIndex operation: the result does not carry the pixel structure.
        return EdgeIndex.__torch_dispatch__.__func__(EdgeIndex, func, types, args, kwargs)


def _rebuild(data: Tensor, taps: Tensor, structure: PixelStructure) -> PixelEdgeIndex:
    return PixelEdgeIndex.make(data, taps, structure)


def _plain(t: Any) -> Any:
    return t._data if isinstance(t, EdgeIndex) else t


def _same(op):
    """Ops that keep the edges as they are (copies, moves): the structure and stamp follow."""
    def handler(t, *args, **kwargs):
        if not isinstance(t, PixelEdgeIndex) or not t.is_intact():
            return NotImplemented
        if kwargs.get("dtype", torch.int64) != torch.int64:
            return NotImplemented  # another dtype: an ordinary EdgeIndex or tensor
        data = op(t._data, *args, **kwargs)
        tap_kwargs = {k: v for k, v in kwargs.items() if k != "dtype"}
        return PixelEdgeIndex.make(data, op(t._taps, *args, **tap_kwargs), t._structure)
    return handler


def _alias(t: Any, *args: Any):
    if not isinstance(t, PixelEdgeIndex) or not t.is_intact():
        return NotImplemented
    return PixelEdgeIndex.make(t._data, t._taps, t._structure)


def _cat(tensors: list, dim: int = 0):
    if dim not in (1, -1) or not all(isinstance(t, PixelEdgeIndex) and t.is_intact() for t in tensors):
        return NotImplemented
    sparse = {any(not part.is_grid for part in t._structure.parts) for t in tensors}
    if len(sparse) > 1:  # PyG batches graphs of one set of attributes: a masked graph has more than a full one
        raise ValueError("cannot batch masked or sparse pixel graphs (image_to_graph(..., mask=...), sparse_to_graph, "
                         "positions_to_graph) with full-grid ones: their graphs hold different attributes. Give the "
                         "full images an all-True mask (image_to_graph(image, conv, mask=torch.ones(H, W, "
                         "dtype=torch.bool))) to batch them as masked graphs")
    data = aten.cat.default([t._data for t in tensors], dim)
    taps = aten.cat.default([t._taps for t in tensors])
    return PixelEdgeIndex.make(data, taps, PixelStructure.concat([t._structure for t in tensors]))


def _shift_of(other: Any, sign: int) -> Optional[tuple[int, int]]:
    if isinstance(other, int) and not isinstance(other, bool):
        return sign * other, sign * other
    if isinstance(other, Tensor) and not isinstance(other, EdgeIndex) and other.dtype in (torch.int64, torch.int32):
        if other.numel() == 1:
            return sign * int(other), sign * int(other)
        if tuple(other.shape) == (2, 1):
            a, b = other.view(-1).tolist()
            return sign * a, sign * b
    return None


def _add(t: Any, other: Any, alpha: int = 1):
    shift = _shift_of(other, alpha) if isinstance(t, PixelEdgeIndex) and t.is_intact() else None
    if shift is None:
        return NotImplemented
    data = aten.add.Tensor(t._data, _plain(other), alpha=alpha)
    return PixelEdgeIndex.make(data, t._taps, t._structure.shifted(*shift))


def _sub(t: Any, other: Any, alpha: int = 1):
    shift = _shift_of(other, -alpha) if isinstance(t, PixelEdgeIndex) and t.is_intact() else None
    if shift is None:
        return NotImplemented
    data = aten.sub.Tensor(t._data, _plain(other), alpha=alpha)
    return PixelEdgeIndex.make(data, t._taps, t._structure.shifted(*shift))


def _slice(t: Any, dim: int = 0, start: Optional[int] = None, end: Optional[int] = None, step: int = 1):
    if not isinstance(t, PixelEdgeIndex) or not t.is_intact() or dim not in (1, -1) or step != 1:
        return NotImplemented
    num_edges = t._data.size(1)
    lo = 0 if start is None else (start + num_edges if start < 0 else min(start, num_edges))
    hi = num_edges if end is None else (end + num_edges if end < 0 else min(end, num_edges))
    sub = t._structure.edge_slice(lo, hi)
    if sub is None:
        return NotImplemented
    return PixelEdgeIndex.make(aten.slice.Tensor(t._data, 1, lo, hi), aten.slice.Tensor(t._taps, 0, lo, hi), sub)


def _rows(op):
    """Rows of the edges (``edge_index[0]``, ``src, dst = edge_index``): plain tensors (views of the data).
    EdgeIndex would return its ``Index`` subclass, which some PyG utilities cannot add to plain tensors."""
    def handler(t, *args, **kwargs):
        return op(t._data, *args, **kwargs) if isinstance(t, EdgeIndex) else NotImplemented
    return handler


_HANDLERS = {
    aten.select.int: _rows(aten.select.int),
    aten.unbind.int: _rows(aten.unbind.int),
    aten.clone.default: _same(aten.clone.default),
    aten._to_copy.default: _same(aten._to_copy.default),
    aten._pin_memory.default: _same(aten._pin_memory.default),
    aten.alias.default: _alias,
    aten.detach.default: _alias,
    aten.cat.default: _cat,
    aten.add.Tensor: _add,
    aten.sub.Tensor: _sub,
    aten.slice.Tensor: _slice,
}


def outside_inference_mode(build):
    """Run a graph builder with normal tensors also under ``torch.inference_mode``: a graph's tensors need version
    counters (so that in-place edits are seen) and may meet autograd later; inference tensors have neither."""
    @functools.wraps(build)
    def wrapper(*args, **kwargs):
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                return build(*args, **kwargs)
        return build(*args, **kwargs)
    return wrapper


def pixel_structure(edge_index: Any) -> Optional[PixelStructure]:
    """The structure ``edge_index`` carries, or None (a plain edge list, or one edited in place)."""
    if not isinstance(edge_index, PixelEdgeIndex) or edge_index.structure is None:
        return None
    if (not edge_index._edited) if torch.compiler.is_compiling() else edge_index.is_intact():
        return edge_index.structure
    return None


# ----------------------------------------------------------------------------------------- graphs
class _Derived(property):
    """A read-only attribute of a pixel graph, computed from its edge_index (assigning one raises)."""

    def __init__(self, fget, name: str) -> None:
        def fset(self, value):
            raise AttributeError(f"{type(self).__name__}.{name} is read from the graph's edge_index (a "
                                 f"PixelEdgeIndex) and cannot be assigned; build another graph with image_to_graph, "
                                 f"or use a plain torch_geometric.data.Data for a graph of your own")
        super().__init__(fget, fset, doc=fget.__doc__)


def _derived(name: str):
    return lambda fget: _Derived(fget, name)


class PixelGraph(Data):
    """A :class:`torch_geometric.data.Data` holding a pixel graph; its structure travels in its ``edge_index``.

    Stored: ``x`` ``[N_src, C]``, ``edge_index`` (a :class:`PixelEdgeIndex` ``[2, E]``), ``edge_attr``
    ``[E, ndim]`` (each edge's tap offset), ``pos`` ``[N_src, ndim]`` (each input pixel's coordinates),
    ``batch`` (the image of each input node; in a PyG ``Batch`` of pixel graphs, PyG's graph index instead). Read from the ``edge_index``:
    ``edge_type`` ``[E]``, ``size()`` = ``(N_src, N_dst)`` (the ``size`` argument a layer takes),
    ``structure``, ``geometry``, ``in_size``, ``out_size``, ``num_images``, ``batched``. A PyG batch of
    pixel graphs is a pixel graph too (``Batch.from_data_list``, ``DataLoader``): its ``structure`` lists
    the graphs, and :func:`~gridgraph.graph_to_image` turns its outputs back into images.

    Example:
        >>> g = image_to_graph(torch.randn(2, 3, 4, 5), kernel_size=3)
        >>> type(g).__name__, g.num_nodes, g.edge_index.size(1), g.in_size, g.num_images
        ('PixelGraph', 40, 260, (4, 5), 2)
    """

    # ------------------------------------------------------------------ the structure
    def _carrier(self) -> Optional[PixelEdgeIndex]:
        edge_index = self._store.get("edge_index") if "_store" in self.__dict__ else None
        return edge_index if isinstance(edge_index, PixelEdgeIndex) else None

    @_derived("structure")
    def structure(self) -> PixelStructure:
        """The :class:`~gridgraph.structure.PixelStructure` carried by ``edge_index``."""
        carrier = self._carrier()
        if carrier is None:
            raise ValueError(
                f"this {type(self).__name__}'s edge_index is no longer a PixelEdgeIndex: something replaced, "
                "merged or reordered its edges (e.g. the ToUndirected or RemoveDuplicatedEdges transforms), so "
                "they are not its convolution's pixel graph any more; build the graph again with image_to_graph")
        return carrier.structure  # its nodes, also after an in-place edit of the edges (see is_intact)

    @_derived("edge_type")
    def edge_type(self) -> Tensor:
        """The kernel tap of every edge ``[E]`` (long): ``u*kW + v`` for the tap ``(u, v)``."""
        carrier = self._carrier()
        if carrier is None:
            self.structure  # raises the ValueError that explains why
        return carrier.edge_type

    def _part(self) -> GraphPart:
        part = self.structure.uniform()
        if part is None:
            raise ValueError(f"this batch mixes pixel graphs of different geometries or grid sizes "
                             f"({self.structure.describe()}); read them from .structure.parts")
        return part

    @_derived("geometry")
    def geometry(self) -> ConvGeometry:
        """The convolution whose taps the edges carry (for a transposed graph: the one it reverses)."""
        return self._part().conv_geometry

    @_derived("in_size")
    def in_size(self) -> tuple[int, ...]:
        """The input grid of each image."""
        return self._part().in_size

    @_derived("out_size")
    def out_size(self) -> tuple[int, ...]:
        """The output grid of each image."""
        return self._part().out_size

    @_derived("num_images")
    def num_images(self) -> int:
        """The number of images (of every graph in a batch)."""
        return sum(p.num_images for p in self.structure.parts)

    @_derived("batched")
    def batched(self) -> bool:
        """Whether :func:`~gridgraph.graph_to_image` returns a batch ``(B, C, ...)`` (else ``(C, ...)``)."""
        parts = self.structure.parts
        return len(parts) != 1 or parts[0].batched

    def size(self, dim: Optional[int] = None):  # type: ignore[override]
        """``(N_src, N_dst)``: the nodes of the input and output grids (all images)."""
        if self._carrier() is None:
            return super().size(dim)
        structure = self.structure
        size = (structure.num_src, structure.num_dst)
        return size if dim is None else size[dim]

    @property
    def num_src(self) -> int:
        return self.size(0)

    @property
    def num_dst(self) -> int:
        return self.size(1)

    @property
    def table(self) -> NeighbourTable:
        """The per-image :class:`~gridgraph.structure.NeighbourTable` this graph was built from (a copy)."""
        part = self._part()
        return cached_table(part.geometry, part.in_size, self.edge_index.device).copy()

    # ------------------------------------------------------------------ PyG batching
    def __inc__(self, key: str, value: Any, *args: Any, **kwargs: Any) -> Any:
        if key == "edge_index" and isinstance(value, PixelEdgeIndex):
            structure = value.structure
            return torch.tensor([[structure.num_src], [structure.num_dst]])
        return super().__inc__(key, value, *args, **kwargs)

    def __repr__(self) -> str:
        text = super().__repr__()
        carrier = self._carrier()
        if carrier is None:
            return text
        marker = f"edge_index=[2, {carrier.size(1)}]"
        return text.replace(marker, f"{marker}, edge_type=[{carrier.size(1)}]", 1)


class TransposedPixelGraph(PixelGraph):
    """The :class:`PixelGraph` of a transposed convolution: sources on the input grid (``in_size``),
    targets on the larger output grid (``out_size``); ``geometry`` is the strided convolution whose edges
    it reverses, ``transposed_geometry`` the transposed convolution's own.

    Example:
        >>> up = torch.nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1)
        >>> g = transposed_image_to_graph(torch.randn(1, 3, 4, 4), up)
        >>> type(g).__name__, g.in_size, g.out_size
        ('TransposedPixelGraph', (4, 4), (8, 8))
    """

    @_derived("transposed_geometry")
    def transposed_geometry(self) -> TransposedGeometry:
        return self._part().geometry


class MaskedPixelGraph(PixelGraph):
    """A :class:`PixelGraph` on the active pixels of a mask or a sparse point set.

    Nodes are active pixels only, row-major image by image: ``x`` ``[N_src, C]``, ``pos`` ``[N_src, ndim]``
    (coordinates of each input node), ``out_pos`` the same for each output node, ``batch`` and
    ``out_batch`` the image of each node, ``in_keys``/``out_keys`` the flat
    dense index ``b*H*W + h*W + w`` of every node. ``size()`` is ``(N_src, N_dst)``: the active counts.
    ``submanifold`` is True when the outputs are the input nodes themselves (stride 1, same grid).

    Example:
        >>> mask = torch.tensor([[True, True, False], [False, True, True]])
        >>> g = image_to_graph(torch.randn(1, 2, 2, 3), kernel_size=3, mask=mask)
        >>> type(g).__name__, g.num_src, g.pos.tolist(), g.submanifold
        ('MaskedPixelGraph', 4, [[0, 0], [0, 1], [1, 1], [1, 2]], True)
    """

    @property
    def submanifold(self) -> bool:
        part = self._part()
        return part.in_size == part.out_size and all(s == 1 for s in part.conv_geometry.stride)

    @property
    def table(self) -> SparseTable:  # type: ignore[override]
        """The :class:`~gridgraph.structure.SparseTable` of the edges: ``index[i, t]`` = the source node
        that tap ``t`` of target node ``i`` reads, or ``-1``."""
        part = self._part()
        index = torch.full((part.num_dst, part.geometry.num_taps), -1, dtype=torch.long, device=self.edge_index.device)
        src, dst = self.edge_index.as_tensor()
        index[dst, self.edge_type] = src
        return SparseTable(index, part.geometry, part.num_src, part.num_dst, bool((index >= 0).all()))

    @property
    def mask(self) -> Tensor:
        """The input mask ``(B, *grid)`` (``(*grid)`` if unbatched), as a dense bool tensor."""
        return self._dense_mask(self.in_keys, self.in_size)

    @property
    def out_mask(self) -> Tensor:
        """The active output pixels ``(B, *out_grid)`` (``(*out_grid)`` if unbatched), as a dense bool tensor."""
        return self._dense_mask(self.out_keys, self.out_size)

    def _dense_mask(self, keys: Tensor, grid: tuple[int, ...]) -> Tensor:
        mask = torch.zeros(self.num_images * math.prod(grid), dtype=torch.bool, device=keys.device)
        mask[keys] = True
        mask = mask.view(self.num_images, *grid)
        return mask if self.batched else mask[0]

    def __inc__(self, key: str, value: Any, *args: Any, **kwargs: Any) -> Any:
        if key in ("in_keys", "out_keys", "perm"):
            part = self.structure.uniform()
            if part is not None:
                if key == "perm":
                    return part.num_src
                grid = part.in_size if key == "in_keys" else part.out_size
                return part.num_images * math.prod(grid)
        return super().__inc__(key, value, *args, **kwargs)


class PointGraph(MaskedPixelGraph):
    """The :class:`MaskedPixelGraph` of points with real-valued positions (see :func:`~gridgraph.positions_to_graph`).

    Targets are the points, in the caller's order. Sources are the points, then (``reduce='mean'`` only)
    one *virtual node* per (target, tap) that several points share, holding their mean. Stored:
    ``x`` ``[N_src, C]`` (the source features), ``pos`` ``[N, ndim]`` (the given positions, float),
    ``cells`` ``[N, ndim]`` (the nearest lattice cell of each point, ``floor(pos / spacing + 1/2)``),
    ``pool_index`` ``[2, N + M]`` (point ``pool_index[0]`` feeds source node ``pool_index[1]``: each point
    its own node, and each member of a virtual node that node), ``batch`` (the image of each point), and
    ``in_keys``/``out_keys`` (each point's pixel in the rasterised grid ``in_size``, for
    :func:`~gridgraph.graph_to_image`, which works while no two points of an image share a cell).

    Example:
        >>> pos = torch.tensor([[0.0, 0.0], [0.0, 1.1], [0.9, 0.0]])
        >>> g = positions_to_graph(pos, torch.randn(3, 2), torch.nn.Conv2d(2, 4, 3, padding=1))
        >>> type(g).__name__, g.edge_index.size(1)
        ('PointGraph', 9)
    """

    def source_features(self, y: Tensor) -> Tensor:
        """The source node features ``[N_src, C]`` for features ``y`` ``[N, C]`` on the points (for example a
        layer's output, to feed the next layer): ``y`` itself, then each virtual node's mean of its points.

        Example:
            >>> pos = torch.tensor([[0.0, 0.0], [0.0, 0.7], [0.0, 1.3]])  # 1 and 2: on tap (0, +1) of 0
            >>> g = positions_to_graph(pos, torch.tensor([[1.0], [2.0], [4.0]]), reduce='mean')
            >>> g.size(), g.source_features(torch.tensor([[1.0], [2.0], [4.0]])).flatten().tolist()
            ((5, 3), [1.0, 2.0, 4.0, 3.0, 1.5])
            >>> g.edge_index.tolist()  # virtual node 3 (mean of 1 and 2) feeds 0; 4 (mean of 0 and 1) feeds 2
            [[0, 3, 0, 1, 2, 4, 2], [0, 0, 1, 1, 1, 2, 2]]
        """
        num_src, num_dst = self.size()
        if not isinstance(y, Tensor):
            raise TypeError(f"y must be a torch.Tensor (got {type(y).__name__})")
        if y.dim() != 2 or y.size(0) != num_dst:
            raise ValueError(f"expected y of shape [{num_dst}, C], one row per point (got {tuple(y.shape)})")
        if num_src == num_dst:  # no virtual nodes: the sources are the points
            return y
        point, node = self.pool_index[0], self.pool_index[1]
        sums = y.new_zeros(num_src, y.size(1)).index_add_(0, node, y.index_select(0, point))
        return sums / torch.bincount(node, minlength=num_src).to(sums.dtype)[:, None]

    @property
    def table(self) -> SparseTable:  # type: ignore[override]
        """The :class:`~gridgraph.structure.SparseTable` of the edges, when every (target, tap) has at most one
        (a ``ValueError`` for a ``reduce='sum'`` graph in which several points share a tap of a target)."""
        part = self._part()
        slots = self.edge_index.as_tensor()[1] * part.geometry.num_taps + self.edge_type
        if slots.numel() > 1 and torch.unique(slots).numel() != slots.numel():
            raise ValueError("several points share a tap of one target in this graph (reduce='sum'): its edges "
                             "are no table; build it with reduce='nearest' or 'mean' for one edge per tap")
        return super().table

    def check_image_keys(self, keys: Tensor) -> None:
        """Raise a ``ValueError`` when two points of one image share a cell (then there is no image)."""
        if keys.numel() > 1:
            ordered = torch.sort(keys).values
            same = ordered[1:] == ordered[:-1]
            if bool(same.any()):
                key = ordered[1:][same][:1]
                b, cell = unravel(key, self.in_size)
                raise ValueError(f"several points share the cell {cell[0].tolist()} of image {int(b[0])}: a point set "
                                 "has an image only while each cell holds at most one point; read the results at "
                                 "the points (the node features) instead")

    def __inc__(self, key: str, value: Any, *args: Any, **kwargs: Any) -> Any:
        if key == "pool_index":
            return torch.tensor([[self.num_dst], [self.num_src]])
        return super().__inc__(key, value, *args, **kwargs)


def _coords(grid: tuple[int, ...], device: torch.device) -> Tensor:
    """``[prod(grid), ndim]`` long: each grid point's coordinates, row-major."""
    ids = torch.arange(math.prod(grid), device=device)
    return unravel(ids, grid)[1]


def grid_pos(grid: tuple[int, ...], num_images: int, device: torch.device) -> Tensor:
    """``pos`` of ``num_images`` full grids: ``[num_images * prod(grid), ndim]``."""
    return _coords(grid, device).repeat(num_images, 1)


_SAFE = [PixelEdgeIndex, _rebuild, PixelGraph, MaskedPixelGraph, PointGraph, TransposedPixelGraph, PixelStructure,
         GraphPart, ConvGeometry, TransposedGeometry]
if hasattr(torch.serialization, "add_safe_globals"):  # torch.load(weights_only=True) may load pixel graphs
    torch.serialization.add_safe_globals(_SAFE)


# ------------------------------------------------------------------------------------- builders
def check_image(image: Any, ndim: int, name: str = "image") -> tuple[Tensor, bool]:
    """``image`` as a batch ``(B, C, *grid)`` and whether it had a batch dimension; a clear error otherwise."""
    if not isinstance(image, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (got {type(image).__name__})")
    if image.dim() not in (ndim + 1, ndim + 2):
        dims = {1: "L", 2: "H, W", 3: "D, H, W"}.get(ndim, ", ".join(f"S{a}" for a in range(ndim)))
        raise ValueError(f"expected {name} of shape (C, {dims}) or (B, C, {dims}): {ndim + 1} or {ndim + 2} "
                         f"dims (got a {image.dim()}-dim tensor of shape {tuple(image.shape)})")
    batched = image.dim() == ndim + 2
    return (image if batched else image.unsqueeze(0)), batched


def node_features(images: Tensor) -> Tensor:
    """``(B, C, *grid)`` -> ``[B*prod(grid), C]``, row-major (a view when the images are channels-last in
    memory). One image in NCHW memory would reshape to a column-major view ``[H*W, C]`` with strides
    ``(1, H*W)``: it is copied once here, as a batch is, instead of once per layer call by the kernels."""
    n = images.dim() - 2
    return images.permute(0, *range(2, n + 2), 1).reshape(-1, images.size(1)).contiguous()


@outside_inference_mode
def full_grid_graph(cls: type, geometry: Any, images: Tensor, batched: bool) -> PixelGraph:
    """The pixel graph of ``images`` ``(B, C, *grid)`` under ``geometry`` (a convolution's or a transposed
    convolution's): fresh tensors written from the cached one-image edge template."""
    num_images, _, *grid = images.shape
    grid = tuple(grid)
    device = images.device
    src1, dst1, tap1 = edge_template(geometry, grid, device)
    table = cached_table(geometry, grid, device)
    e1 = src1.numel()
    data = torch.empty(2, num_images * e1, dtype=torch.long, device=device)
    b = torch.arange(num_images, device=device)[:, None]
    torch.add(src1[None, :], b * table.num_src, out=data[0].view(num_images, e1))
    torch.add(dst1[None, :], b * table.num_dst, out=data[1].view(num_images, e1))
    taps = tap1.repeat(num_images)
    part = GraphPart.grid(geometry, grid, num_images, batched, num_edges=num_images * e1)
    edge_index = PixelEdgeIndex.make(data, taps, PixelStructure.single(part))
    dtype = images.dtype if images.is_floating_point() else torch.get_default_dtype()
    edge_attr = part.conv_geometry.offsets().to(device=device, dtype=dtype)[taps]
    graph = cls(x=node_features(images), edge_index=edge_index, edge_attr=edge_attr,
                pos=grid_pos(grid, num_images, device))
    graph.batch = torch.arange(num_images, device=device).repeat_interleave(table.num_src)  # image of each node
    return graph

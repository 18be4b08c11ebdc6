"""Pixel graphs: images as graphs whose edges are the taps of a convolution.

Conventions (stated once; the README repeats them):

* **nodes** are pixels, row-major: in 2-D the node id of pixel ``(h, w)`` of image ``b`` is
  ``b*H*W + h*W + w`` (y points down); a node's features are its channel vector, ``x[node] = image[b, :, h, w]``;
* **edges** run from a source ``j = edge_index[0]`` (an input pixel) to a target ``i = edge_index[1]``
  (an output pixel, numbered the same way on the output grid);
* **edge types** are kernel taps ``edge_type = u*kW + v``; ``edge_attr`` holds the tap's nominal offset
  ``(dy, dx) = (u*dH - pad_top, v*dW - pad_left)`` from the target's anchor ``(i_h*sH, i_w*sW)``;
* the operation is cross-correlation, as in ``nn.Conv2d`` (no kernel flip).

With stride 1 and 'same' padding the input and output grids coincide; otherwise the graph is
bipartite (sources on the input grid, targets on the output grid). Padding modes: ``'zeros'`` leaves
out edges from padded positions; ``'reflect'``, ``'replicate'`` and ``'circular'`` take the edge from the
reflected, clamped or wrapped input pixel, so every target has exactly ``kH*kW`` incoming edges.

Everything here is built vectorised from a :class:`~gridgraph.geometry.ConvGeometry` and cached per
(geometry, grid size, batch size, device), and depends on nothing but those.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from torch_geometric.data import Data

from .geometry import ConvGeometry

__all__ = ["PixelGraph", "NeighbourTable", "image_to_graph", "graph_to_image", "grid_to_graph",
           "neighbour_table", "to_networkx", "clear_cache", "sequence_to_graph", "volume_to_graph"]


# ---------------------------------------------------------------------------------------- tables
@dataclass(frozen=True, eq=False)
class NeighbourTable:
    """The pixel graph of one image as a fixed-slot table: ``index[i, t]`` is the source pixel that
    the tap ``t`` of target pixel ``i`` reads, or ``-1`` where that edge is absent (zero padding).

    It is the edge list of a grid graph in another layout: at most one edge per (target, tap).
    Node ids are per image; a batch of ``B`` images repeats the table with offsets.
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

    @property
    def num_taps(self) -> int:
        return self.index.size(1)

    @property
    def device(self) -> torch.device:
        return self.index.device


def _axis_sources(n_in: int, n_out: int, k: int, s: int, d: int, pad: int, mode: str,
                  device: torch.device) -> tuple[Tensor, Tensor]:
    """Source coordinate ``[n_out, k]`` along one axis, and whether the edge exists."""
    pos = (torch.arange(n_out, device=device) * s)[:, None] + (torch.arange(k, device=device) * d - pad)[None, :]
    inside = (pos >= 0) & (pos < n_in)
    if mode == "zeros":
        return pos.clamp(0, n_in - 1), inside
    if mode == "replicate":
        src = pos.clamp(0, n_in - 1)
    elif mode == "circular":
        src = torch.remainder(pos, n_in)
    elif mode == "reflect":
        src = torch.where(pos < 0, -pos, pos)
        src = torch.where(src >= n_in, 2 * (n_in - 1) - src, src)
    else:  # pragma: no cover - geometry validates the mode
        raise ValueError(f"unknown padding_mode {mode!r}")
    return src, torch.ones_like(inside)


def _row_runs(geometry: ConvGeometry, in_size: tuple[int, ...], out_size: tuple[int, ...],
              device: torch.device) -> tuple[list[tuple[int, int, Tensor]], int, bool]:
    """The table as runs of output rows (along the first axis) that are shifted copies of each other.

    Returns ``(runs, shift, complete)``: each run ``(start, stop, row)`` holds the table entries of its
    first output row (``row``: ``[prod(out_size[1:]) * num_taps]`` long, ``-1`` for absent edges); the
    row ``start + k`` of the run reads the sources of ``row`` shifted by ``k * shift`` (absent edges
    in the same places). Away from the borders a whole image is one run, so the table and the edge
    list are written as a handful of broadcast additions of one row, never through an ``[N, T]`` mask.
    """
    n = geometry.ndim
    strides = [math.prod(in_size[a + 1:]) for a in range(n)]
    parts, oks, complete = [], [], True
    for a in range(n):
        src, ok = _axis_sources(in_size[a], out_size[a], geometry.kernel_size[a], geometry.stride[a],
                                geometry.dilation[a], geometry.padding[a][0], geometry.padding_mode, device)
        complete = complete and bool(ok.all())
        shape = [1] * (2 * n)
        shape[a], shape[n + a] = out_size[a], geometry.kernel_size[a]
        parts.append(torch.where(ok, src * strides[a], -(1 << 40)).view(shape))
        oks.append((src, ok))
    # Row r continues the run of row r-1 when its present taps are the same and each reads one
    # stride further along the first axis.
    src0, ok0 = oks[0]
    s0 = geometry.stride[0]
    same = (ok0[1:] == ok0[:-1]).all(1) & ((src0[1:] - src0[:-1] == s0) | ~ok0[1:]).all(1)
    starts = [0] + (torch.nonzero(~same).view(-1) + 1).tolist()
    bounds = starts + [out_size[0]]
    rest = parts[1:]
    runs = []
    for r0, r1 in zip(bounds[:-1], bounds[1:]):
        row = parts[0][r0:r0 + 1]
        for part in rest:
            row = row + part
        row = row.expand(1, *out_size[1:], *geometry.kernel_size).reshape(-1).clamp(min=-1)
        runs.append((r0, r1, row))
    return runs, s0 * strides[0], complete


def _build_table(geometry: ConvGeometry, in_size: tuple[int, ...], device: torch.device) -> NeighbourTable:
    out_size = geometry.output_size(in_size)
    num_dst, num_taps = math.prod(out_size), geometry.num_taps
    runs, shift, complete = _row_runs(geometry, in_size, out_size, device)
    index = torch.empty(out_size[0], num_dst // out_size[0] * num_taps, dtype=torch.long, device=device)
    for r0, r1, row in runs:
        block = index[r0:r1]
        torch.add(row[None, :], torch.arange(r1 - r0, device=device)[:, None] * shift, out=block)
        holes = (row < 0).nonzero().view(-1)
        if holes.numel():
            block.index_fill_(1, holes, -1)
    return NeighbourTable(index.view(num_dst, num_taps), geometry, tuple(in_size), tuple(out_size), complete)


# ----------------------------------------------------------------------------------------- cache
class _Cache:
    """A small LRU cache of graph structure, invalidated if a cached tensor was modified in place.

    At most ``maxsize`` entries, and (when ``max_bytes`` is given) at most that many bytes of cached
    tensors, the newest entry always kept: a 1024x1024 pixel graph alone holds ~300 MB of edges.
    """

    def __init__(self, maxsize: int, max_bytes: Optional[int] = None) -> None:
        self.maxsize = maxsize
        self.max_bytes = max_bytes
        self._items: OrderedDict[Any, tuple[Any, tuple[tuple[Tensor, int], ...], int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Any, build) -> Any:
        with self._lock:
            item = self._items.get(key)
            if item is not None and all(t._version == v for t, v in item[1]):
                self._items.move_to_end(key)
                return item[0]
        value, tensors = build()
        size = sum(t.numel() * t.element_size() for t in tensors)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[2]
            self._items[key] = (value, tuple((t, t._version) for t in tensors), size)
            self._bytes += size
            while len(self._items) > 1 and (len(self._items) > self.maxsize or
                                            (self.max_bytes is not None and self._bytes > self.max_bytes)):
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted[2]
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


_TABLES = _Cache(maxsize=128, max_bytes=1 << 30)
_EDGES = _Cache(maxsize=16, max_bytes=2 << 30)


_CLEAR_HOOKS: list = []  # other caches keyed by graph structure (the layers' index plans) register here


def clear_cache() -> None:
    """Forget every cached neighbour table and edge list (and the layers' index plans built on them)."""
    _TABLES.clear()
    _EDGES.clear()
    for hook in _CLEAR_HOOKS:
        hook()


def _device(device: Any) -> torch.device:
    device = torch.device(device if device is not None else "cpu")
    if device.type != "cpu" and device.index is None:
        device = torch.device(device.type, torch.empty(0, device=device).device.index)
    return device


def neighbour_table(geometry: ConvGeometry, in_size: Sequence[int], device: Any = None) -> NeighbourTable:
    """The (cached) :class:`NeighbourTable` of one image of spatial size ``in_size``.

    Example:
        >>> g = ConvGeometry.from_keywords(2, kernel_size=3, padding=1)
        >>> neighbour_table(g, (2, 2)).index.tolist()
        [[-1, -1, -1, -1, 0, 1, -1, 2, 3], [-1, -1, -1, 0, 1, -1, 2, 3, -1], [-1, 0, 1, -1, 2, 3, -1, -1, -1], [0, 1, -1, 2, 3, -1, -1, -1, -1]]
    """
    in_size = tuple(int(n) for n in in_size)
    device = _device(device)
    geometry.output_size(in_size)  # validates before caching anything

    def build():
        table = _build_table(geometry, in_size, device)
        return table, (table.index,)

    return _TABLES.get((geometry, in_size, device), build)


@dataclass(frozen=True, eq=False)
class GridEdges:
    """What a layer needs to recognise a pixel graph's own ``edge_index``: its table and batch size.

    It is attached to the ``edge_index`` tensor that :func:`image_to_graph` returns (as the attribute
    ``_gridgraph``), so the plain call ``layer(g.x, g.edge_index, g.edge_type)`` finds the fast path.
    It is trusted only while neither tensor has been modified in place.
    """

    table: NeighbourTable
    num_images: int
    edge_index_version: int
    edge_type: Tensor
    edge_type_version: int

    def matches(self, edge_index: Tensor, edge_type: Optional[Tensor]) -> bool:
        return (edge_index._version == self.edge_index_version and edge_type is self.edge_type
                and edge_type._version == self.edge_type_version)


def grid_edges(edge_index: Tensor, edge_type: Optional[Tensor]) -> Optional[GridEdges]:
    """The :class:`GridEdges` record of a pixel graph's ``edge_index``, or None for any other graph."""
    info = getattr(edge_index, "_gridgraph", None)
    if isinstance(info, GridEdges) and info.matches(edge_index, edge_type):
        return info
    return None


def _edges(table: NeighbourTable, num_images: int, dtype: torch.dtype):
    """``(edge_index, edge_type, edge_attr, pos, batch)`` of a batch of ``num_images`` images (cached).

    Written straight into the final tensors: per image, edges are the table's present entries in
    target-major order (taps ascending), a batch repeats them with node-id offsets. ``batch`` is
    None for a single image.
    """
    key = (table.geometry, table.in_size, table.device, num_images, dtype)

    def build():
        device = table.device
        ndim = table.geometry.ndim
        n_dst, n_taps = table.num_dst, table.num_taps
        index = table.index
        offsets = table.geometry.offsets().to(device=device, dtype=dtype)
        runs, shift, _ = _row_runs(table.geometry, table.in_size, table.out_size, device)
        row_dst = n_dst // table.out_size[0]
        patterns = []
        for r0, r1, row in runs:
            cols = (row >= 0).nonzero().view(-1)  # present entries of the run's first row, in edge order
            patterns.append((r0, r1, row[cols], cols // n_taps + r0 * row_dst, cols % n_taps))
        e = sum((r1 - r0) * src.numel() for r0, r1, src, _, _ in patterns)
        edge_index = torch.empty(2, num_images * e, dtype=torch.long, device=device)
        edge_type = torch.empty(num_images * e, dtype=torch.long, device=device)
        edge_attr = torch.empty(num_images * e, ndim, dtype=dtype, device=device)
        # The first image is written run by run straight into the outputs; further images repeat it.
        start = 0
        for r0, r1, src, dst, tap in (patterns if num_images else ()):
            rows, per_row = r1 - r0, src.numel()
            seg = slice(start, start + rows * per_row)
            k = torch.arange(rows, device=device)[:, None]
            torch.add(src[None, :], k * shift, out=edge_index[0, seg].view(rows, per_row))
            torch.add(dst[None, :], k * row_dst, out=edge_index[1, seg].view(rows, per_row))
            edge_type[seg].view(rows, per_row).copy_(tap[None, :].expand(rows, per_row))
            edge_attr[seg].view(rows, per_row, ndim).copy_(offsets[tap][None].expand(rows, per_row, ndim))
            start = seg.stop
        if num_images > 1:
            for out, stride in ((edge_index[0], table.num_src), (edge_index[1], n_dst), (edge_type, 0),
                                (edge_attr, 0)):
                first = out[:e]
                rest = out[e:].view(num_images - 1, *first.shape)
                if stride:
                    offs = torch.arange(1, num_images, device=device)[:, None] * stride
                    torch.add(first[None], offs, out=rest)
                else:
                    rest.copy_(first[None].expand_as(rest))
        edge_index._gridgraph = GridEdges(table, num_images, edge_index._version, edge_type, edge_type._version)
        n_src = table.num_src
        pos = torch.empty(num_images, *table.in_size, ndim, dtype=torch.long, device=device)
        for a, size in enumerate(table.in_size):
            shape = [1] * (ndim + 1)
            shape[a + 1] = size
            pos[..., a].copy_(torch.arange(size, device=device).view(shape).expand(pos.shape[:-1]))
        pos = pos.view(num_images * n_src, ndim)
        batch = None
        if num_images > 1:
            batch = torch.arange(num_images, device=device).repeat_interleave(n_src)
        value = (edge_index, edge_type, edge_attr, pos, batch)
        return value, tuple(t for t in value if t is not None)

    return _EDGES.get(key, build)


# ----------------------------------------------------------------------------------------- graphs
class PixelGraph(Data):
    """A :class:`torch_geometric.data.Data` holding a pixel graph and what it takes to rebuild images.

    Attributes: ``x`` ``[B*N_in, C]``, ``edge_index`` ``[2, E]``, ``edge_type`` ``[E]``, ``edge_attr``
    ``[E, ndim]``, ``pos`` ``[B*N_in, ndim]`` (row, col) of each input pixel, ``batch`` (when B > 1),
    and the plain attributes ``geometry``, ``in_size``, ``out_size``, ``num_images``, ``batched``.
    ``size()`` returns ``(num_src, num_dst)``: the ``size`` argument a layer takes.
    """

    def size(self, dim: Optional[int] = None):  # type: ignore[override]
        if getattr(self, "in_size", None) is None:
            return super().size(dim)
        size = (self.num_images * math.prod(self.in_size), self.num_images * math.prod(self.out_size))
        return size if dim is None else size[dim]

    @property
    def num_src(self) -> int:
        return self.size(0)

    @property
    def num_dst(self) -> int:
        return self.size(1)

    @property
    def table(self) -> NeighbourTable:
        """The per-image :class:`NeighbourTable` this graph was built from."""
        return neighbour_table(self.geometry, self.in_size, self.edge_index.device)


def _check_image(image: Any, ndim: int, name: str = "image") -> tuple[Tensor, bool]:
    if not isinstance(image, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (got {type(image).__name__})")
    if image.dim() not in (ndim + 1, ndim + 2):
        dims = "HW"[:ndim] if ndim <= 2 else "DHW"
        dims = {1: "L", 2: "H, W", 3: "D, H, W"}[ndim]
        raise ValueError(f"expected {name} of shape (C, {dims}) or (B, C, {dims}): {ndim + 1} or {ndim + 2} "
                         f"dims (got a {image.dim()}-dim tensor of shape {tuple(image.shape)})")
    batched = image.dim() == ndim + 2
    return (image if batched else image.unsqueeze(0)), batched


def grid_to_graph(image: Tensor, geometry: ConvGeometry) -> PixelGraph:
    """The pixel graph of ``image`` (``(C, *grid)`` or ``(B, C, *grid)``) under ``geometry`` (n-d)."""
    images, batched = _check_image(image, geometry.ndim)
    num_images, channels, *grid = images.shape
    table = neighbour_table(geometry, grid, images.device)
    edge_dtype = image.dtype if image.is_floating_point() else torch.get_default_dtype()
    edge_index, edge_type, edge_attr, pos, batch = _edges(table, num_images, edge_dtype)
    perm = (0, *range(2, geometry.ndim + 2), 1)
    x = images.permute(perm).reshape(-1, channels)
    graph = PixelGraph(x=x, edge_index=edge_index, edge_type=edge_type, edge_attr=edge_attr, pos=pos)
    if num_images > 1:
        graph.batch = batch
    graph.geometry = geometry
    graph.in_size = table.in_size
    graph.out_size = table.out_size
    graph.num_images = num_images
    graph.batched = batched
    return graph


def _geometry(conv: Any, ndim: int, kernel_size: Any, stride: Any, padding: Any, dilation: Any,
              padding_mode: str) -> ConvGeometry:
    if conv is None:
        return ConvGeometry.from_keywords(ndim, kernel_size, stride, padding, dilation, padding_mode)
    geometry = ConvGeometry.from_module(conv)
    if geometry.ndim != ndim:
        raise ValueError(f"conv is a {geometry.ndim}-d convolution; expected a {ndim}-d one")
    return geometry


def image_to_graph(image: Tensor, conv: Any = None, *, kernel_size: Any = 3, stride: Any = 1,
                   padding: Any = 1, dilation: Any = 1, padding_mode: str = "zeros",
                   mask: Optional[Tensor] = None) -> PixelGraph:
    """Turn an image ``(C, H, W)`` or batch ``(B, C, H, W)`` into the pixel graph of a convolution.

    The geometry comes from ``conv`` (an ``nn.Conv2d`` or a gridgraph layer) when given, otherwise
    from the keywords, which mean what they mean for ``nn.Conv2d``. The graph depends only on the
    geometry and the image size (it is cached); ``x`` holds the image's pixels as node features.

    Args:
        image (Tensor): ``(C, H, W)`` or ``(B, C, H, W)``.
        conv (nn.Module, optional): take the geometry (and check the channel count) from this layer.
            A transposed convolution (``nn.ConvTranspose2d``, :class:`~gridgraph.GridConvTranspose2d`)
            gives its reversed graph (see :func:`~gridgraph.domains.transposed_image_to_graph`).
        kernel_size, stride, padding, dilation, padding_mode: as in ``nn.Conv2d``.
        mask (Tensor, optional): bool ``(H, W)`` or ``(B, H, W)``: only its True pixels become nodes
            (row-major), and edges join them only; see :func:`~gridgraph.domains.masked_grid_to_graph`
            (a :class:`~gridgraph.domains.MaskedPixelGraph`, ``g.size()`` = active (inputs, outputs)).

    Returns:
        PixelGraph: ``x [B*H*W, C]``, ``edge_index [2, E]``, ``edge_type [E]``, ``edge_attr [E, 2]``,
        ``pos [B*H*W, 2]``, ``batch`` (B > 1), and the grid sizes; ``g.size()`` is ``(B*H*W, B*H_out*W_out)``.

    Example:
        >>> g = image_to_graph(torch.arange(4.).view(1, 2, 2), kernel_size=1, padding=0)
        >>> g.edge_index.tolist(), g.x.flatten().tolist()
        ([[0, 1, 2, 3], [0, 1, 2, 3]], [0.0, 1.0, 2.0, 3.0])
    """
    if conv is not None and getattr(conv, "transposed", False) is True:  # nn.ConvTranspose2d, GridConvTranspose2d
        if mask is not None:
            raise ValueError("mask is not supported with a transposed convolution")
        from .domains import transposed_image_to_graph
        return transposed_image_to_graph(image, conv)
    geometry = _geometry(conv, 2, kernel_size, stride, padding, dilation, padding_mode)
    if conv is not None:
        _check_image(image, 2)
        expected = getattr(conv, "in_channels", None)
        channels = image.shape[-3]
        if expected is not None and channels != expected:
            raise ValueError(f"expected image with {expected} channels for {type(conv).__name__} "
                             f"(got {channels} channels, image of shape {tuple(image.shape)})")
    if mask is not None:
        from .domains import masked_grid_to_graph
        return masked_grid_to_graph(image, geometry, mask)
    return grid_to_graph(image, geometry)


def graph_to_image(x: Tensor, graph: PixelGraph, side: Optional[str] = None) -> Tensor:
    """Turn node features ``[N, C]`` back into images ``(B, C, H, W)`` (``(C, H, W)`` if unbatched).

    Args:
        x (Tensor): node features on the input grid (``N = B*H*W``) or the output grid
            (``N = B*H_out*W_out``) of ``graph``.
        graph (PixelGraph): the graph that :func:`image_to_graph` returned.
        side (str, optional): ``'input'`` or ``'output'``; by default the grid whose node count matches
            (a ValueError asks for ``side`` when both match but their shapes differ).

    The result is a view of ``x`` where possible: image -> graph -> image is bit-exact.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor (got {type(x).__name__})")
    if not isinstance(graph, PixelGraph) or getattr(graph, "in_size", None) is None:
        raise TypeError(f"graph must be a PixelGraph from image_to_graph (got {type(graph).__name__})")
    if x.dim() != 2:
        raise ValueError(f"expected x of shape [num_nodes, channels]: 2 dims (got shape {tuple(x.shape)})")
    if getattr(graph, "in_keys", None) is not None:  # a masked / sparse graph: scatter into zero images
        from .domains import masked_graph_to_image
        return masked_graph_to_image(x, graph, side)
    b = graph.num_images
    grids = {"input": tuple(graph.in_size), "output": tuple(graph.out_size)}
    if side is None:
        fits = [s for s, grid in grids.items() if b * math.prod(grid) == x.size(0)]
        if not fits:
            raise ValueError(f"x has {x.size(0)} rows, but the graph has {b}x{math.prod(grids['input'])} "
                             f"input nodes and {b}x{math.prod(grids['output'])} output nodes")
        if len(fits) == 2 and grids["input"] != grids["output"]:
            raise ValueError(f"x has {x.size(0)} rows, which fits both the input grid {grids['input']} and the "
                             f"output grid {grids['output']}; pass side='input' or side='output'")
        side = fits[0]
    if side not in grids:
        raise ValueError(f"side must be 'input', 'output' or None (got {side!r})")
    grid = grids[side]
    if x.size(0) != b * math.prod(grid):
        raise ValueError(f"x has {x.size(0)} rows, but the {side} grid holds {b}x{'x'.join(map(str, grid))} = "
                         f"{b * math.prod(grid)} nodes")
    n = len(grid)
    image = x.view(b, *grid, x.size(1)) if x.is_contiguous() else x.reshape(b, *grid, x.size(1))
    image = image.permute(0, n + 1, *range(1, n + 1))
    return image if graph.batched else image[0]


def to_networkx(graph: PixelGraph):
    """Export a pixel graph to a ``networkx.MultiDiGraph`` for drawing (every edge kept).

    Nodes of the input grid are ``0 .. N_in-1``; when the output grid differs (stride, no 'same'
    padding), output nodes are ``N_in + i``. Node attributes: ``pixel`` (row, col), ``side``
    (``'input'``/``'output'``), and ``pos`` (x, y) = (col, -row) ready for ``networkx.draw``
    (outputs drawn at their anchors, shifted by half a pixel). Edge attributes: ``tap`` and ``offset``;
    the edge key is the tap, so the parallel edges that reflect / replicate / circular padding create
    (one pixel read by several taps of the same target) are all kept.
    """
    import networkx as nx

    if graph.geometry.ndim != 2:
        raise ValueError("to_networkx draws 2-d pixel graphs only")
    nxg = nx.MultiDiGraph()
    n_in = graph.num_src
    same_grid = tuple(graph.in_size) == tuple(graph.out_size)
    pos = graph.pos.tolist()
    for j, (r, c) in enumerate(pos):
        nxg.add_node(j, pixel=(r, c), side="input", pos=(c, -r))
    shift = 0 if same_grid else n_in
    if not same_grid:
        h_out, w_out = graph.out_size
        s_h, s_w = graph.geometry.stride
        out_pos = getattr(graph, "out_pos", None)  # a masked graph's active outputs
        out_pos = out_pos.tolist() if out_pos is not None else None
        for i in range(graph.num_dst):
            r, c = out_pos[i] if out_pos is not None else ((i % (h_out * w_out)) // w_out, i % w_out)
            nxg.add_node(n_in + i, pixel=(r, c), side="output", pos=(c * s_w + 0.3, -(r * s_h) - 0.3))
    src, dst = graph.edge_index.tolist()
    taps = graph.edge_type.tolist()
    offs = graph.edge_attr.tolist()
    for j, i, t, o in zip(src, dst, taps, offs):
        nxg.add_edge(j, i + shift, key=t, tap=t, offset=tuple(o))
    return nxg


# ------------------------------------------------------------------------- sequences and volumes
def _grid_graph_from(data: Tensor, ndim: int, conv: Any, kernel_size: Any, stride: Any, padding: Any,
                     dilation: Any, padding_mode: str, name: str) -> PixelGraph:
    """:func:`image_to_graph` for ``ndim`` spatial dimensions: geometry from ``conv`` or the keywords."""
    if conv is not None and getattr(conv, "transposed", False) is True:  # nn.ConvTransposeNd and twins
        from .domains import TransposedGeometry, transposed_grid_to_graph
        transposed = TransposedGeometry.from_module(conv)
        if transposed.ndim != ndim:
            raise ValueError(f"conv is a {transposed.ndim}-d transposed convolution; expected a {ndim}-d one")
        _check_image(data, ndim, name)
        expected = getattr(conv, "in_channels", None)
        if expected is not None and data.shape[-ndim - 1] != expected:
            raise ValueError(f"expected {name} with {expected} channels for {type(conv).__name__} "
                             f"(got {data.shape[-ndim - 1]} channels, {name} of shape {tuple(data.shape)})")
        return transposed_grid_to_graph(data, transposed)
    geometry = _geometry(conv, ndim, kernel_size, stride, padding, dilation, padding_mode)
    if conv is not None:
        _check_image(data, ndim, name)
        expected = getattr(conv, "in_channels", None)
        channels = data.shape[-ndim - 1]
        if expected is not None and channels != expected:
            raise ValueError(f"expected {name} with {expected} channels for {type(conv).__name__} "
                             f"(got {channels} channels, {name} of shape {tuple(data.shape)})")
    else:
        _check_image(data, ndim, name)
    return grid_to_graph(data, geometry)


def sequence_to_graph(sequence: Tensor, conv: Any = None, *, kernel_size: Any = 3, stride: Any = 1,
                      padding: Any = 1, dilation: Any = 1, padding_mode: str = "zeros") -> PixelGraph:
    """The graph of a sequence ``(C, L)`` or batch ``(B, C, L)`` under a 1-D convolution.

    Node ``b*L + l`` is position ``l`` of sequence ``b``; the edge types are the taps ``u`` of the
    kernel. The 1-D twin of :func:`image_to_graph` (same keywords, meaning what they mean for
    ``nn.Conv1d``; the geometry comes from ``conv``, an ``nn.Conv1d`` or :class:`~gridgraph.GridConv1d`,
    when given). :func:`graph_to_image` turns node features back into ``(B, C, L)``.

    Example:
        >>> from gridgraph.graph import sequence_to_graph
        >>> g = sequence_to_graph(torch.arange(4.).view(1, 4), kernel_size=3, padding=1)
        >>> g.edge_index[:, g.edge_index[1] == 0].tolist(), g.size()
        ([[0, 1], [0, 0]], (4, 4))
    """
    return _grid_graph_from(sequence, 1, conv, kernel_size, stride, padding, dilation, padding_mode, "sequence")


def volume_to_graph(volume: Tensor, conv: Any = None, *, kernel_size: Any = 3, stride: Any = 1,
                    padding: Any = 1, dilation: Any = 1, padding_mode: str = "zeros") -> PixelGraph:
    """The graph of a volume ``(C, D, H, W)`` or batch ``(B, C, D, H, W)`` under a 3-D convolution.

    Node ``b*D*H*W + d*H*W + h*W + w`` is voxel ``(d, h, w)``; the edge type of the tap ``(u, v, w)`` is
    ``u*kH*kW + v*kW + w``. The 3-D twin of :func:`image_to_graph` (keywords as for ``nn.Conv3d``;
    the geometry comes from ``conv``, an ``nn.Conv3d`` or :class:`~gridgraph.GridConv3d`, when given).

    Example:
        >>> from gridgraph.graph import volume_to_graph
        >>> g = volume_to_graph(torch.zeros(1, 2, 3, 4), kernel_size=3, padding=1)
        >>> g.x.shape, g.pos.shape, int((g.edge_index[1] == 0).sum())  # a corner voxel has 8 neighbours
        (torch.Size([24, 1]), torch.Size([24, 3]), 8)
    """
    return _grid_graph_from(volume, 3, conv, kernel_size, stride, padding, dilation, padding_mode, "volume")

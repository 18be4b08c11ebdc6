"""Pixel graphs beyond the full grid: the reversed graphs of transposed convolutions, and masked or
sparse pixel domains.

**Transposed convolution.** A transposed convolution with kernel ``k``, stride ``s``, padding ``p``,
dilation ``d`` and output padding ``op`` maps a grid of size ``H`` to
``H_out = (H - 1) s - 2p + d (k - 1) + op + 1``; that is exactly a grid on which the strided
convolution of the same ``(k, s, p, d)`` has ``H`` outputs. Its graph is that convolution's graph with
every edge reversed: the tap ``t`` of source pixel ``i`` (on the ``H`` grid) sends to the pixel
``q = i*s + t*d - p`` of the ``H_out`` grid, when that pixel exists. :func:`transposed_image_to_graph`
builds it (sources = the input pixels of the transposed convolution, targets = its output pixels), and
holds it, like every pixel graph, also as a target-major neighbour table (``index[q, t]`` = the one source
that reaches ``q`` through tap ``t``, or ``-1``), so the layers take their fast path on it.

**Masked and sparse domains.** Only *active* pixels become nodes (row-major, image by image); edges
join active pixels only. With stride 1 and an output grid equal to the input grid the graph is
*submanifold*: the outputs live on the active input pixels (same nodes, same order). Otherwise an output
pixel is active when any input pixel in its window is active. Either way a layer on the graph equals the
dense convolution of the image with inactive pixels zeroed, read at the active output pixels.
The layers on such a graph (:func:`~gridgraph.nn.sparse_conv.sparse_table_conv`) cost memory and time
in proportion to its edges, never ``H x W``. Construction reads a mask once (``O(B*H*W)``, as the mask
itself) and, while the grid is at most :data:`DENSE_MAP_LIMIT` pixels or 16 per active pixel, uses dense
id / occupancy maps of the zero-padded grid (one shift and one gather per tap); beyond that (a huge,
nearly empty grid from :func:`sparse_to_graph`) it works from the active sites' coordinates only
(sorting and binary search), except that deciding which outputs of a *strided* graph with a padding
mode other than ``'zeros'`` are active scans the output grid once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from .geometry import ConvGeometry, _ntuple
from .graph import GridEdges, NeighbourTable, PixelGraph, _Cache, _check_image, _device

__all__ = ["TransposedGeometry", "TransposedPixelGraph", "transposed_table", "transposed_grid_to_graph",
           "transposed_image_to_graph", "SparseTable", "MaskedPixelGraph", "masked_grid_to_graph",
           "sparse_grid_to_graph", "sparse_to_graph", "masked_graph_to_image"]


# ------------------------------------------------------------------------------- transposed graphs
@dataclass(frozen=True)
class TransposedGeometry:
    """The geometry of an ``n``-d transposed convolution: the strided convolution it reverses, plus
    the output padding that picks one of the ``H_out`` grids that convolution maps to ``H``.

    Example:
        >>> t = TransposedGeometry.from_keywords(2, kernel_size=3, stride=2, padding=1, output_padding=1)
        >>> t.output_size((4, 5))
        (8, 10)
    """

    conv: ConvGeometry
    output_padding: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.conv.padding_mode != "zeros":
            raise ValueError('Only "zeros" padding mode is supported for a transposed convolution '
                             f"(got padding_mode={self.conv.padding_mode!r})")
        if any(a != b for a, b in self.conv.padding):
            raise ValueError(f"a transposed convolution takes symmetric padding (got {self.conv.padding})")
        for op, s, d in zip(self.output_padding, self.conv.stride, self.conv.dilation):
            if op < 0 or (op >= s and op >= d):
                raise ValueError("output padding must be smaller than either stride or dilation "
                                 f"(got output_padding={self.output_padding}, stride={self.conv.stride}, "
                                 f"dilation={self.conv.dilation})")

    @classmethod
    def from_keywords(cls, ndim: int, kernel_size: Any = 3, stride: Any = 1, padding: Any = 0,
                      output_padding: Any = 0, dilation: Any = 1) -> "TransposedGeometry":
        """From ``nn.ConvTransposeNd``-style keywords (integer padding only, as there)."""
        if isinstance(padding, str):
            raise TypeError(f"padding of a transposed convolution must be an int or a tuple of {ndim} ints "
                            f"(got {padding!r})")
        conv = ConvGeometry.from_keywords(ndim, kernel_size, stride, padding, dilation, "zeros")
        return cls(conv, _ntuple(output_padding, ndim, "output_padding"))

    @classmethod
    def from_module(cls, module: Any) -> "TransposedGeometry":
        """The geometry of an ``nn.ConvTranspose1d/2d/3d`` or a :class:`~gridgraph.GridConvTranspose2d`."""
        geometry = getattr(module, "transposed_geometry", None)
        if isinstance(geometry, TransposedGeometry):
            return geometry
        if isinstance(module, torch.nn.modules.conv._ConvNd) and module.transposed:
            if module.padding_mode != "zeros":
                raise ValueError(f'Only "zeros" padding mode is supported for {type(module).__name__}')
            n = len(module.kernel_size)
            return cls.from_keywords(n, module.kernel_size, module.stride, module.padding, module.output_padding,
                                     module.dilation)
        raise TypeError("conv must be an nn.ConvTranspose1d/2d/3d or a gridgraph transposed convolution "
                        f"(got {type(module).__name__})")

    @property
    def ndim(self) -> int:
        return self.conv.ndim

    @property
    def num_taps(self) -> int:
        return self.conv.num_taps

    def output_size(self, input_size: Sequence[int]) -> tuple[int, ...]:
        """``H_out = (H - 1) s - 2p + d (k - 1) + op + 1`` per dimension; a ValueError where it is not positive."""
        input_size = tuple(int(n) for n in input_size)
        if len(input_size) != self.ndim:
            raise ValueError(f"expected a grid of {self.ndim} dimensions (got size {input_size})")
        if any(n < 1 for n in input_size):
            raise ValueError(f"image size must be positive in every spatial dimension (got {input_size})")
        c = self.conv
        out = tuple((n - 1) * s - 2 * p + d * (k - 1) + op + 1 for n, s, (p, _), d, k, op in
                    zip(input_size, c.stride, c.padding, c.dilation, c.kernel_size, self.output_padding))
        if any(n < 1 for n in out):
            raise ValueError(f"the transposed convolution's output size {out} is not positive for an input of "
                             f"size {input_size}")
        return out


def transposed_table(geometry: TransposedGeometry, in_size: Sequence[int], device: Any = None) -> NeighbourTable:
    """The (cached) target-major table of a transposed convolution's graph on one image.

    ``index[q, t]`` is the input pixel ``i`` whose tap ``t`` reaches the output pixel ``q``
    (``q = i*s + t*d - p`` per dimension), or ``-1``. Built by reversing the strided convolution's
    table on the output grid: for a fixed tap, ``i -> q`` is one-to-one, so every (target, tap) slot
    holds at most one source.

    Example:
        >>> t = TransposedGeometry.from_keywords(1, kernel_size=3, stride=2, padding=1)
        >>> transposed_table(t, (3,)).index.tolist()  # 3 inputs -> 5 outputs
        [[-1, 0, -1], [1, -1, 0], [-1, 1, -1], [2, -1, 1], [-1, 2, -1]]
    """
    in_size = tuple(int(n) for n in in_size)
    device = _device(device)
    out_size = geometry.output_size(in_size)

    def build():
        conv, n = geometry.conv, geometry.ndim
        # The strided convolution's table on the output grid, restricted to its first in_size rows:
        # fwd[i, t] = the output pixel that input pixel i sends to through tap t (-1: outside).
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
        # Reverse it: index[q, t] = i.
        src, tap = valid.nonzero(as_tuple=True)
        index = torch.full((math.prod(out_size), num_taps), -1, dtype=torch.long, device=device)
        index[fwd[src, tap], tap] = src
        table = NeighbourTable(index, conv, in_size, out_size, bool((index >= 0).all()))
        return table, (index,)

    return _TRANSPOSED.get((geometry, in_size, device), build)


_TRANSPOSED = _Cache(maxsize=64)
_TRANSPOSED_EDGES = _Cache(maxsize=16)


class TransposedPixelGraph(PixelGraph):
    """The :class:`~gridgraph.PixelGraph` of a transposed convolution: sources on the input grid
    (``in_size``), targets on the larger output grid (``out_size``); ``geometry`` is the strided
    convolution whose edges it reverses, ``transposed_geometry`` the transposed convolution's own."""

    @property
    def table(self) -> NeighbourTable:
        return transposed_table(self.transposed_geometry, self.in_size, self.edge_index.device)


def _transposed_edges(table: NeighbourTable, geometry: TransposedGeometry, num_images: int, dtype: torch.dtype):
    key = (geometry, table.in_size, table.device, num_images, dtype)

    def build():
        device = table.device
        dst, tap = (table.index >= 0).nonzero(as_tuple=True)  # target-major, taps ascending
        src = table.index[dst, tap]
        e = src.numel()
        b = torch.arange(num_images, device=device)[:, None]
        edge_index = torch.empty(2, num_images * e, dtype=torch.long, device=device)
        edge_index[0].view(num_images, e).copy_(src[None, :] + b * table.num_src)
        edge_index[1].view(num_images, e).copy_(dst[None, :] + b * table.num_dst)
        edge_type = tap.repeat(num_images)
        edge_attr = geometry.conv.offsets().to(device=device, dtype=dtype)[tap].repeat(num_images, 1)
        edge_index._gridgraph = GridEdges(table=table, num_images=num_images, edge_index_version=edge_index._version,
                                          edge_type=edge_type, edge_type_version=edge_type._version)
        coords = torch.stack(torch.meshgrid(*[torch.arange(n, device=device) for n in table.in_size],
                                            indexing="ij"), dim=-1).reshape(-1, geometry.ndim)
        pos = coords.repeat(num_images, 1)
        batch = torch.arange(num_images, device=device).repeat_interleave(table.num_src)
        value = (edge_index, edge_type, edge_attr, pos, batch)
        return value, value

    return _TRANSPOSED_EDGES.get(key, build)


def transposed_grid_to_graph(image: Tensor, geometry: TransposedGeometry) -> TransposedPixelGraph:
    """The graph of a transposed convolution on ``image`` (``(C, *grid)`` or ``(B, C, *grid)``), n-d."""
    images, batched = _check_image(image, geometry.ndim)
    num_images, channels, *grid = images.shape
    table = transposed_table(geometry, grid, images.device)
    edge_dtype = image.dtype if image.is_floating_point() else torch.get_default_dtype()
    edge_index, edge_type, edge_attr, pos, batch = _transposed_edges(table, geometry, num_images, edge_dtype)
    x = images.permute(0, *range(2, geometry.ndim + 2), 1).reshape(-1, channels)
    graph = TransposedPixelGraph(x=x, edge_index=edge_index, edge_type=edge_type, edge_attr=edge_attr, pos=pos)
    if num_images > 1:
        graph.batch = batch
    graph.geometry = geometry.conv
    graph.transposed_geometry = geometry
    graph.in_size = table.in_size
    graph.out_size = table.out_size
    graph.num_images = num_images
    graph.batched = batched
    return graph


def transposed_image_to_graph(image: Tensor, conv: Any = None, *, kernel_size: Any = 3, stride: Any = 1,
                              padding: Any = 0, output_padding: Any = 0, dilation: Any = 1) -> TransposedPixelGraph:
    """The pixel graph of a 2-D transposed convolution on an image ``(C, H, W)`` or batch ``(B, C, H, W)``.

    Sources are the image's pixels, targets the pixels of the ``H_out x W_out`` output grid
    (``H_out = (H-1) s - 2p + d (k-1) + op + 1``); the edge ``j -> q`` of tap ``t = u*kW + v`` exists when
    ``q = j*s + (u*dH - p_H, v*dW - p_W)`` lies on the output grid: the strided convolution's graph
    reversed. ``edge_attr`` holds that offset ``(dy, dx)`` from the source's anchor ``j*s``.
    The geometry comes from ``conv`` (an ``nn.ConvTranspose2d`` or
    :class:`~gridgraph.GridConvTranspose2d`) when given, else from the keywords (as in ``nn.ConvTranspose2d``).
    :func:`~gridgraph.image_to_graph` calls this when its ``conv`` is a transposed convolution.

    Example:
        >>> g = transposed_image_to_graph(torch.ones(1, 2, 2), kernel_size=2, stride=2)
        >>> g.size(), g.edge_index.tolist()  # each input pixel paints its own 2x2 block
        ((4, 16), [[0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]])
    """
    if conv is None:
        geometry = TransposedGeometry.from_keywords(2, kernel_size, stride, padding, output_padding, dilation)
    else:
        geometry = TransposedGeometry.from_module(conv)
        if geometry.ndim != 2:
            raise ValueError(f"conv is a {geometry.ndim}-d transposed convolution; expected a 2-d one")
        _check_image(image, 2)
        expected = getattr(conv, "in_channels", None)
        if expected is not None and image.shape[-3] != expected:
            raise ValueError(f"expected image with {expected} channels for {type(conv).__name__} "
                             f"(got {image.shape[-3]} channels, image of shape {tuple(image.shape)})")
    return transposed_grid_to_graph(image, geometry)


# ------------------------------------------------------------------------------- masked and sparse
#: Construction uses dense id / occupancy maps of the (padded) grid when the grid holds at most this many
#: pixels, or at most 16 per active pixel; otherwise only the active sites' coordinates (sorting and
#: binary search), so a huge, nearly empty grid never costs memory of its size.
DENSE_MAP_LIMIT = 1 << 22
_DENSE_PER_SITE = 16

@dataclass(frozen=True, eq=False)
class SparseTable:
    """The neighbour table of a masked or sparse pixel graph: one table for all images' active sites.

    ``index[i, t]`` is the active source node that tap ``t`` of active target node ``i`` reads, or
    ``-1`` (an inactive pixel, or zero padding). It has the attributes the table path reads from a
    :class:`~gridgraph.graph.NeighbourTable` (``index``, ``geometry``, ``num_src``, ``num_dst``,
    ``complete``, ``num_taps``, ``device``; ``in_size``/``out_size`` are the node counts) and is used with
    ``num_images = 1``: its size scales with the active pixels, never with ``H x W``.
    """

    index: Tensor  # [num_dst, num_taps] long, -1 = no edge
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

    @property
    def num_taps(self) -> int:
        return self.index.size(1)

    @property
    def device(self) -> torch.device:
        return self.index.device


class MaskedPixelGraph(PixelGraph):
    """A :class:`~gridgraph.PixelGraph` on the active pixels of a mask or a sparse point set.

    Nodes are active pixels only, row-major image by image: ``x`` ``[N_in, C]``, ``pos`` ``[N_in, ndim]``
    (row, col) of each input node, ``out_pos`` the same for each output node, ``batch`` and
    ``out_batch`` the image of each node (when ``num_images > 1``), ``in_keys``/``out_keys`` the flat
    dense index ``b*H*W + h*W + w`` of every node. ``size()`` is ``(N_in, N_out)``: the active counts.
    ``submanifold`` is True when the outputs are the input nodes themselves (stride 1, same grid).
    """

    def size(self, dim: Optional[int] = None):  # type: ignore[override]
        size = (int(self.in_keys.numel()), int(self.out_keys.numel()))
        return size if dim is None else size[dim]

    @property
    def table(self) -> SparseTable:  # type: ignore[override]
        """The :class:`SparseTable` this graph was built from."""
        return self.sparse_table

    @property
    def mask(self) -> Tensor:
        """The input mask ``(B, *grid)`` (``(*grid)`` if unbatched), as a dense bool tensor."""
        return self._dense_mask(self.in_keys, self.in_size)

    @property
    def out_mask(self) -> Tensor:
        """The active output pixels ``(B, *out_grid)`` (``(*out_grid)`` if unbatched), as a dense bool tensor."""
        return self._dense_mask(self.out_keys, self.out_size)

    def _dense_mask(self, keys: Tensor, grid: Sequence[int]) -> Tensor:
        mask = torch.zeros(self.num_images * math.prod(grid), dtype=torch.bool, device=keys.device)
        mask[keys] = True
        mask = mask.view(self.num_images, *grid)
        return mask if self.batched else mask[0]


def _unravel(keys: Tensor, size: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Flat keys ``b*prod(size) + row-major(coords)`` -> ``(b [N], coords [N, ndim])``."""
    coords = []
    rest = keys
    for n in reversed(size):
        coords.append(rest % n)
        rest = rest // n
    return rest, torch.stack(coords[::-1], dim=1) if coords else keys.new_zeros(keys.numel(), 0)


def _ravel(b: Tensor, coords: Tensor, size: Sequence[int]) -> Tensor:
    key = b
    for a, n in enumerate(size):
        key = key * n + coords[..., a]
    return key


def _remap(pos: Tensor, n: int, mode: str) -> tuple[Tensor, Tensor]:
    """Nominal coordinates along one axis -> (the input pixel they read, whether that edge exists)."""
    inside = (pos >= 0) & (pos < n)
    if mode == "zeros":
        return pos.clamp(0, n - 1), inside
    if mode == "replicate":
        src = pos.clamp(0, n - 1)
    elif mode == "circular":
        src = torch.remainder(pos, n)
    else:  # reflect
        src = torch.where(pos < 0, -pos, pos)
        src = torch.where(src >= n, 2 * (n - 1) - src, src)
    return src, torch.ones_like(inside)


def _active_outputs(in_keys: Tensor, geometry: ConvGeometry, in_size: tuple[int, ...], out_size: tuple[int, ...],
                    num_images: int) -> Tensor:
    """Sorted flat keys of the output pixels whose window holds an active input pixel."""
    device = in_keys.device
    padded = tuple(n + lo + hi for n, (lo, hi) in zip(in_size, geometry.padding))
    num_out = num_images * math.prod(out_size)
    if geometry.padding_mode == "zeros" and num_images * math.prod(padded) <= max(DENSE_MAP_LIMIT, _DENSE_PER_SITE * in_keys.numel()):
        # The grid is not much larger than the active set: scan every output anchor of an occupancy map
        # of the zero-padded grid, one shift per tap (O(B*H*W), cheaper than sorting N*K candidates).
        occupied = torch.zeros(num_images * math.prod(padded), dtype=torch.bool, device=device)
        b_in, c_in = _unravel(in_keys, in_size)
        lo = torch.tensor([p for p, _ in geometry.padding], device=device)
        occupied[_ravel(b_in, c_in + lo, padded)] = True
        b_out, o = _unravel(torch.arange(num_out, device=device), out_size)
        anchor = _ravel(b_out, o * torch.tensor(geometry.stride, device=device), padded)
        shifts = _ravel(torch.zeros(geometry.num_taps, dtype=torch.long, device=device),
                        geometry.offsets().to(device) + lo, padded).tolist()
        active = torch.zeros(num_out, dtype=torch.bool, device=device)
        for shift in shifts:
            active |= occupied[anchor + shift]
        return active.nonzero().squeeze(1)
    if geometry.padding_mode == "zeros":
        # Invert the taps: output o reads input o*s + offset_t, so input c is read by o = (c - offset_t)/s.
        b, coords = _unravel(in_keys, in_size)
        offsets = geometry.offsets().to(device)
        stride = torch.tensor(geometry.stride, device=device)
        nominal = coords[:, None, :] - offsets[None, :, :]  # [N, K, ndim]
        ok = (nominal % stride == 0).all(-1) & (nominal >= 0).all(-1)
        o = torch.div(nominal, stride, rounding_mode="floor")
        ok &= (o < torch.tensor(out_size, device=device)).all(-1)
        keys = _ravel(b[:, None].expand_as(ok), o, out_size)[ok]
        return torch.unique(keys)  # sorted
    # Other padding modes: an output may read an active pixel through its padding (reflected,
    # clamped, wrapped), so scan the dense table of the output grid once (construction only).
    table = _dense_table(geometry, in_size, device)
    mask = torch.zeros(num_images * table.num_src + 1, dtype=torch.bool, device=device)
    mask[in_keys] = True  # the last entry stays False: absent edges read it
    index = torch.where(table.index >= 0, table.index, num_images * table.num_src)
    offs = (torch.arange(num_images, device=device) * table.num_src).view(-1, 1, 1)
    index = torch.where(index[None] < table.num_src, index[None] + offs, num_images * table.num_src)
    active = mask[index].any(-1).reshape(-1)
    return active.nonzero().squeeze(1)


def _dense_table(geometry: ConvGeometry, in_size: tuple[int, ...], device: torch.device) -> NeighbourTable:
    from .graph import neighbour_table
    return neighbour_table(geometry, in_size, device)


def _sparse_table(in_keys: Tensor, out_keys: Tensor, geometry: ConvGeometry, in_size: tuple[int, ...],
                  out_size: tuple[int, ...]) -> SparseTable:
    """For every active output site and tap, the active input node it reads (binary search in the
    sorted input keys): ``O(N_out * K * log N_in)`` time, ``O(N_out * K)`` memory."""
    device = in_keys.device
    b, coords = _unravel(out_keys, out_size)
    num_src = in_keys.numel()
    num_images = (int(b.max()) + 1 if b.numel() else 1)
    padded = tuple(n + lo + hi for n, (lo, hi) in zip(in_size, geometry.padding))
    total_padded = num_images * math.prod(padded)
    if geometry.padding_mode == "zeros" and num_src and total_padded <= max(DENSE_MAP_LIMIT, _DENSE_PER_SITE * out_keys.numel()):
        # An id map of the zero-padded grid (-1 = inactive or padding): every tap is one fixed shift of
        # the flat padded index, so the table is one add and one gather (O(B*H*W) memory for the map).
        ids = torch.full((total_padded,), -1, dtype=torch.long, device=device)
        b_in, c_in = _unravel(in_keys, in_size)
        keep = b_in < num_images
        lo = torch.tensor([p for p, _ in geometry.padding], device=device)
        ids[_ravel(b_in[keep], c_in[keep] + lo, padded)] = torch.arange(num_src, device=device)[keep]
        anchor = _ravel(b, coords * torch.tensor(geometry.stride, device=device), padded)
        shifts = _ravel(torch.zeros(geometry.num_taps, dtype=torch.long, device=device),
                        geometry.offsets().to(device) + lo, padded)
        index = ids[anchor[:, None] + shifts[None, :]]
        return SparseTable(index, geometry, num_src, out_keys.numel(), bool((index >= 0).all()))
    offsets = geometry.offsets().to(device)
    nominal = coords[:, None, :] * torch.tensor(geometry.stride, device=device) + offsets[None, :, :]
    src = torch.empty_like(nominal)
    valid = torch.ones(nominal.shape[:2], dtype=torch.bool, device=device)
    for a, n in enumerate(in_size):
        src[..., a], ok = _remap(nominal[..., a], n, geometry.padding_mode)
        valid &= ok
    keys = _ravel(b[:, None].expand_as(valid), src, in_size)
    total = num_images * math.prod(in_size)
    if num_src and total <= max(DENSE_MAP_LIMIT, _DENSE_PER_SITE * keys.numel()):
        # A dense id map is cheaper than a search when the grid is not much larger than the edge count.
        ids = torch.full((total,), -1, dtype=torch.long, device=device)
        ids[in_keys[in_keys < total]] = torch.arange(num_src, device=device)[in_keys < total]
        index = torch.where(valid, ids[keys.clamp(0, total - 1)], -1)
        valid = index >= 0
    elif num_src:
        found = torch.searchsorted(in_keys, keys).clamp_(max=num_src - 1)
        valid &= in_keys[found] == keys
        index = torch.where(valid, found, -1)
    else:
        index = torch.full_like(keys, -1)
    return SparseTable(index.contiguous(), geometry, num_src, out_keys.numel(), bool(valid.all()))


def sparse_grid_to_graph(in_keys: Tensor, x: Tensor, geometry: ConvGeometry, in_size: Sequence[int],
                         num_images: int, batched: bool) -> MaskedPixelGraph:
    """The graph of the active pixels ``in_keys`` (sorted, unique flat keys ``b*prod(size) + row-major``)
    with features ``x`` ``[N, C]`` (in key order) under ``geometry`` (n-d)."""
    in_size = tuple(int(n) for n in in_size)
    out_size = geometry.output_size(in_size)
    device = in_keys.device
    submanifold = out_size == in_size and all(s == 1 for s in geometry.stride)
    out_keys = in_keys if submanifold else _active_outputs(in_keys, geometry, in_size, out_size, num_images)
    table = _sparse_table(in_keys, out_keys, geometry, in_size, out_size)
    dst, tap = (table.index >= 0).nonzero(as_tuple=True)  # target-major, taps ascending
    edge_index = torch.stack([table.index[dst, tap], dst])
    edge_type = tap
    edge_dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    edge_attr = geometry.offsets().to(device=device, dtype=edge_dtype)[tap]
    edge_index._gridgraph = GridEdges(table=table, num_images=1, edge_index_version=edge_index._version,
                                      edge_type=edge_type, edge_type_version=edge_type._version)
    b_in, pos = _unravel(in_keys, in_size)
    b_out, out_pos = (b_in, pos) if submanifold else _unravel(out_keys, out_size)
    graph = MaskedPixelGraph(x=x, edge_index=edge_index, edge_type=edge_type, edge_attr=edge_attr, pos=pos)
    graph.out_pos = out_pos
    if num_images > 1:
        graph.batch = b_in
        graph.out_batch = b_out
    graph.in_keys = in_keys
    graph.out_keys = out_keys
    graph.sparse_table = table
    graph.submanifold = submanifold
    graph.geometry = geometry
    graph.in_size = in_size
    graph.out_size = out_size
    graph.num_images = num_images
    graph.batched = batched
    return graph


def masked_grid_to_graph(image: Tensor, geometry: ConvGeometry, mask: Any) -> MaskedPixelGraph:
    """The graph of the pixels of ``image`` (``(C, *grid)`` or ``(B, C, *grid)``) where ``mask`` is True.

    ``mask`` is a bool tensor of shape ``grid`` (shared by every image) or ``(B, *grid)``.
    Building it reads the mask once (``O(B*H*W)``); the graph and the layers on it scale with the
    active pixels.
    """
    images, batched = _check_image(image, geometry.ndim)
    num_images, channels, *grid = images.shape
    grid = tuple(grid)
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a bool torch.Tensor (got {type(mask).__name__})")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (got dtype {mask.dtype})")
    if mask.device != images.device:
        raise ValueError(f"mask is on {mask.device} but image is on {images.device}")
    shapes = [grid, (num_images, *grid)] if batched else [grid, (1, *grid)]
    if tuple(mask.shape) not in shapes:
        raise ValueError(f"expected mask of shape {' or '.join(str(s) for s in shapes)} for an image of shape "
                         f"{tuple(image.shape)} (got {tuple(mask.shape)})")
    mask = mask.expand(num_images, *grid) if mask.dim() == len(grid) else mask
    in_keys = mask.reshape(-1).nonzero().squeeze(1)
    # Gather channel by channel from the (C, B*H*W) layout (a view for one image), then transpose:
    # no copy of the whole image in channels-last order.
    x = images.transpose(0, 1).reshape(channels, -1).index_select(1, in_keys).t().contiguous()
    return sparse_grid_to_graph(in_keys, x, geometry, grid, num_images, batched)


def sparse_to_graph(coords: Tensor, features: Tensor, size: Sequence[int], conv: Any = None, *,
                    kernel_size: Any = 3, stride: Any = 1, padding: Any = 1, dilation: Any = 1,
                    padding_mode: str = "zeros", num_images: Optional[int] = None) -> MaskedPixelGraph:
    """The pixel graph of a sparse point set: active pixel coordinates with their features.

    Nodes are the active pixels sorted row-major (image by image); ``g.perm`` is that order, so
    ``g.x = features[g.perm]`` and a node result ``out`` goes back to the caller's order with
    ``out[g.perm.argsort()]``. Edges join active pixels only; with stride 1 and an output grid equal to
    the input grid the outputs are the input nodes (submanifold), otherwise the output pixels whose window
    holds an active pixel. A layer on the graph equals the dense convolution of the scattered image
    (zeros elsewhere) read at the output nodes. Memory and time scale with the number of points.

    Args:
        coords (Tensor): ``[N, ndim]`` integer pixel coordinates (row, col in 2-D), or ``[N, ndim + 1]``
            with the image index first (a batch).
        features (Tensor): ``[N, C]`` features of the points.
        size (sequence of int): the grid size ``(H, W)`` (its length sets the number of dimensions).
        conv (nn.Module, optional): take the geometry from this convolution (or gridgraph layer).
        kernel_size, stride, padding, dilation, padding_mode: as in ``nn.Conv2d`` when ``conv`` is None.
        num_images (int, optional): the batch size when ``coords`` has an image column
            (default: the largest image index + 1).

    Example:
        >>> coords = torch.tensor([[2, 2], [0, 0], [0, 1]])
        >>> g = sparse_to_graph(coords, torch.tensor([[3.], [1.], [2.]]), (4, 4))
        >>> g.pos.tolist(), g.x.flatten().tolist(), g.perm.tolist(), g.size()
        ([[0, 0], [0, 1], [2, 2]], [1.0, 2.0, 3.0], [1, 2, 0], (3, 3))
        >>> g.edge_index.tolist()  # (0,0) and (0,1) are neighbours; (2,2) only sees itself
        [[0, 1, 0, 1, 2], [0, 0, 1, 1, 2]]
    """
    if not isinstance(size, (tuple, list, torch.Size)) or not all(isinstance(n, int) and n > 0 for n in size):
        raise ValueError(f"size must be a tuple of positive ints, the grid size (got {size!r})")
    ndim = len(size)
    if conv is None:
        geometry = ConvGeometry.from_keywords(ndim, kernel_size, stride, padding, dilation, padding_mode)
    else:
        geometry = ConvGeometry.from_module(conv)
        if geometry.ndim != ndim:
            raise ValueError(f"conv is a {geometry.ndim}-d convolution; expected a {ndim}-d one for size {tuple(size)}")
    if not isinstance(coords, Tensor) or coords.dtype in (torch.bool,) or coords.is_floating_point() \
            or coords.is_complex():
        got = type(coords).__name__ if not isinstance(coords, Tensor) else f"dtype {coords.dtype}"
        raise TypeError(f"coords must be an integer torch.Tensor (got {got})")
    if coords.dim() != 2 or coords.size(1) not in (ndim, ndim + 1):
        raise ValueError(f"expected coords of shape [N, {ndim}] or [N, {ndim + 1}] (image index first) for a "
                         f"{ndim}-d grid (got {tuple(coords.shape)})")
    if not isinstance(features, Tensor):
        raise TypeError(f"features must be a torch.Tensor (got {type(features).__name__})")
    if features.dim() != 2 or features.size(0) != coords.size(0):
        raise ValueError(f"expected features of shape [{coords.size(0)}, C], one row per point "
                         f"(got {tuple(features.shape)})")
    if features.device != coords.device:
        raise ValueError(f"features are on {features.device} but coords are on {coords.device}")
    expected = getattr(conv, "in_channels", None)
    if expected is not None and features.size(1) != expected:
        raise ValueError(f"expected features with {expected} channels for {type(conv).__name__} "
                         f"(got {features.size(1)})")
    coords = coords.long()
    batched = coords.size(1) == ndim + 1
    b = coords[:, 0] if batched else coords.new_zeros(coords.size(0))
    pix = coords[:, 1:] if batched else coords
    if coords.size(0):
        lo, hi = pix.min(0).values, pix.max(0).values
        if bool((lo < 0).any()) or any(int(h) >= n for h, n in zip(hi, size)):
            raise ValueError(f"coords must lie inside the grid {tuple(size)} (got coordinates from {lo.tolist()} "
                             f"to {hi.tolist()})")
        if batched and int(b.min()) < 0:
            raise ValueError(f"image indices in coords[:, 0] must be non-negative (got {int(b.min())})")
    top = int(b.max()) + 1 if coords.size(0) else (1 if not batched else 0)
    if num_images is None:
        num_images = top
    elif not batched and num_images != 1:
        raise ValueError(f"num_images={num_images} needs coords with an image column [N, {ndim + 1}]")
    elif num_images < top:
        raise ValueError(f"num_images={num_images} is smaller than the largest image index + 1 ({top})")
    keys = _ravel(b, pix, size)
    keys, perm = torch.sort(keys)
    if keys.numel() > 1 and bool((keys[1:] == keys[:-1]).any()):
        dup = int(keys[1:][keys[1:] == keys[:-1]][0])
        raise ValueError(f"coords must be unique: pixel {_unravel(keys.new_tensor([dup]), size)[1][0].tolist()} "
                         "appears more than once")
    graph = sparse_grid_to_graph(keys, features[perm], geometry, tuple(size), num_images, batched)
    graph.perm = perm
    return graph


def masked_graph_to_image(x: Tensor, graph: MaskedPixelGraph, side: Optional[str] = None) -> Tensor:
    """Node features of a masked graph back to dense images, zeros at inactive pixels (see
    :func:`~gridgraph.graph_to_image`)."""
    sides = {"input": (graph.in_keys, tuple(graph.in_size)), "output": (graph.out_keys, tuple(graph.out_size))}
    if side is None:
        fits = [s for s, (keys, _) in sides.items() if keys.numel() == x.size(0)]
        if not fits:
            raise ValueError(f"x has {x.size(0)} rows, but the graph has {graph.in_keys.numel()} active input "
                             f"nodes and {graph.out_keys.numel()} active output nodes")
        if len(fits) == 2 and not graph.submanifold:
            raise ValueError(f"x has {x.size(0)} rows, which fits both the active input and the active output "
                             "nodes; pass side='input' or side='output'")
        side = fits[0]
    if side not in sides:
        raise ValueError(f"side must be 'input', 'output' or None (got {side!r})")
    keys, grid = sides[side]
    if x.size(0) != keys.numel():
        raise ValueError(f"x has {x.size(0)} rows, but the graph has {keys.numel()} active {side} nodes")
    flat = x.new_zeros(graph.num_images * math.prod(grid), x.size(1)).index_copy(0, keys, x)
    n = len(grid)
    image = flat.view(graph.num_images, *grid, x.size(1)).permute(0, n + 1, *range(1, n + 1))
    return image if graph.batched else image[0]

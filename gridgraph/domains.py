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
The table of such a graph is computed from the active sites' coordinates only (a sorted list of keys
and a binary search), so memory and time scale with the number of active pixels, not with ``H x W``;
the one exception is deciding which outputs of a *strided* graph with a padding mode other than
``'zeros'`` are active, which scans the output grid once at construction.
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
           "transposed_image_to_graph"]


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

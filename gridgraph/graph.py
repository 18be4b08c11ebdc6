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

A graph's ``edge_index`` is a :class:`~gridgraph.pixel_graph.PixelEdgeIndex`: it carries the edges' taps and
the graph's structure through what PyG and torch do to graphs (copies, moves, saving, batching), so the
layers recognise it wherever it goes. Every graph gets tensors of its own, written from a cached one-image
template (:mod:`gridgraph.structure`): editing one graph never changes another.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Union

from torch import Tensor

from .domains import masked_graph_to_image, masked_grid_to_graph, transposed_grid_to_graph
from .geometry import ConvGeometry, TransposedGeometry
from .pixel_graph import MaskedPixelGraph, PixelGraph, check_image, full_grid_graph
from .structure import NeighbourTable, clear_cache, neighbour_table

__all__ = ["PixelGraph", "NeighbourTable", "image_to_graph", "graph_to_image", "grid_to_graph",
           "neighbour_table", "to_networkx", "clear_cache", "sequence_to_graph", "volume_to_graph"]


def grid_to_graph(image: Tensor, geometry: ConvGeometry) -> PixelGraph:
    """The pixel graph of ``image`` (``(C, *grid)`` or ``(B, C, *grid)``) under ``geometry`` (n-d).

    Example:
        >>> g = grid_to_graph(torch.randn(3, 4, 4), ConvGeometry.from_keywords(2, kernel_size=3, padding=1))
        >>> g.num_nodes, g.edge_index.size(1)
        (16, 100)
    """
    if isinstance(geometry, TransposedGeometry):
        return transposed_grid_to_graph(image, geometry)
    if not isinstance(geometry, ConvGeometry):
        raise TypeError(f"geometry must be a ConvGeometry (got {type(geometry).__name__})")
    images, batched = check_image(image, geometry.ndim)
    return full_grid_graph(PixelGraph, geometry, images, batched)


def _geometry_of(conv: Any, ndim: int, name: str, data: Tensor, kernel_size: Any, stride: Any, padding: Any,
                 dilation: Any, padding_mode: str, output_padding: Any = 0) -> Union[ConvGeometry, TransposedGeometry]:
    """The geometry from ``conv`` (checked against ``data``'s channels) or from the keywords."""
    if conv is None:
        return ConvGeometry.from_keywords(ndim, kernel_size, stride, padding, dilation, padding_mode)
    transposed = getattr(conv, "transposed", False) is True  # nn.ConvTransposeNd and gridgraph's twins
    geometry = TransposedGeometry.from_module(conv) if transposed else ConvGeometry.from_module(conv)
    if geometry.ndim != ndim:
        what = "transposed convolution" if transposed else "convolution"
        raise ValueError(f"conv is a {geometry.ndim}-d {what}; expected a {ndim}-d one")
    check_image(data, ndim, name)
    expected = getattr(conv, "in_channels", None)
    channels = data.shape[-ndim - 1]
    if expected is not None and channels != expected:
        raise ValueError(f"expected {name} with {expected} channels for {type(conv).__name__} "
                         f"(got {channels} channels, {name} of shape {tuple(data.shape)})")
    return geometry


def image_to_graph(image: Tensor, conv: Any = None, *, kernel_size: Any = 3, stride: Any = 1,
                   padding: Any = None, dilation: Any = 1, padding_mode: str = "zeros",
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
        kernel_size, stride, padding, dilation, padding_mode: as in ``nn.Conv2d`` (default: a 3x3 kernel at
            stride 1 with padding ``dilation * (kernel_size - 1) // 2`` per side, the one rule of every graph
            builder (:func:`~gridgraph.geometry.default_padding`): an odd kernel keeps the grid, and
            ``kernel_size=1`` gives the self-loops of the input grid).
        mask (Tensor, optional): bool ``(H, W)`` or ``(B, H, W)``: only its True pixels become nodes
            (row-major), and edges join them only; see :func:`~gridgraph.domains.masked_grid_to_graph`
            (a :class:`~gridgraph.domains.MaskedPixelGraph`, ``g.size()`` = active (inputs, outputs)).

    Returns:
        PixelGraph: ``x [B*H*W, C]``, ``edge_index [2, E]``, ``edge_type [E]``, ``edge_attr [E, 2]``,
        ``pos [B*H*W, 2]``, ``batch`` (B > 1), and the grid sizes; ``g.size()`` is ``(B*H*W, B*H_out*W_out)``.

    Example:
        >>> g = image_to_graph(torch.arange(4.).view(1, 2, 2), kernel_size=1)
        >>> g.edge_index.tolist(), g.x.flatten().tolist()
        ([[0, 1, 2, 3], [0, 1, 2, 3]], [0.0, 1.0, 2.0, 3.0])
    """
    geometry = _geometry_of(conv, 2, "image", image, kernel_size, stride, padding, dilation, padding_mode)
    if mask is not None:
        if isinstance(geometry, TransposedGeometry):
            raise ValueError("mask is not supported with a transposed convolution")
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

    Example:
        >>> images = torch.randn(2, 3, 4, 5)
        >>> g = image_to_graph(images, kernel_size=3)
        >>> torch.equal(graph_to_image(g.x, g), images)      # bit-exact round trip
        True
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor (got {type(x).__name__})")
    if not isinstance(graph, PixelGraph):
        raise TypeError(f"graph must be a PixelGraph from image_to_graph (got {type(graph).__name__})")
    if x.dim() != 2:
        raise ValueError(f"expected x of shape [num_nodes, channels]: 2 dims (got shape {tuple(x.shape)})")
    if side not in (None, "input", "output"):
        raise ValueError(f"side must be 'input', 'output' or None (got {side!r})")
    structure = graph.structure
    part = structure.uniform()
    if part is None:  # a batch of different grids: one image (batch) per graph
        return _per_graph_images(x, graph, side)
    if isinstance(graph, MaskedPixelGraph):  # a masked / sparse graph: scatter into zero images
        return masked_graph_to_image(x, graph, side)
    b = part.num_images
    grids = {"input": tuple(part.in_size), "output": tuple(part.out_size)}
    if side is None:
        fits = [s for s, grid in grids.items() if b * math.prod(grid) == x.size(0)]
        if not fits:
            raise ValueError(f"x has {x.size(0)} rows, but the graph has {b}x{math.prod(grids['input'])} "
                             f"input nodes and {b}x{math.prod(grids['output'])} output nodes")
        if len(fits) == 2 and grids["input"] != grids["output"]:
            raise ValueError(f"x has {x.size(0)} rows, which fits both the input grid {grids['input']} and the "
                             f"output grid {grids['output']}; pass side='input' or side='output'")
        side = fits[0]
    grid = grids[side]
    if x.size(0) != b * math.prod(grid):
        raise ValueError(f"x has {x.size(0)} rows, but the {side} grid holds {b}x{'x'.join(map(str, grid))} = "
                         f"{b * math.prod(grid)} nodes")
    n = len(grid)
    image = x.view(b, *grid, x.size(1)) if x.is_contiguous() else x.reshape(b, *grid, x.size(1))
    image = image.permute(0, n + 1, *range(1, n + 1))
    return image if graph.batched else image[0]


def _per_graph_images(x: Tensor, graph: PixelGraph, side: Optional[str]) -> list[Tensor]:
    """The images of a batch that mixes grids: one entry per graph of the batch (in order)."""
    from torch_geometric.data import Batch

    structure = graph.structure
    rows = {"input": structure.num_src, "output": structure.num_dst}
    if side is None:
        fits = [s for s, n in rows.items() if n == x.size(0)]
        if not fits:
            raise ValueError(f"x has {x.size(0)} rows, but the batch has {rows['input']} input nodes and "
                             f"{rows['output']} output nodes")
        if len(fits) == 2 and rows["input"] == rows["output"] and not all(
                p.in_size == p.out_size for p in structure.parts):
            raise ValueError(f"x has {x.size(0)} rows, which fits both sides of the batch; pass side='input' or "
                             "side='output'")
        side = fits[0]
    if x.size(0) != rows[side]:
        raise ValueError(f"x has {x.size(0)} rows, but the batch has {rows[side]} {side} nodes")
    graphs = graph.to_data_list() if isinstance(graph, Batch) else None
    offsets = structure.src_offsets if side == "input" else structure.dst_offsets
    images = []
    for k, part in enumerate(structure.parts):
        count = part.num_src if side == "input" else part.num_dst
        one = graphs[k] if graphs is not None and len(graphs) == len(structure.parts) else None
        if one is None:
            raise ValueError("this graph mixes grids but is not a PyG Batch of pixel graphs: split it first")
        images.append(graph_to_image(x[offsets[k]:offsets[k] + count], one, side))
    return images


def to_networkx(graph: PixelGraph):
    """Export a pixel graph to a ``networkx.MultiDiGraph`` for drawing (every edge kept).

    Nodes of the input grid are ``0 .. N_in-1``; when the output grid differs (stride, no 'same'
    padding), output nodes are ``N_in + i``. Node attributes: ``pixel`` (row, col), ``side``
    (``'input'``/``'output'``), and ``pos`` (x, y) = (col, -row) ready for ``networkx.draw``
    (outputs drawn at their anchors, shifted by half a pixel). Edge attributes: ``tap`` and ``offset``;
    the edge key is the tap, so the parallel edges that reflect / replicate / circular padding create
    (one pixel read by several taps of the same target) are all kept.

    Example:
        >>> G = to_networkx(image_to_graph(torch.randn(1, 2, 3, 3), kernel_size=3))
        >>> G.number_of_nodes(), G.number_of_edges(), G.has_edge(0, 4)
        (9, 49, True)
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
    geometry = _geometry_of(conv, ndim, name, data, kernel_size, stride, padding, dilation, padding_mode)
    check_image(data, ndim, name)
    return grid_to_graph(data, geometry)


def sequence_to_graph(sequence: Tensor, conv: Any = None, *, kernel_size: Any = 3, stride: Any = 1,
                      padding: Any = None, dilation: Any = 1, padding_mode: str = "zeros") -> PixelGraph:
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
                    padding: Any = None, dilation: Any = 1, padding_mode: str = "zeros") -> PixelGraph:
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

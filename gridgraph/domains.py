"""Pixel graphs beyond the full grid: the reversed graphs of transposed convolutions, and masked or
sparse pixel domains.

**Transposed convolution.** A transposed convolution with kernel ``k``, stride ``s``, padding ``p``,
dilation ``d`` and output padding ``op`` maps a grid of size ``H`` to
``H_out = (H - 1) s - 2p + d (k - 1) + op + 1``; that is exactly a grid on which the strided
convolution of the same ``(k, s, p, d)`` has ``H`` outputs. Its graph is that convolution's graph with
every edge reversed: the tap ``t`` of source pixel ``i`` (on the ``H`` grid) sends to the pixel
``q = i*s + t*d - p`` of the ``H_out`` grid, when that pixel exists. :func:`transposed_image_to_graph`
builds it (sources = the input pixels of the transposed convolution, targets = its output pixels).

**Masked and sparse domains.** Only *active* pixels become nodes (row-major, image by image); edges
join active pixels only. With stride 1 and an output grid equal to the input grid the graph is
*submanifold*: the outputs live on the active input pixels (same nodes, same order). Otherwise an output
pixel is active when any input pixel in its window is active. Either way a layer on the graph equals the
dense convolution of the image with inactive pixels zeroed, read at the active output pixels, and costs
memory and time in proportion to its edges, never ``H x W``. Construction reads a mask once
(``O(B*H*W)``, as the mask itself) and, while the grid is at most
:data:`~gridgraph.structure.DENSE_MAP_LIMIT` pixels or 16 per active pixel, uses dense id / occupancy maps
of the zero-padded grid; beyond that (a huge, nearly empty grid from :func:`sparse_to_graph`) it works
from the active sites' coordinates only (sorting and binary search).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from .geometry import ConvGeometry, TransposedGeometry
from .pixel_graph import (MaskedPixelGraph, PixelEdgeIndex, PointGraph, TransposedPixelGraph, check_image,
                          full_grid_graph, outside_inference_mode)

from .structure import (DENSE_MAP_LIMIT, GraphPart, PixelStructure, SparseTable, active_outputs, centre_tap,
                        ravel, sparse_table, table_edges, tap_offsets, transposed_table, unravel)

__all__ = ["TransposedGeometry", "TransposedPixelGraph", "transposed_table", "transposed_grid_to_graph",
           "transposed_image_to_graph", "SparseTable", "MaskedPixelGraph", "masked_grid_to_graph",
           "sparse_grid_to_graph", "sparse_to_graph", "masked_graph_to_image", "DENSE_MAP_LIMIT"]


# ------------------------------------------------------------------------------- transposed graphs
@outside_inference_mode
def transposed_grid_to_graph(image: Tensor, geometry: TransposedGeometry) -> TransposedPixelGraph:
    """The graph of a transposed convolution on ``image`` (``(C, *grid)`` or ``(B, C, *grid)``), n-d."""
    if not isinstance(geometry, TransposedGeometry):
        raise TypeError(f"geometry must be a TransposedGeometry (got {type(geometry).__name__})")
    images, batched = check_image(image, geometry.ndim)
    return full_grid_graph(TransposedPixelGraph, geometry, images, batched)


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
        check_image(image, 2)
        expected = getattr(conv, "in_channels", None)
        if expected is not None and image.shape[-3] != expected:
            raise ValueError(f"expected image with {expected} channels for {type(conv).__name__} "
                             f"(got {image.shape[-3]} channels, image of shape {tuple(image.shape)})")
    return transposed_grid_to_graph(image, geometry)


# ------------------------------------------------------------------------------- masked and sparse
@outside_inference_mode
def sparse_grid_to_graph(in_keys: Tensor, x: Tensor, geometry: ConvGeometry, in_size: Sequence[int],
                         num_images: int, batched: bool, in_coords: Optional[tuple[Tensor, Tensor]] = None
                         ) -> MaskedPixelGraph:
    """The graph of the active pixels ``in_keys`` (sorted, unique flat keys ``b*prod(size) + row-major``)
    with features ``x`` ``[N, C]`` (in key order) under ``geometry`` (n-d). ``in_coords``:
    ``unravel(in_keys, in_size)`` when the caller has it.

    The slot table (``[N_out, K]``, int32) is built once; the edges are read off it, and it seeds the
    layers' edge plan (:func:`gridgraph.nn.kernels.seed_edge_plan`) for as long as the edges live."""
    from .nn.kernels import seed_edge_plan  # the graph side does not import the layers at load time

    in_size = tuple(int(n) for n in in_size)
    out_size = geometry.output_size(in_size)
    submanifold = out_size == in_size and all(s == 1 for s in geometry.stride)
    b_in, pos = in_coords if in_coords is not None else unravel(in_keys, in_size)
    out_keys = in_keys if submanifold else active_outputs(in_keys, geometry, in_size, out_size, num_images)
    b_out, out_pos = (b_in, pos) if submanifold else unravel(out_keys, out_size)
    num_src = in_keys.numel()
    index_dtype = torch.int32 if num_src < 2 ** 31 - 1 else torch.long
    table = sparse_table(in_keys, out_keys, geometry, in_size, out_size, num_images, index_dtype, (b_out, out_pos))
    data, tap = table_edges(table.index)
    part = GraphPart("sparse", geometry, in_size, num_images, num_src, out_keys.numel(), tap.numel(), batched)
    edge_index = PixelEdgeIndex.make(data, tap, PixelStructure.single(part))
    # submanifold: the tap of offset zero reads every node itself (its column is 0 .. N-1)
    seed_edge_plan(data, tap, table.index, num_src, centre_tap(geometry) if submanifold else None)
    edge_dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    edge_attr = tap_offsets(geometry, tap, edge_dtype)
    graph = MaskedPixelGraph(x=x, edge_index=edge_index, edge_attr=edge_attr, pos=pos, out_pos=out_pos,
                             in_keys=in_keys, out_keys=out_keys)
    graph.batch, graph.out_batch = b_in, b_out  # the image of each node (as in a PyG batch of the images)
    return graph


def check_point_features(features: Any, points: Tensor, name: str, conv: Any) -> None:
    """``features`` must be ``[N, C]``, one row per point of ``points`` (named ``name``), on its device, with
    ``conv``'s input channels when ``conv`` has them."""
    if not isinstance(features, Tensor):
        raise TypeError(f"features must be a torch.Tensor (got {type(features).__name__})")
    if features.dim() != 2 or features.size(0) != points.size(0):
        raise ValueError(f"expected features of shape [{points.size(0)}, C], one row per point "
                         f"(got {tuple(features.shape)})")
    if features.device != points.device:
        raise ValueError(f"features are on {features.device} but {name} {'is' if name == 'pos' else 'are'} on "
                         f"{points.device}")
    expected = getattr(conv, "in_channels", None)
    if expected is not None and features.size(1) != expected:
        raise ValueError(f"expected features with {expected} channels for {type(conv).__name__} "
                         f"(got {features.size(1)})")


def sparse_to_graph(coords: Tensor, features: Tensor, size: Sequence[int], conv: Any = None, *,
                    kernel_size: Any = 3, stride: Any = 1, padding: Any = None, dilation: Any = 1,
                    padding_mode: str = "zeros", num_images: Optional[int] = None) -> MaskedPixelGraph:
    """The pixel graph of a sparse point set: active pixel coordinates with their features.

    Nodes are the active pixels sorted row-major (image by image); ``g.perm`` is that order, so
    ``g.x = features[g.perm]`` and a node result ``out`` goes back to the caller's order with
    ``out[g.perm.argsort()]``. Points that come sorted and unique (as ``mask.nonzero()`` gives them) are
    not sorted again, and then ``g.x`` is ``features`` itself (no copy, as in PyG's ``Data(x=features)``).
    Edges join active pixels only; with stride 1 and an output grid equal to the input grid the outputs
    are the input nodes (submanifold), otherwise the output pixels whose window holds an active pixel. A layer on the graph equals the dense convolution of the scattered image
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
    check_point_features(features, coords, "coords", conv)
    coords = coords.long()
    batched = coords.size(1) == ndim + 1
    b = coords[:, 0] if batched else coords.new_zeros(coords.size(0))
    pix = coords[:, 1:] if batched else coords
    top = 1 if not batched else 0
    if coords.size(0):
        lo, hi = (t.tolist() for t in torch.aminmax(coords, dim=0))  # one pass, one read-back
        if batched:
            (b_lo, *lo), (b_hi, *hi) = lo, hi
            if b_lo < 0:
                raise ValueError(f"image indices in coords[:, 0] must be non-negative (got {b_lo})")
            top = b_hi + 1
        if min(lo) < 0 or any(h >= n for h, n in zip(hi, size)):
            raise ValueError(f"coords must lie inside the grid {tuple(size)} (got coordinates from {lo} to {hi})")
    if num_images is None:
        num_images = top
    elif not batched and num_images != 1:
        raise ValueError(f"num_images={num_images} needs coords with an image column [N, {ndim + 1}]")
    elif num_images < top:
        raise ValueError(f"num_images={num_images} is smaller than the largest image index + 1 ({top})")
    keys = ravel(b, pix, size)
    if keys.numel() < 2 or bool((keys[1:] > keys[:-1]).all()):
        # already row-major and unique (e.g. from mask.nonzero()): no sort, and the features are the nodes'
        perm = torch.arange(keys.numel(), device=keys.device)
        coordinates = (b.clone() if batched else b, pix.clone())  # the graph's own, not views of the caller's
        graph = sparse_grid_to_graph(keys, features, geometry, tuple(size), num_images, batched, coordinates)
    else:
        keys, perm = torch.sort(keys)
        if bool((keys[1:] == keys[:-1]).any()):
            dup = int(keys[1:][keys[1:] == keys[:-1]][0])
            raise ValueError(f"coords must be unique: pixel {unravel(keys.new_tensor([dup]), size)[1][0].tolist()} "
                             "appears more than once")
        graph = sparse_grid_to_graph(keys, features[perm], geometry, tuple(size), num_images, batched)
    graph.perm = perm
    return graph


def masked_grid_to_graph(image: Tensor, geometry: ConvGeometry, mask: Any) -> MaskedPixelGraph:
    """The graph of the pixels of ``image`` (``(C, *grid)`` or ``(B, C, *grid)``) where ``mask`` is True.

    ``mask`` is a bool tensor of shape ``grid`` (shared by every image) or ``(B, *grid)``.
    Building it reads the mask once (``O(B*H*W)``); the graph and the layers on it scale with the
    active pixels.
    """
    images, batched = check_image(image, geometry.ndim)
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
    found = mask.nonzero()  # [N, 1 + ndim]: (image, coordinates), row-major: no division to unravel keys
    b, pos = found[:, 0].contiguous(), found[:, 1:].contiguous()
    in_keys = ravel(b, pos, grid)
    # Gather channel by channel from the (C, B*H*W) layout (a view for one image), then transpose:
    # no copy of the whole image in channels-last order.
    x = images.transpose(0, 1).reshape(channels, -1).index_select(1, in_keys).t().contiguous()
    return sparse_grid_to_graph(in_keys, x, geometry, grid, num_images, batched, (b, pos))


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
    if isinstance(graph, PointGraph):  # points sharing a cell have no image
        graph.check_image_keys(keys)
    flat = x.new_zeros(graph.num_images * math.prod(grid), x.size(1)).index_copy(0, keys, x)
    n = len(grid)
    image = flat.view(graph.num_images, *grid, x.size(1)).permute(0, n + 1, *range(1, n + 1))
    return image if graph.batched else image[0]

"""gridgraph: a CNN is a GNN on a pixel graph, exactly.

Images become pixel graphs (:func:`image_to_graph`, :func:`graph_to_image`); convolutions become
message passing on them (:class:`GridConv2d` and its pointwise, depthwise and separable forms), each
numerically equal to ``torch.nn.Conv2d``.
"""
from .geometry import ConvGeometry
from .graph import (NeighbourTable, PixelGraph, clear_cache, graph_to_image, grid_to_graph, image_to_graph,
                    neighbour_table, to_networkx)
from .nn import DepthwiseConv2d, GridConv2d, GridConvNd, PointwiseConv2d, SeparableConv2d

__version__ = "0.1.0"

__all__ = [
    # geometry and pixel graphs
    "ConvGeometry", "PixelGraph", "NeighbourTable", "image_to_graph", "graph_to_image", "grid_to_graph",
    "neighbour_table", "to_networkx", "clear_cache",
    # layers
    "GridConvNd", "GridConv2d", "PointwiseConv2d", "DepthwiseConv2d", "SeparableConv2d",
]

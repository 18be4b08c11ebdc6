"""gridgraph: a CNN is a GNN on a pixel graph, exactly.

Images become pixel graphs (:func:`image_to_graph`, :func:`graph_to_image`); convolutions become
message passing on them (:class:`GridConv2d` and its pointwise, depthwise, separable, transposed, 1-D
and 3-D forms), each numerically equal to its ``torch.nn`` twin. :func:`convert` swaps every
convolution of a model for its graph twin and :func:`verify_model` proves, layer by layer, that
nothing changed. :mod:`gridgraph.analysis` and :mod:`gridgraph.plot` make the analogy explorable.
"""
from . import analysis, plot
from .analysis import (conv_cost, linear_operator, mixing_matrix, receptive_field, receptive_field_size,
                       separable_cost, separable_ratio)
from .conversion import (CONVERSIONS, ImageGridConv1d, ImageGridConv2d, ImageGridConv3d, convert, converted_layers,
                         unconvert)
from .domains import sparse_to_graph, transposed_image_to_graph
from .geometry import ConvGeometry, TransposedGeometry
from .graph import graph_to_image, grid_to_graph, image_to_graph, sequence_to_graph, to_networkx, volume_to_graph
from .pixel_graph import MaskedPixelGraph, PixelEdgeIndex, PixelGraph, PointGraph, TransposedPixelGraph
from .positions import positions_to_graph
from .structure import (GraphPart, NeighbourTable, PixelStructure, SparseTable, cache_info, clear_cache,
                        neighbour_table, set_cache_limit)
from .transforms import ToPixelGraph
from .models import REFERENCE_MODELS, reference_model
from .nn import (DepthwiseConv2d, GridConv1d, GridConv2d, GridConv3d, GridConvNd, GridConvTranspose1d,
                 GridConvTranspose2d, GridConvTranspose3d, GridConvTransposeNd, PointwiseConv2d, SeparableConv2d)
from .nn.attention import PixelAttention, SqueezeExcitation, complete_pixel_graph
from .verify import ModelReport, torch_convolutions, verify_layers, verify_model
from .routing import MessagePassingMode, message_passing
from .gnn import GNN, Features, Grids, features_of, to_gnn, to_pixel_graphs
from .tiling import SpatialParallel, Tiled, spatial_parallel, tiled
from .onnx import export_onnx, onnx_translations

from ._version import __version__

__all__ = [
    # geometry and pixel graphs (grids, masked and sparse domains, point positions, transposed graphs)
    "ConvGeometry", "TransposedGeometry", "PixelGraph", "MaskedPixelGraph", "PointGraph", "TransposedPixelGraph",
    "PixelEdgeIndex", "PixelStructure", "GraphPart", "NeighbourTable", "SparseTable", "image_to_graph",
    "graph_to_image", "grid_to_graph", "sequence_to_graph", "volume_to_graph", "sparse_to_graph",
    "positions_to_graph", "transposed_image_to_graph", "neighbour_table", "to_networkx", "ToPixelGraph", "clear_cache", "cache_info", "set_cache_limit",
    # layers
    "GridConvNd", "GridConv1d", "GridConv2d", "GridConv3d", "PointwiseConv2d", "DepthwiseConv2d",
    "SeparableConv2d", "GridConvTransposeNd", "GridConvTranspose1d", "GridConvTranspose2d", "GridConvTranspose3d",
    # attention on pixel graphs (complete_pixel_graph: every pixel of an image joined to every pixel)
    "PixelAttention", "SqueezeExcitation", "complete_pixel_graph",
    # whole networks and verification
    "convert", "unconvert", "converted_layers", "CONVERSIONS", "ImageGridConv1d", "ImageGridConv2d",
    "ImageGridConv3d", "REFERENCE_MODELS", "reference_model", "verify_model", "ModelReport", "verify_layers",
    "torch_convolutions", "message_passing", "MessagePassingMode",
    # a whole CNN as a GNN on PyG batches of pixel graphs
    "to_gnn", "GNN", "Features", "Grids", "features_of", "to_pixel_graphs",
    # images larger than memory and than one machine: exact tiled and spatially parallel execution
    "tiled", "Tiled", "spatial_parallel", "SpatialParallel",
    # analysis (more in gridgraph.analysis; drawings in gridgraph.plot)
    "analysis", "plot", "receptive_field", "receptive_field_size", "conv_cost", "separable_cost",
    "separable_ratio", "linear_operator", "mixing_matrix",
    # ONNX export (needs onnx and onnxscript: the "onnx" extra)
    "export_onnx", "onnx_translations",
]

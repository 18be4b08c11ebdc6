"""Message-passing convolution layers (PyG ``MessagePassing`` subclasses)."""
from .depthwise_conv import DepthwiseConv2d
from .grid_conv import GridConv2d, GridConvNd
from .pointwise_conv import PointwiseConv2d
from .separable_conv import SeparableConv2d

__all__ = ["GridConvNd", "GridConv2d", "PointwiseConv2d", "DepthwiseConv2d", "SeparableConv2d"]

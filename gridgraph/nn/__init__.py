"""Message-passing convolution layers (PyG ``MessagePassing`` subclasses), and attention on pixel graphs."""
from .attention import PixelAttention, SqueezeExcitation, complete_pixel_graph
from .depthwise_conv import DepthwiseConv2d
from .grid_conv import GridConv1d, GridConv2d, GridConv3d, GridConvNd
from .pointwise_conv import PointwiseConv2d
from .separable_conv import SeparableConv2d
from .transposed_conv import GridConvTranspose1d, GridConvTranspose2d, GridConvTranspose3d, GridConvTransposeNd

__all__ = ["GridConvNd", "GridConv1d", "GridConv2d", "GridConv3d", "PointwiseConv2d", "DepthwiseConv2d", "SeparableConv2d",
           "GridConvTransposeNd", "GridConvTranspose1d", "GridConvTranspose2d", "GridConvTranspose3d",
           "PixelAttention", "SqueezeExcitation", "complete_pixel_graph"]

"""``SeparableConv2d``: depthwise then pointwise, composed of the two graph layers."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from .depthwise_conv import DepthwiseConv2d
from .pointwise_conv import PointwiseConv2d

__all__ = ["SeparableConv2d"]


class SeparableConv2d(torch.nn.Module):
    r"""Depthwise-separable convolution: spatial message passing per channel, then channel mixing
    over self-loops. Costs about ``1/C_out + 1/k^2`` of a full ``k x k`` convolution.

    .. math::
        \mathbf{h}_i = \sum_{(j \to i)} \mathbf{w}_{\tau(j \to i)} \odot \mathbf{x}_j, \qquad
        \mathbf{x}'_i = \mathbf{b} + \mathbf{P} \mathbf{h}_i

    Args:
        in_channels (int): input channels.
        out_channels (int): output channels.
        kernel_size (int or tuple): the depthwise kernel size.
        stride, padding, dilation, padding_mode: of the depthwise step, as in ``nn.Conv2d``.
        bias (bool, optional): bias of the pointwise step (default: ``True``); the depthwise step has none.
        depth_multiplier (int, optional): depthwise filters per input channel (default: ``1``).
        device, dtype: as in ``nn.Conv2d``.

    Shapes:
        - **input:** :math:`(|\mathcal{V}_{in}|, C_{in})`, ``edge_index``, ``edge_type`` of the depthwise graph
        - **output:** :math:`(|\mathcal{V}_{out}|, C_{out})`

    Example:
        >>> SeparableConv2d(16, 32, 3, padding=1)
        SeparableConv2d(
          (depthwise): DepthwiseConv2d(16, 16, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), groups=16, bias=False)
          (pointwise): PointwiseConv2d(16, 32, kernel_size=(1, 1), stride=(1, 1))
        )
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, bias: bool = True, padding_mode: str = "zeros", depth_multiplier: int = 1,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.depthwise = DepthwiseConv2d(in_channels, kernel_size, stride, padding, dilation, bias=False,
                                         padding_mode=padding_mode, depth_multiplier=depth_multiplier,
                                         device=device, dtype=dtype)
        self.pointwise = PointwiseConv2d(in_channels * depth_multiplier, out_channels, bias=bias,
                                         device=device, dtype=dtype)

    @property
    def in_channels(self) -> int:
        return self.depthwise.in_channels

    @property
    def out_channels(self) -> int:
        return self.pointwise.out_channels

    @property
    def geometry(self):
        """ConvGeometry: the geometry of the depthwise step, the pixel graph this layer runs on."""
        return self.depthwise.geometry

    def forward(self, x: Tensor, edge_index: Tensor, edge_type: Tensor,
                size: Optional[tuple[int, int]] = None) -> Tensor:
        return self.pointwise(self.depthwise(x, edge_index, edge_type, size))

    @classmethod
    def from_conv2d(cls, depthwise_conv: torch.nn.Conv2d, pointwise_conv: torch.nn.Conv2d) -> "SeparableConv2d":
        """The twin of a depthwise ``nn.Conv2d`` followed by a 1x1 ``nn.Conv2d``."""
        depthwise = DepthwiseConv2d.from_conv2d(depthwise_conv)
        pointwise = PointwiseConv2d.from_conv2d(pointwise_conv)
        if pointwise.in_channels != depthwise.out_channels:
            raise ValueError(f"pointwise_conv must take the depthwise output's {depthwise.out_channels} channels "
                             f"(got in_channels={pointwise.in_channels})")
        layer = cls.__new__(cls)
        torch.nn.Module.__init__(layer)
        layer.depthwise, layer.pointwise = depthwise, pointwise
        layer.train(depthwise_conv.training)
        return layer

    def to_conv2d(self) -> tuple[torch.nn.Conv2d, torch.nn.Conv2d]:
        """The ``(depthwise, pointwise)`` pair of ``nn.Conv2d`` twins."""
        return self.depthwise.to_conv2d(), self.pointwise.to_conv2d()

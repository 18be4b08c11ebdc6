"""``DepthwiseConv2d``: one spatial filter per channel (``groups = channels``)."""
from __future__ import annotations

from typing import Any

import torch

from .grid_conv import GridConv2d

__all__ = ["DepthwiseConv2d"]


class DepthwiseConv2d(GridConv2d):
    r"""Depthwise convolution by message passing: :class:`GridConv2d` with ``groups = channels``.

    Each channel ``c`` is filtered on its own (``depth_multiplier`` filters per channel), so a message
    scales features channel by channel and never mixes them:

    .. math::
        x'_{i, c m} = b_{c m} + \sum_{(j \to i)} w_{c m, \tau(j \to i)} \, x_{j, c}

    Args:
        channels (int): input channels.
        kernel_size (int or tuple): kernel size.
        stride, padding, dilation, bias, padding_mode: as in ``nn.Conv2d``.
        depth_multiplier (int, optional): output channels per input channel (default: ``1``).
        device, dtype: as in ``nn.Conv2d``.

    Shapes:
        - **input:** :math:`(|\mathcal{V}_{in}|, C)`, ``edge_index``, ``edge_type``
        - **output:** :math:`(|\mathcal{V}_{out}|, C \cdot m)`

    Example:
        >>> DepthwiseConv2d(16, 3, padding=1, depth_multiplier=2)
        DepthwiseConv2d(16, 32, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), groups=16)
    """

    def __init__(self, channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0, dilation: Any = 1,
                 bias: bool = True, padding_mode: str = "zeros", depth_multiplier: int = 1,
                 device: Any = None, dtype: Any = None) -> None:
        if not isinstance(depth_multiplier, int) or isinstance(depth_multiplier, bool) or depth_multiplier < 1:
            raise ValueError(f"depth_multiplier must be a positive integer (got {depth_multiplier!r})")
        super().__init__(channels, channels * depth_multiplier, kernel_size, stride, padding, dilation,
                         groups=channels, bias=bias, padding_mode=padding_mode, device=device, dtype=dtype)
        self.depth_multiplier = depth_multiplier

    @classmethod
    def from_conv2d(cls, conv: torch.nn.Conv2d) -> "DepthwiseConv2d":
        """The twin of a depthwise ``nn.Conv2d`` (``groups == in_channels``)."""
        cls._check_torch_conv(conv)
        if conv.groups != conv.in_channels:
            raise ValueError(f"DepthwiseConv2d.from_conv2d expects groups == in_channels (got groups={conv.groups}, "
                             f"in_channels={conv.in_channels}); use GridConv2d.from_conv2d")
        layer = cls(conv.in_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.bias is not None, conv.padding_mode, depth_multiplier=conv.out_channels // conv.in_channels,
                    device=conv.weight.device, dtype=conv.weight.dtype)
        layer._copy_parameters_from(conv)
        return layer

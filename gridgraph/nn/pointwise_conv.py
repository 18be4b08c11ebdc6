"""``PointwiseConv2d``: the 1x1 convolution as message passing over self-loops only."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..pixel_graph import pixel_structure
from ..structure import GraphPart
from . import functional as F
from .grid_conv import GridConv2d

__all__ = ["PointwiseConv2d"]


class PointwiseConv2d(GridConv2d):
    r"""The 1x1 convolution: message passing over self-loops only, equal to ``nn.Conv2d(C_in, C_out, 1)``.

    Every pixel receives exactly one message, its own features, so the layer mixes channels and is
    blind to space: stacking pointwise layers never grows the receptive field.

    .. math::
        \mathbf{x}'_i = \mathbf{b} + \mathbf{W} \mathbf{x}_i

    Args:
        in_channels (int): input channels.
        out_channels (int): output channels.
        bias (bool, optional): learn an additive bias (default: ``True``).
        groups (int, optional): block-diagonal channel mixing (default: ``1``).
        device, dtype: as in ``nn.Conv2d``.

    Shapes:
        - **input:** node features :math:`(|\mathcal{V}|, C_{in})`; ``edge_index`` :math:`(2, |\mathcal{V}|)`
          and ``edge_type`` optional (self-loops implied)
        - **output:** node features :math:`(|\mathcal{V}|, C_{out})`

    Example:
        >>> layer = PointwiseConv2d(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([1., -1.]).view(1, 2, 1, 1))  # channel 1 minus channel 2
        >>> layer(torch.tensor([[3., 1.], [0., 2.]])).flatten().tolist()
        [2.0, -2.0]
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True, groups: int = 1,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__(in_channels, out_channels, 1, stride=1, padding=0, dilation=1, groups=groups,
                         bias=bias, padding_mode="zeros", device=device, dtype=dtype)

    @classmethod
    def from_conv2d(cls, conv: torch.nn.Conv2d) -> "PointwiseConv2d":
        """The twin of a 1x1 ``nn.Conv2d`` with stride 1 and no padding."""
        cls._check_torch_conv(conv)
        if tuple(conv.kernel_size) != (1, 1):
            raise ValueError(f"PointwiseConv2d.from_conv2d expects a 1x1 convolution (got kernel_size="
                             f"{tuple(conv.kernel_size)}); use GridConv2d.from_conv2d")
        geometry_ok = tuple(conv.stride) == (1, 1) and conv.padding in ((0, 0), "valid", "same")
        if not geometry_ok:
            raise ValueError("PointwiseConv2d.from_conv2d expects stride 1 and no padding (got stride="
                             f"{tuple(conv.stride)}, padding={conv.padding}): such a 1x1 convolution is not "
                             "a self-loop graph; use GridConv2d.from_conv2d")
        layer = cls(conv.in_channels, conv.out_channels, bias=conv.bias is not None, groups=conv.groups,
                    device=conv.weight.device, dtype=conv.weight.dtype)
        layer._copy_parameters_from(conv)
        return layer

    def forward(self, x: Tensor, edge_index: Optional[Tensor] = None, edge_type: Optional[Tensor] = None,
                size: Optional[tuple[int, int]] = None) -> Tensor:
        """Without ``edge_index``, the self-loop graph of ``x``'s rows (a 1x1 convolution on a ``1 x N`` grid);
        with one, that graph (a pixel graph of this 1x1 geometry, or self-loops only)."""
        if not isinstance(x, Tensor) or x.dim() != 2 or edge_index is not None:
            own = pixel_structure(edge_index) is not None and (edge_type is None or edge_type is edge_index.edge_type)
            if isinstance(edge_index, Tensor) and not own:
                if _has_neighbour_edges(edge_index):
                    raise ValueError("PointwiseConv2d takes self-loops only (edge_index[0] == edge_index[1]): a 1x1 "
                                     "convolution cannot see its neighbours; use GridConv2d for a k x k graph")
                if edge_type is None and edge_index.dim() == 2:
                    edge_type = torch.zeros(edge_index.size(-1), dtype=torch.long, device=edge_index.device)
            return super().forward(x, edge_index, edge_type, size)
        self._check_x(x)
        if edge_type is not None:
            raise ValueError("edge_type given without edge_index")
        if size is not None and tuple(size) != (x.size(0), x.size(0)):
            raise ValueError(f"a pointwise layer maps each node to itself: size must be "
                             f"({x.size(0)}, {x.size(0)}) (got {tuple(size)})")
        # The self-loop graph: node i's one message is its own features (N images of one pixel).
        part = GraphPart.grid(self.geometry, (1, 1), x.size(0))
        return F.conv(x, part, self.weight, self.bias, self.groups)


def _has_neighbour_edges(edge_index: Tensor) -> bool:
    """True when a plain edge list joins some node to another node (not only self-loops)."""
    from torch_geometric import EdgeIndex

    data = edge_index.as_tensor() if isinstance(edge_index, EdgeIndex) else edge_index
    if torch.compiler.is_compiling() or data.dim() != 2 or data.size(0) != 2 or not data.size(1):
        return False
    return bool((data[0] != data[1]).any())

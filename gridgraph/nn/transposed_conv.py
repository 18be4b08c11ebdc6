"""``GridConvTranspose2d``: the transposed convolution as message passing along reversed edges."""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor
from torch.nn import Parameter
from torch_geometric.nn import MessagePassing

from ..geometry import TransposedGeometry, _ntuple, check_conv_arguments
from . import functional as F
from .functional import tap_messages
from .grid_conv import GridConvNd, check_graph_inputs

__all__ = ["GridConvTransposeNd", "GridConvTranspose1d", "GridConvTranspose2d", "GridConvTranspose3d",
           "ImageGridConvTranspose1d", "ImageGridConvTranspose2d", "ImageGridConvTranspose3d"]


class GridConvTransposeNd(MessagePassing):
    r"""The n-d transposed convolution as message passing on the reversed graph of a strided convolution
    (base of :class:`GridConvTranspose2d`).

    .. math::
        \mathbf{x}'_q = \mathbf{b} + \sum_{(i \to q) \in \mathcal{E}} \mathbf{W}_{:, :, \tau(i \to q)}^{\top} \mathbf{x}_i

    with ``weight`` ``(C_in, C_out/groups, *kernel)`` as in ``nn.ConvTransposeNd`` (block-diagonal over
    ``groups``). It is the message function of :class:`~gridgraph.GridConvNd` with the weight read as
    the convolution weight ``(C_out, C_in/groups, *kernel)`` it is the transpose of.

    Example:
        >>> up = GridConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1)
        >>> g = transposed_image_to_graph(torch.randn(1, 4, 5, 5), up)   # a strided graph with its edges reversed
        >>> isinstance(up, GridConvTransposeNd), up(g.x, g.edge_index, g.edge_type, size=g.size()).shape
        (True, torch.Size([100, 2]))
    """

    _ndim: int = 2
    _torch_name: str = "ConvTranspose2d"
    transposed = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
                 output_padding: Any = 0, groups: int = 1, bias: bool = True, dilation: Any = 1,
                 padding_mode: str = "zeros", device: Any = None, dtype: Any = None) -> None:
        super().__init__(aggr="add", flow="source_to_target", node_dim=0)
        n = self._ndim
        if padding_mode != "zeros":
            raise ValueError(f'Only "zeros" padding mode is supported for {self._torch_name}')
        kernel_size = _ntuple(kernel_size, n, "kernel_size")
        stride = _ntuple(stride, n, "stride")
        if isinstance(padding, str):
            raise TypeError(f"padding must be an int or a tuple of {n} ints for {self._torch_name} (got {padding!r})")
        padding = _ntuple(padding, n, "padding")
        output_padding = _ntuple(output_padding, n, "output_padding")
        dilation = _ntuple(dilation, n, "dilation")
        check_conv_arguments(in_channels, out_channels, stride, padding, groups, padding_mode)
        TransposedGeometry.from_keywords(n, kernel_size, stride, padding, output_padding, dilation)  # validates
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.output_padding = output_padding
        self.dilation = dilation
        self.groups = groups
        self.padding_mode = padding_mode
        factory = {"device": device, "dtype": dtype}
        self.weight = Parameter(torch.empty((in_channels, out_channels // groups, *kernel_size), **factory))
        if bias:
            self.bias = Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    reset_parameters = GridConvNd.reset_parameters  # the same init as nn.ConvTransposeNd (fan-in from dim 1)

    @property
    def transposed_geometry(self) -> TransposedGeometry:
        """The :class:`~gridgraph.geometry.TransposedGeometry` of the current attributes (read at every call),
        the kernel size read off the weight as ``nn.ConvTransposeNd``'s forward does. Attributes edited into
        what ``nn.ConvTransposeNd`` refuses at call time are refused alike: a ``padding_mode`` other than
        ``'zeros'`` (``ValueError``) and a ``padding`` that is not a tuple (``TypeError``)."""
        if self.padding_mode != "zeros":
            raise ValueError(f'Only "zeros" padding mode is supported for {self._torch_name} '
                             f'(got padding_mode={self.padding_mode!r})')
        if not isinstance(self.padding, tuple):
            raise TypeError(f"{type(self).__name__}.padding must be a tuple of {self._ndim} ints, as "
                            f"nn.{self._torch_name} requires after construction (got {self.padding!r})")
        kernel = tuple(int(k) for k in self.weight.shape[2:])  # plain ints under torch.jit.trace too
        return TransposedGeometry.from_keywords(self._ndim, kernel, self.stride, self.padding,
                                                self.output_padding, self.dilation)

    @property
    def num_taps(self) -> int:
        return math.prod(self.weight.shape[2:])

    def conv_weight(self) -> Tensor:
        """``weight`` ``(C_in, C_out/G, *k)`` read as the convolution weight ``(C_out, C_in/G, *k)`` of the
        reversed graph: block ``g`` of tap ``t`` is ``weight[g-th C_in block, :, t]`` transposed."""
        c_in, c_out_g = self.weight.shape[:2]
        g = self.groups
        w = self.weight.reshape(g, c_in // g, c_out_g, -1).transpose(1, 2)
        return w.reshape(g * c_out_g, c_in // g, *self.kernel_size)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, edge_index: Optional[Tensor] = None, edge_type: Optional[Tensor] = None,
                size: Optional[tuple[int, int]] = None) -> Tensor:
        """Args:
            x (Tensor): source node features ``[N_in, C_in]`` (the input grid's pixels).
            edge_index (Tensor): ``[2, E]`` long, row 0 sources, row 1 targets (output grid pixels): the
                graph's own (it carries its structure) or any edge list.
            edge_type (Tensor, optional): ``[E]`` long, the kernel tap of each edge (a transposed pixel
                graph's own edge_index carries it).
            size (tuple[int, int], optional): ``(N_in, N_out)``; by default the graph's own size when
                ``edge_index`` comes from :func:`~gridgraph.transposed_image_to_graph`, else ``N_out = N_in``.

        Returns:
            Tensor: target node features ``[N_out, C_out]``.
        """
        GridConvNd._check_x(self, x, edge_index)
        structure = check_graph_inputs(self, x, edge_index, edge_type, size, self.transposed_geometry)
        return F.conv(x, structure, self.conv_weight(), self.bias, self.groups)

    def message(self, x_j: Tensor, edge_type: Tensor, weight: Tensor) -> Tensor:
        return tap_messages(x_j, edge_type, weight, self.groups)

    # ------------------------------------------------------------------ conversion and repr
    @classmethod
    def _check_torch_conv(cls, conv: Any) -> None:
        torch_cls = getattr(torch.nn, cls._torch_name)
        if not isinstance(conv, torch_cls):
            raise TypeError(f"conv must be an nn.{cls._torch_name} (got {type(conv).__name__})")

    @classmethod
    def _from_torch(cls, conv: torch.nn.Module):
        cls._check_torch_conv(conv)
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.output_padding, conv.groups, conv.bias is not None, conv.dilation, conv.padding_mode,
                    device=conv.weight.device, dtype=conv.weight.dtype)
        GridConvNd._copy_parameters_from(layer, conv)
        return layer

    def _to_torch(self) -> torch.nn.Module:
        conv = getattr(torch.nn, self._torch_name)(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.output_padding,
            self.groups, self.bias is not None, self.dilation, self.padding_mode,
            device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        conv.weight.requires_grad_(self.weight.requires_grad)
        if self.bias is not None:
            conv.bias.requires_grad_(self.bias.requires_grad)
        conv.train(self.training)
        return conv

    def extra_repr(self) -> str:  # nn.ConvTransposeNd's order: padding, dilation, output_padding
        n = self._ndim
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0,) * n:
            s += f", padding={self.padding}"
        if self.dilation != (1,) * n:
            s += f", dilation={self.dilation}"
        if self.output_padding != (0,) * n:
            s += f", output_padding={self.output_padding}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s

    def __repr__(self) -> str:  # MessagePassing.__repr__ hides extra_repr
        return f"{type(self).__name__}({self.extra_repr()})"


class GridConvTranspose2d(GridConvTransposeNd):
    r"""A 2-D transposed convolution by message passing; equal to ``nn.ConvTranspose2d``.

    Its graph is the strided convolution's graph (same kernel, stride, padding, dilation) with every
    edge reversed: input pixel :math:`i` sends, through the tap :math:`(u, v)`, to the output pixel
    :math:`q = i \cdot s + (u d_H - p_H, v d_W - p_W)`, transformed by that tap's weight transposed:

    .. math::
        \mathbf{x}'_q = \mathbf{b} + \sum_{(i \to q) \in \mathcal{E}} \mathbf{W}_{:, :, u, v}^{\top} \, \mathbf{x}_i,
        \qquad \texttt{edge\_type}(i \to q) = u \cdot k_W + v .

    The constructor is ``nn.ConvTranspose2d``'s (names, order, defaults, initialisation); ``weight``
    ``(C_in, C_out/groups, kH, kW)`` and ``bias`` ``(C_out)`` have its names and shapes, so state dicts load
    both ways. Build the graph with :func:`~gridgraph.transposed_image_to_graph` (or
    :func:`~gridgraph.image_to_graph` given this layer).

    Args:
        in_channels, out_channels, kernel_size: as in ``nn.ConvTranspose2d``.
        stride, padding, output_padding, groups, bias, dilation, padding_mode, device, dtype: as in
            ``nn.ConvTranspose2d`` (default: ``1, 0, 0, 1, True, 1, 'zeros'``).

    Shapes:
        - **input:** node features :math:`(B \cdot H \cdot W, C_{in})`, ``edge_index``, ``edge_type``
        - **output:** node features :math:`(B \cdot H_{out} W_{out}, C_{out})`,
          :math:`H_{out} = (H - 1) s - 2p + d (k - 1) + op + 1`

    Example:
        >>> from gridgraph.nn import GridConvTranspose2d
        >>> from gridgraph.domains import transposed_image_to_graph
        >>> up = torch.nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1)
        >>> layer = GridConvTranspose2d.from_conv_transpose2d(up)
        >>> images = torch.randn(2, 4, 5, 6)
        >>> g = transposed_image_to_graph(images, layer)
        >>> out = graph_to_image(layer(g.x, g.edge_index, g.edge_type, size=g.size()), g)
        >>> out.shape, torch.allclose(out, up(images), atol=1e-6)
        (torch.Size([2, 2, 10, 12]), True)
    """

    _ndim = 2
    _torch_name = "ConvTranspose2d"

    @classmethod
    def from_conv_transpose2d(cls, conv: torch.nn.ConvTranspose2d) -> "GridConvTranspose2d":
        """An independent twin of ``conv`` (weights copied; device, dtype, mode and requires_grad kept)."""
        return cls._from_torch(conv)

    def to_conv_transpose2d(self) -> torch.nn.ConvTranspose2d:
        """The ``nn.ConvTranspose2d`` twin of this layer (an independent copy)."""
        return self._to_torch()


class GridConvTranspose1d(GridConvTransposeNd):
    r"""A 1-D transposed convolution by message passing on the reversed sequence graph; equal to
    ``nn.ConvTranspose1d`` (the n-d layer of :class:`GridConvTranspose2d` with one spatial dimension).

    .. math::
        \mathbf{x}'_q = \mathbf{b} + \sum_{(i \to q) \in \mathcal{E}} \mathbf{W}_{:, :, u}^{\top} \mathbf{x}_i,
        \qquad q = i s + u d - p .

    Args:
        in_channels, out_channels, kernel_size: as in ``nn.ConvTranspose1d``.
        stride, padding, output_padding, groups, bias, dilation, padding_mode, device, dtype: as in
            ``nn.ConvTranspose1d``.

    Shapes:
        - **input:** :math:`(B \cdot L, C_{in})`, ``edge_index``, ``edge_type``
        - **output:** :math:`(B \cdot L_{out}, C_{out})`, :math:`L_{out} = (L - 1) s - 2p + d (k - 1) + op + 1`

    Example:
        >>> from gridgraph.nn import GridConvTranspose1d
        >>> from gridgraph.domains import transposed_grid_to_graph, TransposedGeometry
        >>> up = torch.nn.ConvTranspose1d(2, 3, 4, stride=2, padding=1)
        >>> layer = GridConvTranspose1d.from_conv_transpose1d(up)
        >>> seq = torch.randn(2, 2, 7)
        >>> g = transposed_grid_to_graph(seq, TransposedGeometry.from_module(layer))
        >>> out = graph_to_image(layer(g.x, g.edge_index, g.edge_type), g)
        >>> out.shape, torch.allclose(out, up(seq), atol=1e-6)
        (torch.Size([2, 3, 14]), True)
    """

    _ndim = 1
    _torch_name = "ConvTranspose1d"

    @classmethod
    def from_conv_transpose1d(cls, conv: torch.nn.ConvTranspose1d) -> "GridConvTranspose1d":
        """An independent twin of ``conv`` (weights copied; device, dtype, mode and requires_grad kept)."""
        return cls._from_torch(conv)

    def to_conv_transpose1d(self) -> torch.nn.ConvTranspose1d:
        """The ``nn.ConvTranspose1d`` twin of this layer (an independent copy)."""
        return self._to_torch()


class GridConvTranspose3d(GridConvTransposeNd):
    r"""A 3-D transposed convolution by message passing on the reversed voxel graph; equal to
    ``nn.ConvTranspose3d`` (the n-d layer of :class:`GridConvTranspose2d` with three spatial dimensions).

    Args:
        in_channels, out_channels, kernel_size: as in ``nn.ConvTranspose3d``.
        stride, padding, output_padding, groups, bias, dilation, padding_mode, device, dtype: as in
            ``nn.ConvTranspose3d``.

    Shapes:
        - **input:** :math:`(B \cdot D H W, C_{in})`, ``edge_index``, ``edge_type``
        - **output:** :math:`(B \cdot D_{out} H_{out} W_{out}, C_{out})`

    Example:
        >>> from gridgraph.nn import GridConvTranspose3d
        >>> GridConvTranspose3d(4, 2, 2, stride=2)
        GridConvTranspose3d(4, 2, kernel_size=(2, 2, 2), stride=(2, 2, 2))
    """

    _ndim = 3
    _torch_name = "ConvTranspose3d"

    @classmethod
    def from_conv_transpose3d(cls, conv: torch.nn.ConvTranspose3d) -> "GridConvTranspose3d":
        """An independent twin of ``conv`` (weights copied; device, dtype, mode and requires_grad kept)."""
        return cls._from_torch(conv)

    def to_conv_transpose3d(self) -> torch.nn.ConvTranspose3d:
        """The ``nn.ConvTranspose3d`` twin of this layer (an independent copy)."""
        return self._to_torch()


class _ImageGridConvTranspose:
    """Mixin: the image-in, image-out ``forward`` of an ``nn.ConvTransposeNd`` twin (any number of dimensions).

    Called with an image (and optionally ``output_size``, as torch takes it) it behaves like the torch
    layer; called with node features, ``edge_index`` and ``edge_type`` it is the plain graph layer.
    """

    _ndim: int
    _torch_name: str

    def forward(self, input: Tensor, edge_index: Any = None, edge_type: Optional[Tensor] = None,
                size: Optional[tuple[int, int]] = None, output_size: Any = None) -> Tensor:
        if edge_type is not None or (isinstance(edge_index, Tensor) and edge_index.dim() == 2):
            return super().forward(input, edge_index, edge_type, size)  # type: ignore[misc]
        if edge_index is not None:  # nn.ConvTransposeNd's positional output_size
            output_size = edge_index
        n = self._ndim
        name = type(self).__name__
        if not isinstance(input, Tensor):
            raise TypeError(f"{name} expects an image tensor (got {type(input).__name__})")
        geometry = self.transposed_geometry if output_size is None else \
            self._geometry_for(tuple(input.shape[-n:]), output_size)
        return F.conv_image(input, self.weight, self.bias, geometry, self.groups, name)

    def _geometry_for(self, grid: tuple[int, ...], output_size: Any) -> TransposedGeometry:
        """The layer's geometry, with the output padding that ``output_size`` asks for (as torch picks it)."""
        geometry = self.transposed_geometry
        if output_size is None:
            return geometry
        output_size = tuple(int(s) for s in output_size)[-self._ndim:]
        if len(output_size) != self._ndim:
            raise ValueError(f"output_size must give {self._ndim} spatial sizes (got {output_size})")
        base = TransposedGeometry(geometry.conv, (0,) * self._ndim).output_size(grid)
        extra = tuple(o - b for o, b in zip(output_size, base))
        if any(e < 0 or e >= s for e, s in zip(extra, geometry.conv.stride)):
            high = tuple(b + s - 1 for b, s in zip(base, geometry.conv.stride))
            raise ValueError(f"requested an output size of {list(output_size)}, but valid sizes range from "
                             f"{list(base)} to {list(high)} (for an input of {list(grid)})")
        return TransposedGeometry(geometry.conv, extra)

    @classmethod
    def _share_from_torch(cls, conv: torch.nn.Module):
        """The twin of ``conv`` holding ``conv``'s own ``weight`` and ``bias`` Parameter objects (no copy)."""
        cls._check_torch_conv(conv)
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.output_padding, conv.groups, conv.bias is not None, conv.dilation, conv.padding_mode,
                    device="meta", dtype=conv.weight.dtype)
        layer.weight = conv.weight
        if conv.bias is not None:
            layer.bias = conv.bias
        layer.train(conv.training)
        return layer

    def _share_to_torch(self) -> torch.nn.Module:
        """The torch layer holding this layer's own ``weight`` and ``bias`` Parameter objects."""
        conv = getattr(torch.nn, self._torch_name)(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                        self.padding, self.output_padding, self.groups, self.bias is not None,
                                        self.dilation, self.padding_mode, device="meta", dtype=self.weight.dtype)
        conv.weight = self.weight
        if self.bias is not None:
            conv.bias = self.bias
        conv.train(self.training)
        return conv


class ImageGridConvTranspose2d(_ImageGridConvTranspose, GridConvTranspose2d):
    r"""A drop-in ``nn.ConvTranspose2d`` that computes by message passing on the reversed pixel graph of
    its input: ``image -> node features -> message passing on the (cached) graph -> output image``.

    Called with an image ``(B, C_in, H, W)`` or ``(C_in, H, W)`` (and optionally ``output_size``, as
    ``nn.ConvTranspose2d`` takes it) it behaves like the torch layer; called with node features,
    ``edge_index`` and ``edge_type`` it is the plain :class:`GridConvTranspose2d`. :func:`~gridgraph.convert`
    puts it in place of every ``nn.ConvTranspose2d``; its parameters and state dict keys are torch's.

    Example:
        >>> from gridgraph.nn.transposed_conv import ImageGridConvTranspose2d
        >>> up = torch.nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1)
        >>> twin = ImageGridConvTranspose2d.from_conv_transpose2d(up)
        >>> image = torch.randn(1, 4, 5, 6)
        >>> twin(image, output_size=(10, 12)).shape, torch.allclose(twin(image), up(image), atol=1e-6)
        (torch.Size([1, 2, 10, 12]), True)
    """


class ImageGridConvTranspose1d(_ImageGridConvTranspose, GridConvTranspose1d):
    """A drop-in ``nn.ConvTranspose1d`` computing by message passing on the reversed graph of its input
    sequence (:class:`ImageGridConvTranspose2d` with one spatial dimension)."""


class ImageGridConvTranspose3d(_ImageGridConvTranspose, GridConvTranspose3d):
    """A drop-in ``nn.ConvTranspose3d`` computing by message passing on the reversed graph of its input
    volume (:class:`ImageGridConvTranspose2d` with three spatial dimensions)."""

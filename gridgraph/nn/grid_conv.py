"""``GridConv2d``: the convolution as message passing from each neighbour in the kernel window."""
from __future__ import annotations

import functools
import math
from typing import Any, Optional

import torch
from torch import Tensor
from torch.nn import Parameter, init
from torch_geometric.nn import MessagePassing

from ..geometry import ConvGeometry, TransposedGeometry, _ntuple, check_conv_arguments
from ..pixel_graph import PixelEdgeIndex, _EdgeTypes, pixel_structure
from . import functional as F
from .functional import EdgeList, tap_messages

__all__ = ["GridConvNd", "GridConv2d", "GridConv1d", "GridConv3d", "check_graph_inputs"]


def check_graph_inputs(layer: Any, x: Tensor, edge_index: Any, edge_type: Any, size: Any,
                       geometry: Any) -> "F.Structure":
    """What :func:`~gridgraph.nn.functional.conv` should run ``layer`` on, checked.

    A pixel graph's own ``edge_index`` (a :class:`~gridgraph.pixel_graph.PixelEdgeIndex`, intact) is its
    structure: every graph in it must have ``geometry`` (else a ``ValueError`` naming both geometries), and
    ``size`` / ``x`` must match its node counts; ``edge_type`` may be omitted. Anything else is a plain
    edge list with PyG's semantics (each edge of type ``t`` adds ``W_t x_j``), checked for types, shapes
    and ranges.
    """
    carried = pixel_structure(edge_index)
    if carried is not None:
        own = edge_type is None or edge_type is edge_index.edge_type or (
            not torch.compiler.is_compiling() and isinstance(edge_type, Tensor) and
            edge_type.shape == edge_index.edge_type.shape and edge_type.device == edge_index.device and
            edge_type.dtype == torch.long and torch.equal(edge_type, edge_index.edge_type))
        if own:
            for part in carried.parts:
                if not _same_geometry(part.geometry, geometry):
                    raise ValueError(
                        f"{type(layer).__name__} computes the convolution {geometry.describe()}, but this is the pixel "
                        f"graph of another one ({part.describe()}); build the graph with "
                        f"image_to_graph(image, layer) or use a layer of that geometry")
            expected = (carried.num_src, carried.num_dst)
            if size is not None and (len(size) != 2 or tuple(int(n) for n in size) != expected):
                raise ValueError(f"size {tuple(size)} does not match the pixel graph's (N_src, N_dst) = {expected}")
            if x.size(0) != expected[0]:
                sizes = ", ".join("x".join(map(str, p.in_size)) for p in carried.parts)
                raise ValueError(f"expected x with {expected[0]} rows, the source nodes of this pixel graph "
                                 f"({carried.parts[0].num_images if len(carried.parts) == 1 else 'its'} image(s) of "
                                 f"{sizes}) (got {x.size(0)}): x and edge_index must come from the same graph, "
                                 "g = image_to_graph(images, layer), then layer(g.x, g.edge_index, g.edge_type)")
            if edge_index.device != x.device:
                raise ValueError(f"edge_index is on {edge_index.device} but x is on {x.device}")
            return edge_index
        edge_index = edge_index.as_tensor()  # other taps on these edges: a plain typed graph
    elif isinstance(edge_index, PixelEdgeIndex) and edge_index.structure is not None:
        if edge_type is None:
            edge_type = edge_index.edge_type
        if size is None:
            size = (edge_index.structure.num_src, edge_index.structure.num_dst)
        edge_index = edge_index.as_tensor()  # edited in place: its current edges, as a plain graph
    return _check_edges(layer, x, edge_index, edge_type, size)


def _geometry_of(ndim: int, kernel_size: Any, stride: Any, padding: Any, dilation: Any, mode: str) -> ConvGeometry:
    """A geometry from a layer's attributes; ``padding`` may be ``(before, after)`` pairs (a non-zero padding
    mode's fixed padding)."""
    if isinstance(padding, tuple) and padding and isinstance(padding[0], tuple):
        base = ConvGeometry.from_keywords(ndim, kernel_size, stride, 0, dilation, mode)
        return ConvGeometry(base.kernel_size, base.stride, tuple(tuple(p) for p in padding), base.dilation, mode)
    return ConvGeometry.from_keywords(ndim, kernel_size, stride, padding, dilation, mode)


@functools.lru_cache(maxsize=1024)
def _geometry(*attrs: Any) -> ConvGeometry:
    """The geometry of a layer's attributes (cached: a layer asks for it at every call)."""
    return _geometry_of(*attrs)


def _same_geometry(a: Any, b: Any) -> bool:
    """Field-by-field equality of two geometries (traceable by torch.compile, whose sizes may be symbolic)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, TransposedGeometry):
        return tuple(a.output_padding) == tuple(b.output_padding) and _same_geometry(a.conv, b.conv)
    return (tuple(a.kernel_size) == tuple(b.kernel_size) and tuple(a.stride) == tuple(b.stride)
            and tuple(a.padding) == tuple(b.padding) and tuple(a.dilation) == tuple(b.dilation)
            and a.padding_mode == b.padding_mode)


def _check_edges(layer: Any, x: Tensor, edge_index: Any, edge_type: Any, size: Any) -> EdgeList:
    from torch_geometric import EdgeIndex

    if isinstance(edge_index, EdgeIndex):
        if size is None:  # its own sparse size (a bipartite graph's target count), where known
            known = edge_index.sparse_size()
            size = (x.size(0) if known[0] is None else known[0], x.size(0) if known[1] is None else known[1])
        edge_index = edge_index.as_tensor()
    if not isinstance(edge_index, Tensor):
        raise TypeError(f"edge_index must be a torch.Tensor (got {type(edge_index).__name__})")
    if edge_index.dtype != torch.long:
        raise TypeError(f"expected edge_index of dtype torch.int64 (got {edge_index.dtype})")
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f"expected edge_index of shape [2, num_edges] (got {tuple(edge_index.shape)})")
    if edge_index.device != x.device:
        raise ValueError(f"edge_index is on {edge_index.device} but x is on {x.device}")
    if edge_type is None:
        raise ValueError("edge_type is required with a plain edge_index (only a pixel graph's own edge_index "
                         "carries its taps)")
    if not isinstance(edge_type, Tensor):
        raise TypeError(f"edge_type must be a torch.Tensor (got {type(edge_type).__name__})")
    if isinstance(edge_type, _EdgeTypes):  # a pixel graph's taps: the plain tensor they wrap
        edge_type = edge_type._t
    if edge_type.dtype != torch.long:
        raise TypeError(f"expected edge_type of dtype torch.int64 (got {edge_type.dtype})")
    num_edges = edge_index.size(1)
    if edge_type.dim() != 1 or edge_type.numel() != num_edges:
        raise ValueError(f"expected edge_type of shape [{num_edges}], one tap per edge "
                         f"(got {tuple(edge_type.shape)})")
    if edge_type.device != x.device:
        raise ValueError(f"edge_type is on {edge_type.device} but x is on {x.device}")
    if size is None:
        size = (x.size(0), x.size(0))
    else:
        if len(size) != 2:
            raise ValueError(f"size must be (num_src, num_dst) (got {size!r})")
        size = (int(size[0]), int(size[1]))
        if size[0] != x.size(0):
            raise ValueError(f"size[0] = {size[0]} (the source node count) must equal the number of rows of x "
                             f"({x.size(0)})")
    if num_edges and not torch.compiler.is_compiling():
        lo, hi = edge_type.aminmax()
        if lo < 0 or hi >= layer.num_taps:
            raise ValueError(f"edge_type must lie in [0, {layer.num_taps}) for a {layer.kernel_size} kernel "
                             f"(got values in [{int(lo)}, {int(hi)}])")
        for row, name, n in ((0, "source", size[0]), (1, "target", size[1])):
            lo, hi = edge_index[row].aminmax()
            if lo < 0 or hi >= n:
                raise ValueError(f"edge_index[{row}] ({name} node ids) must lie in [0, {n}) "
                                 f"(got values in [{int(lo)}, {int(hi)}])")
    return EdgeList(edge_index, edge_type, size[0], size[1])


class GridConvNd(MessagePassing):
    r"""The n-d grid convolution as relational message passing (base of :class:`GridConv2d`).

    .. math::
        \mathbf{x}'_i = \mathbf{b} + \sum_{(j \to i) \in \mathcal{E}} \mathbf{W}_{\tau(j \to i)} \mathbf{x}_j

    where :math:`\tau(j \to i)` is the edge's kernel tap and :math:`\mathbf{W}_t` the weight slice
    ``weight[:, :, *tap]``, block-diagonal over ``groups``. The geometry (``kernel_size``, ``stride``,
    ``padding``, ``dilation``, ``padding_mode``) is read from the attributes at every call, as
    ``nn.Conv2d`` reads them: editing ``layer.stride`` takes effect.

    Example:
        >>> layer = GridConv2d(3, 4, 3, padding=1)          # GridConv1d/2d/3d are GridConvNd with ndim fixed
        >>> isinstance(layer, GridConvNd), layer.geometry.num_taps
        (True, 9)
    """

    _ndim: int = 2
    _torch_name: str = "Conv2d"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", device: Any = None, dtype: Any = None) -> None:
        super().__init__(aggr="add", flow="source_to_target", node_dim=0)
        n = self._ndim
        kernel_size = _ntuple(kernel_size, n, "kernel_size")
        stride = _ntuple(stride, n, "stride")
        padding = padding if isinstance(padding, str) else _ntuple(padding, n, "padding")
        dilation = _ntuple(dilation, n, "dilation")
        check_conv_arguments(in_channels, out_channels, stride, padding, groups, padding_mode)
        ConvGeometry.from_keywords(n, kernel_size, stride, padding, dilation, padding_mode)  # validates
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self.padding_mode = padding_mode
        # As nn.ConvNd: the padding a non-zero padding mode pads with is fixed here (F.pad's order: last
        # dimension first, (before, after) each); editing ``padding`` later changes only zero padding.
        pads = ConvGeometry.from_keywords(n, kernel_size, stride, padding, dilation).padding
        self._reversed_padding_repeated_twice = [v for pair in reversed(pads) for v in pair]
        factory = {"device": device, "dtype": dtype}
        self.weight = Parameter(torch.empty((out_channels, in_channels // groups, *kernel_size), **factory))
        if bias:
            self.bias = Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Conv2d``'s initialisation: Kaiming-uniform weight (a=sqrt(5)), bias in +-1/sqrt(fan_in)."""
        with torch.no_grad():
            init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            if self.bias is not None:
                fan_in, _ = init._calculate_fan_in_and_fan_out(self.weight)
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                init.uniform_(self.bias, -bound, bound)

    @property
    def geometry(self) -> ConvGeometry:
        """The :class:`~gridgraph.geometry.ConvGeometry` this layer computes now, read as ``nn.ConvNd``'s
        forward reads it: the kernel size from the weight's shape (editing ``kernel_size`` changes nothing,
        as in torch), ``stride``, ``dilation``, ``padding_mode`` and, for zero padding, ``padding`` from the
        attributes; a non-zero padding mode pads with the padding fixed at construction."""
        padding = self.padding
        if self.padding_mode != "zeros":
            reversed_pads = getattr(self, "_reversed_padding_repeated_twice", None)
            if reversed_pads is not None:
                padding = tuple(tuple(reversed_pads[2 * i:2 * i + 2]) for i in reversed(range(len(reversed_pads) // 2)))
        attrs = (self._ndim, tuple(self.weight.shape[2:]), self.stride, padding, self.dilation, self.padding_mode)
        if torch.compiler.is_compiling():
            return _geometry_of(*attrs)
        attrs = tuple(tuple(a) if isinstance(a, list) else a for a in attrs)  # a list edited in place: its values
        cached = self.__dict__.get("_geometry_of")
        if cached is not None and cached[0] == attrs:  # the attributes as they were: the same geometry
            return cached[1]
        geometry = _geometry(*attrs)
        self.__dict__["_geometry_of"] = (attrs, geometry)
        return geometry

    @property
    def num_taps(self) -> int:
        """int: the number of kernel taps, that is of the edge types this layer has a weight for."""
        return math.prod(self.weight.shape[2:])

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, edge_index: Optional[Tensor] = None, edge_type: Optional[Tensor] = None,
                size: Optional[tuple[int, int]] = None) -> Tensor:
        """Args:
            x (Tensor): source node features ``[N_src, C_in]``.
            edge_index (Tensor): ``[2, E]`` long, row 0 sources, row 1 targets: a pixel graph's own
                (which carries its structure: the neighbour-table kernels run) or any edge list.
            edge_type (Tensor, optional): ``[E]`` long, the kernel tap of each edge, in ``[0, num_taps)``
                (a pixel graph's own edge_index carries it: may be omitted).
            size (tuple[int, int], optional): ``(N_src, N_dst)``; by default the pixel graph's own size,
                else ``N_dst = N_src``.

        Returns:
            Tensor: target node features ``[N_dst, C_out]``.
        """
        self._check_x(x, edge_index)
        structure = check_graph_inputs(self, x, edge_index, edge_type, size, self.geometry)
        return F.conv(x, structure, self.weight, self.bias, self.groups)

    def message(self, x_j: Tensor, edge_type: Tensor) -> Tensor:
        """The message of every edge, for ``MessagePassing.propagate`` (the forward calls the kernels directly)."""
        return tap_messages(x_j, edge_type, self.weight, self.groups)

    # ------------------------------------------------------------------ validation
    def _check_x(self, x: Any, edge_index: Any = ...) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor (got {type(x).__name__})")
        if edge_index is None and x.dim() != 2:
            raise TypeError(
                f"{type(self).__name__} computes on a pixel graph, not on an image: call it as "
                f"layer(g.x, g.edge_index, g.edge_type, size=g.size()) with g = image_to_graph(image, layer), or "
                f"use gridgraph.convert(model) / Image{type(self).__name__}.from_conv{self._ndim}d(conv) for a "
                f"drop-in module that takes images (got x of shape {tuple(x.shape)} and no edge_index)")
        if x.dim() != 2:
            raise ValueError(f"expected x of shape [num_nodes, {self.in_channels}]: 2 dims "
                             f"(got a {x.dim()}-dim tensor of shape {tuple(x.shape)})")
        if x.size(1) != self.in_channels:
            raise ValueError(f"expected x with {self.in_channels} channels, the layer's in_channels (got {x.size(1)}: "
                             f"x of shape {tuple(x.shape)}, one row per node and one column per channel)")
        if edge_index is None:
            raise TypeError(f"{type(self).__name__}.forward() needs edge_index: the graph to compute on")
        if x.dtype != self.weight.dtype and not F.autocast_enabled(x.device.type):
            raise TypeError(f"expected x of dtype {self.weight.dtype}, the layer's dtype (got {x.dtype}): convert one "
                            f"to the other, x.to({self.weight.dtype}) or layer.to({x.dtype})")
        if x.device != self.weight.device:
            raise ValueError(f"x is on {x.device} but the layer's weight is on {self.weight.device}")

    # ------------------------------------------------------------------ conversion and repr
    def _torch_conv_class(self):
        return getattr(torch.nn, self._torch_name)

    @classmethod
    def _check_torch_conv(cls, conv: Any) -> None:
        torch_cls = getattr(torch.nn, cls._torch_name)
        if type(conv) is not torch_cls and not (isinstance(conv, torch_cls) and not conv.transposed):
            raise TypeError(f"conv must be an nn.{cls._torch_name} (got {type(conv).__name__})")

    @classmethod
    def _from_torch(cls, conv: torch.nn.Module, **extra: Any):
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                    device=conv.weight.device, dtype=conv.weight.dtype, **extra)
        layer._copy_parameters_from(conv)
        return layer

    def _copy_parameters_from(self, conv: torch.nn.Module) -> None:
        with torch.no_grad():
            self.weight.copy_(conv.weight)
            if self.bias is not None:
                self.bias.copy_(conv.bias)
        self.weight.requires_grad_(conv.weight.requires_grad)
        if self.bias is not None:
            self.bias.requires_grad_(conv.bias.requires_grad)
        self.train(conv.training)

    def _to_torch(self) -> torch.nn.Module:
        conv = self._torch_conv_class()(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
            self.groups, self.bias is not None, self.padding_mode,
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

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0,) * self._ndim:
            s += f", padding={self.padding}"  # as Conv2d: padding=same, not padding='same'
        if self.dilation != (1,) * self._ndim:
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s

    def __repr__(self) -> str:  # MessagePassing.__repr__ hides extra_repr
        return f"{type(self).__name__}({self.extra_repr()})"


class GridConv2d(GridConvNd):
    r"""A 2-D convolution computed by message passing on a pixel graph; equal to ``nn.Conv2d``.

    Each output pixel :math:`i` receives one message from every input pixel :math:`j` in its
    ``kH x kW`` window, transformed by the weight of the kernel tap :math:`(u, v)` that joins them:

    .. math::
        \mathbf{x}'_i = \mathbf{b} + \sum_{(j \to i) \in \mathcal{E}} \mathbf{W}_{:, :, u, v} \, \mathbf{x}_j,
        \qquad \texttt{edge\_type}(j \to i) = u \cdot k_W + v .

    The constructor is ``nn.Conv2d``'s (names, order, defaults, validation and initialisation), and
    ``weight`` ``(C_out, C_in/groups, kH, kW)`` and ``bias`` ``(C_out)`` have its names and shapes,
    so state dicts load both ways. The geometry arguments (stride, padding, dilation, padding mode)
    do not enter the computation: they describe the pixel graph this layer is the twin of
    (:func:`~gridgraph.image_to_graph` reads them), while the layer computes from the graph it is given.

    Args:
        in_channels (int): channels of the input image / source node features.
        out_channels (int): channels of the output.
        kernel_size (int or tuple): kernel size ``(kH, kW)``.
        stride, padding, dilation, groups, bias, padding_mode, device, dtype: as in ``nn.Conv2d``
            (default: ``1, 0, 1, 1, True, 'zeros', None, None``).

    Shapes:
        - **input:** node features :math:`(|\mathcal{V}_{in}|, C_{in})`, edge indices
          :math:`(2, |\mathcal{E}|)`, edge types :math:`(|\mathcal{E}|)`
        - **output:** node features :math:`(|\mathcal{V}_{out}|, C_{out})`

    Example:
        >>> conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        >>> layer = GridConv2d.from_conv2d(conv)
        >>> images = torch.randn(2, 3, 5, 6)
        >>> g = image_to_graph(images, layer)
        >>> out = graph_to_image(layer(g.x, g.edge_index, g.edge_type, size=g.size()), g)
        >>> torch.allclose(out, conv(images), atol=1e-6)
        True
        >>> layer
        GridConv2d(3, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
    """

    _ndim = 2
    _torch_name = "Conv2d"

    @classmethod
    def from_conv2d(cls, conv: torch.nn.Conv2d) -> "GridConv2d":
        """An independent twin of ``conv`` (weights copied; device, dtype, mode and requires_grad kept)."""
        cls._check_torch_conv(conv)
        return cls._from_torch(conv)

    def to_conv2d(self) -> torch.nn.Conv2d:
        """The ``nn.Conv2d`` twin of this layer (an independent copy)."""
        return self._to_torch()


class GridConv1d(GridConvNd):
    r"""A 1-D convolution computed by message passing on a sequence graph; equal to ``nn.Conv1d``.

    The same layer as :class:`GridConv2d` on a 1-D grid (the maths lives once, in
    :class:`GridConvNd`): each position :math:`i` receives one message from every position :math:`j`
    in its window, transformed by the weight of the tap :math:`u` that joins them,

    .. math::
        \mathbf{x}'_i = \mathbf{b} + \sum_{(j \to i) \in \mathcal{E}} \mathbf{W}_{:, :, u} \, \mathbf{x}_j,
        \qquad \texttt{edge\_type}(j \to i) = u .

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype:
            as in ``nn.Conv1d`` (default: ``1, 0, 1, 1, True, 'zeros', None, None``).

    Shapes:
        - **input:** node features :math:`(B \cdot L, C_{in})`, ``edge_index`` :math:`(2, |\mathcal{E}|)`,
          ``edge_type`` :math:`(|\mathcal{E}|)` (from :func:`~gridgraph.sequence_to_graph`)
        - **output:** node features :math:`(B \cdot L_{out}, C_{out})`

    Example:
        >>> from gridgraph.nn import GridConv1d
        >>> from gridgraph.graph import sequence_to_graph
        >>> conv = torch.nn.Conv1d(2, 3, 5, stride=2, padding=2)
        >>> layer = GridConv1d.from_conv1d(conv)
        >>> seq = torch.randn(4, 2, 11)
        >>> g = sequence_to_graph(seq, layer)
        >>> out = graph_to_image(layer(g.x, g.edge_index, g.edge_type, size=g.size()), g)
        >>> out.shape, torch.allclose(out, conv(seq), atol=1e-6)
        (torch.Size([4, 3, 6]), True)
    """

    _ndim = 1
    _torch_name = "Conv1d"

    @classmethod
    def from_conv1d(cls, conv: torch.nn.Conv1d) -> "GridConv1d":
        """An independent twin of ``conv`` (weights copied; device, dtype, mode and requires_grad kept)."""
        cls._check_torch_conv(conv)
        return cls._from_torch(conv)

    def to_conv1d(self) -> torch.nn.Conv1d:
        """The ``nn.Conv1d`` twin of this layer (an independent copy)."""
        return self._to_torch()


class GridConv3d(GridConvNd):
    r"""A 3-D convolution computed by message passing on a voxel graph; equal to ``nn.Conv3d``.

    The same layer as :class:`GridConv2d` on a 3-D grid (the maths lives once, in
    :class:`GridConvNd`); the tap of an edge is ``u*kH*kW + v*kW + w``:

    .. math::
        \mathbf{x}'_i = \mathbf{b} + \sum_{(j \to i) \in \mathcal{E}} \mathbf{W}_{:, :, u, v, w} \, \mathbf{x}_j .

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype:
            as in ``nn.Conv3d`` (default: ``1, 0, 1, 1, True, 'zeros', None, None``).

    Shapes:
        - **input:** node features :math:`(B \cdot D \cdot H \cdot W, C_{in})`, ``edge_index``,
          ``edge_type`` (from :func:`~gridgraph.volume_to_graph`)
        - **output:** node features :math:`(B \cdot D_{out} H_{out} W_{out}, C_{out})`

    Example:
        >>> from gridgraph.nn import GridConv3d
        >>> from gridgraph.graph import volume_to_graph
        >>> conv = torch.nn.Conv3d(2, 3, 3, padding=1)
        >>> layer = GridConv3d.from_conv3d(conv)
        >>> vol = torch.randn(2, 2, 4, 5, 3)
        >>> g = volume_to_graph(vol, layer)
        >>> out = graph_to_image(layer(g.x, g.edge_index, g.edge_type, size=g.size()), g)
        >>> torch.allclose(out, conv(vol), atol=1e-6)
        True
        >>> layer
        GridConv3d(2, 3, kernel_size=(3, 3, 3), stride=(1, 1, 1), padding=(1, 1, 1))
    """

    _ndim = 3
    _torch_name = "Conv3d"

    @classmethod
    def from_conv3d(cls, conv: torch.nn.Conv3d) -> "GridConv3d":
        """An independent twin of ``conv`` (weights copied; device, dtype, mode and requires_grad kept)."""
        cls._check_torch_conv(conv)
        return cls._from_torch(conv)

    def to_conv3d(self) -> torch.nn.Conv3d:
        """The ``nn.Conv3d`` twin of this layer (an independent copy)."""
        return self._to_torch()

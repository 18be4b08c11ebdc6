r"""Attention on pixel graphs: a convolution whose edge weights are computed from the data.

In a convolution the edge :math:`j \to i` carries a fixed weight, chosen by its kernel tap. In
attention the same edge carries a weight :math:`\alpha_{ij}` computed from the two pixels: the
softmax, over the incoming edges of :math:`i`, of the score :math:`\mathbf{q}_i \cdot \mathbf{k}_j / \sqrt{d}`.
Queries, keys and values are 1x1 convolutions (:class:`~gridgraph.PointwiseConv2d`: message passing
over self-loops), so everything spatial happens on the graph's edges:

* :class:`PixelAttention` on :func:`complete_pixel_graph` (every pixel of an image joined to every
  pixel of the same image) equals ``nn.MultiheadAttention`` on the flattened pixels; on the
  ``k x k`` graph of :func:`~gridgraph.image_to_graph` it equals ``nn.MultiheadAttention`` with the
  ``k x k`` neighbourhood as ``attn_mask`` (local attention). An optional learned bias per kernel tap
  (relative-position bias) is added to the scores; with constant scores attention reduces to a
  convolution whose tap weights are ``softmax(bias)_t * W_out W_v``.
* :class:`SqueezeExcitation` is channel attention: pixels send their features to one virtual node
  per image (mean aggregation), two 1x1 convolutions and a sigmoid run on that node, and the gate is
  sent back along the reversed edges to rescale every pixel's channels.

Graphs are block-diagonal per image (no edge joins two images), so a batch needs no extra argument.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor
from torch.nn import Parameter, init
from torch_geometric.nn import MessagePassing
from torch_geometric.utils import softmax

from ..geometry import _ntuple
from ..graph import PixelGraph, image_to_graph
from ..pixel_graph import _EdgeTypes, outside_inference_mode
from .pointwise_conv import PointwiseConv2d

try:  # PyG >= 2.5
    from torch_geometric import EdgeIndex as _EdgeIndex
except ImportError:  # pragma: no cover - older PyG has no EdgeIndex
    _EdgeIndex = None

__all__ = ["PixelAttention", "SqueezeExcitation", "complete_pixel_graph"]


def _plain(t: Any) -> Any:
    """A ``torch_geometric.EdgeIndex`` (or subclass) as a plain tensor; anything else unchanged."""
    if _EdgeIndex is not None and isinstance(t, _EdgeIndex):
        return t.as_tensor()
    if isinstance(t, _EdgeTypes):  # a pixel graph's edge_type: the taps it wraps
        return t._t
    return t


def _check_features(x: Any, name: str, channels: int, like: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (got {type(x).__name__})")
    if x.dim() != 2:
        raise ValueError(f"expected {name} of shape [num_nodes, {channels}]: 2 dims "
                         f"(got a {x.dim()}-dim tensor of shape {tuple(x.shape)})")
    if x.size(1) != channels:
        raise ValueError(f"expected {name} with {channels} channels (got {x.size(1)})")
    if x.dtype != like.dtype:
        raise TypeError(f"expected {name} of dtype {like.dtype}, the layer's dtype (got {x.dtype})")
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but the layer's weights are on {like.device}")


def _check_index(t: Any, name: str, shape: str, dim: int, device: torch.device) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (got {type(t).__name__})")
    if t.dtype != torch.long:
        raise TypeError(f"expected {name} of dtype torch.int64 (got {t.dtype})")
    if t.dim() != dim:
        raise ValueError(f"expected {name} of shape {shape} (got {tuple(t.shape)})")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")


@outside_inference_mode
def complete_pixel_graph(images: Tensor) -> PixelGraph:
    r"""The complete pixel graph of a batch: every pixel joined to every pixel of the same image.

    Each pixel receives an edge from every pixel of its image (itself included); no edge joins two
    images. It is the pixel graph of one very large convolution: kernel ``(2H-1, 2W-1)`` with padding
    ``(H-1, W-1)`` reaches every pixel from every other, so it is built by
    :func:`~gridgraph.image_to_graph` and each edge keeps a meaningful ``edge_type``: the tap
    ``u*(2W-1) + v`` of the relative offset ``(dy, dx) = (u - (H-1), v - (W-1))`` from target to source.
    A :class:`PixelAttention` with ``kernel_size=(2H-1, 2W-1)`` therefore learns one bias per head per
    relative position over the whole image (the relative-position bias of Swin-style attention);
    without a tap bias the layer ignores ``edge_type``. A batch of ``B`` images of ``H x W`` pixels has
    ``B (HW)^2`` edges: keep images small.

    Args:
        images (Tensor): ``(C, H, W)`` or ``(B, C, H, W)``.

    Returns:
        PixelGraph: as :func:`~gridgraph.image_to_graph` (``x``, ``edge_index``, ``edge_type``,
        ``edge_attr`` = offsets, ``pos``, ``batch``); :func:`~gridgraph.graph_to_image` inverts it.

    Example:
        >>> g = complete_pixel_graph(torch.zeros(2, 3, 2, 3))
        >>> g.num_nodes, g.edge_index.size(1), int((g.edge_index[1] == 4).sum())
        (12, 72, 6)
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor (got {type(images).__name__})")
    if images.dim() not in (3, 4):
        raise ValueError(f"expected images of shape (C, H, W) or (B, C, H, W): 3 or 4 dims "
                         f"(got a {images.dim()}-dim tensor of shape {tuple(images.shape)})")
    h, w = images.shape[-2:]
    if h == 0 or w == 0:
        raise ValueError(f"expected images with at least one pixel (got H, W = {h}, {w})")
    return image_to_graph(images, kernel_size=(2 * h - 1, 2 * w - 1), padding=(h - 1, w - 1))


class PixelAttention(MessagePassing):
    r"""Multi-head attention by message passing on a pixel graph; equal to ``nn.MultiheadAttention``.

    On :func:`complete_pixel_graph` it is global self-attention, ``nn.MultiheadAttention`` on each
    image's flattened pixels; on the ``k x k`` graph of :func:`~gridgraph.image_to_graph` it is local
    attention; on any graph, ``nn.MultiheadAttention`` with the missing edges as ``attn_mask``
    (:meth:`attention_mask`).

    Queries, keys and values are 1x1 convolutions of the pixels (:class:`~gridgraph.PointwiseConv2d`),
    split into :math:`h` heads of :math:`d = E/h` channels. Each edge :math:`j \to i` gets, per head,
    the weight :math:`\alpha_{ij}`, a softmax over the incoming edges of :math:`i`:

    .. math::
        \alpha_{ij} = \operatorname*{softmax}_{j:\,(j \to i) \in \mathcal{E}}
            \Big( \frac{\mathbf{q}_i \cdot \mathbf{k}_j}{\sqrt{d}} + \beta_{\tau(j \to i)} \Big),
        \qquad
        \mathbf{x}'_i = \mathbf{W}_{out} \Big\Vert_{\text{heads}} \sum_{(j \to i) \in \mathcal{E}} \alpha_{ij} \mathbf{v}_j
            + \mathbf{b}_{out}

    with :math:`\mathbf{q}_i = \mathbf{W}_q \mathbf{x}_i + \mathbf{b}_q` (likewise :math:`\mathbf{k}`,
    :math:`\mathbf{v}`) and :math:`\beta_t` the optional learned bias of kernel tap
    :math:`t = \texttt{edge\_type}`, one per head (``tap_bias``, shape ``(num_heads, kH*kW)``). A convolution
    is the case where :math:`\alpha_{ij}` depends on the tap only. A target with no incoming edge gets
    :math:`\mathbf{b}_{out}` (``nn.MultiheadAttention`` would give NaN for a fully masked row). Every
    edge is one term of the softmax: on a graph with parallel edges (reflect, replicate or circular
    padding of a kernel larger than the image) a pixel reached by two taps counts twice.

    Args:
        embed_dim (int): channels :math:`E` of the pixels (input and output).
        num_heads (int): attention heads; ``embed_dim`` must be divisible by it.
        dropout (float, optional): dropout on the attention weights in training, as in
            ``nn.MultiheadAttention`` (default: ``0.0``).
        bias (bool, optional): biases of the four projections (default: ``True``).
        kernel_size (int or tuple, optional): learn a bias per head per kernel tap of a graph of this
            kernel size, indexed by ``edge_type`` (default: ``None``, no tap bias; ``edge_type`` ignored).
        device, dtype: as in ``nn.MultiheadAttention``.

    Shapes:
        - **input:** node features :math:`(|\mathcal{V}|, E)`, or a pair (sources
          :math:`(|\mathcal{V}_{s}|, E)`, targets :math:`(|\mathcal{V}_{t}|, E)`) for cross-attention;
          ``edge_index`` :math:`(2, |\mathcal{E}|)`; ``edge_type`` :math:`(|\mathcal{E}|)` (needed with
          a tap bias)
        - **output:** node features :math:`(|\mathcal{V}_{t}|, E)`; with
          ``return_attention_weights=True`` also :math:`\alpha` of shape :math:`(|\mathcal{E}|, h)`

    Example:
        >>> mha = torch.nn.MultiheadAttention(4, num_heads=2, batch_first=True)
        >>> layer = PixelAttention.from_multihead_attention(mha)
        >>> images = torch.randn(2, 4, 3, 3)
        >>> g = complete_pixel_graph(images)
        >>> out = graph_to_image(layer(g.x, g.edge_index), g)          # (2, 4, 3, 3)
        >>> seq = images.flatten(2).transpose(1, 2)                     # (2, 9 pixels, 4)
        >>> torch.allclose(out.flatten(2).transpose(1, 2), mha(seq, seq, seq)[0], atol=1e-6)
        True
        >>> layer
        PixelAttention(embed_dim=4, num_heads=2)
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True, *,
                 kernel_size: Any = None, device: Any = None, dtype: Any = None) -> None:
        super().__init__(aggr="add", flow="source_to_target", node_dim=0)
        for name, v in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int (got {v!r})")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim must be divisible by num_heads (got embed_dim={embed_dim}, "
                             f"num_heads={num_heads})")
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1] (got {dropout!r})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = float(dropout)
        self.kernel_size = None if kernel_size is None else _ntuple(kernel_size, 2, "kernel_size")
        self.batch_first = False  # the layout to_multihead_attention() gives (from_multihead_attention keeps it)
        factory = {"device": device, "dtype": dtype}
        self.query = PointwiseConv2d(embed_dim, embed_dim, bias=bias, **factory)
        self.key = PointwiseConv2d(embed_dim, embed_dim, bias=bias, **factory)
        self.value = PointwiseConv2d(embed_dim, embed_dim, bias=bias, **factory)
        self.out_proj = PointwiseConv2d(embed_dim, embed_dim, bias=bias, **factory)
        if self.kernel_size is not None:
            self.tap_bias = Parameter(torch.empty(num_heads, math.prod(self.kernel_size), **factory))
        else:
            self.register_parameter("tap_bias", None)
        self._alpha: Optional[Tensor] = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.MultiheadAttention``'s initialisation: Xavier-uniform over the packed ``[3E, E]`` input
        projection, zero projection biases, ``nn.Linear``'s init for the output weight; zero tap bias."""
        bound = math.sqrt(6.0 / (self.embed_dim + 3 * self.embed_dim))  # xavier_uniform_ of [3E, E]
        with torch.no_grad():
            for proj in (self.query, self.key, self.value):
                init.uniform_(proj.weight, -bound, bound)
            self.out_proj.reset_parameters()
            for proj in (self.query, self.key, self.value, self.out_proj):
                if proj.bias is not None:
                    proj.bias.zero_()
            if self.tap_bias is not None:
                self.tap_bias.zero_()

    @property
    def num_taps(self) -> Optional[int]:
        """Number of kernel taps the tap bias covers (None without a tap bias)."""
        return None if self.tap_bias is None else self.tap_bias.size(1)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Union[Tensor, tuple[Tensor, Tensor]], edge_index: Tensor,
                edge_type: Optional[Tensor] = None, size: Optional[tuple[int, int]] = None,
                return_attention_weights: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
        """Args:
            x (Tensor or (Tensor, Tensor)): node features ``[N, E]``, or ``(x_src, x_dst)``: keys and
                values from the sources, queries from the targets.
            edge_index (Tensor): ``[2, num_edges]`` long, row 0 sources ``j``, row 1 targets ``i``.
            edge_type (Tensor, optional): ``[num_edges]`` long kernel taps, read by the tap bias.
            size (tuple[int, int], optional): ``(N_src, N_dst)``; by default the rows of ``x``.
            return_attention_weights (bool, optional): also return ``alpha`` ``[num_edges, num_heads]``.

        Returns:
            Tensor: target features ``[N_dst, E]`` (and ``alpha`` when asked).
        """
        edge_index, edge_type = _plain(edge_index), _plain(edge_type)
        if isinstance(x, tuple):
            if len(x) != 2:
                raise ValueError(f"x must be a tensor or a pair (x_src, x_dst) (got a tuple of {len(x)})")
            x_src, x_dst = _plain(x[0]), _plain(x[1])
        else:
            x_src, x_dst = _plain(x), None
        like = self.query.weight
        _check_features(x_src, "x" if x_dst is None else "x[0] (sources)", self.embed_dim, like)
        if x_dst is None:
            x_dst = x_src
        else:
            _check_features(x_dst, "x[1] (targets)", self.embed_dim, like)
        size = self._check_edges(x_src, x_dst, edge_index, edge_type, size)
        q = self.query(x_dst).view(-1, self.num_heads, self.head_dim)
        k = self.key(x_src).view(-1, self.num_heads, self.head_dim)
        v = self.value(x_src).view(-1, self.num_heads, self.head_dim)
        out = self.propagate(edge_index, q=q, k=k, v=v, edge_type=edge_type, size=size)
        out = self.out_proj(out.reshape(-1, self.embed_dim))
        alpha, self._alpha = self._alpha, None
        return (out, alpha) if return_attention_weights else out

    def message(self, q_i: Tensor, k_j: Tensor, v_j: Tensor, edge_type: Optional[Tensor], index: Tensor,
                ptr: Optional[Tensor], size_i: Optional[int]) -> Tensor:
        score = (q_i * k_j).sum(-1) / math.sqrt(self.head_dim)  # [E, heads]
        if self.tap_bias is not None:
            score = score + self.tap_bias.t()[edge_type]
        alpha = softmax(score, index, ptr, size_i)
        self._alpha = alpha
        alpha = torch.nn.functional.dropout(alpha, p=self.dropout, training=self.training)
        return alpha.unsqueeze(-1) * v_j  # [E, heads, head_dim]

    def _check_edges(self, x_src: Tensor, x_dst: Tensor, edge_index: Any, edge_type: Any,
                     size: Optional[tuple[int, int]]) -> tuple[int, int]:
        device = x_src.device
        _check_index(edge_index, "edge_index", "[2, num_edges]", 2, device)
        if edge_index.size(0) != 2:
            raise ValueError(f"expected edge_index of shape [2, num_edges] (got {tuple(edge_index.shape)})")
        num_edges = edge_index.size(1)
        if self.tap_bias is not None:
            if edge_type is None:
                raise ValueError(f"edge_type is needed: this layer has a tap bias for a {self.kernel_size} kernel")
            _check_index(edge_type, "edge_type", f"[{num_edges}]", 1, device)
            if edge_type.numel() != num_edges:
                raise ValueError(f"expected edge_type of shape [{num_edges}], one tap per edge "
                                 f"(got {tuple(edge_type.shape)})")
        expected = (x_src.size(0), x_dst.size(0))
        if size is not None:
            if len(size) != 2:
                raise ValueError(f"size must be (num_src, num_dst) (got {size!r})")
            if (int(size[0]), int(size[1])) != expected:
                what = "the rows of x twice" if x_dst is x_src else "the rows of (x_src, x_dst)"
                raise ValueError(f"size {tuple(size)} does not match {what}: {expected}; queries need target "
                                 f"features, so pass x = (x_src, x_dst) for a bipartite graph")
        if num_edges and not torch.compiler.is_compiling():
            if self.tap_bias is not None:
                lo, hi = edge_type.aminmax()
                if lo < 0 or hi >= self.num_taps:
                    raise ValueError(f"edge_type must lie in [0, {self.num_taps}) for the tap bias of a "
                                     f"{self.kernel_size} kernel (got values in [{int(lo)}, {int(hi)}])")
            for row, name, n in ((0, "source", expected[0]), (1, "target", expected[1])):
                lo, hi = edge_index[row].aminmax()
                if lo < 0 or hi >= n:
                    raise ValueError(f"edge_index[{row}] ({name} node ids) must lie in [0, {n}) "
                                     f"(got values in [{int(lo)}, {int(hi)}])")
        return expected

    def attention_mask(self, height: int, width: int, kernel_size: Any = None, num_images: int = 1) -> Tensor:
        r"""The ``attn_mask`` with which ``nn.MultiheadAttention`` on the flattened pixels of an
        ``height x width`` image equals this layer on the ``k x k`` pixel graph with padding ``k // 2``.

        Pixel :math:`j` may send to pixel :math:`i` when their offset
        :math:`(dy, dx) = (u - k_H/\!/2,\; v - k_W/\!/2)` is a tap :math:`(u, v)` of the kernel. Without a
        tap bias it is a bool mask ``(HW, HW)``, True where attention is not allowed; with one, a float
        mask ``(num_images * num_heads, HW, HW)`` holding :math:`\beta_{h, t}` on allowed pairs and
        ``-inf`` elsewhere (it stays differentiable in ``tap_bias``).

        Args:
            height, width (int): the image size.
            kernel_size (int or tuple, optional): the graph's kernel (default: the tap bias's; the
                complete graph of :func:`complete_pixel_graph` is ``(2H-1, 2W-1)``).
            num_images (int, optional): images in the batch, for the per-head float mask (default: 1).
        """
        kernel_size = self.kernel_size if kernel_size is None else _ntuple(kernel_size, 2, "kernel_size")
        if kernel_size is None:
            raise ValueError("kernel_size is needed: this layer has no tap bias to take it from")
        if self.tap_bias is not None and kernel_size != self.kernel_size:
            raise ValueError(f"kernel_size {kernel_size} differs from the tap bias's {self.kernel_size}")
        if kernel_size[0] % 2 == 0 or kernel_size[1] % 2 == 0:
            raise ValueError(f"kernel_size must be odd: only then does padding k // 2 keep the image's grid "
                             f"(got {kernel_size})")
        device = self.query.weight.device
        rows, cols = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device),
                                    indexing="ij")
        rows, cols = rows.reshape(-1), cols.reshape(-1)
        u = rows[None, :] - rows[:, None] + kernel_size[0] // 2  # [target i, source j]
        v = cols[None, :] - cols[:, None] + kernel_size[1] // 2
        allowed = (u >= 0) & (u < kernel_size[0]) & (v >= 0) & (v < kernel_size[1])
        if self.tap_bias is None:
            return ~allowed
        tap = torch.where(allowed, u * kernel_size[1] + v, 0)
        bias = self.tap_bias[:, tap]  # [heads, HW, HW]
        bias = bias.masked_fill(~allowed, float("-inf"))
        return bias.repeat(num_images, 1, 1)

    # ------------------------------------------------------------------ conversion and repr
    @classmethod
    def from_multihead_attention(cls, mha: torch.nn.MultiheadAttention, *, kernel_size: Any = None) -> "PixelAttention":
        """An independent twin of ``mha`` (weights copied; device, dtype, mode and requires_grad kept).

        ``batch_first`` only concerns the sequence layout, so both kinds convert. Refused (ValueError):
        ``kdim``/``vdim`` different from ``embed_dim``, ``add_bias_kv`` and ``add_zero_attn``, which have
        no pixel-graph meaning. ``kernel_size`` adds a (zero) tap bias for graphs of that kernel.
        """
        if not isinstance(mha, torch.nn.MultiheadAttention):
            raise TypeError(f"mha must be an nn.MultiheadAttention (got {type(mha).__name__})")
        if not mha._qkv_same_embed_dim:
            raise ValueError(f"mha must have kdim = vdim = embed_dim = {mha.embed_dim} (got kdim={mha.kdim}, "
                             f"vdim={mha.vdim}): pixel features have one width")
        if mha.bias_k is not None:
            raise ValueError("mha must not have add_bias_kv=True: its extra key/value has no pixel")
        if mha.add_zero_attn:
            raise ValueError("mha must not have add_zero_attn=True: its extra zero key/value has no pixel")
        weight = mha.in_proj_weight
        bias = mha.in_proj_bias
        layer = cls(mha.embed_dim, mha.num_heads, mha.dropout, bias is not None, kernel_size=kernel_size,
                    device=weight.device, dtype=weight.dtype)
        e = mha.embed_dim
        with torch.no_grad():
            for n, proj in enumerate((layer.query, layer.key, layer.value)):
                proj.weight.copy_(weight[n * e:(n + 1) * e].view(e, e, 1, 1))
                if bias is not None:
                    proj.bias.copy_(bias[n * e:(n + 1) * e])
            layer.out_proj.weight.copy_(mha.out_proj.weight.view(e, e, 1, 1))
            if bias is not None:
                layer.out_proj.bias.copy_(mha.out_proj.bias)
        for proj in (layer.query, layer.key, layer.value):
            proj.requires_grad_(weight.requires_grad)
        layer.out_proj.requires_grad_(mha.out_proj.weight.requires_grad)
        layer.batch_first = mha.batch_first
        layer.train(mha.training)
        return layer

    def to_multihead_attention(self, batch_first: Optional[bool] = None) -> torch.nn.MultiheadAttention:
        """The ``nn.MultiheadAttention`` twin (an independent copy; the tap bias has no counterpart there
        and is left out: pass it as ``attn_mask``). ``batch_first`` defaults to that of the module this
        layer was made from (False for a layer built directly)."""
        bias = self.query.bias is not None
        w = self.query.weight
        mha = torch.nn.MultiheadAttention(self.embed_dim, self.num_heads, self.dropout, bias,
                                          batch_first=self.batch_first if batch_first is None else batch_first,
                                          device=w.device, dtype=w.dtype)
        e = self.embed_dim
        projections = (self.query, self.key, self.value)
        with torch.no_grad():
            mha.in_proj_weight.copy_(torch.cat([p.weight.view(e, e) for p in projections]))
            mha.out_proj.weight.copy_(self.out_proj.weight.view(e, e))
            if bias:
                mha.in_proj_bias.copy_(torch.cat([p.bias for p in projections]))
                mha.out_proj.bias.copy_(self.out_proj.bias)
        mha.in_proj_weight.requires_grad_(w.requires_grad)
        mha.out_proj.requires_grad_(self.out_proj.weight.requires_grad)
        mha.train(self.training)
        return mha

    def extra_repr(self) -> str:
        s = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.query.bias is None:
            s += ", bias=False"
        if self.kernel_size is not None:
            s += f", kernel_size={self.kernel_size}"
        return s

    def __repr__(self) -> str:  # MessagePassing.__repr__ hides extra_repr
        return f"{type(self).__name__}({self.extra_repr()})"


class SqueezeExcitation(MessagePassing):
    r"""Squeeze-and-excitation by message passing to one virtual node per image and back.

    Channel attention, equal to the torch block ``x * sigmoid(fc2(act(fc1(mean_hw(x)))))``.
    Every pixel :math:`j` of image :math:`b` sends its features to the image's virtual node
    :math:`z_b` (mean aggregation: global average pooling); two 1x1 convolutions
    (:class:`~gridgraph.PointwiseConv2d`) and a sigmoid turn it into a gate, which travels back along
    the reversed edges and rescales the pixel's channels:

    .. math::
        \mathbf{z}_b = \frac{1}{|\mathcal{V}_b|} \sum_{j \in \mathcal{V}_b} \mathbf{x}_j, \qquad
        \mathbf{s}_b = \sigma\big(\mathbf{W}_2\, \delta(\mathbf{W}_1 \mathbf{z}_b + \mathbf{b}_1) + \mathbf{b}_2\big),
        \qquad \mathbf{x}'_i = \mathbf{s}_{b(i)} \odot \mathbf{x}_i

    Submodule names and shapes are those of torchvision's ``SqueezeExcitation`` (``fc1``, ``fc2``,
    1x1 convolution weights), so state dicts load both ways.

    Args:
        input_channels (int): channels :math:`C` of the pixels.
        squeeze_channels (int): channels of the bottleneck (``fc1``'s output).
        activation (callable, optional): factory of the activation :math:`\delta` between the two 1x1
            layers (default: ``torch.nn.ReLU``).
        scale_activation (callable, optional): factory of the gate's activation (default: ``torch.nn.Sigmoid``).
        device, dtype: as in ``nn.Conv2d``.

    Shapes:
        - **input:** node features :math:`(|\mathcal{V}|, C)`; ``batch`` :math:`(|\mathcal{V}|)`, the
          image of each node (default: one image)
        - **output:** node features :math:`(|\mathcal{V}|, C)`

    Example:
        >>> se = SqueezeExcitation(4, 2)
        >>> images = torch.randn(2, 4, 3, 5)
        >>> g = image_to_graph(images, kernel_size=1, padding=0)
        >>> out = graph_to_image(se(g.x, g.batch), g)
        >>> fc1, fc2 = se.to_conv2d()
        >>> gate = torch.sigmoid(fc2(torch.relu(fc1(images.mean((2, 3), keepdim=True)))))
        >>> torch.allclose(out, images * gate, atol=1e-6)
        True
    """

    def __init__(self, input_channels: int, squeeze_channels: int,
                 activation: Callable[..., torch.nn.Module] = torch.nn.ReLU,
                 scale_activation: Callable[..., torch.nn.Module] = torch.nn.Sigmoid,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__(aggr="mean", flow="source_to_target", node_dim=0)
        self.input_channels = input_channels
        self.squeeze_channels = squeeze_channels
        self.fc1 = PointwiseConv2d(input_channels, squeeze_channels, device=device, dtype=dtype)
        self.fc2 = PointwiseConv2d(squeeze_channels, input_channels, device=device, dtype=dtype)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def reset_parameters(self) -> None:
        """``nn.Conv2d``'s initialisation of both 1x1 layers."""
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()

    def forward(self, x: Tensor, batch: Optional[Tensor] = None, num_images: Optional[int] = None) -> Tensor:
        """Args:
            x (Tensor): pixel features ``[N, C]``.
            batch (Tensor, optional): ``[N]`` long, the image of each pixel (default: all in image 0).
            num_images (int, optional): number of images (default: ``batch.max() + 1``).

        Returns:
            Tensor: ``[N, C]``, each pixel's channels rescaled by its image's gate.
        """
        x, batch = _plain(x), _plain(batch)
        _check_features(x, "x", self.input_channels, self.fc1.weight)
        n = x.size(0)
        if batch is None:
            batch = torch.zeros(n, dtype=torch.long, device=x.device)
        else:
            _check_index(batch, "batch", f"[{n}]", 1, x.device)
            if batch.numel() != n:
                raise ValueError(f"expected batch of shape [{n}], one image id per row of x (got {tuple(batch.shape)})")
        if num_images is None:
            num_images = int(batch.max()) + 1 if n else 0
        elif n and not 0 <= int(batch.min()) <= int(batch.max()) < num_images:
            raise ValueError(f"batch must lie in [0, num_images={num_images}) (got values in "
                             f"[{int(batch.min())}, {int(batch.max())}])")
        pixels = torch.arange(n, device=x.device)
        to_virtual = torch.stack([pixels, batch])          # pixel j -> virtual node b(j)
        z = self.propagate(to_virtual, x=x, size=(n, num_images))            # global average pooling
        gate = self.scale_activation(self.fc2(self.activation(self.fc1(z))))  # 1x1 layers on the virtual node
        scale = self.propagate(to_virtual.flip(0), x=gate, size=(num_images, n))  # back along reversed edges
        return scale * x

    @classmethod
    def from_conv2d(cls, fc1: torch.nn.Conv2d, fc2: torch.nn.Conv2d,
                    activation: Callable[..., torch.nn.Module] = torch.nn.ReLU,
                    scale_activation: Callable[..., torch.nn.Module] = torch.nn.Sigmoid) -> "SqueezeExcitation":
        """The twin of a torch block with 1x1 convolutions ``fc1`` (reduce) and ``fc2`` (expand)."""
        first = PointwiseConv2d.from_conv2d(fc1)
        second = PointwiseConv2d.from_conv2d(fc2)
        if second.in_channels != first.out_channels or second.out_channels != first.in_channels:
            raise ValueError(f"fc2 must map fc1's {first.out_channels} channels back to {first.in_channels} "
                             f"(got fc2: {second.in_channels} -> {second.out_channels})")
        layer = cls(first.in_channels, first.out_channels, activation, scale_activation,
                    device=fc1.weight.device, dtype=fc1.weight.dtype)
        layer.fc1, layer.fc2 = first, second
        layer.train(fc1.training)
        return layer

    def to_conv2d(self) -> tuple[torch.nn.Conv2d, torch.nn.Conv2d]:
        """The ``(fc1, fc2)`` pair of ``nn.Conv2d`` twins."""
        return self.fc1.to_conv2d(), self.fc2.to_conv2d()

    def extra_repr(self) -> str:
        return (f"{self.input_channels}, {self.squeeze_channels}, activation={type(self.activation).__name__}, "
                f"scale_activation={type(self.scale_activation).__name__}")

    def __repr__(self) -> str:  # MessagePassing.__repr__ hides extra_repr
        return f"{type(self).__name__}({self.extra_repr()})"

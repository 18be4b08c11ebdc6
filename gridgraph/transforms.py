"""A ``torch_geometric.transforms``-style transform that turns image samples into pixel graphs.

:class:`ToPixelGraph` takes a :class:`~torch_geometric.data.Data` holding an image (``data.image``,
``(C, H, W)`` or any ``(C, *grid)``), builds the pixel graph of a convolution's geometry on it and keeps
every other attribute (labels and the like), so a PyG ``Dataset`` of images feeds a ``DataLoader`` of
pixel graphs:

.. code-block:: python

    dataset = MyImages(root, transform=ToPixelGraph(conv))   # each item: Data(image=..., y=...)
    loader = DataLoader(dataset, batch_size=32)               # batches of pixel graphs
    for batch in loader:
        batch = batch.to("cuda")                              # the structure travels with the edges
        out = layer(batch.x, batch.edge_index, batch.edge_type, size=batch.size())

Which PyG transforms keep a pixel graph a pixel graph: those that leave its edges alone (``ToDevice``,
``NormalizeFeatures`` and other feature transforms, ``Compose`` of such) and PyG's copies, moves,
batching and splitting (``clone``, ``.to``, ``Batch``, ``DataLoader``, ``to_data_list``,
``index_select``). Transforms that add, remove, merge or reorder edges (``ToUndirected``,
``RemoveDuplicatedEdges``, ``AddSelfLoops``, ``Coalesce``...) make another graph: its ``edge_index``
becomes an ordinary ``EdgeIndex``, and asking it for ``edge_type`` raises a ``ValueError`` (the taps no
longer match the edges), so a layer never computes on it by mistake.
"""
from __future__ import annotations

from typing import Any, Optional

from torch import Tensor
from torch_geometric.data import Data
from torch_geometric.transforms import BaseTransform

from .geometry import ConvGeometry, TransposedGeometry
from .graph import grid_to_graph
from .domains import masked_grid_to_graph

__all__ = ["ToPixelGraph"]


class ToPixelGraph(BaseTransform):
    """Turn ``data[key]``, an image ``(C, *grid)`` or batch ``(B, C, *grid)``, into its pixel graph.

    Args:
        conv (nn.Module, optional): take the geometry (and the expected channel count) from this
            convolution or gridgraph layer (``nn.Conv1d/2d/3d``, ``nn.ConvTranspose*`` or a twin).
        key (str, optional): the attribute holding the image (default: ``'image'``).
        mask_key (str, optional): an attribute holding a bool mask ``(*grid)``: only its active pixels
            become nodes (a :class:`~gridgraph.MaskedPixelGraph`).
        kernel_size, stride, padding, dilation, padding_mode: the geometry when ``conv`` is None, as in
            ``nn.Conv2d`` (default: a 3x3 convolution at stride 1 with the builders' padding
            ``dilation * (kernel_size - 1) // 2``), for images of ``ndim`` spatial dimensions (default: 2).

    Every other attribute of the sample is kept on the graph.

    Example:
        >>> sample = Data(image=torch.randn(3, 5, 6), y=torch.tensor([1]))
        >>> g = ToPixelGraph(torch.nn.Conv2d(3, 8, 3, stride=2))(sample)
        >>> type(g).__name__, g.size(), g.y.tolist()
        ('PixelGraph', (30, 4), [1])
    """

    def __init__(self, conv: Any = None, *, key: str = "image", mask_key: Optional[str] = None,
                 kernel_size: Any = 3, stride: Any = 1, padding: Any = None, dilation: Any = 1,
                 padding_mode: str = "zeros", ndim: int = 2) -> None:
        if conv is None:
            self.geometry = ConvGeometry.from_keywords(ndim, kernel_size, stride, padding, dilation, padding_mode)
            self.in_channels = None
        else:
            transposed = getattr(conv, "transposed", False) is True
            self.geometry = TransposedGeometry.from_module(conv) if transposed else ConvGeometry.from_module(conv)
            self.in_channels = getattr(conv, "in_channels", None)
        if not isinstance(key, str):
            raise TypeError(f"key must be a str (got {type(key).__name__})")
        self.key, self.mask_key = key, mask_key

    def forward(self, data: Data) -> Data:
        if not isinstance(data, Data):
            raise TypeError(f"ToPixelGraph expects a torch_geometric.data.Data (got {type(data).__name__})")
        if self.key not in data:
            raise ValueError(f"ToPixelGraph: the sample has no {self.key!r} attribute (it has {sorted(data.keys())})")
        image = data[self.key]
        if not isinstance(image, Tensor):
            raise TypeError(f"data.{self.key} must be an image tensor (got {type(image).__name__})")
        channels = image.size(-self.geometry.ndim - 1) if image.dim() > self.geometry.ndim else None
        if self.in_channels is not None and channels != self.in_channels:
            raise ValueError(f"ToPixelGraph: expected data.{self.key} with {self.in_channels} channels "
                             f"(got an image of shape {tuple(image.shape)})")
        if self.mask_key is not None:
            if isinstance(self.geometry, TransposedGeometry):
                raise ValueError("mask_key is not supported with a transposed convolution")
            graph = masked_grid_to_graph(image, self.geometry, data[self.mask_key])
        else:
            graph = grid_to_graph(image, self.geometry)
        skip = {self.key, self.mask_key} | set(graph.keys())
        for name, value in data:
            if name not in skip:
                graph[name] = value
        return graph

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.geometry.describe()}, key={self.key!r})"

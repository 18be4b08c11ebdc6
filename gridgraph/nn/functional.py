"""The maths of every gridgraph layer, in two layouts of the same edges.

``x'_i = b + sum over edges (j -> i) of W[:, :, tap(j -> i)] x_j``, with ``W`` block-diagonal over
``groups``. :func:`tap_messages` computes the messages of an edge list (any graph, any number of
edges per tap); :func:`table_conv` computes the same sum from a :class:`~gridgraph.graph.NeighbourTable`
(a pixel graph: at most one edge per target and tap). Both are gathers, GEMMs and scatters: no
convolution or unfold primitive appears here.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..graph import NeighbourTable

__all__ = ["tap_weights", "apply_tap", "tap_messages", "table_conv"]


def tap_weights(weight: Tensor, groups: int) -> Tensor:
    """``weight`` ``(C_out, C_in/groups, *kernel)`` as ``[num_taps, groups, C_out/groups, C_in/groups]``."""
    c_out, c_in_g = weight.shape[:2]
    return weight.reshape(groups, c_out // groups, c_in_g, -1).permute(3, 0, 1, 2)


def apply_tap(x: Tensor, w: Tensor) -> Tensor:
    """Mix channels of ``x`` ``[..., C_in]`` with one tap's block-diagonal weight ``[G, C_out/G, C_in/G]``."""
    groups, c_out_g, c_in_g = w.shape
    if groups == 1:
        return x @ w[0].t()
    if c_in_g == 1 and c_out_g == 1:  # depthwise: a per-channel scale
        return x * w.view(groups)
    lead = x.shape[:-1]
    xg = x.reshape(-1, groups, c_in_g).transpose(0, 1)  # [G, n, C_in/G]
    out = torch.bmm(xg, w.transpose(1, 2))  # [G, n, C_out/G]
    return out.transpose(0, 1).reshape(*lead, groups * c_out_g)


def tap_messages(x_j: Tensor, edge_type: Tensor, weight: Tensor, groups: int) -> Tensor:
    """Messages ``W[:, :, tap_e] x_j`` of every edge ``e``: edges grouped by tap, one GEMM per tap."""
    taps = tap_weights(weight, groups)
    num_taps = taps.size(0)
    c_out = weight.size(0)
    if x_j.size(0) == 0:
        return x_j.new_zeros(0, c_out) + 0 * weight.sum()
    order = torch.argsort(edge_type, stable=True)
    counts = torch.bincount(edge_type, minlength=num_taps).tolist()
    pieces = [apply_tap(chunk, taps[t]) for t, chunk in enumerate(x_j[order].split(counts)) if counts[t]]
    sorted_messages = torch.cat(pieces, dim=0)
    return sorted_messages.new_empty(sorted_messages.shape).index_copy(0, order, sorted_messages)


def table_conv(x: Tensor, table: NeighbourTable, num_images: int, weight: Tensor,
               bias: Optional[Tensor], groups: int) -> Tensor:
    """The layer's output ``[B*N_out, C_out]`` on a pixel graph given as a neighbour table.

    Per tap, gather each target's source features (zeros where the edge is absent) and mix them with
    that tap's weight, accumulating into the output.
    """
    c_in = x.size(1)
    xb = x.reshape(num_images, table.num_src, c_in)
    index = table.index
    if not table.complete:
        xb = torch.cat([xb, xb.new_zeros(num_images, 1, c_in)], dim=1)
        index = torch.where(index < 0, table.num_src, index)
    taps = tap_weights(weight, groups)
    out = None
    for t in range(taps.size(0)):
        term = apply_tap(xb[:, index[:, t]], taps[t])
        out = term if out is None else out + term
    out = out.reshape(num_images * table.num_dst, weight.size(0))
    if bias is not None:
        out = out + bias
    return out

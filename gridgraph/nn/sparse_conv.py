"""The layers' maths on a sparse pixel graph, in the layout that suits it: per tap, a list of edges.

On a masked or sparse domain most (target, tap) slots of a neighbour table are empty: at 1% occupancy
a 3x3 table is 90% holes. :func:`sparse_table_conv` therefore runs over the edges that exist: for each
tap ``t``, the pairs ``(src, dst)`` it joins (built once per table and cached on it), a gather of those
sources, one GEMM with the tap's weight and an ``index_add`` into the targets:

.. math::
    \\mathbf{x}'_i = \\mathbf{b} + \\sum_t \\sum_{(j \\to i) \\in \\mathcal{E}_t} \\mathbf{W}_t \\mathbf{x}_j

A tap that maps every node to itself (the centre of a submanifold graph) is one GEMM on ``x`` with no
gather. Forward and backward run in a custom autograd function that keeps nothing of size ``E x C``:
the backward gathers again. Work and memory scale with the edges, never with ``H x W``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .functional import apply_tap, tap_weights

__all__ = ["sparse_table_conv", "tap_pairs"]


def tap_pairs(table) -> list[tuple[int, Optional[Tensor], Optional[Tensor], bool]]:
    """``[(tap, src, dst, src_unique), ...]`` of a sparse table's present edges, per tap (cached on the
    table); ``src = dst = None`` marks a tap that joins every node to itself. Within a tap ``dst`` is
    always unique (one slot per target and tap) and ``src`` is unique except where reflect or replicate
    padding lets one border pixel reach two targets through the same tap."""
    pairs = getattr(table, "_tap_pairs", None)
    if pairs is not None:
        return pairs
    index = table.index
    ids = torch.arange(index.size(0), device=index.device)
    pairs = []
    for t in range(index.size(1)):
        column = index[:, t]
        if table.num_src == table.num_dst and bool((column == ids).all()):
            pairs.append((t, None, None, True))
            continue
        dst = (column >= 0).nonzero().squeeze(1)
        if dst.numel():
            src = column[dst].contiguous()
            pairs.append((t, src, dst, bool(torch.unique(src).numel() == src.numel())))
    object.__setattr__(table, "_tap_pairs", pairs)
    return pairs


def _add_rows(out: Tensor, rows: Tensor, values: Tensor, unique: bool) -> None:
    """``out[rows] += values``: with unique rows a gather, an add and a copy (parallel on CPU, about
    twice as fast as ``index_add_``); otherwise ``index_add_``, which sums repeated rows."""
    if unique:
        out.index_copy_(0, rows, out.index_select(0, rows).add_(values))
    else:
        out.index_add_(0, rows, values)


class _SparseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], table, groups: int) -> Tensor:
        taps = tap_weights(weight, groups)
        pairs = tap_pairs(table)
        out = x.new_zeros(table.num_dst, weight.size(0))
        for t, src, dst, _ in pairs:
            if src is None:
                out += apply_tap(x, taps[t])
            else:
                _add_rows(out, dst, apply_tap(x.index_select(0, src), taps[t]), unique=True)
        if bias is not None:
            out += bias
        ctx.save_for_backward(x, weight)
        ctx.table, ctx.groups, ctx.has_bias = table, groups, bias is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        groups = ctx.groups
        taps = tap_weights(weight, groups)  # [K, G, C_out/G, C_in/G]
        grad_x = grad_w = grad_b = None
        g_out = grad_out.contiguous()
        if ctx.needs_input_grad[0]:
            grad_x = torch.zeros_like(x)
            for t, src, dst, src_unique in tap_pairs(ctx.table):
                w_t = taps[t].transpose(1, 2)  # the tap's weight transposed: C_out -> C_in
                if src is None:
                    grad_x += apply_tap(g_out, w_t)
                else:
                    _add_rows(grad_x, src, apply_tap(g_out.index_select(0, dst), w_t), unique=src_unique)
        if ctx.needs_input_grad[1]:
            k, g, c_out_g, c_in_g = taps.shape
            grad_taps = x.new_zeros(k, g, c_out_g, c_in_g)
            for t, src, dst, _ in tap_pairs(ctx.table):
                go = g_out if dst is None else g_out.index_select(0, dst)
                xs = x if src is None else x.index_select(0, src)
                # sum over edges of g_e x_e^T, block-diagonal per group
                go = go.view(-1, g, c_out_g).transpose(0, 1)  # [G, E, C_out/G]
                xs = xs.view(-1, g, c_in_g).transpose(0, 1)  # [G, E, C_in/G]
                grad_taps[t] = torch.bmm(go.transpose(1, 2), xs)
            # back to (C_out, C_in/G, *kernel): taps were weight.reshape(G, C_out/G, C_in/G, K).permute(3, 0, 1, 2)
            grad_w = grad_taps.permute(1, 2, 3, 0).reshape(weight.shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g_out.sum(0)
        return grad_x, grad_w, grad_b, None, None


def sparse_table_conv(x: Tensor, table, weight: Tensor, bias: Optional[Tensor], groups: int) -> Tensor:
    """The layer's output ``[N_out, C_out]`` on a sparse pixel graph (:class:`~gridgraph.domains.SparseTable`).

    Args:
        x (Tensor): active source node features ``[N_in, C_in]``.
        table (SparseTable): the graph's table (all images' active sites in one).
        weight (Tensor): ``(C_out, C_in/groups, *kernel)``.
        bias (Tensor, optional): ``(C_out)``.
        groups (int): block-diagonal channel groups.

    Example:
        >>> from gridgraph.domains import sparse_to_graph
        >>> from gridgraph.nn.sparse_conv import sparse_table_conv
        >>> g = sparse_to_graph(torch.tensor([[0, 0], [0, 1], [3, 3]]), torch.tensor([[1.], [2.], [4.]]), (4, 4))
        >>> sparse_table_conv(g.x, g.table, torch.ones(1, 1, 3, 3), None, 1).flatten().tolist()
        [3.0, 3.0, 4.0]
    """
    return _SparseConv.apply(x, weight, bias, table, groups)

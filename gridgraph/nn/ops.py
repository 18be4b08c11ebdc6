"""The kernels of :mod:`gridgraph.nn.kernels` registered as torch operators (``torch.ops.gridgraph.*``).

Two families of three operators, one per layout of the edges:

=================================  ===================================  ==================================
map                                grid (structure given by a key)      edge list (any graph)
=================================  ===================================  ==================================
``F(x, W) + b``                    ``grid_conv``                        ``edge_conv``
``Ft(g, W)`` (input gradient)      ``grid_conv_input_grad``             ``edge_conv_input_grad``
``G(x, g)`` (weight gradient)      ``grid_conv_weight_grad``            ``edge_conv_weight_grad``
=================================  ===================================  ==================================

A grid operator takes its pixel graph as a string (:attr:`gridgraph.structure.GraphPart.key`): the table
is looked up inside the operator, so compiled and exported programs hold no table and no Python cache.
Each operator has a fake (meta) implementation that computes shapes from its arguments alone, and an
autograd formula written with the operators of its family, which are closed under differentiation
(``F``, ``Ft`` and ``G`` are the three bilinear maps of one trilinear form):

* ``y = F(x, W) + b``: ``dx = Ft(dy, W*)``, ``dW = G(x*, dy)``, ``db = sum dy``;
* ``y = Ft(g, W)``: ``dg = F(dy, W*)``, ``dW = G(dy, g*)``;
* ``y = G(x, g)``: ``dx = Ft(g*, dy)``, ``dg = F(x*, dy)``;

(``*``: complex conjugate; nothing for real dtypes), so gradients of any order are exact and no
backward allocates an ``E x C`` temporary. Under ``torch.func.vmap`` a batched feature tensor with
unbatched weights folds into more images (one call); anything else runs per sample.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from torch.utils.flop_counter import register_flop_formula

from ..structure import parse_key
from . import kernels

__all__ = ["grid_conv", "grid_conv_input_grad", "grid_conv_weight_grad", "edge_conv", "edge_conv_input_grad",
           "edge_conv_weight_grad", "apply", "FUNCTIONS"]


def _conj(t: Tensor) -> Tensor:
    return t.conj().resolve_conj() if t.is_complex() else t


def _grid_sizes(key: str) -> tuple[int, int]:
    _, geometry, in_size, num_images = parse_key(key)
    return num_images * math.prod(in_size), num_images * math.prod(geometry.output_size(in_size))


# ----------------------------------------------------------------------------------- grid family
@torch.library.custom_op("gridgraph::grid_conv", mutates_args=())
def grid_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], key: str, groups: int) -> Tensor:
    """``F(x, W) + b`` on the pixel graph ``key``: ``[N_dst, C_out]`` from ``x`` ``[N_src, C_in]``."""
    return kernels.grid_forward(x.resolve_conj(), weight.resolve_conj(),
                                None if bias is None else bias.resolve_conj(), key, groups)


@torch.library.custom_op("gridgraph::grid_conv_input_grad", mutates_args=())
def grid_conv_input_grad(grad_out: Tensor, weight: Tensor, key: str, groups: int) -> Tensor:
    """``Ft(g, W)``: ``[N_src, C_in]`` from ``grad_out`` ``[N_dst, C_out]``."""
    return kernels.grid_input_grad(grad_out.resolve_conj(), weight.resolve_conj(), key, groups)


@torch.library.custom_op("gridgraph::grid_conv_weight_grad", mutates_args=())
def grid_conv_weight_grad(x: Tensor, grad_out: Tensor, key: str, groups: int, weight_shape: list[int]) -> Tensor:
    """``G(x, g)``, shaped like the weight."""
    return kernels.grid_weight_grad(x.resolve_conj(), grad_out.resolve_conj(), key, groups, list(weight_shape))


@grid_conv.register_fake
def _(x, weight, bias, key, groups):
    return x.new_empty(_grid_sizes(key)[1], weight.size(0))


@grid_conv_input_grad.register_fake
def _(grad_out, weight, key, groups):
    return grad_out.new_empty(_grid_sizes(key)[0], weight.size(1) * groups)


@grid_conv_weight_grad.register_fake
def _(x, grad_out, key, groups, weight_shape):
    return x.new_empty(list(weight_shape))


def _grid_conv_setup(ctx, inputs, output):
    x, weight, bias, key, groups = inputs
    ctx.save_for_backward(x, weight)
    ctx.key, ctx.groups, ctx.has_bias = key, groups, bias is not None


def _grid_conv_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        gx = _apply("grid_conv_input_grad", grad, _conj(weight), ctx.key, ctx.groups)
    if ctx.needs_input_grad[1]:
        gw = _apply("grid_conv_weight_grad", _conj(x), grad, ctx.key, ctx.groups, list(weight.shape))
    if ctx.has_bias and ctx.needs_input_grad[2]:
        gb = grad.sum(0)
    return gx, gw, gb, None, None


def _grid_input_grad_setup(ctx, inputs, output):
    grad_out, weight, key, groups = inputs
    ctx.save_for_backward(grad_out, weight)
    ctx.key, ctx.groups = key, groups


def _grid_input_grad_backward(ctx, grad):
    g, weight = ctx.saved_tensors
    dg = dw = None
    if ctx.needs_input_grad[0]:
        dg = _apply("grid_conv", grad, _conj(weight), None, ctx.key, ctx.groups)
    if ctx.needs_input_grad[1]:
        dw = _apply("grid_conv_weight_grad", grad, _conj(g), ctx.key, ctx.groups, list(weight.shape))
    return dg, dw, None, None


def _grid_weight_grad_setup(ctx, inputs, output):
    x, grad_out, key, groups, weight_shape = inputs
    ctx.save_for_backward(x, grad_out)
    ctx.key, ctx.groups = key, groups


def _grid_weight_grad_backward(ctx, grad):
    x, g = ctx.saved_tensors
    dx = dg = None
    if ctx.needs_input_grad[0]:
        dx = _apply("grid_conv_input_grad", _conj(g), grad, ctx.key, ctx.groups)
    if ctx.needs_input_grad[1]:
        dg = _apply("grid_conv", _conj(x), grad, None, ctx.key, ctx.groups)
    return dx, dg, None, None, None


grid_conv.register_autograd(_grid_conv_backward, setup_context=_grid_conv_setup)
grid_conv_input_grad.register_autograd(_grid_input_grad_backward, setup_context=_grid_input_grad_setup)
grid_conv_weight_grad.register_autograd(_grid_weight_grad_backward, setup_context=_grid_weight_grad_setup)


# ----------------------------------------------------------------------------------- edge family
@torch.library.custom_op("gridgraph::edge_conv", mutates_args=())
def edge_conv(x: Tensor, edge_index: Tensor, edge_type: Tensor, weight: Tensor, bias: Optional[Tensor], num_dst: int,
              groups: int, holes: bool, cache: bool) -> Tensor:
    """``F(x, W) + b`` over the edges ``edge_index`` (typed by ``edge_type``): ``[num_dst, C_out]``.
    ``holes``: a pixel graph, where an absent tap adds what zero padding adds; ``cache``: the edge tensors
    belong to a pixel graph, so their per-tap plan may be kept while they are alive and unmodified."""
    return kernels.edge_forward(x.resolve_conj(), edge_index, edge_type, weight.resolve_conj(),
                                None if bias is None else bias.resolve_conj(), num_dst, groups, holes, cache)


@torch.library.custom_op("gridgraph::edge_conv_input_grad", mutates_args=())
def edge_conv_input_grad(grad_out: Tensor, edge_index: Tensor, edge_type: Tensor, weight: Tensor, num_src: int,
                         groups: int, cache: bool) -> Tensor:
    """``Ft(g, W)`` over an edge list: ``[num_src, C_in]``."""
    return kernels.edge_input_grad(grad_out.resolve_conj(), edge_index, edge_type, weight.resolve_conj(), num_src,
                                   groups, cache)


@torch.library.custom_op("gridgraph::edge_conv_weight_grad", mutates_args=())
def edge_conv_weight_grad(x: Tensor, grad_out: Tensor, edge_index: Tensor, edge_type: Tensor, groups: int,
                          weight_shape: list[int], cache: bool) -> Tensor:
    """``G(x, g)`` over an edge list, shaped like the weight."""
    return kernels.edge_weight_grad(x.resolve_conj(), grad_out.resolve_conj(), edge_index, edge_type, groups,
                                    list(weight_shape), cache)


@edge_conv.register_fake
def _(x, edge_index, edge_type, weight, bias, num_dst, groups, holes, cache):
    return x.new_empty(num_dst, weight.size(0))


@edge_conv_input_grad.register_fake
def _(grad_out, edge_index, edge_type, weight, num_src, groups, cache):
    return grad_out.new_empty(num_src, weight.size(1) * groups)


@edge_conv_weight_grad.register_fake
def _(x, grad_out, edge_index, edge_type, groups, weight_shape, cache):
    return x.new_empty(list(weight_shape))


def _edge_conv_setup(ctx, inputs, output):
    x, edge_index, edge_type, weight, bias, num_dst, groups, holes, cache = inputs
    ctx.save_for_backward(x, edge_index, edge_type, weight)
    ctx.groups, ctx.cache, ctx.has_bias = groups, cache, bias is not None


def _edge_conv_backward(ctx, grad):
    x, edge_index, edge_type, weight = ctx.saved_tensors
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        gx = _apply("edge_conv_input_grad", grad, edge_index, edge_type, _conj(weight), x.size(0), ctx.groups, ctx.cache)
    if ctx.needs_input_grad[3]:
        gw = _apply("edge_conv_weight_grad", _conj(x), grad, edge_index, edge_type, ctx.groups, list(weight.shape), ctx.cache)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        gb = grad.sum(0)
    return gx, None, None, gw, gb, None, None, None, None


def _edge_input_grad_setup(ctx, inputs, output):
    grad_out, edge_index, edge_type, weight, num_src, groups, cache = inputs
    ctx.save_for_backward(grad_out, edge_index, edge_type, weight)
    ctx.groups, ctx.cache = groups, cache


def _edge_input_grad_backward(ctx, grad):
    g, edge_index, edge_type, weight = ctx.saved_tensors
    dg = dw = None
    if ctx.needs_input_grad[0]:
        dg = _apply("edge_conv", grad, edge_index, edge_type, _conj(weight), None, g.size(0), ctx.groups, False, ctx.cache)
    if ctx.needs_input_grad[3]:
        dw = _apply("edge_conv_weight_grad", grad, _conj(g), edge_index, edge_type, ctx.groups, list(weight.shape), ctx.cache)
    return dg, None, None, dw, None, None, None


def _edge_weight_grad_setup(ctx, inputs, output):
    x, grad_out, edge_index, edge_type, groups, weight_shape, cache = inputs
    ctx.save_for_backward(x, grad_out, edge_index, edge_type)
    ctx.groups, ctx.cache = groups, cache


def _edge_weight_grad_backward(ctx, grad):
    x, g, edge_index, edge_type = ctx.saved_tensors
    dx = dg = None
    if ctx.needs_input_grad[0]:
        dx = _apply("edge_conv_input_grad", _conj(g), edge_index, edge_type, grad, x.size(0), ctx.groups, ctx.cache)
    if ctx.needs_input_grad[1]:
        dg = _apply("edge_conv", _conj(x), edge_index, edge_type, grad, None, g.size(0), ctx.groups, False, ctx.cache)
    return dx, dg, None, None, None, None, None


edge_conv.register_autograd(_edge_conv_backward, setup_context=_edge_conv_setup)
edge_conv_input_grad.register_autograd(_edge_input_grad_backward, setup_context=_edge_input_grad_setup)
edge_conv_weight_grad.register_autograd(_edge_weight_grad_backward, setup_context=_edge_weight_grad_setup)


# ------------------------------------------------------------------------- autograd.Function twins
# ``torch.func`` transforms (grad, vjp, jacrev) differentiate autograd.Functions that define
# ``setup_context``; the autograd that ``register_autograd`` generates for a custom op does not, so each
# operator also has a Function twin with the same formulas (vmap rules generated from the operators' own).
class GridConvFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, key, groups):
        return grid_conv(x, weight, bias, key, groups)

    setup_context = staticmethod(_grid_conv_setup)
    backward = staticmethod(_grid_conv_backward)


class GridConvInputGradFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(grad_out, weight, key, groups):
        return grid_conv_input_grad(grad_out, weight, key, groups)

    setup_context = staticmethod(_grid_input_grad_setup)
    backward = staticmethod(_grid_input_grad_backward)


class GridConvWeightGradFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, grad_out, key, groups, weight_shape):
        return grid_conv_weight_grad(x, grad_out, key, groups, weight_shape)

    setup_context = staticmethod(_grid_weight_grad_setup)
    backward = staticmethod(_grid_weight_grad_backward)


class EdgeConvFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, edge_index, edge_type, weight, bias, num_dst, groups, holes, cache):
        return edge_conv(x, edge_index, edge_type, weight, bias, num_dst, groups, holes, cache)

    setup_context = staticmethod(_edge_conv_setup)
    backward = staticmethod(_edge_conv_backward)


class EdgeConvInputGradFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(grad_out, edge_index, edge_type, weight, num_src, groups, cache):
        return edge_conv_input_grad(grad_out, edge_index, edge_type, weight, num_src, groups, cache)

    setup_context = staticmethod(_edge_input_grad_setup)
    backward = staticmethod(_edge_input_grad_backward)


class EdgeConvWeightGradFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, grad_out, edge_index, edge_type, groups, weight_shape, cache):
        return edge_conv_weight_grad(x, grad_out, edge_index, edge_type, groups, weight_shape, cache)

    setup_context = staticmethod(_edge_weight_grad_setup)
    backward = staticmethod(_edge_weight_grad_backward)


FUNCTIONS = {"grid_conv": GridConvFunction, "grid_conv_input_grad": GridConvInputGradFunction, "grid_conv_weight_grad": GridConvWeightGradFunction, "edge_conv": EdgeConvFunction, "edge_conv_input_grad": EdgeConvInputGradFunction, "edge_conv_weight_grad": EdgeConvWeightGradFunction}


_OPS = {"grid_conv": grid_conv, "grid_conv_input_grad": grid_conv_input_grad,
        "grid_conv_weight_grad": grid_conv_weight_grad, "edge_conv": edge_conv,
        "edge_conv_input_grad": edge_conv_input_grad, "edge_conv_weight_grad": edge_conv_weight_grad}


def _apply(name: str, *args):
    """Run operator ``name`` through its autograd.Function twin (differentiable under autograd and torch.func);
    the operator itself when nothing needs a gradient (the Function's argument binding costs ~30 us a call)
    and under ``torch.jit.trace`` (the operator carries its autograd formula; the trace records one node)."""
    if torch.jit.is_tracing():
        return _OPS[name](*args)
    if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
        return FUNCTIONS[name].apply(*args)
    return _OPS[name](*args)


def apply(name: str, *args) -> Tensor:
    """Call a gridgraph operator differentiably, e.g. ``apply('grid_conv', x, weight, bias, key, groups)``."""
    return _apply(name, *args)


# ----------------------------------------------------------------------------------------- vmap
def _per_sample(op):
    """The always-correct vmap rule: one call per sample of the batched arguments."""
    def rule(info, in_dims, *args):
        outs = []
        for b in range(info.batch_size):
            outs.append(op(*[a.select(d, b) if isinstance(d, int) else a for a, d in zip(args, in_dims)]))
        return torch.stack(outs), 0
    return rule


def _more_images(key: str, times: int) -> str:
    kind, geometry, in_size, num_images = key.split("|")
    return f"{kind}|{geometry}|{in_size}|{int(num_images) * times}"


def _fold_rule(op, feature: int):
    """Batched features (argument ``feature``) with unbatched weights: the samples are more images of the
    same grid, so the key's image count is multiplied and the operator runs once."""
    loop = _per_sample(op)

    def rule(info, in_dims, *args):
        batched = [i for i, d in enumerate(in_dims) if isinstance(d, int)]
        if batched != [feature]:  # weights (or more) batched too: per sample
            return loop(info, in_dims, *args)
        v = info.batch_size
        feats = args[feature].movedim(in_dims[feature], 0)
        args = list(args)
        args[feature] = feats.reshape(v * feats.size(1), feats.size(2))
        key_index = next(i for i, a in enumerate(args) if isinstance(a, str))
        args[key_index] = _more_images(args[key_index], v)
        out = op(*args)
        return out.view(v, out.size(0) // v, out.size(1)), 0
    return rule


torch.library.register_vmap(grid_conv, _fold_rule(grid_conv, 0))
torch.library.register_vmap(grid_conv_input_grad, _fold_rule(grid_conv_input_grad, 0))
torch.library.register_vmap(grid_conv_weight_grad, _per_sample(grid_conv_weight_grad))
for _op in (edge_conv, edge_conv_input_grad, edge_conv_weight_grad):
    torch.library.register_vmap(_op, _per_sample(_op))


# ----------------------------------------------------------------------------------------- FLOPs
# torch.utils.flop_counter.FlopCounterMode sees the operators, not their insides: count each as the GEMM work
# it does, 2 * (slots or edges) * C_in/groups * C_out, which for a full grid is what it counts for nn.Conv2d.
def _grid_slots(key: str) -> int:
    _, geometry, in_size, num_images = parse_key(key)
    return _grid_sizes(key)[1] * geometry.num_taps


@register_flop_formula(torch.ops.gridgraph.grid_conv)
def _grid_conv_flops(x_shape, w_shape, bias_shape, key, groups, *args, out_shape=None, **kwargs) -> int:
    return 2 * _grid_slots(key) * w_shape[1] * w_shape[0]


@register_flop_formula(torch.ops.gridgraph.grid_conv_input_grad)
def _grid_input_grad_flops(g_shape, w_shape, key, groups, *args, out_shape=None, **kwargs) -> int:
    return 2 * _grid_slots(key) * w_shape[1] * w_shape[0]


@register_flop_formula(torch.ops.gridgraph.grid_conv_weight_grad)
def _grid_weight_grad_flops(x_shape, g_shape, key, groups, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _grid_slots(key) * weight_shape[1] * weight_shape[0]


@register_flop_formula(torch.ops.gridgraph.edge_conv)
def _edge_conv_flops(x_shape, ei_shape, et_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * ei_shape[1] * w_shape[1] * w_shape[0]


@register_flop_formula(torch.ops.gridgraph.edge_conv_input_grad)
def _edge_input_grad_flops(g_shape, ei_shape, et_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * ei_shape[1] * w_shape[1] * w_shape[0]


@register_flop_formula(torch.ops.gridgraph.edge_conv_weight_grad)
def _edge_weight_grad_flops(x_shape, g_shape, ei_shape, et_shape, groups, weight_shape, *args, out_shape=None,
                            **kwargs) -> int:
    return 2 * ei_shape[1] * weight_shape[1] * weight_shape[0]

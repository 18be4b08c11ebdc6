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
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from torch.utils.flop_counter import conv_flop_count, register_flop_formula

from ..structure import parse_key
from . import kernels, layout

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
    ctx.save_for_forward(x, weight)
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
    ctx.save_for_forward(grad_out, weight)
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
    ctx.save_for_forward(x, grad_out)
    ctx.key, ctx.groups, ctx.weight_shape = key, groups, list(weight_shape)


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
    ctx.save_for_forward(x, edge_index, edge_type, weight)
    ctx.groups, ctx.cache, ctx.has_bias = groups, cache, bias is not None
    ctx.num_dst, ctx.holes = num_dst, holes


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
    ctx.save_for_forward(grad_out, edge_index, edge_type, weight)
    ctx.groups, ctx.cache, ctx.num_src = groups, cache, num_src


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
    ctx.save_for_forward(x, grad_out, edge_index, edge_type)
    ctx.groups, ctx.cache, ctx.weight_shape = groups, cache, list(weight_shape)


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


# ----------------------------------------------------------------------------------- image family
# The grid maps on images of any memory format (the image-facing layers that ``convert`` makes): the same
# kernels, with node features read from the image (a view when it is channels-last) and results handed out
# with the strides torch's convolution would give them, passed in by the caller (:mod:`gridgraph.nn.layout`):
# ``out_strides`` for the output, ``in_strides`` for the input's gradient, ``weight_strides`` for the weight's.
# A transposed part's weight is the transposed layer's own ``(C_in, C_out/G, *k)``.
def _dense_strides(t: Tensor) -> list[int]:
    """``t``'s strides when they lay it out densely, else the contiguous ones (for gradients of gradients)."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last) and t.dim() == 4 or \
            t.is_contiguous(memory_format=torch.channels_last_3d) and t.dim() == 5:
        return list(t.stride())
    return list(layout.contiguous_strides(t.shape))


def _image_out_shape(key: str, batch: int, weight: Tensor, groups: int) -> list[int]:
    kind, geometry, in_size, num_images = parse_key(key)
    c_out = weight.size(1) * groups if kind == "transposed" else weight.size(0)
    return [batch, c_out, *geometry.output_size(in_size)]


def _image_in_shape(key: str, batch: int, weight: Tensor, groups: int) -> list[int]:
    kind, geometry, in_size, num_images = parse_key(key)
    c_in = weight.size(0) if kind == "transposed" else weight.size(1) * groups
    return [batch, c_in, *in_size]


@torch.library.custom_op("gridgraph::conv_image", mutates_args=())
def conv_image(input: Tensor, weight: Tensor, bias: Optional[Tensor], key: str, groups: int, out_strides: list[int],
               in_strides: list[int], weight_strides: list[int]) -> Tensor:
    """The image layer's output ``(B, C_out, *out_grid)`` (strides ``out_strides``) from ``input``."""
    lat, transposed = kernels.grid_lattice(key, input.size(0))
    return kernels.image_forward(input.resolve_conj(), weight.resolve_conj(),
                                 None if bias is None else bias.resolve_conj(), lat, transposed, groups, out_strides)


@torch.library.custom_op("gridgraph::conv_image_input_grad", mutates_args=())
def conv_image_input_grad(grad_out: Tensor, weight: Tensor, key: str, groups: int, in_strides: list[int]) -> Tensor:
    """The gradient of the image layer's input (strides ``in_strides``)."""
    lat, transposed = kernels.grid_lattice(key, grad_out.size(0))
    return kernels.image_input_grad(grad_out.resolve_conj(), weight.resolve_conj(), lat, transposed, groups,
                                    in_strides)


@torch.library.custom_op("gridgraph::conv_image_weight_grad", mutates_args=())
def conv_image_weight_grad(input: Tensor, grad_out: Tensor, key: str, groups: int, weight_shape: list[int],
                           weight_strides: list[int]) -> Tensor:
    """The gradient of the image layer's weight (strides ``weight_strides``)."""
    lat, transposed = kernels.grid_lattice(key, input.size(0))
    return kernels.image_weight_grad(input.resolve_conj(), grad_out.resolve_conj(), lat, transposed, groups,
                                     weight_shape, weight_strides)


@conv_image.register_fake
def _(input, weight, bias, key, groups, out_strides, in_strides, weight_strides):
    return input.new_empty_strided(_image_out_shape(key, input.size(0), weight, groups), out_strides)


@conv_image_input_grad.register_fake
def _(grad_out, weight, key, groups, in_strides):
    return grad_out.new_empty_strided(_image_in_shape(key, grad_out.size(0), weight, groups), in_strides)


@conv_image_weight_grad.register_fake
def _(input, grad_out, key, groups, weight_shape, weight_strides):
    return input.new_empty_strided(list(weight_shape), weight_strides)


def _bias_grad(grad: Tensor) -> Tensor:
    return grad.sum([0] + list(range(2, grad.dim())))


def _conv_image_setup(ctx, inputs, output):
    input, weight, bias, key, groups, out_strides, in_strides, weight_strides = inputs
    ctx.save_for_backward(input, weight)
    ctx.save_for_forward(input, weight)
    ctx.key, ctx.groups, ctx.has_bias = key, groups, bias is not None
    ctx.out_strides, ctx.in_strides, ctx.weight_strides = out_strides, in_strides, weight_strides


def _conv_image_backward(ctx, grad):
    input, weight = ctx.saved_tensors
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        gx = _apply("conv_image_input_grad", grad, _conj(weight), ctx.key, ctx.groups, ctx.in_strides)
    if ctx.needs_input_grad[1]:
        gw = _apply("conv_image_weight_grad", _conj(input), grad, ctx.key, ctx.groups, list(weight.shape),
                    ctx.weight_strides)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        gb = _bias_grad(grad)
    return gx, gw, gb, None, None, None, None, None


def _image_input_grad_setup(ctx, inputs, output):
    grad_out, weight, key, groups, in_strides = inputs
    ctx.save_for_backward(grad_out, weight)
    ctx.save_for_forward(grad_out, weight)
    ctx.key, ctx.groups, ctx.in_strides = key, groups, in_strides


def _image_input_grad_backward(ctx, grad):
    g, weight = ctx.saved_tensors
    dg = dw = None
    if ctx.needs_input_grad[0]:
        dg = _apply("conv_image", grad, _conj(weight), None, ctx.key, ctx.groups, _dense_strides(g),
                    _dense_strides(grad), _dense_strides(weight))
    if ctx.needs_input_grad[1]:
        dw = _apply("conv_image_weight_grad", grad, _conj(g), ctx.key, ctx.groups, list(weight.shape),
                    _dense_strides(weight))
    return dg, dw, None, None, None


def _image_weight_grad_setup(ctx, inputs, output):
    input, grad_out, key, groups, weight_shape, weight_strides = inputs
    ctx.save_for_backward(input, grad_out)
    ctx.save_for_forward(input, grad_out)
    ctx.key, ctx.groups, ctx.weight_shape, ctx.weight_strides = key, groups, list(weight_shape), weight_strides


def _image_weight_grad_backward(ctx, grad):
    x, g = ctx.saved_tensors
    dx = dg = None
    if ctx.needs_input_grad[0]:
        dx = _apply("conv_image_input_grad", _conj(g), grad, ctx.key, ctx.groups, _dense_strides(x))
    if ctx.needs_input_grad[1]:
        dg = _apply("conv_image", _conj(x), grad, None, ctx.key, ctx.groups, _dense_strides(g), _dense_strides(x),
                    _dense_strides(grad))
    return dx, dg, None, None, None, None


conv_image.register_autograd(_conv_image_backward, setup_context=_conv_image_setup)
conv_image_input_grad.register_autograd(_image_input_grad_backward, setup_context=_image_input_grad_setup)
conv_image_weight_grad.register_autograd(_image_weight_grad_backward, setup_context=_image_weight_grad_setup)


# ------------------------------------------------------------------------------ forward mode (jvp)
# Each map is bilinear in its two tensor arguments (plus the bias), so its tangent is the map applied to one
# tangent and the other primal, summed: ``d F(x, W) = F(dx, W) + F(x, dW)`` (no conjugation: the maps are
# complex-bilinear). The formulas reuse the family's own operators, so forward over forward works too.
def _sum_tangents(*terms):
    terms = [t for t in terms if t is not None]
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


def _grid_conv_jvp(ctx, tx, tw, tb, *_):
    x, weight = ctx.saved_tensors
    return _sum_tangents(
        None if tx is None else _apply("grid_conv", tx, weight, None, ctx.key, ctx.groups),
        None if tw is None else _apply("grid_conv", x, tw, None, ctx.key, ctx.groups),
        None if tb is None else tb.expand(_grid_sizes(ctx.key)[1], tb.size(0)))


def _grid_input_grad_jvp(ctx, tg, tw, *_):
    g, weight = ctx.saved_tensors
    return _sum_tangents(
        None if tg is None else _apply("grid_conv_input_grad", tg, weight, ctx.key, ctx.groups),
        None if tw is None else _apply("grid_conv_input_grad", g, tw, ctx.key, ctx.groups))


def _grid_weight_grad_jvp(ctx, tx, tg, *_):
    x, g = ctx.saved_tensors
    return _sum_tangents(
        None if tx is None else _apply("grid_conv_weight_grad", tx, g, ctx.key, ctx.groups, ctx.weight_shape),
        None if tg is None else _apply("grid_conv_weight_grad", x, tg, ctx.key, ctx.groups, ctx.weight_shape))


def _edge_conv_jvp(ctx, tx, _ei, _et, tw, tb, *_):
    x, edge_index, edge_type, weight = ctx.saved_tensors
    n = ctx.num_dst
    return _sum_tangents(
        None if tx is None else _apply("edge_conv", tx, edge_index, edge_type, weight, None, n, ctx.groups, ctx.holes,
                                       ctx.cache),
        None if tw is None else _apply("edge_conv", x, edge_index, edge_type, tw, None, n, ctx.groups, ctx.holes,
                                       ctx.cache),
        None if tb is None else tb.expand(n, tb.size(0)))


def _edge_input_grad_jvp(ctx, tg, _ei, _et, tw, *_):
    g, edge_index, edge_type, weight = ctx.saved_tensors
    n = ctx.num_src
    return _sum_tangents(
        None if tg is None else _apply("edge_conv_input_grad", tg, edge_index, edge_type, weight, n, ctx.groups,
                                       ctx.cache),
        None if tw is None else _apply("edge_conv_input_grad", g, edge_index, edge_type, tw, n, ctx.groups,
                                       ctx.cache))


def _edge_weight_grad_jvp(ctx, tx, tg, *_):
    x, g, edge_index, edge_type = ctx.saved_tensors
    shape = ctx.weight_shape
    return _sum_tangents(
        None if tx is None else _apply("edge_conv_weight_grad", tx, g, edge_index, edge_type, ctx.groups, shape,
                                       ctx.cache),
        None if tg is None else _apply("edge_conv_weight_grad", x, tg, edge_index, edge_type, ctx.groups, shape,
                                       ctx.cache))


def _conv_image_jvp(ctx, tx, tw, tb, *_):
    x, weight = ctx.saved_tensors
    args = (ctx.key, ctx.groups, ctx.out_strides, ctx.in_strides, ctx.weight_strides)
    out = _sum_tangents(
        None if tx is None else _apply("conv_image", tx, weight, None, *args),
        None if tw is None else _apply("conv_image", x, tw, None, *args))
    if tb is not None:
        shape = [1, tb.size(0)] + [1] * (out.dim() - 2)
        out = out + tb.view(shape)
    return out


def _image_input_grad_jvp(ctx, tg, tw, *_):
    g, weight = ctx.saved_tensors
    return _sum_tangents(
        None if tg is None else _apply("conv_image_input_grad", tg, weight, ctx.key, ctx.groups, ctx.in_strides),
        None if tw is None else _apply("conv_image_input_grad", g, tw, ctx.key, ctx.groups, ctx.in_strides))


def _image_weight_grad_jvp(ctx, tx, tg, *_):
    x, g = ctx.saved_tensors
    args = (ctx.key, ctx.groups, ctx.weight_shape, ctx.weight_strides)
    return _sum_tangents(
        None if tx is None else _apply("conv_image_weight_grad", tx, g, *args),
        None if tg is None else _apply("conv_image_weight_grad", x, tg, *args))


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


class ConvImageFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, key, groups, out_strides, in_strides, weight_strides):
        return conv_image(input, weight, bias, key, groups, out_strides, in_strides, weight_strides)

    setup_context = staticmethod(_conv_image_setup)
    backward = staticmethod(_conv_image_backward)


class ConvImageInputGradFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(grad_out, weight, key, groups, in_strides):
        return conv_image_input_grad(grad_out, weight, key, groups, in_strides)

    setup_context = staticmethod(_image_input_grad_setup)
    backward = staticmethod(_image_input_grad_backward)


class ConvImageWeightGradFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(input, grad_out, key, groups, weight_shape, weight_strides):
        return conv_image_weight_grad(input, grad_out, key, groups, weight_shape, weight_strides)

    setup_context = staticmethod(_image_weight_grad_setup)
    backward = staticmethod(_image_weight_grad_backward)


def _with_jvp(function: type, jvp) -> type:
    """``function`` with a forward-mode formula: used under forward-mode AD (dual tensors, ``torch.func.jvp``)
    only, because torch.compile cannot trace an autograd.Function that defines ``jvp``."""
    return type(function.__name__ + "WithJvp", (function,), {"jvp": staticmethod(jvp)})


FUNCTIONS = {"grid_conv": GridConvFunction, "grid_conv_input_grad": GridConvInputGradFunction, "grid_conv_weight_grad": GridConvWeightGradFunction, "edge_conv": EdgeConvFunction, "edge_conv_input_grad": EdgeConvInputGradFunction, "edge_conv_weight_grad": EdgeConvWeightGradFunction,
             "conv_image": ConvImageFunction, "conv_image_input_grad": ConvImageInputGradFunction,
             "conv_image_weight_grad": ConvImageWeightGradFunction}


_JVPS = {"grid_conv": _grid_conv_jvp, "grid_conv_input_grad": _grid_input_grad_jvp,
         "grid_conv_weight_grad": _grid_weight_grad_jvp, "edge_conv": _edge_conv_jvp,
         "edge_conv_input_grad": _edge_input_grad_jvp, "edge_conv_weight_grad": _edge_weight_grad_jvp,
         "conv_image": _conv_image_jvp, "conv_image_input_grad": _image_input_grad_jvp,
         "conv_image_weight_grad": _image_weight_grad_jvp}
FORWARD_FUNCTIONS = {name: _with_jvp(FUNCTIONS[name], jvp) for name, jvp in _JVPS.items()}

_OPS = {"grid_conv": grid_conv, "grid_conv_input_grad": grid_conv_input_grad,
        "grid_conv_weight_grad": grid_conv_weight_grad, "edge_conv": edge_conv,
        "edge_conv_input_grad": edge_conv_input_grad, "edge_conv_weight_grad": edge_conv_weight_grad,
        "conv_image": conv_image, "conv_image_input_grad": conv_image_input_grad,
        "conv_image_weight_grad": conv_image_weight_grad}


def _apply(name: str, *args):
    """Run operator ``name`` through its autograd.Function twin (differentiable under autograd and torch.func);
    the operator itself when nothing needs a gradient (the Function's argument binding costs ~30 us a call)
    and under ``torch.jit.trace`` (the operator carries its autograd formula; the trace records one node)."""
    if torch.jit.is_tracing():
        return _OPS[name](*args)
    if not torch.compiler.is_compiling() and (_forward_ad._current_level >= 0
                                              or torch._C._are_functorch_transforms_active()):
        return FORWARD_FUNCTIONS[name].apply(*args)  # forward mode (dual tensors, torch.func.jvp) needs a jvp
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


def _refold(strides: list[int], shape: list[int], new_shape: list[int]) -> list[int]:
    """Strides of the same memory format for ``new_shape`` (channels-last stays channels-last)."""
    if list(strides) == list(layout.channels_last_strides(shape)) != list(layout.contiguous_strides(shape)):
        return list(layout.channels_last_strides(new_shape))
    return list(layout.contiguous_strides(new_shape))


def _image_fold_rule(op, feature: int, shape_of):
    """Batched images (argument ``feature``) with unbatched weights: the samples are more images, so the key's
    image count is multiplied and the operator runs once; the stride arguments follow the folded shapes."""
    loop = _per_sample(op)

    def rule(info, in_dims, *args):
        batched = [i for i, d in enumerate(in_dims) if isinstance(d, int)]
        if batched != [feature]:
            return loop(info, in_dims, *args)
        v = info.batch_size
        images = args[feature].movedim(in_dims[feature], 0)
        args = list(args)
        args[feature] = images.reshape(v * images.size(1), *images.shape[2:])
        key_index = next(i for i, a in enumerate(args) if isinstance(a, str))
        key = args[key_index]
        args[key_index] = _more_images(key, v)
        weight = args[1]
        groups = args[key_index + 1]
        for i, a in enumerate(args):  # the stride lists: re-derived for the folded shapes
            if isinstance(a, list) and i > key_index + 1:
                old, new = shape_of(i, key, images.size(1), weight, groups), shape_of(i, key, v * images.size(1),
                                                                                      weight, groups)
                args[i] = _refold(a, old, new)
        out = op(*args)
        return out.view(v, out.size(0) // v, *out.shape[1:]), 0
    return rule


def _conv_image_shapes(i, key, batch, weight, groups):
    return (_image_out_shape, _image_in_shape, lambda *a: list(weight.shape))[i - 5](key, batch, weight, groups)


def _input_grad_shapes(i, key, batch, weight, groups):
    return _image_in_shape(key, batch, weight, groups)


torch.library.register_vmap(conv_image, _image_fold_rule(conv_image, 0, _conv_image_shapes))
torch.library.register_vmap(conv_image_input_grad, _image_fold_rule(conv_image_input_grad, 0, _input_grad_shapes))
torch.library.register_vmap(conv_image_weight_grad, _per_sample(conv_image_weight_grad))


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


# The image operators count as torch counts the convolution they replace (torch.utils.flop_counter's own rule).
def _transposed(key: str) -> bool:
    return key.startswith("transposed|")


def _swap(shape):
    return [shape[1], shape[0]] + list(shape[2:])


@register_flop_formula(torch.ops.gridgraph.conv_image)
def _conv_image_flops(x_shape, w_shape, bias_shape, key, groups, *args, out_shape=None, **kwargs) -> int:
    return conv_flop_count(list(x_shape), list(w_shape), list(out_shape), _transposed(key))


@register_flop_formula(torch.ops.gridgraph.conv_image_input_grad)
def _conv_image_input_grad_flops(g_shape, w_shape, key, groups, *args, out_shape=None, **kwargs) -> int:
    return conv_flop_count(list(g_shape), list(w_shape), list(out_shape), not _transposed(key))


@register_flop_formula(torch.ops.gridgraph.conv_image_weight_grad)
def _conv_image_weight_grad_flops(x_shape, g_shape, key, groups, *args, out_shape=None, **kwargs) -> int:
    if _transposed(key):
        return conv_flop_count(_swap(g_shape), _swap(x_shape), _swap(out_shape), transposed=False)
    return conv_flop_count(_swap(x_shape), _swap(g_shape), _swap(out_shape), transposed=False)

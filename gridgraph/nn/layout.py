"""The layout contract of image-facing layers: the strides torch's convolution would hand out.

A converted convolution computes in node layout (``[B * prod(grid), C]``, which *is* a channels-last image
in memory) and must hand torch and the user back exactly the strides the original ``nn.ConvNd`` would:
outputs, input gradients and weight gradients, batch 1 and size-1 dimensions included. Then whatever torch
gets right for the original network it gets right for the converted one (its own kernels depend on strides,
and user code calls ``.view()`` on outputs).

Torch decides in two steps, and so do we: which backend its convolution would run
(``torch._C._select_conv_backend``, which only reads shapes, strides, dtypes and devices) and which memory
format that backend uses (``torch._C._conv_determine_backend_memory_format``: channels-last when the input
*or the weight* suggests it, for the backends that support it). The strides then follow the backend's
allocation rule (:class:`ConvLayout`): results are allocated in that format, except that torch's generic
CPU kernels (``Slow*``) return the weight gradient converted from the weight's own strides, and their
depthwise output and input gradient converted from a contiguous tensor (a conversion keeps the strides of a
tensor that is already contiguous in the format: only size-1 dimensions differ).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["ConvLayout", "conv_layout", "contiguous_strides", "channels_last_strides", "to_nodes", "to_image"]


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """The strides of ``torch.empty(shape)`` (size-0 and size-1 dimensions as torch writes them)."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def channels_last_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """The strides of ``torch.empty(shape, memory_format=channels_last[_3d])``: channels fastest, then the
    spatial dimensions from the last, then the batch."""
    n = len(shape)
    strides = [0] * n
    step = 1
    for d in [1] + list(range(n - 1, 1, -1)) + [0]:
        strides[d] = step
        step *= max(shape[d], 1)
    return tuple(strides)


def _is_contiguous_as(shape: Sequence[int], strides: Sequence[int], want: Sequence[int]) -> bool:
    """Whether a tensor of ``shape``/``strides`` is contiguous in the layout whose canonical strides are
    ``want`` (size-1 dimensions do not count, as in ``Tensor.is_contiguous``)."""
    if any(n == 0 for n in shape):
        return True
    return all(s == w for n, s, w in zip(shape, strides, want) if n != 1)


def _converted(shape: Sequence[int], strides: Sequence[int], channels_last: bool) -> tuple[int, ...]:
    """The strides of ``t.contiguous(memory_format=...)`` for a tensor ``t`` of ``shape``/``strides``: ``t``'s
    own when it already is contiguous in that format, else the canonical ones."""
    want = channels_last_strides(shape) if channels_last else contiguous_strides(shape)
    return tuple(strides) if _is_contiguous_as(shape, strides, want) else want


class ConvLayout:
    """The strides of a torch convolution's output, input gradient and weight gradient for one call
    signature (shapes, strides, dtype, device). ``channels_last``: the memory format torch's backend uses."""

    __slots__ = ("backend", "channels_last", "fresh", "converted", "weight_strides", "empty_like")

    def __init__(self, backend: str, channels_last: bool, fresh: bool, converted: bool,
                 weight_strides: tuple[int, ...]) -> None:
        self.backend, self.channels_last = backend, channels_last
        self.weight_strides = weight_strides  # what a weight gradient not allocated fresh is converted from
        self.fresh = fresh  # the weight gradient is allocated in the format (else: from the weight's strides)
        self.converted = converted  # output and input gradient: a contiguous result converted to the format
        self.empty_like: Optional[tuple[tuple[int, ...], tuple[int, ...]]] = None  # an empty batch's input

    def strides(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Output or input-gradient strides for a result of ``shape``."""
        if self.empty_like is not None:  # an empty batch: torch's output is ``(input * w).view(shape)``
            in_shape, in_strides = self.empty_like
            probe = torch.empty_strided(in_shape, in_strides)  # no elements: nothing is allocated
            probe = probe.view(-1) * probe.new_empty(1) if in_shape[1] == 0 else probe * probe.new_empty(())
            return tuple(probe.view(tuple(shape)).stride())
        if self.channels_last:
            return _converted(shape, contiguous_strides(shape), True) if self.converted else channels_last_strides(shape)
        return contiguous_strides(shape)

    def weight_grad_strides(self, shape: Sequence[int]) -> tuple[int, ...]:
        if self.fresh:
            return channels_last_strides(shape) if self.channels_last else contiguous_strides(shape)
        return _converted(shape, self.weight_strides, self.channels_last)

    def empty(self, shape: Sequence[int], like: Tensor) -> Tensor:
        return like.new_empty_strided(tuple(shape), self.strides(shape))


def conv_layout(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                padding: Sequence[int], dilation: Sequence[int], transposed: bool, output_padding: Sequence[int],
                groups: int) -> ConvLayout:
    """The :class:`ConvLayout` torch's ``convolution`` would use for these arguments (``input`` batched).

    Asks torch which backend it would select and that backend's memory format; nothing is computed.
    """
    n = weight.dim() - 2
    try:
        if torch.compiler.is_compiling():  # the compiler cannot trace torch's backend selection: the rule
            raise RuntimeError("compiling")
        backend = torch._C._select_conv_backend(input, weight, bias, list(stride), list(padding), list(dilation),
                                                transposed, list(output_padding), groups, None)
        if n == 1 and not input.is_mkldnn:  # torch expands 1-d convolutions to 2-d before deciding the format
            fmt = torch._C._conv_determine_backend_memory_format(input.contiguous().unsqueeze(2), weight.unsqueeze(2),
                                                                 backend)
        else:
            fmt = torch._C._conv_determine_backend_memory_format(input, weight, backend)
        name = str(backend).rsplit(".", 1)[-1]
    except (AttributeError, RuntimeError, TypeError):  # a torch without these helpers: the documented rule
        name = "Unknown"
        fmt = _suggested(input, n)
        if fmt == torch.contiguous_format:
            fmt = _suggested(weight, n)
    channels_last = fmt in (torch.channels_last, torch.channels_last_3d) and n >= 2
    slow = name in ("Slow2d", "SlowTranspose2d", "Slow3d", "SlowTranspose3d")
    depthwise = groups > 1 and groups == input.size(1) and not transposed
    # torch's generic 2-d kernels return the weight gradient from the weight's strides, the 3-d ones from a
    # contiguous tensor
    from_strides = tuple(weight.stride()) if n < 3 else contiguous_strides(weight.shape)
    layout = ConvLayout(name, channels_last, not slow, slow and depthwise, from_strides)
    if name == "Empty":
        layout.empty_like = (tuple(input.shape), tuple(input.stride()))
    return layout


def _suggested(t: Tensor, n: int) -> torch.memory_format:
    """``Tensor.suggest_memory_format`` (torch's reference implementation, by the order of the strides)."""
    if n < 2:
        return torch.contiguous_format
    from torch._prims_common import suggest_memory_format

    return suggest_memory_format(t)


def padded_image(images: Tensor, padding: Sequence[tuple[int, int]], mode: str) -> tuple[Tensor, tuple[int, ...]]:
    """What ``F.pad(images, mode=mode)`` hands torch's convolution (an empty tensor of the padded image's shape
    and strides, to ask torch about: a batch of at most two images, which decides the same), and the strides
    of the gradient its backward gives ``images``: reflect and replicate padding keep the input's memory
    format (its own strides when it is dense), circular padding (slices and concatenations) is contiguous."""
    shape = tuple(int(v) for v in images.shape)
    padded = (shape[0], shape[1], *(n + a + b for n, (a, b) in zip(shape[2:], padding)))
    probe = (min(padded[0], 2), *padded[1:])
    dense = images.is_contiguous() or images.dim() in _CL and images.is_contiguous(memory_format=_CL[images.dim()])
    if mode == "circular" or images.dim() not in _CL:
        return images.new_empty(probe), contiguous_strides(shape)
    fmt = _suggested(images, images.dim() - 2)
    padded_probe = torch.empty(probe, dtype=images.dtype, device=images.device, memory_format=fmt)
    grad = tuple(images.stride()) if dense else (channels_last_strides(shape) if fmt != torch.contiguous_format
                                                 else contiguous_strides(shape))
    return padded_probe, grad


# ------------------------------------------------------------------------------------ conversions
_CL = {4: torch.channels_last, 5: torch.channels_last_3d}


def to_nodes(images: Tensor) -> Tensor:
    """``(B, C, *grid)`` -> node features ``[B * prod(grid), C]``, row-major: a view when the images are
    channels-last in memory (their ``[nodes, channels]`` rows), else one copy."""
    dim = images.dim()
    c = images.size(1)
    fmt = _CL.get(dim)
    if fmt is not None and images.is_contiguous(memory_format=fmt) or \
            fmt is None and _is_contiguous_as(images.shape, images.stride(), channels_last_strides(images.shape)):
        return images.as_strided((images.numel() // max(c, 1), c), (c, 1), images.storage_offset()) if c else \
            images.new_empty(images.numel(), 0)
    return images.permute(0, *range(2, dim), 1).reshape(-1, c).contiguous()


def is_node_layout(shape: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether an image of ``shape``/``strides`` is laid out as its node features (channels-last memory)."""
    return _is_contiguous_as(shape, strides, channels_last_strides(shape))


def to_image(nodes: Tensor, num_images: int, grid: Sequence[int], strides: Sequence[int],
             view: Optional[bool] = None) -> Tensor:
    """Node features ``[B * prod(grid), C]`` (contiguous) as the image ``(B, C, *grid)`` with exactly
    ``strides``: a view when the strides describe the nodes' own memory (channels-last), else one copy.
    ``view``: :func:`is_node_layout` of the result, when the caller knows it. The result is never an autograd
    view (the layers return it: an in-place activation after them must work, as after ``nn.Conv2d``)."""
    c = nodes.size(-1)
    shape = (num_images, c, *grid)
    if view is None:
        view = is_node_layout(shape, strides)
    if view:  # detached: not an autograd view of the kernels' buffer, so in-place ops on it are allowed
        return nodes.as_strided(shape, strides, nodes.storage_offset()).detach()
    out = nodes.new_empty_strided(shape, strides)
    out.copy_(nodes.view(num_images, *grid, c).permute(0, len(grid) + 1, *range(1, len(grid) + 1)))
    return out


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)

"""The geometry of a convolution: the one object every other part of gridgraph reads.

A :class:`ConvGeometry` holds, for ``n`` spatial dimensions, the kernel size, stride, padding
(resolved to explicit ``(before, after)`` amounts, so ``'same'`` and ``'valid'`` are numbers here),
dilation and padding mode of a convolution. It is immutable and hashable, so it keys the graph
cache. It is built from keywords (:meth:`ConvGeometry.from_keywords`, same meaning as
``nn.Conv2d``) or from a module (:meth:`ConvGeometry.from_module`: an ``nn.Conv1d/2d/3d`` or a
gridgraph layer).

Conventions (stated once, used everywhere):

* taps are numbered row-major over the kernel: in 2-D the tap ``(u, v)`` is ``t = u * kW + v``;
* the tap ``(u, v)`` of the output pixel ``(i_h, i_w)`` reads the input pixel
  ``(i_h * sH + u * dH - pad_top, i_w * sW + v * dW - pad_left)`` (cross-correlation, as in
  ``nn.Conv2d``, no kernel flip); its *offset* is ``(u * dH - pad_top, v * dW - pad_left)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

__all__ = ["ConvGeometry", "TransposedGeometry", "PADDING_MODES", "default_padding"]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
# Tuples, not sets: the messages below list the choices, and a set's order changes with PYTHONHASHSEED.
# (nn.Conv2d's own messages print a set; ours read the same with the choices in this fixed order.)
_VALID_PADDING_MODES = PADDING_MODES
_VALID_PADDING_STRINGS = ("same", "valid")


def _ntuple(value: Any, ndim: int, name: str) -> tuple[int, ...]:
    """``value`` as a tuple of ``ndim`` ints (an int is repeated), with a clear error otherwise."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a tuple of {ndim} ints (got {value!r})")
    if isinstance(value, int):
        return (value,) * ndim
    if isinstance(value, torch.Size) or isinstance(value, (tuple, list)):
        items = tuple(value)
        if len(items) != ndim or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            raise ValueError(f"{name} must be an int or a tuple of {ndim} ints (got {value!r})")
        return items
    raise TypeError(f"{name} must be an int or a tuple of {ndim} ints (got {type(value).__name__} {value!r})")


def check_conv_arguments(in_channels: int, out_channels: int, stride: tuple[int, ...],
                         padding: Any, groups: int, padding_mode: str) -> None:
    """The checks ``nn.Conv2d`` makes in its constructor, with its exact messages."""
    for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"{name} must be an int (got {type(v).__name__} {v!r})")
    if groups <= 0:
        raise ValueError("groups must be a positive integer")
    if in_channels % groups != 0:
        raise ValueError("in_channels must be divisible by groups")
    if out_channels % groups != 0:
        raise ValueError("out_channels must be divisible by groups")
    if isinstance(padding, str):
        if padding not in _VALID_PADDING_STRINGS:
            raise ValueError(
                f"Invalid padding string {padding!r}, should be one of {_VALID_PADDING_STRINGS}")
        if padding == "same" and any(s != 1 for s in stride):
            raise ValueError("padding='same' is not supported for strided convolutions")
    if padding_mode not in _VALID_PADDING_MODES:
        raise ValueError(
            f"padding_mode must be one of {_VALID_PADDING_MODES}, but got padding_mode='{padding_mode}'")


def default_padding(kernel_size: Sequence[int], dilation: Sequence[int]) -> tuple[int, ...]:
    """The padding every graph builder (:func:`~gridgraph.image_to_graph`, ``sequence_to_graph``,
    ``volume_to_graph``, ``sparse_to_graph``, ``positions_to_graph``, :class:`~gridgraph.ToPixelGraph`) takes when
    none is given: ``dilation * (kernel_size - 1) // 2`` per dimension, so that at stride 1 an odd kernel's
    output grid is the input grid and ``kernel_size=1`` is the graph of self-loops on the input grid. (A
    transposed builder keeps ``nn.ConvTransposeNd``'s default, 0.)

    Example:
        >>> default_padding((3, 1, 4), (1, 1, 2))
        (1, 0, 3)
    """
    return tuple(di * (ki - 1) // 2 for ki, di in zip(kernel_size, dilation))


@dataclass(frozen=True)
class ConvGeometry:
    """Normalised geometry of an ``n``-d convolution (immutable, hashable).

    Args:
        kernel_size (tuple[int, ...]): kernel extent per spatial dimension.
        stride (tuple[int, ...]): step between output anchors on the input grid.
        padding (tuple[tuple[int, int], ...]): ``(before, after)`` padding per dimension.
        dilation (tuple[int, ...]): spacing between taps.
        padding_mode (str): ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.

    Example:
        >>> g = ConvGeometry.from_keywords(2, kernel_size=3, padding='same')
        >>> g.padding, g.num_taps, g.output_size((5, 7))
        (((1, 1), (1, 1)), 9, (5, 7))
        >>> g.offsets().tolist()[4]  # the centre tap of a 'same' kernel
        [0, 0]
    """

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    dilation: tuple[int, ...]
    padding_mode: str = "zeros"

    def __post_init__(self) -> None:
        n = len(self.kernel_size)
        if not (len(self.stride) == len(self.padding) == len(self.dilation) == n) or n == 0:
            raise ValueError("kernel_size, stride, padding and dilation must have the same number of "
                             f"dimensions (got {self.kernel_size}, {self.stride}, {self.padding}, "
                             f"{self.dilation})")
        if any(k <= 0 for k in self.kernel_size):
            raise ValueError(f"kernel_size must be positive (got {self.kernel_size})")
        if any(s <= 0 for s in self.stride):
            raise ValueError(f"stride must be positive (got {self.stride}): non-positive stride is not supported")
        if any(p < 0 for pair in self.padding for p in pair):
            raise ValueError(f"padding must be non-negative (got {self.padding}): negative padding is not supported")
        if any(d <= 0 for d in self.dilation):
            raise ValueError(f"dilation must be positive (got {self.dilation})")
        if self.padding_mode not in _VALID_PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_VALID_PADDING_MODES}, but got "
                             f"padding_mode='{self.padding_mode}'")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_keywords(cls, ndim: int, kernel_size: Any = 3, stride: Any = 1, padding: Any = 0,
                      dilation: Any = 1, padding_mode: str = "zeros") -> "ConvGeometry":
        """Build from ``nn.ConvNd``-style keywords (``padding`` may be ``'same'``/``'valid'``, or ``None``:
        the graph builders' default, :func:`~gridgraph.geometry.default_padding`)."""
        k = _ntuple(kernel_size, ndim, "kernel_size")
        s = _ntuple(stride, ndim, "stride")
        d = _ntuple(dilation, ndim, "dilation")
        if padding is None:
            padding = default_padding(k, d)
        if isinstance(padding, str):
            if padding not in _VALID_PADDING_STRINGS:
                raise ValueError(
                    f"Invalid padding string {padding!r}, should be one of {_VALID_PADDING_STRINGS}")
            if padding == "valid":
                pads = ((0, 0),) * ndim
            else:
                if any(x != 1 for x in s):
                    raise ValueError("padding='same' is not supported for strided convolutions")
                pads = tuple((di * (ki - 1) // 2, di * (ki - 1) - di * (ki - 1) // 2) for ki, di in zip(k, d))
        else:
            p = _ntuple(padding, ndim, "padding")
            pads = tuple((x, x) for x in p)
        return cls(k, s, pads, d, padding_mode)

    @classmethod
    def from_module(cls, module: Any) -> "ConvGeometry":
        """The geometry of an ``nn.Conv1d/2d/3d`` or of a gridgraph layer."""
        geometry = getattr(module, "geometry", None)
        if isinstance(geometry, ConvGeometry):
            return geometry
        if isinstance(module, torch.nn.modules.conv._ConvNd) and not module.transposed:
            n = len(module.kernel_size)
            return cls.from_keywords(n, module.kernel_size, module.stride, module.padding,
                                     module.dilation, module.padding_mode)
        raise TypeError("conv must be an nn.Conv1d/Conv2d/Conv3d or a gridgraph convolution layer "
                        f"(got {type(module).__name__})")

    # ------------------------------------------------------------------ derived facts
    @property
    def ndim(self) -> int:
        """Number of spatial dimensions."""
        return len(self.kernel_size)

    @property
    def num_taps(self) -> int:
        """Number of kernel taps, ``prod(kernel_size)``: the number of edge types."""
        return math.prod(self.kernel_size)

    @property
    def is_pointwise(self) -> bool:
        """bool: ``True`` for a 1x1 kernel with unit stride and no padding (a graph of self-loops only)."""
        return (all(k == 1 for k in self.kernel_size) and all(s == 1 for s in self.stride)
                and all(p == (0, 0) for p in self.padding))

    def padded_size(self, input_size: Sequence[int]) -> tuple[int, ...]:
        return tuple(n + a + b for n, (a, b) in zip(input_size, self.padding))

    def output_size(self, input_size: Sequence[int]) -> tuple[int, ...]:
        """Output grid size from ``nn.Conv2d``'s formula; a ValueError where Conv2d refuses."""
        input_size = tuple(int(n) for n in input_size)
        if len(input_size) != self.ndim:
            raise ValueError(f"expected a grid of {self.ndim} dimensions (got size {input_size})")
        self.check_input_size(input_size)
        return tuple((p - d * (k - 1) - 1) // s + 1 for p, k, s, d in
                     zip(self.padded_size(input_size), self.kernel_size, self.stride, self.dilation))

    def check_input_size(self, input_size: Sequence[int]) -> None:
        """Raise the ValueError ``nn.Conv2d`` raises (as a RuntimeError) for too small inputs."""
        padded = self.padded_size(input_size)
        extent = tuple(d * (k - 1) + 1 for k, d in zip(self.kernel_size, self.dilation))
        if any(n < 1 for n in input_size):
            raise ValueError(f"image size must be positive in every spatial dimension (got {tuple(input_size)})")
        if any(p < e for p, e in zip(padded, extent)):
            raise ValueError(
                f"image too small for the kernel: padded input size per channel {padded}, dilated kernel "
                f"size {extent}; the kernel can't be greater than the (padded) input size")
        if self.padding_mode == "reflect":
            for n, (a, b) in zip(input_size, self.padding):
                if a >= n or b >= n:
                    raise ValueError(
                        f"padding {self.padding} with padding_mode='reflect' needs each padding to be less "
                        f"than the corresponding image size (got image size {tuple(input_size)})")
        if self.padding_mode == "circular":
            for n, (a, b) in zip(input_size, self.padding):
                if a > n or b > n:
                    raise ValueError(
                        f"padding {self.padding} with padding_mode='circular' would wrap around more than "
                        f"once (image size {tuple(input_size)}); padding must be at most the image size")

    def offsets(self) -> torch.Tensor:
        """``[num_taps, ndim]`` long tensor: the offset of each tap from the output pixel's anchor."""
        axes = [torch.arange(k) * d - a for k, d, (a, _) in zip(self.kernel_size, self.dilation, self.padding)]
        grids = torch.meshgrid(*axes, indexing="ij")
        return torch.stack([g.reshape(-1) for g in grids], dim=1)

    def torch_padding(self) -> tuple[int, ...] | str:
        """Padding as ``nn.ConvNd`` takes it: symmetric ints, or ``'same'`` where it is asymmetric."""
        if all(a == b for a, b in self.padding):
            return tuple(a for a, _ in self.padding)
        same = ConvGeometry.from_keywords(self.ndim, self.kernel_size, 1, "same", self.dilation)
        if self.padding == same.padding and all(s == 1 for s in self.stride):
            return "same"
        raise ValueError(f"asymmetric padding {self.padding} has no nn.ConvNd equivalent")

    def key(self) -> str:
        """A canonical string of the geometry (what :meth:`from_key` reads back), e.g.
        ``'k3,3;s1,1;p1,1,1,1;d1,1;zeros'``: the form in which the registered torch operators take it."""
        j = ",".join
        pads = j(str(v) for pair in self.padding for v in pair)
        return (f"k{j(map(str, self.kernel_size))};s{j(map(str, self.stride))};p{pads};"
                f"d{j(map(str, self.dilation))};{self.padding_mode}")

    @classmethod
    def from_key(cls, key: str) -> "ConvGeometry":
        """The geometry whose :meth:`key` is ``key``.

        Example:
            >>> g = ConvGeometry.from_keywords(2, kernel_size=(3, 2), padding='same', padding_mode='reflect')
            >>> ConvGeometry.from_key(g.key()) == g
            True
        """
        try:
            k, s, p, d, mode = key.split(";")
            ints = lambda part: tuple(int(v) for v in part[1:].split(","))  # noqa: E731
            pads = ints(p)
            return cls(ints(k), ints(s), tuple(zip(pads[::2], pads[1::2])), ints(d), mode)
        except (ValueError, TypeError) as error:
            raise ValueError(f"not a ConvGeometry key: {key!r} ({error})") from None

    def describe(self) -> str:
        """A compact human-readable summary, e.g. ``k3x3 s1 p1 d1 zeros``."""
        x = "x".join
        pads = self.padding
        p = x(str(a) for a, _ in pads) if all(a == b for a, b in pads) else x(f"{a}+{b}" for a, b in pads)
        return (f"k{x(map(str, self.kernel_size))} s{x(map(str, self.stride))} p{p} "
                f"d{x(map(str, self.dilation))} {self.padding_mode}")


@dataclass(frozen=True)
class TransposedGeometry:
    """The geometry of an ``n``-d transposed convolution: the strided convolution it reverses, plus
    the output padding that picks one of the ``H_out`` grids that convolution maps to ``H``.

    A transposed convolution with kernel ``k``, stride ``s``, padding ``p``, dilation ``d`` and output
    padding ``op`` maps a grid of size ``H`` to ``H_out = (H - 1) s - 2p + d (k - 1) + op + 1``: exactly a
    grid on which the strided convolution of the same ``(k, s, p, d)`` has ``H`` outputs. Its graph is
    that convolution's graph with every edge reversed.

    Example:
        >>> t = TransposedGeometry.from_keywords(2, kernel_size=3, stride=2, padding=1, output_padding=1)
        >>> t.output_size((4, 5))
        (8, 10)
    """

    conv: ConvGeometry
    output_padding: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.conv.padding_mode != "zeros":
            raise ValueError('Only "zeros" padding mode is supported for a transposed convolution '
                             f"(got padding_mode={self.conv.padding_mode!r})")
        if any(a != b for a, b in self.conv.padding):
            raise ValueError(f"a transposed convolution takes symmetric padding (got {self.conv.padding})")
        if len(self.output_padding) != self.conv.ndim:
            raise ValueError(f"output_padding must have {self.conv.ndim} entries (got {self.output_padding})")
        for op, s, d in zip(self.output_padding, self.conv.stride, self.conv.dilation):
            if op < 0 or (op >= s and op >= d):
                raise ValueError("output padding must be smaller than either stride or dilation "
                                 f"(got output_padding={self.output_padding}, stride={self.conv.stride}, "
                                 f"dilation={self.conv.dilation})")

    @classmethod
    def from_keywords(cls, ndim: int, kernel_size: Any = 3, stride: Any = 1, padding: Any = 0,
                      output_padding: Any = 0, dilation: Any = 1) -> "TransposedGeometry":
        """From ``nn.ConvTransposeNd``-style keywords (integer padding only, as there)."""
        if isinstance(padding, str):
            raise TypeError(f"padding of a transposed convolution must be an int or a tuple of {ndim} ints "
                            f"(got {padding!r})")
        conv = ConvGeometry.from_keywords(ndim, kernel_size, stride, padding, dilation, "zeros")
        return cls(conv, _ntuple(output_padding, ndim, "output_padding"))

    @classmethod
    def from_module(cls, module: Any) -> "TransposedGeometry":
        """The geometry of an ``nn.ConvTranspose1d/2d/3d`` or a gridgraph transposed convolution layer."""
        geometry = getattr(module, "transposed_geometry", None)
        if isinstance(geometry, TransposedGeometry):
            return geometry
        if isinstance(module, torch.nn.modules.conv._ConvNd) and module.transposed:
            if module.padding_mode != "zeros":
                raise ValueError(f'Only "zeros" padding mode is supported for {type(module).__name__}')
            n = len(module.kernel_size)
            return cls.from_keywords(n, module.kernel_size, module.stride, module.padding, module.output_padding,
                                     module.dilation)
        raise TypeError("conv must be an nn.ConvTranspose1d/2d/3d or a gridgraph transposed convolution "
                        f"(got {type(module).__name__})")

    @property
    def ndim(self) -> int:
        return self.conv.ndim

    @property
    def num_taps(self) -> int:
        return self.conv.num_taps

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return self.conv.kernel_size

    def output_size(self, input_size: Sequence[int]) -> tuple[int, ...]:
        """``H_out = (H - 1) s - 2p + d (k - 1) + op + 1`` per dimension; a ValueError where it is not positive."""
        input_size = tuple(int(n) for n in input_size)
        if len(input_size) != self.ndim:
            raise ValueError(f"expected a grid of {self.ndim} dimensions (got size {input_size})")
        if any(n < 1 for n in input_size):
            raise ValueError(f"image size must be positive in every spatial dimension (got {input_size})")
        c = self.conv
        out = tuple((n - 1) * s - 2 * p + d * (k - 1) + op + 1 for n, s, (p, _), d, k, op in
                    zip(input_size, c.stride, c.padding, c.dilation, c.kernel_size, self.output_padding))
        if any(n < 1 for n in out):
            raise ValueError(f"the transposed convolution's output size {out} is not positive for an input of "
                             f"size {input_size}")
        return out

    def key(self) -> str:
        """A canonical string (the convolution's :meth:`ConvGeometry.key` and the output padding)."""
        return f"{self.conv.key()};o{','.join(map(str, self.output_padding))}"

    @classmethod
    def from_key(cls, key: str) -> "TransposedGeometry":
        """The geometry whose :meth:`key` is ``key``."""
        conv_key, _, op = key.rpartition(";")
        if not op.startswith("o"):
            raise ValueError(f"not a TransposedGeometry key: {key!r}")
        return cls(ConvGeometry.from_key(conv_key), tuple(int(v) for v in op[1:].split(",")))

    def describe(self) -> str:
        """A compact summary, e.g. ``transposed k3x3 s2x2 p1 d1 op1x1``."""
        return (f"transposed {self.conv.describe().rsplit(' ', 1)[0]} "
                f"op{'x'.join(map(str, self.output_padding))}")

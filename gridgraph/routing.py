"""Convolutions that are not ``nn.ConvNd`` modules of their own, as message passing.

:func:`~gridgraph.convert` replaces every module whose type is exactly a torch convolution by its twin. Real
networks also convolve in other ways, and this module routes those through gridgraph too:

* **subclasses** of the torch convolutions (a "same" padding computed from the input size, weight
  standardisation, scaled weights with a gain, a 3-d subclass that only adds a static method), **parametrised**
  convolutions (``weight_norm``, ``spectral_norm``: ``ParametrizedConv2d``), convolutions whose weight is
  recomputed by a hook (the old ``torch.nn.utils.weight_norm``) and fused QAT modules (``ConvBn2d``): their own
  ``forward`` runs unchanged (it standardises, pads, fake-quantises, updates spectral norm's power iteration),
  and only its convolution call becomes message passing;
* **functional calls**: a module whose ``forward`` calls ``F.conv1d/2d/3d`` or ``F.conv_transpose1d/2d/3d``
  itself (a blur filter in a registered buffer, per-sample experts, a user's Sobel filter).

Both are one mechanism: :class:`MessagePassingMode`, a ``torch.overrides.TorchFunctionMode`` that computes
those six functions with :func:`gridgraph.nn.functional.conv_image` (their torch semantics: the padding,
stride, dilation, groups and output padding they are given). A routed module keeps its class (a subclass of
it is swapped in, :func:`route`), its parameters, buffers, ``state_dict`` keys and hooks; only its own
``forward`` runs inside the mode, so nothing else in the network pays the mode's per-call cost.
:func:`message_passing` is the same mode as a context manager, for any code.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .geometry import ConvGeometry, TransposedGeometry

__all__ = ["MessagePassingMode", "message_passing", "route", "unroute", "is_routed", "CONV_FUNCTIONS"]

#: The torch functions routed, with (spatial dimensions, transposed). ``F.conv2d`` is ``torch.conv2d``.
CONV_FUNCTIONS: dict[Callable, tuple[int, bool]] = {
    torch.conv1d: (1, False), torch.conv2d: (2, False), torch.conv3d: (3, False),
    torch.conv_transpose1d: (1, True), torch.conv_transpose2d: (2, True), torch.conv_transpose3d: (3, True),
}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_TRANSPOSED_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")


def _bind(transposed: bool, args: tuple, kwargs: dict) -> dict:
    names = _TRANSPOSED_ARGS if transposed else _CONV_ARGS
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def unroutable(func: Callable, args: tuple, kwargs: Optional[dict] = None) -> Optional[str]:
    """Why a call of one of :data:`CONV_FUNCTIONS` cannot run as message passing (None: it can)."""
    ndim, transposed = CONV_FUNCTIONS[func]
    bound = _bind(transposed, args, kwargs or {})
    x, w, b = bound.get("input"), bound.get("weight"), bound.get("bias")
    for name, t in (("input", x), ("weight", w), ("bias", b)):
        if t is None and name != "bias":
            return f"no {name}"
        if t is not None and not isinstance(t, Tensor):
            return f"{name} is a {type(t).__name__}"
        if t is not None and (t.layout != torch.strided or t.is_quantized or t.is_nested):
            return f"{name} is a {t.layout} tensor" if t.layout != torch.strided else f"{name} is quantized or nested"
        if t is not None and not (t.is_floating_point() or t.is_complex()):
            return f"{name} has dtype {t.dtype}"
    if w.dim() != ndim + 2:
        return f"a weight of {w.dim()} dims for a {ndim}-d convolution"
    return None


def conv_call(func: Callable, args: tuple, kwargs: Optional[dict] = None) -> Tensor:
    """One call of ``F.convNd`` / ``F.conv_transposeNd`` computed by message passing (torch's semantics)."""
    from .nn import functional as F

    ndim, transposed = CONV_FUNCTIONS[func]
    bound = _bind(transposed, args, kwargs or {})
    x, w, b = bound["input"], bound["weight"], bound.get("bias")
    stride, padding = bound.get("stride", 1), bound.get("padding", 0)
    dilation, groups = bound.get("dilation", 1), int(bound.get("groups", 1))
    kernel = tuple(int(k) for k in w.shape[2:])
    name = f"{func.__name__} (routed)"
    if transposed:
        geometry = TransposedGeometry.from_keywords(ndim, kernel, stride, padding, bound.get("output_padding", 0),
                                                    dilation)
    else:
        geometry = ConvGeometry.from_keywords(ndim, kernel, stride, padding, dilation, "zeros")
    return F.conv_image(x, w, b, geometry, groups, name)


class MessagePassingMode(TorchFunctionMode):
    """Inside it, ``F.conv1d/2d/3d`` and ``F.conv_transpose1d/2d/3d`` compute by message passing on the
    pixel graph of their input (:func:`gridgraph.nn.functional.conv_image`), with torch's semantics: equal to
    torch's result (forward and backward), with its output strides. A call it cannot take (a quantized or
    sparse input, an integer dtype) runs torch's own function.

    ``record``, if given, is called as ``record(func, reason)`` for every convolution call: ``reason`` is None
    when it was routed, else why not.

    Example:
        >>> image, kernel = torch.randn(1, 1, 5, 5), torch.randn(1, 1, 3, 3)
        >>> with message_passing():
        ...     edges = torch.nn.functional.conv2d(image, kernel, padding=1)
        >>> torch.allclose(edges, torch.nn.functional.conv2d(image, kernel, padding=1), atol=1e-6)
        True
    """

    def __init__(self, record: Optional[Callable[[Callable, Optional[str]], None]] = None) -> None:
        super().__init__()
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in CONV_FUNCTIONS:
            reason = unroutable(func, args, kwargs)
            if self.record is not None:
                self.record(func, reason)
            if reason is None:
                return conv_call(func, args, kwargs)
        return func(*args, **kwargs)


def message_passing(record: Optional[Callable[[Callable, Optional[str]], None]] = None) -> MessagePassingMode:
    """A context manager in which every ``F.convNd`` / ``F.conv_transposeNd`` call (and so every torch
    convolution module's forward) runs as message passing: :class:`MessagePassingMode`.

    Example:
        >>> x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)
        >>> with message_passing():                          # F.conv2d computed on the pixel graph
        ...     y = torch.nn.functional.conv2d(x, w, padding=1)
        >>> torch.allclose(y, torch.nn.functional.conv2d(x, w, padding=1), atol=1e-5)
        True
    """
    return MessagePassingMode(record)


# --------------------------------------------------------------------------------- routed modules
class _Routed:
    """Mixin of a routed module's class: its own ``forward`` runs inside :class:`MessagePassingMode`."""

    _routed_base: type

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with MessagePassingMode():
            return super().forward(*args, **kwargs)  # type: ignore[misc]

    def __reduce_ex__(self, protocol: Any):
        # pickled and copied as the base class would be, then routed again (the routed class is made at run time)
        base = type(self)._routed_base
        self.__class__ = base
        try:
            reduced = self.__reduce_ex__(protocol)
        finally:
            self.__class__ = routed_class(base)
        return (_rebuild_routed, (reduced[0], reduced[1])) + tuple(reduced[2:])


def _rebuild_routed(constructor: Callable, args: tuple) -> nn.Module:
    module = constructor(*args)
    module.__class__ = routed_class(type(module))
    return module


_ROUTED: dict[type, type] = {}


def routed_class(base: type) -> type:
    """The routed subclass of ``base`` (one per class): ``isinstance(module, base)`` still holds."""
    if issubclass(base, _Routed):
        return base
    cls = _ROUTED.get(base)
    if cls is None:
        cls = _ROUTED[base] = type(base.__name__, (_Routed, base), {"_routed_base": base,
                                                                     "__module__": base.__module__,
                                                                     "__qualname__": base.__qualname__})
    return cls


def route(module: nn.Module) -> nn.Module:
    """Route ``module`` in place: its class becomes :func:`routed_class` of its own, so its ``forward`` runs
    its convolution calls as message passing. Returns ``module``."""
    module.__class__ = routed_class(type(module))
    return module


def unroute(module: nn.Module) -> nn.Module:
    """Undo :func:`route` in place. Returns ``module``."""
    if isinstance(module, _Routed):
        module.__class__ = type(module)._routed_base
    return module


def is_routed(module: Any) -> bool:
    """Whether ``module`` was routed by :func:`route`."""
    return isinstance(module, _Routed)

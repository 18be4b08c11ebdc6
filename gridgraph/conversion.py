"""Whole networks: swap every ``torch.nn`` convolution in a model for its message-passing twin, and back.

:func:`convert` replaces each ``nn.Conv2d`` by an :class:`ImageGridConv2d`: a :class:`~gridgraph.GridConv2d`
that, called like ``nn.Conv2d`` on an image ``(B, C, H, W)`` or ``(C, H, W)``, turns it into node
features, runs message passing on the (cached) pixel graph of its geometry and that image size, and
returns the output image. Its parameters are the convolution's own ``weight`` and ``bias`` (same names,
shapes, ``requires_grad``, device and dtype), so state dicts load both ways and, with ``inplace=True``,
an optimizer built before the conversion keeps training the converted model. :func:`unconvert` goes back.

Which module becomes which is one table, :data:`CONVERSIONS` (torch class -> gridgraph class): a new
convolution family is one entry there plus its image-facing layer class.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Optional

import torch
from torch import Tensor, nn

from . import routing
from .nn import functional as F
from .nn.grid_conv import GridConv1d, GridConv2d, GridConv3d, GridConvNd
from .nn.transposed_conv import ImageGridConvTranspose1d, ImageGridConvTranspose2d, ImageGridConvTranspose3d

__all__ = ["ImageGridConv2d", "ImageGridConv1d", "ImageGridConv3d", "CONVERSIONS", "convert", "unconvert",
           "converted_layers"]


class _ImageGridConv:
    """Mixin: the image-in, image-out ``forward`` of an ``nn.ConvNd`` twin (any number of dimensions).

    Called with an image it behaves like the torch convolution; called with node features and an
    ``edge_index`` it is the plain graph layer it extends.
    """

    _ndim: int

    def forward(self, input: Tensor, edge_index: Optional[Tensor] = None, edge_type: Optional[Tensor] = None,
                size: Optional[tuple[int, int]] = None) -> Tensor:
        if edge_index is not None or edge_type is not None:
            return super().forward(input, edge_index, edge_type, size)  # type: ignore[misc]
        # images -> node features (a view when channels-last) -> message passing on the pixel graph of this
        # geometry and size -> images with the strides nn.ConvNd would give them
        return F.conv_image(input, self.weight, self.bias, self.geometry, self.groups,  # type: ignore[attr-defined]
                            type(self).__name__)

    # ------------------------------------------------------------------ conversion
    @classmethod
    def _share_from_torch(cls, conv: nn.Module) -> "_ImageGridConv":
        """The twin of ``conv`` holding ``conv``'s own ``weight`` and ``bias`` Parameter objects.

        Nothing is copied (:func:`convert` copies the model first unless ``inplace=True``; the public
        ``from_conv2d`` makes an independent copy): the twin and ``conv`` share their parameters.
        """
        cls._check_torch_conv(conv)  # type: ignore[attr-defined]
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta",
                    dtype=conv.weight.dtype)
        layer.weight = conv.weight
        if conv.bias is not None:
            layer.bias = conv.bias
        layer.train(conv.training)
        if hasattr(conv, "_reversed_padding_repeated_twice"):  # the padding a non-zero mode pads with, as it is
            layer._reversed_padding_repeated_twice = list(conv._reversed_padding_repeated_twice)
        return layer

    def _share_to_torch(self) -> nn.Module:
        """The torch convolution holding this layer's own ``weight`` and ``bias`` Parameter objects."""
        torch_cls = self._torch_conv_class()  # type: ignore[attr-defined]
        conv = torch_cls(self.in_channels, self.out_channels, self.kernel_size, self.stride,  # type: ignore[attr-defined]
                         self.padding, self.dilation, self.groups, self.bias is not None,  # type: ignore[attr-defined]
                         self.padding_mode, device="meta", dtype=self.weight.dtype)  # type: ignore[attr-defined]
        conv.weight = self.weight  # type: ignore[attr-defined]
        if self.bias is not None:  # type: ignore[attr-defined]
            conv.bias = self.bias  # type: ignore[attr-defined]
        conv.train(self.training)  # type: ignore[attr-defined]
        if hasattr(self, "_reversed_padding_repeated_twice"):
            conv._reversed_padding_repeated_twice = list(self._reversed_padding_repeated_twice)
        return conv


class ImageGridConv2d(_ImageGridConv, GridConv2d):
    r"""A drop-in ``nn.Conv2d`` that computes by message passing on the pixel graph of its input.

    On an image it runs ``image -> node features -> message passing on the cached pixel graph ->
    output image``:

    .. math::
        \mathbf{x}'_i = \mathbf{b} + \sum_{(j \to i) \in \mathcal{E}} \mathbf{W}_{:, :, u, v} \, \mathbf{x}_j,
        \qquad \texttt{edge\_type}(j \to i) = u \cdot k_W + v ,

    where :math:`\mathcal{E}` is the pixel graph of the layer's geometry on the input's ``H x W`` grid
    (built once per size and device, then cached). Given node features and ``edge_index``/``edge_type``
    it is the plain :class:`~gridgraph.GridConv2d`. The constructor, parameters (``weight``, ``bias``)
    and ``state_dict`` keys are ``nn.Conv2d``'s; :func:`convert` puts it in place of every ``nn.Conv2d``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype:
            as in ``nn.Conv2d``.

    Shapes:
        - **input:** :math:`(B, C_{in}, H, W)` or :math:`(C_{in}, H, W)`
        - **output:** :math:`(B, C_{out}, H_{out}, W_{out})` or :math:`(C_{out}, H_{out}, W_{out})`,
          with ``nn.Conv2d``'s output size

    Example:
        >>> conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode='reflect')
        >>> twin = ImageGridConv2d.from_conv2d(conv)
        >>> image = torch.randn(2, 3, 9, 8)
        >>> twin(image).shape, torch.allclose(twin(image), conv(image), atol=1e-6)
        (torch.Size([2, 4, 5, 4]), True)
        >>> twin
        ImageGridConv2d(3, 4, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), padding_mode=reflect)
    """


class ImageGridConv1d(_ImageGridConv, GridConv1d):
    """A drop-in ``nn.Conv1d`` computing by message passing on the graph of its input sequence
    (:class:`ImageGridConv2d` with one spatial dimension; :func:`convert` puts it in place of ``nn.Conv1d``).

    Example:
        >>> conv = torch.nn.Conv1d(3, 4, 5, padding=2, padding_mode='circular')
        >>> twin = ImageGridConv1d.from_conv1d(conv)
        >>> x = torch.randn(2, 3, 16)
        >>> torch.allclose(twin(x), conv(x), atol=1e-6)
        True
    """


class ImageGridConv3d(_ImageGridConv, GridConv3d):
    """A drop-in ``nn.Conv3d`` computing by message passing on the graph of its input volume
    (:class:`ImageGridConv2d` with three spatial dimensions; :func:`convert` puts it in place of ``nn.Conv3d``).

    Example:
        >>> conv = torch.nn.Conv3d(2, 3, 3, stride=(1, 2, 2), padding=1)
        >>> twin = ImageGridConv3d.from_conv3d(conv)
        >>> x = torch.randn(1, 2, 4, 6, 6)
        >>> torch.allclose(twin(x), conv(x), atol=1e-6)
        True
    """


#: torch convolution class -> its image-facing message-passing twin. ``convert`` replaces modules whose
#: type is exactly a key; ``unconvert`` turns instances of the values back into the keys.
CONVERSIONS: dict[type[nn.Module], type[GridConvNd]] = {
    nn.Conv2d: ImageGridConv2d,
    nn.Conv1d: ImageGridConv1d,
    nn.Conv3d: ImageGridConv3d,
    nn.ConvTranspose1d: ImageGridConvTranspose1d,  # type: ignore[dict-item]
    nn.ConvTranspose2d: ImageGridConvTranspose2d,  # type: ignore[dict-item]
    nn.ConvTranspose3d: ImageGridConvTranspose3d,  # type: ignore[dict-item]
}


def _copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters keep the tensor hooks of the originals (``register_hook``,
    ``register_post_accumulate_grad_hook``), which ``copy.deepcopy`` of a Parameter drops: the copy behaves as
    the model does."""
    try:
        twin = copy.deepcopy(model)
    except Exception as error:  # e.g. non-leaf tensors held as attributes
        raise RuntimeError(f"convert could not copy the model ({type(error).__name__}: {error}); "
                           "convert it in place with inplace=True") from error
    copies = dict(twin.named_parameters(remove_duplicate=False))
    seen = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        twin_param = copies.get(name)
        if twin_param is None or id(twin_param) in seen:
            continue
        seen.add(id(twin_param))
        for attr in ("_backward_hooks", "_post_accumulate_grad_hooks"):
            hooks = getattr(param, attr, None)
            if hooks:
                for hook in hooks.values():
                    (twin_param.register_hook if attr == "_backward_hooks" else
                     twin_param.register_post_accumulate_grad_hook)(hook)
    return twin


def _replace(model: nn.Module, make, what: str) -> tuple[nn.Module, list[str]]:
    """Replace, in place, every submodule for which ``make(module)`` returns a module (shared modules
    stay shared), carrying each one's buffers, extra attributes and hooks over (:func:`_carry_state`).
    Returns the (possibly new) root and the qualified names replaced."""
    done: dict[int, nn.Module] = {}
    names: list[str] = []
    lost: list[str] = []
    for name, module in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(module._modules.items()):
            if child is None:
                continue
            qualified = f"{name}.{child_name}" if name else child_name
            new = done.get(id(child))
            if new is None:
                new = make(child)
                if new is None:
                    continue
                done[id(child)] = new
                lost += [f"{qualified}.{a}" for a in _carry_state(child, new)]
            module._modules[child_name] = new
            names.append(qualified)
    root = model
    new_root = make(model)
    if new_root is not None:
        lost += [f"(the model itself).{a}" for a in _carry_state(model, new_root)]
        root = new_root
        names.insert(0, "")
    if lost:
        warnings.warn(f"{what}: could not carry over {', '.join(sorted(set(lost)))}: the replacement module has "
                      "attributes of those names itself", UserWarning, stacklevel=3)
    return root, names


_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
          "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
          "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
_FRESH: dict[type, nn.Module] = {}


def _fresh(cls: type) -> nn.Module:
    """A module of ``cls`` as its constructor builds it: what it holds is not the user's own."""
    module = _FRESH.get(cls)
    if module is None:
        module = _FRESH[cls] = cls(1, 1, 1, device="meta")
    return module


def _carry_state(old: nn.Module, new: nn.Module) -> list[str]:
    """Move what ``old`` holds beyond a fresh module of its class onto ``new``: buffers (persistent or
    not), parameters other than ``weight``/``bias``, submodules, hooks (the same dicts, so their handles
    still remove them) and plain attributes (e.g. ``qconfig``). Returns the names it could not move."""
    lost = []
    fresh = _fresh(type(old))
    for name, buffer in old._buffers.items():
        if name not in fresh._buffers:
            new._buffers[name] = buffer
            if name in old._non_persistent_buffers_set:
                new._non_persistent_buffers_set.add(name)
    for name, param in old._parameters.items():
        if name not in fresh._parameters:
            new._parameters[name] = param
    for name, module in old._modules.items():
        if name not in fresh._modules:
            new._modules[name] = module
    for attr in _HOOKS:
        hooks = old.__dict__.get(attr)
        if hooks:
            new.__dict__[attr] = hooks
    # whether _backward_hooks holds full backward hooks (register_full_backward_hook) or the old kind: without
    # the flag torch would not call them
    if "_is_full_backward_hook" in old.__dict__:
        new.__dict__["_is_full_backward_hook"] = old.__dict__["_is_full_backward_hook"]
    own, twin_keys = frozenset(vars(fresh)), set(vars(new)) | set(dir(type(new)))
    for key, value in vars(old).items():
        if key in own or key in _HOOKS:
            continue
        if key in twin_keys:
            lost.append(key)
            continue
        new.__dict__[key] = value
    return lost


def _check_model(model: Any, name: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} expects an nn.Module (got {type(model).__name__})")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(f"{name} cannot rewrite a TorchScript module ({type(model).__name__}); "
                        "pass the eager nn.Module")


def convert(model: nn.Module, inplace: bool = False, example_input: Any = None) -> nn.Module:
    """Replace every ``nn.Conv2d`` in ``model`` by its message-passing twin, :class:`ImageGridConv2d`.

    The twins take and return images exactly like the convolutions they replace, with the same
    ``weight`` and ``bias`` (names, values, device, dtype, ``requires_grad``), so
    ``converted.load_state_dict(model.state_dict())`` and the reverse work. Training mode is kept,
    modules that are not convolutions are left alone, a convolution shared between places stays
    shared, and ``model`` itself may be a convolution.

    Every convolution of the model runs as message passing afterwards:

    * modules whose type is exactly a key of :data:`CONVERSIONS` (with ``weight`` and ``bias`` Parameters)
      are replaced by their twin (the fast path; ``unconvert`` gives the torch class back);
    * any other instance of a torch convolution class keeps its class and its own ``forward``, whose
      convolution call is routed through gridgraph (:func:`gridgraph.routing.route`): subclasses (a "same"
      padding computed from the input size, weight standardisation, scaled weights, a subclass that only adds
      methods), parametrised convolutions (``weight_norm``, ``spectral_norm``: same ``state_dict`` keys, the
      power iteration still runs in training), weights recomputed by a hook, fused QAT modules (``ConvBn2d``);
    * modules whose ``forward`` calls ``F.conv1d/2d/3d`` or ``F.conv_transpose1d/2d/3d`` themselves (a blur
      filter, per-sample experts, an edge filter) are routed too: found by running ``example_input`` through
      the model when it is given, else during the converted model's first call.

    What cannot be converted is left alone with a ``UserWarning`` naming each module and why: TorchScript
    submodules (their code is compiled, so their calls cannot be routed) and lazy convolutions not
    materialised yet (pass ``example_input``, or convert after the first forward). :func:`verify_model`
    reports every torch convolution that still runs, by running the model. A model with nothing to convert
    gives a ``UserWarning`` and comes back unchanged (a copy unless ``inplace``).

    Args:
        model (nn.Module): the network (or a single convolution).
        inplace (bool, optional): modify ``model`` itself, keeping its Parameter objects (so an optimizer
            built on ``model.parameters()`` still applies); otherwise work on a deep copy and leave
            ``model`` untouched (default: ``False``).
        example_input (Tensor or tuple, optional): the model's positional input(s) for one run (no gradients;
            buffers such as BatchNorm statistics are restored after it) that materialises lazy modules and
            finds functional convolution calls; without it they are found at the first call.

    Returns:
        nn.Module: the converted model (``model`` itself when ``inplace`` and it is not a convolution).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
        ...                           torch.nn.Conv2d(8, 4, 1))
        >>> twin = convert(net)
        >>> twin
        Sequential(
          (0): ImageGridConv2d(3, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
          (1): ReLU()
          (2): ImageGridConv2d(8, 4, kernel_size=(1, 1), stride=(1, 1))
        )
        >>> image = torch.randn(2, 3, 6, 6)
        >>> torch.allclose(twin(image), net(image), atol=1e-6)
        True
    """
    _check_model(model, "convert")
    if not inplace:
        model = _copy_model(model)
    inputs = None if example_input is None else (
        tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,))
    if inputs is not None and _has_lazy(model):
        _run_once(model, inputs)  # materialise lazy modules before deciding what they become

    def make(module: nn.Module) -> Optional[nn.Module]:
        target = CONVERSIONS.get(type(module))
        if target is not None and not _lazy(module) and all(
                isinstance(p, nn.Parameter) for p in (module.weight, module.bias) if p is not None):
            return target._share_from_torch(module)  # type: ignore[attr-defined]
        return None

    root, names = _replace(model, make, "convert")
    left: dict[str, str] = {}
    for name, module in _modules_outside_script(root, left):
        if isinstance(module, _TORCH_CONVS) and not isinstance(module, _TWINS) and not routing.is_routed(module):
            if _lazy(module):
                left[name or "(the model itself)"] = (
                    f"a lazy {type(module).__name__} not materialised yet: pass example_input to convert, or "
                    "convert after the model's first forward")
                continue
            routing.route(module)  # its own forward, its convolution call as message passing
            names.append(name)
    if inputs is not None:
        names += _route_functional(root, _find_functional(root, inputs))
    else:
        for name, module in _modules_outside_script(root, left):  # the code of their class names one
            if _calls_conv_functions(module) and not isinstance(module, _TWINS) and not routing.is_routed(module):
                routing.route(module)
                names.append(name)
        if not isinstance(root, _TWINS):  # calls through other functions: found at the first call
            _FirstCall.install(root)
    if left:
        warnings.warn("convert left these torch convolutions as they are: "
                      + "; ".join(f"{n}: {why}" for n, why in sorted(left.items())), UserWarning, stacklevel=2)
    if not names and inputs is not None:
        kinds = ", ".join(f"nn.{k.__name__}" for k in CONVERSIONS)
        warnings.warn(f"convert found nothing to convert in {type(model).__name__}: it contains no {kinds} "
                      "(nor a subclass) and calls no functional convolution on example_input; the model is "
                      "returned unchanged", UserWarning, stacklevel=2)
    elif not names:
        kinds = ", ".join(f"nn.{k.__name__}" for k in CONVERSIONS)
        warnings.warn(f"convert found nothing to convert in {type(model).__name__}: it contains no {kinds} (nor a "
                      "subclass); functional convolution calls in its forward, if any, are routed at its first call "
                      "(pass example_input to find them now)", UserWarning, stacklevel=2)
    return root


_TORCH_CONVS = tuple(CONVERSIONS)
_TWINS = tuple(CONVERSIONS.values())


def _lazy(module: nn.Module) -> bool:
    return any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters(recurse=False))


def _has_lazy(model: nn.Module) -> bool:
    return any(_lazy(m) for m in model.modules())


def _modules_outside_script(model: nn.Module, left: dict[str, str]):
    """``named_modules`` without descending into TorchScript submodules (noted in ``left`` when they hold a
    convolution: their compiled code cannot be routed)."""
    stack = [("", model)]
    seen: set[int] = set()
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, torch.jit.ScriptModule):
            if any(getattr(m, "original_name", "").startswith(("Conv", "ConvTranspose")) for m in module.modules()):
                left[name or "(the model itself)"] = ("a TorchScript module: its compiled code calls torch's "
                                                     "convolution directly and cannot be routed")
            continue
        yield name, module
        for child_name, child in reversed(list(module._modules.items())):
            if child is not None:
                stack.append((f"{name}.{child_name}" if name else child_name, child))


def _run_once(model: nn.Module, inputs: tuple, mode: Optional[Any] = None) -> None:
    """Run ``model`` on ``inputs`` without gradients, restoring its buffers (BatchNorm statistics) after."""
    from .verify import _state_kept

    with _state_kept(model, model), torch.no_grad():
        if mode is None:
            model(*inputs)
        else:
            with mode:
                model(*inputs)


class _CallStack:
    """The innermost module running, by forward hooks on every module of a model (for one run)."""

    def __init__(self, model: nn.Module) -> None:
        self.root = model  # the innermost module when no other runs (not hooked: the first-call hooks run on it)
        self.stack: list[nn.Module] = []
        self.handles = []
        for module in _hookable(model):
            if module is not model:
                self.handles.append(module.register_forward_pre_hook(self._push))
                self.handles.append(module.register_forward_hook(self._pop, always_call=True))

    @property
    def innermost(self) -> nn.Module:
        return self.stack[-1] if self.stack else self.root

    def _push(self, module, args):
        self.stack.append(module)

    def _pop(self, module, args, output):
        if self.stack and self.stack[-1] is module:
            self.stack.pop()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


_CONV_NAMES = frozenset(f.__name__ for f in routing.CONV_FUNCTIONS)


def _calls_conv_functions(module: nn.Module) -> bool:
    """Whether the code of ``module``'s class (its own methods, not torch's) names a functional convolution
    (``F.conv2d``, ``torch.conv_transpose2d``, ...)."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith(("torch.", "gridgraph.")) or cls is object:
            continue
        for value in vars(cls).values():
            func = getattr(value, "__func__", value)
            code = getattr(func, "__code__", None)
            if code is not None and _code_names(code) & _CONV_NAMES:
                return True
    return False


def _code_names(code) -> set:
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= _code_names(const)
    return names


def _hookable(model: nn.Module):
    """The modules of ``model`` that take Python hooks (not inside a TorchScript module)."""
    stack = [model]
    seen: set[int] = set()
    while stack:
        module = stack.pop()
        if id(module) in seen or isinstance(module, torch.jit.ScriptModule):
            continue
        seen.add(id(module))
        yield module
        stack.extend(c for c in module._modules.values() if c is not None)


def _recording_mode(calls: _CallStack, found: dict) -> routing.MessagePassingMode:
    def record(func, reason):
        found.setdefault(calls.innermost, []).append((func, reason))
    return routing.MessagePassingMode(record)


def _find_functional(model: nn.Module, inputs: tuple) -> dict:
    """The modules whose own ``forward`` called a functional convolution on ``inputs`` (innermost module). The
    run is made on a copy of the model where one can be made, so that nothing the model keeps between calls
    (caches in plain attributes, e.g. attention biases cached in eval mode) is left from a run without
    gradients; the modules found are those of ``model`` at the same paths."""
    try:
        probe = copy.deepcopy(model)
    except Exception:  # noqa: BLE001  (an uncopyable model: the run is made on it, buffers restored)
        probe = model
    calls = _CallStack(probe)
    found: dict = {}
    try:
        _run_once(probe, inputs, _recording_mode(calls, found))
    finally:
        calls.remove()
    if probe is model:
        return found
    names = {id(m): n for n, m in probe.named_modules()}
    modules = dict(model.named_modules())
    return {modules[names[id(m)]]: calls for m, calls in found.items() if names.get(id(m)) in modules}


def _route_functional(model: nn.Module, found: dict) -> list[str]:
    """Route each module of ``found`` (see :func:`_find_functional`); warn for calls that cannot be routed."""
    names = {id(m): n for n, m in model.named_modules()}
    routed, refused = [], []
    for module, calls in found.items():
        reasons = sorted({r for _, r in calls if r is not None})
        if reasons:
            refused.append(f"{names.get(id(module)) or '(the model itself)'}: {', '.join(reasons)}")
        if isinstance(module, _TWINS) or routing.is_routed(module) or isinstance(module, torch.jit.ScriptModule):
            continue
        routing.route(module)
        routed.append(names.get(id(module), ""))
    if refused:
        warnings.warn("these convolution calls stay torch's (their arguments cannot run as message passing): "
                      + "; ".join(refused), UserWarning, stacklevel=3)
    return routed


class _FirstCall:
    """Finds functional convolutions during a converted model's first call (when ``convert`` had no example
    input): the call runs inside a recording :class:`~gridgraph.routing.MessagePassingMode` (so its
    convolutions are message passing already), and the modules that made them are routed for later calls.
    The hooks are module-level functions (a converted model pickles and copies before its first call too)."""

    @staticmethod
    def install(model: nn.Module) -> None:
        model.register_forward_pre_hook(_first_call_before)
        model.register_forward_hook(_first_call_after, always_call=True)

    @staticmethod
    def installed(model: nn.Module) -> bool:
        return any(h is _first_call_before for h in model._forward_pre_hooks.values()) and \
            not model.__dict__.get("_gridgraph_first_call_done")

    @staticmethod
    def run_now(model: nn.Module, inputs: tuple) -> None:
        """Find and route now what the first call would (on a copy of the model, see :func:`_find_functional`)."""
        if _FirstCall.installed(model):
            model.__dict__["_gridgraph_first_call_done"] = True
            _route_functional(model, _find_functional(model, inputs))

    @staticmethod
    def remove(model: nn.Module) -> None:
        for hooks, fn in ((model._forward_pre_hooks, _first_call_before), (model._forward_hooks, _first_call_after)):
            for key in [k for k, h in hooks.items() if h is fn]:
                del hooks[key]
                model._forward_hooks_always_called.pop(key, None)
        model.__dict__.pop("_gridgraph_first_call_done", None)


def _first_call_before(model: nn.Module, args: Any) -> None:
    if model.__dict__.get("_gridgraph_first_call_done"):  # later calls: nothing to find (two no-op hooks stay:
        return                                             # a hook cannot remove itself while torch runs them)
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return  # left to an eager call (or convert(..., example_input=...))
    calls = _CallStack(model)
    found: dict = {}
    mode = _recording_mode(calls, found)
    model.__dict__["_gridgraph_first_call_state"] = (calls, found, mode)
    mode.__enter__()


def _first_call_after(model: nn.Module, args: Any, output: Any) -> None:
    state = model.__dict__.pop("_gridgraph_first_call_state", None)
    if state is None:
        return
    calls, found, mode = state
    mode.__exit__(None, None, None)
    calls.remove()
    model.__dict__["_gridgraph_first_call_done"] = True
    _route_functional(model, found)


def unconvert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The inverse of :func:`convert`: every :class:`ImageGridConv2d` becomes an ``nn.Conv2d`` again.

    Weights (values, device, dtype, ``requires_grad``) and training mode are kept; ``inplace=True``
    keeps the Parameter objects themselves. A model with nothing to unconvert gives a ``UserWarning``.

    Args:
        model (nn.Module): a model returned by :func:`convert` (or a single converted layer).
        inplace (bool, optional): modify ``model`` itself instead of a deep copy (default: ``False``).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3))
        >>> back = unconvert(convert(net))
        >>> type(back[0]).__name__, torch.equal(back[0].weight, net[0].weight)
        ('Conv2d', True)
    """
    _check_model(model, "unconvert")
    if not inplace:
        model = _copy_model(model)
    targets = tuple(CONVERSIONS.values())

    def make(module: nn.Module) -> Optional[nn.Module]:
        return module._share_to_torch() if isinstance(module, targets) else None  # type: ignore[attr-defined]

    root, names = _replace(model, make, "unconvert")
    for name, module in root.named_modules():
        if routing.is_routed(module):
            routing.unroute(module)
            names.append(name)
    _FirstCall.remove(root)
    if not names:
        warnings.warn(f"unconvert found nothing to unconvert in {type(model).__name__}: it contains no "
                      f"{'/'.join(t.__name__ for t in targets)}; the model is returned unchanged",
                      UserWarning, stacklevel=2)
    return root


def converted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The converted layers of ``model`` by qualified name (``''`` for the model itself).

    Example:
        >>> list(converted_layers(convert(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3), torch.nn.ReLU()))))
        ['0']
    """
    targets = tuple(CONVERSIONS.values())
    return {name: m for name, m in model.named_modules() if isinstance(m, targets) or routing.is_routed(m)}

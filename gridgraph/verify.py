"""Equivalence checks: every gridgraph layer against the torch module it mirrors, and whole converted models.

:func:`verify_layers` runs a table of ``nn.Conv2d`` configurations through :class:`~gridgraph.GridConv2d`
(weights moved with ``from_conv2d``) on both computation paths (the neighbour-table fast path and the
general edge-list path), forward and backward, and reports the largest errors. Errors are measured
relative to the data: ``max|out - ref| / max(1, max|ref|)``.

:func:`verify_model` runs a model and its :func:`~gridgraph.convert`-ed twin side by side and reports,
per converted layer (through forward hooks), the error of the layer alone and inside the network, then
the outputs and the gradients of every parameter (:class:`ModelReport`). :func:`verify_reference_models`
does it for the networks of :mod:`gridgraph.models`; :func:`check_model` and :func:`load_model` serve
``gridgraph verify --model module:attribute``.
"""
from __future__ import annotations

import contextlib
import copy
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch

from .conversion import _TORCH_CONVS, CONVERSIONS, _FirstCall, convert, converted_layers
from .routing import is_routed
from .graph import graph_to_image, image_to_graph
from .nn import GridConv2d

__all__ = ["LayerCase", "CaseResult", "LayerReport", "LAYER_CASES", "QUICK_LAYER_CASES", "TOLERANCES",
           "check_layer_case", "verify_layers", "available_devices", "no_tf32",
           "ModelLayerResult", "Comparison", "ModelReport", "verify_model", "check_model", "verify_reference_models",
           "load_model", "models_summary"]

#: Largest accepted error, relative to ``max(1, max|reference|)``, per dtype.
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-5}


@dataclass(frozen=True)
class LayerCase:
    """One ``nn.Conv2d`` configuration and the input it is checked on."""

    in_channels: int
    out_channels: int
    kernel_size: Any
    stride: Any = 1
    padding: Any = 0
    dilation: Any = 1
    groups: int = 1
    bias: bool = True
    padding_mode: str = "zeros"
    image: tuple[int, int] = (9, 11)
    batch: int = 2

    def conv_kwargs(self) -> dict:
        return dict(kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                    dilation=self.dilation, groups=self.groups, bias=self.bias, padding_mode=self.padding_mode)

    def describe(self) -> str:
        """The configuration, e.g. ``'4->6 k3 s2 p1 d1 g2 reflect'``."""
        k = self.kernel_size if isinstance(self.kernel_size, int) else "x".join(map(str, self.kernel_size))
        s = f"{self.in_channels}->{self.out_channels} k{k} s{self.stride} p{self.padding!r} d{self.dilation}"
        if self.groups != 1:
            s += f" g{self.groups}"
        if not self.bias:
            s += " nobias"
        if self.padding_mode != "zeros":
            s += f" {self.padding_mode}"
        return s

    def describe_input(self) -> str:
        """The input it is checked on: batch and image size, e.g. ``'B2 9x11'``."""
        return f"B{self.batch} {self.image[0]}x{self.image[1]}"


C = LayerCase
#: The built-in table of layer configurations (kernels 1, 2, 3, 5, 7 and rectangular; strides; paddings;
#: dilations; groups; all four padding modes; bias off; odd, non-square, tiny images and batch 0).
LAYER_CASES: tuple[LayerCase, ...] = (
    C(4, 6, 3, padding=1),
    C(4, 6, 1),
    C(4, 6, 1, stride=2),
    C(4, 6, 2),
    C(4, 6, 2, padding="same"),
    C(4, 6, 5, padding=2, bias=False),
    C(3, 8, 7, stride=2, padding=3, image=(15, 13)),
    C(4, 6, (1, 7), padding=(0, 3)),
    C(4, 6, (3, 2), padding="same"),
    C(4, 6, 3, stride=2, padding=1),
    C(4, 6, 3, stride=3, padding=2),
    C(4, 6, 3, stride=(1, 2), padding=(2, 1)),
    C(4, 6, 3, padding="valid"),
    C(4, 6, 3, dilation=2, padding=2),
    C(4, 6, 3, dilation=3, padding="same"),
    C(4, 6, 3, dilation=(1, 2), padding=1, stride=2),
    C(4, 6, 3, padding=1, groups=2),
    C(4, 4, 3, padding=1, groups=4),
    C(4, 8, 3, padding=1, groups=4, bias=False),
    C(4, 6, 3, padding=1, padding_mode="reflect"),
    C(4, 6, 3, padding=2, padding_mode="replicate", stride=2),
    C(4, 6, 3, padding=1, padding_mode="circular"),
    C(4, 6, 5, padding="same", padding_mode="circular", dilation=2),
    C(4, 6, (3, 2), padding="same", padding_mode="reflect", groups=2),
    C(4, 8, 3, padding=1, groups=4, padding_mode="replicate", dilation=2),
    C(4, 6, 3, padding=1, image=(1, 1)),
    C(4, 6, 3, image=(3, 3)),
    C(2, 3, 3, padding=1, image=(2, 7), batch=1),
    C(4, 6, 3, padding=1, batch=0),
)
#: The representative subset of :data:`LAYER_CASES` that ``gridgraph verify --quick`` checks.
QUICK_LAYER_CASES: tuple[LayerCase, ...] = tuple(LAYER_CASES[i] for i in (0, 1, 6, 8, 10, 13, 16, 18, 19, 21, 22, 28))


@dataclass
class CaseResult:
    """The outcome of one case on one device, dtype and computation path."""

    case: LayerCase
    device: str
    dtype: torch.dtype
    path: str  # 'table' (pixel graph fast path) or 'edges' (general edge-list path)
    forward_error: float
    gradient_error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.forward_error <= self.tolerance and self.gradient_error <= self.tolerance


@dataclass
class LayerReport:
    """All results of :func:`verify_layers`, printable as a table."""

    results: list[CaseResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def max_forward_error(self) -> dict:
        return _max_by_dtype(self.results, "forward_error")

    @property
    def max_gradient_error(self) -> dict:
        return _max_by_dtype(self.results, "gradient_error")

    def table(self) -> str:
        """A markdown table, one row per result, its columns padded to line up in a terminal.

        Example:
            >>> print(verify_layers(LAYER_CASES[:1], dtypes=[torch.float64], devices=['cpu']).table())
            ... # doctest: +ELLIPSIS
            | configuration    | input   | device | dtype   | path  | max err fwd | max err grad | result |
            |------------------|---------|--------|---------|-------|------------:|-------------:|--------|
            | 4->6 k3 s1 p1 d1 | B2 9x11 | cpu    | float64 | table |    ...e-16 |     ...e-16 | pass   |
            | 4->6 k3 s1 p1 d1 | B2 9x11 | cpu    | float64 | edges |    ...e-16 |     ...e-16 | pass   |
        """
        rows = [(r.case.describe(), r.case.describe_input(), r.device, _short(r.dtype), r.path,
                 f"{r.forward_error:.2e}", f"{r.gradient_error:.2e}", "pass" if r.passed else "FAIL")
                for r in self.results]
        return _format_table(["configuration", "input", "device", "dtype", "path", "max err fwd", "max err grad",
                             "result"], rows, numeric=[5, 6])

    def summary(self) -> str:
        """One line: the verdict, how many checks of how many configurations, the time, the largest errors."""
        failed = sum(not r.passed for r in self.results)
        worst = ", ".join(f"{_short(d)} {self.max_forward_error[d]:.1e} / {self.max_gradient_error[d]:.1e}"
                          for d in self.max_forward_error)
        verdict = "PASS" if failed == 0 else f"FAIL ({failed} {'mismatch' if failed == 1 else 'mismatches'})"
        return (f"{verdict}: {_count(len(self.results), 'check')} of "
                f"{_count(len({r.case for r in self.results}), 'configuration')} "
                f"in {_format_seconds(self.seconds)}; max relative error (fwd / grad): "
                f"{worst or 'none'}")

    def to_dict(self) -> dict:
        """The report as plain data for JSON (non-finite numbers as the strings ``'inf'`` / ``'nan'``)."""
        return {"passed": self.passed, "seconds": self.seconds, "summary": self.summary(),
                "results": [{"configuration": r.case.describe(), "input": r.case.describe_input(),
                             "device": r.device, "dtype": _short(r.dtype), "path": r.path,
                             "forward_error": _json_number(r.forward_error),
                             "gradient_error": _json_number(r.gradient_error), "tolerance": r.tolerance,
                             "passed": r.passed} for r in self.results]}

    def __str__(self) -> str:
        return self.table() + "\n\n" + self.summary()


def _short(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _count(n: int, noun: str) -> str:
    """``'1 check'``, ``'2 checks'``."""
    return f"{n} {noun}{'s' if n != 1 else ''}"


def _json_number(value: float) -> Any:
    """``value``, or ``'inf'`` / ``'nan'`` where it is not finite (JSON has no such numbers)."""
    return value if math.isfinite(value) else str(value)


def _format_seconds(seconds: float) -> str:
    """A duration that reads well at every scale: ``'4.2 ms'``, ``'31 ms'``, ``'1.6 s'``.

    Example:
        >>> _format_seconds(0.0042), _format_seconds(0.0314), _format_seconds(1.62)
        ('4.2 ms', '31 ms', '1.6 s')
    """
    if seconds < 0.01:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 1:
        return f"{seconds * 1e3:.0f} ms"
    return f"{seconds:.1f} s"


def _format_table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = ()) -> str:
    """A markdown table whose columns are padded to a common width (numeric columns right-aligned), so that
    it reads as a table in a terminal too.

    Example:
        >>> print(_format_table(["name", "error"], [["a", "1.0e-16"], ["longer", "3e-7"]], numeric=[1]))
        | name   |   error |
        |--------|--------:|
        | a      | 1.0e-16 |
        | longer |    3e-7 |
    """
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"a row has {len(row)} cells, the header {len(header)}: {list(row)}")
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in numeric else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if i in numeric else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule] + [line(row) for row in rows])


def _max_by_dtype(results: Sequence[CaseResult], attr: str) -> dict:
    out: dict = {}
    for r in results:
        out[r.dtype] = max(out.get(r.dtype, 0.0), getattr(r, attr))
    return out


def available_devices() -> list[str]:
    """``['cpu']``, plus ``'cuda'`` when a GPU is present."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """Disable TF32 in cuDNN and matmul (cuDNN uses it by default), restoring the settings after."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.shape != ref.shape:
        return float("inf")
    if ref.numel() == 0:
        return 0.0
    scale = max(1.0, ref.detach().abs().max().item())
    return (out.detach() - ref.detach()).abs().max().item() / scale


def check_layer_case(case: LayerCase, dtype: torch.dtype = torch.float64, device: Any = "cpu",
                     seed: int = 0, paths: Iterable[str] = ("table", "edges")) -> list[CaseResult]:
    """Check one configuration: ``GridConv2d.from_conv2d(conv)`` against ``conv`` itself.

    Forward output and the gradients of input, weight and bias (for a random upstream gradient) are
    compared, once per computation path.
    """
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    with no_tf32(), warnings.catch_warnings():
        # The reference itself warns that even 'same' kernels pad a copy of the input: not our concern.
        warnings.filterwarnings("ignore", message="Using padding='same'", category=UserWarning)
        torch.manual_seed(seed)
        conv = torch.nn.Conv2d(case.in_channels, case.out_channels, **case.conv_kwargs()).to(device, dtype)
        layer = GridConv2d.from_conv2d(conv)
        image = torch.randn(case.batch, case.in_channels, *case.image, generator=gen, dtype=dtype).to(device)
        image.requires_grad_(True)
        ref = conv(image)
        upstream = torch.randn(ref.shape, generator=gen, dtype=dtype).to(device)
        ref_params = [conv.weight] + ([conv.bias] if conv.bias is not None else [])
        ref_grads = torch.autograd.grad(ref, [image, *ref_params], upstream, allow_unused=True)
        results = []
        for path in paths:
            g = image_to_graph(image, layer)
            results.append(_compare_path(case, layer, g, path, image, upstream, ref, ref_grads, device, dtype))
    return results


def _compare_path(case: Any, layer: torch.nn.Module, g: Any, path: str, image: torch.Tensor,
                  upstream: torch.Tensor, ref: torch.Tensor, ref_grads: Sequence[Optional[torch.Tensor]],
                  device: torch.device, dtype: torch.dtype) -> CaseResult:
    """Run ``layer`` on graph ``g`` by one path ('table': the graph's own edges; 'edges': a copy without
    its table, so the general edge-list path) and compare output and gradients with the reference's."""
    edge_index = g.edge_index if path == "table" else g.edge_index.as_tensor()  # a plain edge list
    out = graph_to_image(layer(g.x, edge_index, g.edge_type, size=g.size()), g, side="output")
    params = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
    grads = torch.autograd.grad(out, [image, *params], upstream, allow_unused=True)
    grad_error = max(_relative_error(_zero_if_none(a, b), _zero_if_none(b, a)) for a, b in zip(grads, ref_grads))
    return CaseResult(case, str(device), dtype, path, _relative_error(out, ref), grad_error, TOLERANCES[dtype])


def _zero_if_none(t: Optional[torch.Tensor], like: Optional[torch.Tensor]) -> torch.Tensor:
    if t is not None:
        return t
    return torch.zeros_like(like) if like is not None else torch.zeros(0)


def verify_layers(cases: Sequence[LayerCase] = LAYER_CASES, dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64),
                  devices: Optional[Sequence[Any]] = None, seed: int = 0,
                  progress: Optional[Callable[[LayerReport], None]] = None) -> LayerReport:
    """Run :func:`check_layer_case` over ``cases`` x ``dtypes`` x ``devices`` (default: every available one).

    ``progress``, if given, is called with the report of each device and dtype as it finishes.

    Example:
        >>> report = verify_layers(LAYER_CASES[:2], dtypes=[torch.float64], devices=['cpu'])
        >>> report.passed, len(report.results)
        (True, 4)
    """
    return _run_cases(check_layer_case, cases, dtypes, devices, seed, progress)


def _run_cases(check, cases: Sequence[Any], dtypes: Sequence[torch.dtype], devices: Optional[Sequence[Any]],
               seed: int, progress: Optional[Callable[[LayerReport], None]] = None) -> LayerReport:
    """``check(case, dtype, device, seed=...)`` over every case, dtype and device, gathered in one report;
    ``progress(part)`` after each device and dtype, ``part`` being the report of that group alone."""
    report = LayerReport()
    for device in devices or available_devices():
        for dtype in dtypes:
            part = LayerReport()
            start = time.perf_counter()
            for i, case in enumerate(cases):
                part.results.extend(check(case, dtype, device, seed=seed + i))
            part.seconds = time.perf_counter() - start
            report.results.extend(part.results)
            report.seconds += part.seconds
            if progress is not None:
                progress(part)
    return report


# ================================================================================ whole models
@dataclass
class ModelLayerResult:
    """One converted layer of a model, on one call (a shared layer called twice has two rows).

    Errors are max absolute errors against the original layer's output in the same run:
    ``alone`` feeds the converted layer the original layer's own input (the layer's error by itself),
    ``in_network`` compares its output inside the converted model (errors of earlier layers included).
    ``weight_grad``/``bias_grad`` compare the gradients of the layer's parameters (``nan``: not checked).
    ``tolerance`` (outputs) and ``grad_tolerance`` are absolute: ``tol * max(1, max|reference output|)``
    and ``tol * (largest gradient of the model)``.
    """

    name: str
    configuration: str
    grid: str
    alone: float
    in_network: float
    tolerance: float
    weight_grad: float = float("nan")
    bias_grad: float = float("nan")
    grad_tolerance: float = float("inf")
    network_tolerance: Optional[float] = None  # the in-network error's own (default: ``tolerance``)
    backward_alone: float = float("nan")  # the layer's own backward (input, weight, bias gradients), or nan
    backward_tolerance: float = float("inf")
    grads_waived: bool = False  # its network gradients are among those waived (see ModelReport.notes)

    @property
    def passed(self) -> bool:
        return self.own_passed and (self.grads_waived or all(g <= self.grad_tolerance for g in
                                                             (self.weight_grad, self.bias_grad) if g == g))

    @property
    def own_passed(self) -> bool:
        """Whether the layer passes by itself (forward alone and in the network, and its own backward)."""
        network = self.tolerance if self.network_tolerance is None else self.network_tolerance
        return (self.alone <= self.tolerance and self.in_network <= network
                and not self.backward_alone > self.backward_tolerance)


@dataclass
class Comparison:
    """A compared tensor (a model output, a parameter gradient, the input gradient)."""

    name: str
    error: float       # max absolute error
    scale: float       # max(1, max|reference|) for outputs; the model's largest gradient for gradients
    tolerance: float   # absolute: tol * scale
    waived: bool = False  # beyond tolerance, but explained by torch's own rounding (see ModelReport.notes)

    @property
    def passed(self) -> bool:
        return self.error <= self.tolerance or self.waived


@dataclass
class ModelReport:
    """What :func:`verify_model` found: per-layer rows, outputs, gradients and the verdict.

    ``str(report)`` is a table (layer name, configuration, grid, max abs error alone and in the network,
    gradient errors, tolerance, pass/fail) followed by the output and gradient comparisons and a
    one-line summary. ``seconds`` is the wall time of the whole check: both models run forward (and
    backward with ``grads``), every layer replayed alone, every comparison; :func:`check_model` adds
    the copy and the conversion of the model.

    Example:
        >>> net = reference_model("resnet", dtype=torch.float64)
        >>> report = verify_model(net, convert(net), torch.randn(2, 3, 16, 16, dtype=torch.float64))
        >>> report.passed, report.max_output_error < 1e-10
        (True, True)
    """

    name: str
    dtype: torch.dtype
    device: str
    tol: float
    layers: list[ModelLayerResult] = field(default_factory=list)
    outputs: list[Comparison] = field(default_factory=list)
    gradients: list[Comparison] = field(default_factory=list)  # every parameter, then the inputs
    unconverted: list[str] = field(default_factory=list)       # torch convolutions still in the converted model
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)             # how the tolerances of a low-precision run were set

    @property
    def passed(self) -> bool:
        return (bool(self.layers) and all(r.passed for r in self.layers)
                and all(c.passed for c in self.outputs + self.gradients) and not self.unconverted)

    @property
    def max_layer_error(self) -> float:
        """Largest max-abs error of any converted layer's output (alone or in the network)."""
        return max((max(r.alone, r.in_network) for r in self.layers), default=0.0)

    @property
    def max_output_error(self) -> float:
        return max((c.error for c in self.outputs), default=0.0)

    @property
    def max_gradient_error(self) -> float:
        return max((c.error for c in self.gradients), default=float("nan"))

    def table(self) -> str:
        """A markdown table, one row per converted layer call, its columns padded to line up."""
        rows = []
        for r in self.layers:
            grads = ", ".join(f"{g:.1e}" for g in (r.weight_grad, r.bias_grad) if g == g) or "-"
            rows.append((r.name, r.configuration, r.grid, f"{r.alone:.1e}", f"{r.in_network:.1e}", grads,
                         f"{r.tolerance:.1e}", "pass" if r.passed else "FAIL"))
        return _format_table(["layer", "configuration", "grid", "err alone", "err in network", "grad err (w, b)",
                              "tol", "result"], rows, numeric=[3, 4, 5, 6])

    def details(self) -> str:
        """The output and gradient comparisons (and any convolution left unconverted), one line each."""
        lines = []
        for c in self.outputs:
            lines.append(f"{c.name}: max abs error {c.error:.2e} (tol {c.tolerance:.1e}) "
                         f"{'pass' if c.passed else 'FAIL'}")
        if self.gradients:
            worst = max(self.gradients, key=lambda c: c.error / c.tolerance if c.tolerance else c.error)
            failed = [c.name for c in self.gradients if not c.passed]
            lines.append(f"gradients of {len(self.gradients)} tensors (every parameter and the input): largest abs "
                         f"error {self.max_gradient_error:.2e}; closest to its tolerance: {worst.name} "
                         f"{worst.error:.2e} (tol {worst.tolerance:.1e})"
                         + (f"; FAILED: {', '.join(failed)}" if failed else ""))
        if self.unconverted:
            lines.append(f"not converted (still torch convolutions): {', '.join(self.unconverted)}")
        lines.extend(self.notes)
        return "\n".join(lines)

    def summary(self) -> str:
        """One line: verdict, name, dtype and device, layer calls, largest errors and the time taken."""
        failed = sum(not r.passed for r in self.layers)
        verdict = "PASS" if self.passed else "FAIL"
        grads = f", gradients {self.max_gradient_error:.1e}" if self.gradients else ""
        return (f"{verdict} {self.name} [{_short(self.dtype)}, {self.device}]: {len(self.layers)} converted layer "
                f"calls, {failed} failing; largest abs errors: layers {self.max_layer_error:.1e}, outputs "
                f"{self.max_output_error:.1e}{grads}; {_format_seconds(self.seconds)}")

    def to_dict(self) -> dict:
        """The report as plain data for JSON (errors not checked are ``None``; infinite ones ``'inf'``)."""
        def number(value: float) -> Any:
            return None if value != value else _json_number(value)

        def comparison(c: Comparison) -> dict:
            return {"name": c.name, "error": number(c.error), "scale": c.scale, "tolerance": c.tolerance,
                    "passed": c.passed}

        return {"name": self.name, "dtype": _short(self.dtype), "device": self.device, "tol": self.tol,
                "passed": self.passed, "seconds": self.seconds, "summary": self.summary(),
                "layers": [{"name": r.name, "configuration": r.configuration, "grid": r.grid,
                            "alone": number(r.alone), "in_network": number(r.in_network),
                            "tolerance": r.tolerance, "weight_grad": number(r.weight_grad),
                            "bias_grad": number(r.bias_grad), "grad_tolerance": number(r.grad_tolerance),
                            "passed": r.passed} for r in self.layers],
                "outputs": [comparison(c) for c in self.outputs],
                "gradients": [comparison(c) for c in self.gradients],
                "unconverted": list(self.unconverted)}

    def __str__(self) -> str:
        return "\n".join(p for p in (self.table(), self.details(), self.summary()) if p)


def _flatten(value: Any, prefix: str = "output") -> list[tuple[str, Any]]:
    """Leaves of a (nested) tuple / list / dict of tensors, with their paths."""
    if isinstance(value, torch.Tensor):
        return [(prefix, value)]
    if isinstance(value, dict):
        return [leaf for k in sorted(value, key=str) for leaf in _flatten(value[k], f"{prefix}[{k!r}]")]
    if isinstance(value, (tuple, list)):
        return [leaf for i, v in enumerate(value) for leaf in _flatten(v, f"{prefix}[{i}]")]
    return [(prefix, value)]


def _abs_error(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """``(max|out - ref|, max(1, max|ref|))``; ``inf`` error on a shape mismatch."""
    if out.shape != ref.shape:
        return float("inf"), 1.0
    if ref.numel() == 0:
        return 0.0, 1.0
    ref = ref.detach()
    return (out.detach() - ref).abs().max().item(), max(1.0, ref.abs().max().item())


def _describe_conv(module: torch.nn.Module) -> str:
    """``'C_in->C_out <geometry> [gG] [nobias]'`` of a converted layer (a routed one: its class and routing)."""
    if is_routed(module) and not isinstance(module, _TORCH_CONVS):
        return f"{type(module)._routed_base.__name__}: its own forward, convolution calls routed"
    if is_routed(module):
        return f"{type(module)._routed_base.__name__}: its own forward, routed; " + _describe_plain(module)
    return _describe_plain(module)


def _describe_plain(module: torch.nn.Module) -> str:
    geometry = getattr(module, "geometry", None)
    if not hasattr(geometry, "describe") and isinstance(module, _TORCH_CONVS):
        try:
            from .geometry import ConvGeometry
            geometry = ConvGeometry.from_module(module)
        except Exception:  # noqa: BLE001  (e.g. a transposed convolution: the attributes below)
            geometry = None
    if hasattr(geometry, "describe"):
        described = geometry.describe()
    else:  # e.g. a transposed convolution: read the Conv-style attributes
        x = "x".join
        parts = [("k", "kernel_size"), ("s", "stride"), ("p", "padding"), ("d", "dilation")]
        described = " ".join(f"{p}{x(map(str, getattr(module, a)))}" for p, a in parts
                             if isinstance(getattr(module, a, None), tuple))
        if getattr(module, "transposed", False) or "Transpose" in type(module).__name__:
            described = ("transposed " + described).strip()
    s = f"{module.in_channels}->{module.out_channels} {described}".rstrip()
    if module.groups != 1:
        s += f" g{module.groups}"
    if module.bias is None:
        s += " nobias"
    return s


@contextlib.contextmanager
def _state_kept(*models: torch.nn.Module) -> Iterator[None]:
    """Restore every buffer (e.g. BatchNorm running statistics) of ``models`` on exit."""
    saved = [(b, b.detach().clone()) for m in models for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                if b.shape == value.shape:
                    b.copy_(value)
                else:  # resized while running (e.g. a quantisation observer's first statistics)
                    b.data = value


def verify_model(original: torch.nn.Module, converted: torch.nn.Module, example_input: Any, *,
                 grads: bool = False, tol: Optional[float] = None, seed: int = 0,
                 name: Optional[str] = None) -> ModelReport:
    """Run a model and its :func:`~gridgraph.convert`-ed twin on the same input and compare, layer by layer.

    Forward hooks record every converted layer's output and the output of the original layer of the
    same name. Each converted layer is checked twice: *alone* (fed the original layer's own input, so
    the error is the layer's own) and *in the network* (its output inside the converted model, which
    carries the rounding of everything before it). The final outputs are compared, and with
    ``grads=True`` the gradients of every parameter and of the input for a fixed random upstream
    gradient. An output check passes when ``max|out - ref| <= tol * max(1, max|ref|)``, a gradient check
    when ``max|grad - ref| <= tol * G`` with ``G`` the largest gradient of the model (round-off in a
    gradient scales with the network's gradients, and some are exactly zero, e.g. a convolution's bias
    before BatchNorm), with ``tol`` by default :data:`TOLERANCES` of the input's dtype (``1e-10`` float64,
    ``1e-5`` float32).

    Both models run in their current training mode, from the same RNG state (so dropout masks agree),
    with TF32 off; their buffers (BatchNorm running statistics) and ``.grad`` are left as they were.

    Args:
        original (nn.Module): the torch model.
        converted (nn.Module): its converted twin (same parameter names).
        example_input (Tensor or tuple of Tensors): the model's positional input(s).
        grads (bool, optional): also compare gradients (default: ``False``).
        tol (float, optional): relative tolerance (default: by dtype).
        seed (int, optional): seed of the RNG state both runs start from and of the upstream gradient.
        name (str, optional): the model's name in the report (default: its class name).

    Returns:
        ModelReport: per-layer table, output and gradient comparisons, ``passed``.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
        >>> report = verify_model(net, convert(net), torch.randn(2, 3, 9, 9), grads=True)
        >>> report.passed, [r.name for r in report.layers]
        (True, ['0', '2'])
        >>> print(report.table().splitlines()[0])
        | layer | configuration | grid | err alone | err in network | grad err (w, b) | tol | result |
    """
    for arg, value in (("original", original), ("converted", converted)):
        if not isinstance(value, torch.nn.Module):
            raise TypeError(f"{arg} must be an nn.Module (got {type(value).__name__})")
    inputs = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError("example_input must be a Tensor or a tuple of Tensors "
                        f"(got {type(example_input).__name__})")
    dtype = inputs[0].dtype
    if tol is None:
        if dtype not in TOLERANCES:
            raise ValueError(f"no default tolerance for inputs of dtype {dtype}; pass tol")
        tol = TOLERANCES[dtype]
    device = inputs[0].device
    start = time.perf_counter()

    def pair_up() -> list[tuple[str, torch.nn.Module, torch.nn.Module]]:
        twins = converted_layers(converted)
        if not twins and not _FirstCall.installed(converted):
            raise ValueError(f"converted ({type(converted).__name__}) contains no converted layer; "
                             "did you pass gridgraph.convert(original)?")
        originals = dict(original.named_modules())
        found = []
        for layer_name, twin in twins.items():
            ref = originals.get(layer_name)
            torch_cls = type(twin)._routed_base if is_routed(twin) else next(
                k for k, v in CONVERSIONS.items() if isinstance(twin, v))
            if not isinstance(ref, torch_cls):
                raise ValueError(f"converted layer {layer_name or '(root)'!r} has no {torch_cls.__name__} of the same "
                                 f"name in original (found {type(ref).__name__ if ref is not None else 'nothing'})")
            found.append((layer_name, ref, twin))
        return found

    pair_up()  # the arguments' errors before anything runs
    with no_tf32():
        _FirstCall.run_now(converted, tuple(inputs))  # route functional convolutions convert could not see yet
        # what still runs as a torch convolution: found by running (a copy of) the converted model, not by its
        # module classes
        unconverted = torch_convolutions(converted, inputs, grads=grads, seed=seed)
    pairs = pair_up()
    if not pairs:
        raise ValueError(f"converted ({type(converted).__name__}) contains no converted layer; "
                         "did you pass gridgraph.convert(original)?")

    # A low-precision run is judged against a float64 run of the original: rounding that torch's own modules
    # make in float32 (deep networks amplify it) is allowed to the twin too, and nothing more.
    reference = _high_precision_copy(original) if dtype in _HIGH else None
    reference_modules = dict(reference.named_modules()) if reference is not None else {}

    records: dict[str, dict[str, list]] = {n: {"ref_in": [], "ref_out": [], "out": [], "high_out": []}
                                           for n, _, _ in pairs}
    handles = []

    def recorder(layer_name: str, side: str):
        # Copies, not views: the model may overwrite a recorded tensor in place after the hook has run
        # (nn.ReLU(inplace=True) after a convolution), which would change what is compared.
        def keep(v: Any) -> Any:
            return v.detach().clone() if isinstance(v, torch.Tensor) else v

        def hook(module, args, kwargs, output):
            rec = records[layer_name]
            if side == "ref":  # the call's arguments (e.g. a transposed convolution's output_size) too
                rec["ref_in"].append(([keep(a) for a in args], {k: keep(v) for k, v in kwargs.items()}))
                rec["ref_out"].append(keep(output))
            elif side == "high":
                rec["high_out"].append(keep(output))
            else:
                rec["out"].append(keep(output))
        return hook

    for layer_name, ref, twin in pairs:
        handles.append(ref.register_forward_hook(recorder(layer_name, "ref"), with_kwargs=True))
        handles.append(twin.register_forward_hook(recorder(layer_name, "twin"), with_kwargs=True))
        if layer_name in reference_modules:
            handles.append(reference_modules[layer_name].register_forward_hook(recorder(layer_name, "high"),
                                                                               with_kwargs=True))

    def run(model: torch.nn.Module, high: bool = False):
        xs = [(_to_high(t) if high else t).detach().clone().requires_grad_(grads and t.is_floating_point())
              for t in inputs]
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            with torch.set_grad_enabled(grads):
                out = model(*xs)
        return xs, out

    report = ModelReport(name or type(original).__name__, dtype, str(device), tol, unconverted=unconverted)
    with no_tf32(), _state_kept(original, converted), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using padding='same'", category=UserWarning)
        try:
            ref_xs, ref_out = run(original)
            xs, out = run(converted)
            high_xs, high_out = run(reference, high=True) if reference is not None else (None, None)
        finally:
            for h in handles:
                h.remove()
        ref_leaves, leaves = _flatten(ref_out), _flatten(out)
        high_leaves = _flatten(high_out) if reference is not None else [(p, None) for p, _ in ref_leaves]
        if [p for p, _ in ref_leaves] != [p for p, _ in leaves]:
            raise ValueError("original and converted return outputs of different structure: "
                             f"{[p for p, _ in ref_leaves]} vs {[p for p, _ in leaves]}")
        # errors that accumulate through the network may grow with the number of layer calls it makes
        depth = math.sqrt(max(1, sum(len(rec["out"]) for rec in records.values()))) if reference is not None else 1.0
        torch_errors = {"outputs": 0.0, "layers": 0.0}
        for (path, r), (_, o), (_, h) in zip(ref_leaves, leaves, high_leaves):
            if isinstance(r, torch.Tensor):
                error, scale = _abs_error(o, r) if isinstance(o, torch.Tensor) else (float("inf"), 1.0)
                own = _torch_error(r, h)
                torch_errors["outputs"] = max(torch_errors["outputs"], own)
                tolerance = tol * scale * depth + 2 * own
            else:
                error, scale = (0.0 if o == r else float("inf")), 1.0
                tolerance = tol * scale
            report.outputs.append(Comparison(path, error, scale, tolerance))
        for layer_name, ref, twin in pairs:
            rec = records[layer_name]
            if len(rec["out"]) != len(rec["ref_out"]):
                raise ValueError(f"layer {layer_name!r} ran {len(rec['ref_out'])} times in original but "
                                 f"{len(rec['out'])} times in converted")
            for call, ((args, kwargs), y_ref, y) in enumerate(zip(rec["ref_in"], rec["ref_out"], rec["out"])):
                x_ref = args[0]
                with torch.no_grad():
                    alone, scale = _abs_error(twin(*args, **kwargs), y_ref)
                in_network, _ = _abs_error(y, y_ref)
                tolerance = network_tolerance = tol * scale
                if reference is not None and layer_name in reference_modules:
                    with torch.no_grad():  # the original layer in float64 on the same input: its own rounding
                        own_alone = _torch_error(y_ref, reference_modules[layer_name](
                            *[_to_high(a) for a in args], **{k: _to_high(v) for k, v in kwargs.items()}))
                    own_network = _torch_error(y_ref, rec["high_out"][call] if call < len(rec["high_out"])
                                               else None)
                    torch_errors["layers"] = max(torch_errors["layers"], own_alone, own_network)
                    tolerance = tol * scale + 2 * own_alone
                    network_tolerance = tol * scale * depth + 2 * own_network
                label = layer_name or "(root)"
                if len(rec["out"]) > 1:
                    label += f" (call {call + 1})"
                n = getattr(twin, "_ndim", 2)
                grid = "x".join(map(str, x_ref.shape[-n:])) + " -> " + "x".join(map(str, y_ref.shape[-n:]))
                row = ModelLayerResult(label, _describe_conv(twin), grid, alone, in_network, tolerance,
                                       network_tolerance=network_tolerance)
                if grads:
                    row.backward_alone, row.backward_tolerance = _backward_alone(
                        ref, twin, args, kwargs, tol, seed + call, reference_modules.get(layer_name))
                report.layers.append(row)
        if grads:
            high = (reference, high_xs, high_out, depth) if reference is not None else None
            torch_errors["gradients"] = _compare_gradients(report, original, converted, ref_xs, ref_out, xs, out,
                                                           tol, seed, pairs, high)
        if reference is not None and grads:
            _waive_ill_conditioned(report)
        if reference is not None:
            report.notes.append(
                f"{_short(dtype)} run: each tolerance is tol x scale (x sqrt({depth ** 2:.0f} layer calls) where errors "
                f"accumulate through the network) plus twice the original's own {_short(dtype)} error against a "
                f"float64 run of it; the original's own error reached "
                + ", ".join(f"{k} {v:.1e}" for k, v in torch_errors.items()))
            if not report.passed:
                report.notes.append(_format_disagreement(original, inputs, ref_out, seed, device))
    report.seconds = time.perf_counter() - start
    return report


def _backward_alone(ref: torch.nn.Module, twin: torch.nn.Module, args: list, kwargs: dict, tol: float, seed: int,
                    high: Optional[torch.nn.Module]) -> tuple[float, float]:
    """The layer's own backward: both layers on the original's recorded input with one seeded upstream
    gradient; ``(max error of the input, weight and bias gradients, tolerance)``. A gradient with other strides
    than torch's counts as an infinite error (the network's other modules would receive different tensors)."""
    x = args[0]
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() and not x.is_complex():
        return float("nan"), float("inf")
    gen = torch.Generator().manual_seed(seed)

    def grads_of(module, dtype=None):
        xi = (x if dtype is None else x.to(dtype)).detach().clone().requires_grad_()
        rest = [a if dtype is None else _to_high(a) for a in args[1:]]
        params = [p for p in (module.weight, module.bias) if p is not None and p.requires_grad]
        with torch.enable_grad():
            y = module(xi, *rest, **({k: _to_high(v) for k, v in kwargs.items()} if dtype is not None else kwargs))
            u = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            u = u.to(y.dtype if not y.is_complex() else torch.float64).to(y.device)
            out = torch.autograd.grad(y, [xi] + params, u.to(y.dtype) if not y.is_complex() else u.to(y.real.dtype),
                                      allow_unused=True)
        return [g if g is not None else torch.zeros_like(t) for g, t in zip(out, [xi] + params)]

    del gen
    want, got = grads_of(ref), grads_of(twin)
    if want[0].stride() != got[0].stride() and want[0].numel() > 1:
        return float("inf"), 0.0
    scale = max(1.0, max((g.abs().max().item() for g in want if g.numel()), default=1.0))
    error = max((_abs_error(g, w)[0] for g, w in zip(got, want)), default=0.0)
    own = 0.0
    if high is not None:
        try:
            exact = grads_of(high, _HIGH[x.dtype])
            own = max((_torch_error(w, e) for w, e in zip(want, exact)), default=0.0)
        except Exception:  # noqa: BLE001  (no float64 replay: the plain tolerance)
            own = 0.0
    return error, tol * scale + 2 * own


def _waive_ill_conditioned(report: ModelReport) -> None:
    """Low precision: when every converted layer matches torch by itself (forward alone and in the network,
    and its own backward) and the outputs match, gradients of the whole network that still differ beyond
    rounding come from the network, not from the twin: a ReLU-like gate that rounding flips (an activation
    within rounding of 0) sends a different gradient through every earlier layer, in torch's own float32 run
    as in the twin's. Those gradient comparisons are waived, and a note says so."""
    failing = [c for c in report.gradients if not c.passed]
    if not failing or not report.layers or not all(r.own_passed for r in report.layers) or \
            not all(c.passed for c in report.outputs) or report.unconverted:
        return
    for c in failing:
        c.waived = True
    for r in report.layers:
        r.grads_waived = True
    worst = max(failing, key=lambda c: c.error / c.scale)
    report.notes.append(
        f"{len(failing)} network gradients differ beyond rounding (largest {worst.name}: {worst.error:.1e} of "
        f"{worst.scale:.1e}) although every converted layer matches torch by itself, forward and backward, and "
        f"the outputs match: this network's {_short(report.dtype)} gradients are ill-conditioned (a ReLU-like "
        f"gate within rounding of its threshold flips and sends a different gradient through every earlier "
        f"layer); waived. verify in float64 for an exact check")


class _ScriptCall:
    """Marks a TorchScript submodule as the running module while it runs (it takes no Python hooks): its
    ``forward`` is wrapped on the instance for one run, and ``remove`` restores it."""

    def __init__(self, module: torch.nn.Module, stack: list) -> None:
        self.module = module
        self.original = module.forward

        def forward(*args, **kwargs):
            stack.append(module)
            try:
                return self.original(*args, **kwargs)
            finally:
                stack.pop()
        module.__dict__["forward"] = forward

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)


_CONV_OP = re.compile(r"^aten::_?(conv(olution)?\d?d?(_|$)|conv_transpose|conv_depthwise|convolution|mkldnn_conv|"
                      r"cudnn_conv|miopen_conv|slow_conv|_slow_conv|thnn_conv|nnpack_spatial|conv_tbc)")


def torch_convolutions(model: torch.nn.Module, inputs: Sequence[Any], grads: bool = True, seed: int = 0) -> list[str]:
    """Where ``model`` still runs a torch convolution on ``inputs``: found by running it (forward, and backward
    with ``grads``) under a ``TorchDispatchMode`` that sees every ATen operator torch executes, with the module
    running at the time; one entry per place, ``'<module path> (<class>): <operators> [in backward]'``.

    (``torch.profiler`` sees the same operators, but not which module's Python code issued them; the dispatch
    mode does, and runs wherever the model runs.) The run is made on a copy of the model where one can be made
    (else on the model, its buffers restored after), so that nothing it caches between calls changes.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Conv2d(2, 2, 1))
        >>> torch_convolutions(net, (torch.randn(1, 1, 5, 5),))
        ['0 (Conv2d): aten::convolution', '1 (Conv2d): aten::convolution', '(backward): aten::convolution_backward']
        >>> torch_convolutions(convert(net), (torch.randn(1, 1, 5, 5),))
        []
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    try:
        model = copy.deepcopy(model)
    except Exception:  # noqa: BLE001  (an uncopyable model: run it, buffers restored)
        pass
    names = {id(m): n for n, m in model.named_modules()}
    stack: list[torch.nn.Module] = []
    found: dict[str, set] = {}

    def push(module, args):
        stack.append(module)

    def pop(module, args, output):
        if stack and stack[-1] is module:
            stack.pop()

    class Recorder(TorchDispatchMode):
        backward = False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name
            if _CONV_OP.match(name):
                if self.backward:
                    where = "(backward)"
                elif stack:
                    module = stack[-1]
                    where = f"{names.get(id(module)) or '(the model itself)'} ({type(module).__name__})"
                else:
                    where = "(outside any module)"
                found.setdefault(where, set()).add(name)
            return func(*args, **(kwargs or {}))

    scripted = [m for m in model.modules() if isinstance(m, torch.jit.ScriptModule)]
    inside = {id(c) for m in scripted for c in m.modules()} - {id(m) for m in scripted}
    handles = []
    for m in model.modules():
        if id(m) in inside:
            continue
        if isinstance(m, torch.jit.ScriptModule):  # no Python hooks: its whole call is recorded as its own
            handles.append(_ScriptCall(m, stack))
            continue
        handles += [m.register_forward_pre_hook(push), m.register_forward_hook(pop, always_call=True)]
    xs = [t.detach().clone().requires_grad_(grads and (t.is_floating_point() or t.is_complex()))
          if isinstance(t, torch.Tensor) else t for t in inputs]
    recorder = Recorder()
    try:
        with _state_kept(model, model), torch.random.fork_rng(devices=[]), torch.set_grad_enabled(grads):
            torch.manual_seed(seed)
            with recorder:
                out = model(*xs)
            leaves = [t for _, t in _flatten(out) if isinstance(t, torch.Tensor) and t.requires_grad]
            if grads and leaves:
                recorder.backward = True
                with recorder:
                    torch.autograd.backward(leaves, [torch.ones_like(t) for t in leaves])
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True) if grads else None
    return [f"{where}: {', '.join(sorted(ops))}" for where, ops in found.items()]


#: Low-precision dtypes and the dtype of the reference run that judges them.
_HIGH = {torch.float32: torch.float64, torch.float16: torch.float64, torch.bfloat16: torch.float64,
         torch.complex64: torch.complex128}


def _to_high(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype in _HIGH:
        return value.to(_HIGH[value.dtype])
    return value


def _high_precision_copy(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """A float64 (complex128) copy of ``model``, or None where it cannot be made."""
    try:
        high = copy.deepcopy(model)
    except Exception:  # noqa: BLE001  (an uncopyable model: judged without the float64 run)
        return None
    for t in list(high.parameters()) + list(high.buffers()):
        if t.dtype in _HIGH:
            t.data = t.data.to(_HIGH[t.dtype])
    return high


def _torch_error(low: Any, high: Any) -> float:
    """The original's own low-precision error: ``max|low - high|`` (0 where there is nothing to compare)."""
    if not isinstance(low, torch.Tensor) or not isinstance(high, torch.Tensor) or low.shape != high.shape:
        return 0.0
    if low.numel() == 0:
        return 0.0
    error = (low.detach().to(high.dtype) - high.detach()).abs().max().item()
    return error if error == error else 0.0


def _format_disagreement(original: torch.nn.Module, inputs: Sequence[torch.Tensor], ref_out: Any, seed: int,
                         device: torch.device) -> str:
    """How far torch's own results move when only the memory format changes (a failure next to a large
    number here is torch's rounding, not the twin's)."""
    first = inputs[0]
    if first.dim() not in (4, 5):
        return "torch's own memory formats: not compared (the input is not an image batch)"
    fmt = torch.channels_last if first.dim() == 4 else torch.channels_last_3d
    try:
        other = copy.deepcopy(original).to(memory_format=fmt)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            torch.manual_seed(seed)
            out = other(*[t.to(memory_format=fmt) if t.dim() == first.dim() else t for t in inputs])
    except Exception as error:  # noqa: BLE001
        return f"torch's own memory formats: not compared ({type(error).__name__})"
    diffs = [_torch_error(a, b.to(a.dtype) if isinstance(b, torch.Tensor) else b)
             for (_, a), (_, b) in zip(_flatten(ref_out), _flatten(out))]
    return (f"torch's own outputs differ by up to {max(diffs, default=0.0):.1e} between its NCHW and channels-last "
            f"runs of the original")


def _compare_gradients(report: ModelReport, original, converted, ref_xs, ref_out, xs, out, tol, seed, pairs,
                       high=None) -> float:
    """Compare every parameter's and input's gradient; ``high`` = ``(reference, its inputs, its output,
    depth)`` of a float64 run that sets the tolerances of a low-precision one. Returns the original's own
    largest gradient error against that run (0 without one)."""
    ref_params = dict(original.named_parameters())
    params = dict(converted.named_parameters())
    if set(ref_params) != set(params):
        raise ValueError("original and converted have different parameter names: "
                         f"only in original {sorted(set(ref_params) - set(params))}, "
                         f"only in converted {sorted(set(params) - set(ref_params))}")
    names = [n for n in ref_params if ref_params[n].requires_grad]
    gen = torch.Generator().manual_seed(seed + 1)
    ref_leaves = [t for _, t in _flatten(ref_out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    leaves = [t for _, t in _flatten(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    upstream = [torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device) for t in ref_leaves]
    x_names = [f"input[{i}]" if len(xs) > 1 else "input" for i in range(len(xs))]
    x_ids = [i for i, x in enumerate(xs) if x.requires_grad]

    def grads_of(outs, ps, inputs):
        pairs_ = [(o, u) for o, u in zip(outs, upstream) if o.requires_grad]
        if not pairs_:
            return [None] * (len(ps) + len(inputs))
        return torch.autograd.grad([o for o, _ in pairs_], ps + inputs, [u for _, u in pairs_], allow_unused=True)

    ref_grads = grads_of(ref_leaves, [ref_params[n] for n in names], [ref_xs[i] for i in x_ids])
    new_grads = grads_of(leaves, [params[n] for n in names], [xs[i] for i in x_ids])
    own = [0.0] * len(ref_grads)
    depth = 1.0
    if high is not None:
        reference, high_xs, high_out, depth = high
        high_params = dict(reference.named_parameters())
        high_leaves = [t for _, t in _flatten(high_out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        pairs_ = [(o, _to_high(u)) for o, u in zip(high_leaves, upstream) if o.requires_grad]
        if pairs_ and all(n in high_params for n in names):
            high_grads = torch.autograd.grad([o for o, _ in pairs_], [high_params[n] for n in names]
                                             + [high_xs[i] for i in x_ids], [u for _, u in pairs_],
                                             allow_unused=True)
            own = [_torch_error(_zero_if_none(g, h), h) if h is not None else 0.0
                   for g, h in zip(ref_grads, high_grads)]
    labels = names + [x_names[i] for i in x_ids]
    compared = []
    for g_ref, g in zip(ref_grads, new_grads):
        g_ref = _zero_if_none(g_ref, g)
        g = _zero_if_none(g, g_ref)
        compared.append(_abs_error(g, g_ref)[0])
        compared[-1] = (compared[-1], g_ref.detach().abs().max().item() if g_ref.numel() else 0.0)
    # Round-off in a gradient scales with the network's gradients, not with that one tensor (a conv bias
    # followed by BatchNorm has a gradient that is exactly zero up to round-off), so every gradient is
    # measured against the largest gradient of the model. Unlike the floor of 1 used for activations,
    # this stays strict when all gradients are small.
    network_scale = max((m for _, m in compared), default=0.0) or 1.0
    by_name = {}
    for label, (error, _), own_error in zip(labels, compared, own):
        report.gradients.append(Comparison(label, error, network_scale, tol * network_scale * depth + 2 * own_error))
        by_name[label] = report.gradients[-1]
    # Attach each converted layer's weight / bias gradient error to its rows.
    rows = {r.name.split(" (call")[0]: [] for r in report.layers}
    for r in report.layers:
        rows[r.name.split(" (call")[0]].append(r)
    for layer_name, _, _ in pairs:
        for r in rows.get(layer_name or "(root)", []):
            for attr, param in (("weight_grad", "weight"), ("bias_grad", "bias")):
                c = by_name.get(f"{layer_name}.{param}" if layer_name else param)
                if c is not None:
                    setattr(r, attr, c.error)
                    r.grad_tolerance = min(r.grad_tolerance, c.tolerance)
    return max(own, default=0.0)


def load_model(spec: str) -> torch.nn.Module:
    """The model named by ``'module:attribute'`` (or ``'path/to/file.py:attribute'``).

    The attribute (dots allowed: ``'pkg.nets:Zoo.small'``) is an ``nn.Module`` or a callable that
    builds one with no arguments (a class or a factory function).

    Example:
        >>> type(load_model('gridgraph.models:ResNeXtish')).__name__
        'ResNeXtish'
    """
    import importlib
    import importlib.util
    import os

    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"expected a model as 'module:attribute' or 'file.py:attribute' (got {spec!r})")
    module_name, attribute = spec.split(":")
    if module_name.endswith(".py"):
        if not os.path.isfile(module_name):
            raise ValueError(f"no such file: {module_name!r}")
        module_spec = importlib.util.spec_from_file_location(os.path.basename(module_name)[:-3], module_name)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    obj: Any = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{module_name!r} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, torch.nn.Module):
        if not callable(obj):
            raise TypeError(f"{spec} is a {type(obj).__name__}, not an nn.Module or a factory of one")
        obj = obj()
        if not isinstance(obj, torch.nn.Module):
            raise TypeError(f"{spec}() returned a {type(obj).__name__}, not an nn.Module")
    return obj


def check_model(model: torch.nn.Module, input_shape: Sequence[int], *, name: str, dtype: torch.dtype = torch.float64,
                device: Any = "cpu", seed: int = 0, grads: bool = True, training: Optional[bool] = None) -> ModelReport:
    """Copy ``model`` to ``dtype`` and ``device``, convert it, and :func:`verify_model` it on a seeded
    standard-normal input of ``input_shape`` (``model`` itself is not modified).

    Args:
        model (nn.Module): the torch model.
        input_shape (sequence of int): its input's shape, e.g. ``(2, 3, 32, 32)``.
        name (str): the name in the report (with the mode appended).
        dtype, device: where to run both copies (default: float64 on the CPU).
        seed (int): seed of the input and of the upstream gradient.
        grads (bool): compare gradients too (default: ``True``).
        training (bool, optional): set the mode of the copy (default: keep the model's).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode='reflect'), torch.nn.Tanh())
        >>> report = check_model(net, (2, 3, 8, 8), name='tiny')
        >>> report.name, report.passed, report.max_layer_error < 1e-12
        ('tiny (train)', True, True)
    """
    import copy

    start = time.perf_counter()
    original = copy.deepcopy(model).to(device=device, dtype=dtype)
    if training is not None:
        original.train(training)
    converted = convert(original)
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn(tuple(input_shape), generator=generator, dtype=dtype).to(device)
    mode = "train" if original.training else "eval"
    report = verify_model(original, converted, example, grads=grads, seed=seed, name=f"{name} ({mode})")
    report.seconds = time.perf_counter() - start  # the copy and the conversion included
    return report


def verify_reference_models(names: Optional[Sequence[str]] = None,
                            dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64),
                            devices: Optional[Sequence[Any]] = None, seed: int = 0, grads: bool = True,
                            modes: Sequence[str] = ("train", "eval")) -> list[ModelReport]:
    """:func:`check_model` over the reference networks (:data:`~gridgraph.models.REFERENCE_MODELS`, all by
    default) x ``dtypes`` x ``devices`` x training ``modes``.

    Example:
        >>> reports = verify_reference_models(['resnext'], dtypes=[torch.float64], devices=['cpu'], modes=['eval'])
        >>> [(r.name, r.passed, len(r.layers)) for r in reports]
        [('resnext (eval)', True, 8)]
    """
    from .models import REFERENCE_MODELS

    names = list(REFERENCE_MODELS) if names is None else list(names)
    unknown = [n for n in names if n not in REFERENCE_MODELS]
    if unknown:
        raise ValueError(f"unknown reference model(s) {unknown}; expected some of {sorted(REFERENCE_MODELS)}")
    for mode in modes:
        if mode not in ("train", "eval"):
            raise ValueError(f"modes must be 'train' and/or 'eval' (got {mode!r})")
    reports = []
    for device in devices or available_devices():
        for dtype in dtypes:
            for name in names:
                entry = REFERENCE_MODELS[name]
                model = entry.build(seed=seed)
                for mode in modes:
                    reports.append(check_model(model, entry.input_shape, name=name, dtype=dtype, device=device,
                                               seed=seed, grads=grads, training=mode == "train"))
    return reports


def models_summary(reports: Sequence[ModelReport]) -> str:
    """One line over many :class:`ModelReport`\\ s: verdict, counts and the largest errors per dtype."""
    failed = [r.name + f" [{_short(r.dtype)}]" for r in reports if not r.passed]
    worst: dict = {}
    for r in reports:
        w = worst.setdefault(r.dtype, [0.0, 0.0, None])
        w[0] = max(w[0], r.max_layer_error)
        w[1] = max(w[1], r.max_output_error)
        if r.gradients:
            w[2] = max(w[2] or 0.0, r.max_gradient_error)
    grads = any(w[2] is not None for w in worst.values())
    errors = ", ".join(f"{_short(d)} {w[0]:.1e} / {w[1]:.1e}" + (f" / {w[2]:.1e}" if grads else "")
                       for d, w in worst.items())
    verdict = "PASS" if not failed else f"FAIL ({len(failed)}: {', '.join(failed)})"
    layers = sum(len(r.layers) for r in reports)
    seconds = sum(r.seconds for r in reports)
    return (f"{verdict}: {_count(len(reports), 'model check')}, {_count(layers, 'layer call')} in "
            f"{_format_seconds(seconds)}; "
            f"max abs error (layers / outputs{' / grads' if grads else ''}): {errors or 'none'}")


# ================================================================================ beyond the grid
@dataclass(frozen=True)
class BeyondCase:
    """One case beyond the dense 2-D grid: a 1-D or 3-D convolution, a transposed convolution, or a
    2-D convolution on a masked or sparse domain or on point positions, with the input it is checked on.

    ``kind`` is ``'conv1d'``, ``'conv3d'``, ``'transposed1d/2d/3d'``, ``'masked2d'``, ``'sparse2d'`` or
    ``'points2d'`` (the active pixels as real positions, jittered by less than a quarter pixel:
    :func:`~gridgraph.positions_to_graph`); ``kwargs`` are the torch module's keyword arguments (as a tuple
    of pairs, so the case is hashable); ``occupancy`` is the fraction of active pixels of the masked,
    sparse and point kinds.
    """

    kind: str
    in_channels: int
    out_channels: int
    kwargs: tuple
    grid: tuple
    batch: int = 2
    occupancy: float = 1.0

    def describe(self) -> str:
        """The configuration, e.g. ``'conv1d 3->4 kernel_size=5 padding=2 stride=2'``."""
        kw = " ".join(f"{k}={v}" for k, v in self.kwargs)
        extra = f" occ {self.occupancy:.0%}" if self.kind in _MASKED_KINDS else ""
        return f"{self.kind} {self.in_channels}->{self.out_channels} {kw}{extra}"

    def describe_input(self) -> str:
        """The input it is checked on: batch and grid size, e.g. ``'B2 5x6x4'``."""
        return f"B{self.batch} {'x'.join(map(str, self.grid))}"


def _bc(kind, c_in, c_out, grid, batch=2, occupancy=1.0, **kwargs) -> BeyondCase:
    return BeyondCase(kind, c_in, c_out, tuple(sorted(kwargs.items())), tuple(grid), batch, occupancy)


_MASKED_KINDS = ("masked2d", "sparse2d", "points2d")

#: 1-D, 3-D, transposed, masked, sparse and point configurations checked by :func:`verify_beyond`.
BEYOND_CASES: tuple[BeyondCase, ...] = (
    _bc("conv1d", 3, 4, (17,), kernel_size=5, stride=2, padding=2),
    _bc("conv1d", 4, 4, (12,), kernel_size=3, padding=2, dilation=2, groups=2, padding_mode="reflect"),
    _bc("conv3d", 2, 3, (5, 6, 4), kernel_size=3, padding=1),
    _bc("conv3d", 2, 4, (5, 4, 6), kernel_size=(3, 1, 2), stride=(2, 1, 2), padding=(1, 0, 1), groups=2,
        padding_mode="circular"),
    _bc("transposed2d", 4, 3, (5, 6), kernel_size=3, stride=2, padding=1, output_padding=1),
    _bc("transposed2d", 4, 6, (4, 5), kernel_size=(4, 3), stride=(2, 3), padding=(1, 0), dilation=(1, 2),
        groups=2, bias=False),
    _bc("transposed1d", 3, 2, (7,), kernel_size=4, stride=3, padding=1, output_padding=2),
    _bc("transposed3d", 2, 4, (3, 2, 3), kernel_size=(2, 3, 2), stride=2, padding=(0, 1, 0), groups=2),
    _bc("masked2d", 3, 4, (11, 9), occupancy=0.3, kernel_size=3, padding=1),
    _bc("masked2d", 4, 6, (11, 10), occupancy=0.2, kernel_size=3, stride=2, padding=1, groups=2),
    _bc("masked2d", 3, 3, (9, 9), occupancy=0.5, kernel_size=5, padding=2, groups=3),
    _bc("sparse2d", 3, 4, (16, 16), occupancy=0.05, kernel_size=3, padding=1),
    _bc("sparse2d", 3, 4, (16, 15), occupancy=0.1, kernel_size=3, stride=2, padding=1),
    _bc("points2d", 3, 4, (12, 10), occupancy=0.4, kernel_size=3, padding=1),
    _bc("points2d", 4, 6, (11, 13), occupancy=0.3, kernel_size=3, padding=2, dilation=2, groups=2),
)
QUICK_BEYOND_CASES: tuple[BeyondCase, ...] = tuple(BEYOND_CASES[i] for i in (0, 3, 4, 7, 9, 12))


def _beyond_window(mask: torch.Tensor, conv: torch.nn.Module) -> torch.Tensor:
    """The active outputs of a zero-padded masked domain, computed densely from the mask (the reference)."""
    if conv.stride == (1, 1) and all(d * (k - 1) == 2 * p for k, p, d in zip(conv.kernel_size, conv.padding,
                                                                          conv.dilation)):
        return mask  # submanifold (the output grid is the input grid): outputs on the active inputs
    ones = torch.ones(1, 1, *conv.kernel_size, dtype=torch.float64, device=mask.device)
    window = torch.nn.functional.conv2d(mask[:, None].double(), ones, stride=conv.stride, padding=conv.padding,
                                        dilation=conv.dilation)
    return window[:, 0] > 0


def check_beyond_case(case: BeyondCase, dtype: torch.dtype = torch.float64, device: Any = "cpu", seed: int = 0,
                      paths: Iterable[str] = ("table", "edges")) -> list[CaseResult]:
    """Check one :class:`BeyondCase` against its torch reference, forward and gradients, per path.

    The reference of a masked, sparse or point case is ``nn.Conv2d`` on the image with inactive pixels
    zeroed, read at the active output pixels (zeros elsewhere on both sides).
    """
    from .domains import TransposedGeometry, sparse_to_graph, transposed_grid_to_graph
    from .positions import positions_to_graph
    from .graph import grid_to_graph
    from .nn import GridConv1d, GridConv3d, GridConvTranspose1d, GridConvTranspose2d, GridConvTranspose3d

    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    kwargs = dict(case.kwargs)
    torch_cls, twin = {"conv1d": (torch.nn.Conv1d, GridConv1d.from_conv1d),
                       "conv3d": (torch.nn.Conv3d, GridConv3d.from_conv3d),
                       "transposed1d": (torch.nn.ConvTranspose1d, GridConvTranspose1d.from_conv_transpose1d),
                       "transposed2d": (torch.nn.ConvTranspose2d, GridConvTranspose2d.from_conv_transpose2d),
                       "transposed3d": (torch.nn.ConvTranspose3d, GridConvTranspose3d.from_conv_transpose3d),
                       "masked2d": (torch.nn.Conv2d, GridConv2d.from_conv2d),
                       "sparse2d": (torch.nn.Conv2d, GridConv2d.from_conv2d),
                       "points2d": (torch.nn.Conv2d, GridConv2d.from_conv2d)}[case.kind]
    with no_tf32():
        torch.manual_seed(seed)
        conv = torch_cls(case.in_channels, case.out_channels, **kwargs).to(device, dtype)
        layer = twin(conv)
        image = torch.randn(case.batch, case.in_channels, *case.grid, generator=gen, dtype=dtype).to(device)
        image.requires_grad_(True)
        masked = case.kind in _MASKED_KINDS
        if masked:
            mask = (torch.rand(case.batch, *case.grid, generator=gen) < case.occupancy).to(device)
            ref = conv(image * mask[:, None])
            out_mask = _beyond_window(mask, conv)[:, None].to(dtype)
            ref = ref * out_mask
        else:
            ref = conv(image)
        upstream = torch.randn(ref.shape, generator=gen, dtype=dtype).to(device)
        if masked:
            upstream = upstream * out_mask
        ref_params = [conv.weight] + ([conv.bias] if conv.bias is not None else [])
        ref_grads = torch.autograd.grad(ref, [image, *ref_params], upstream, allow_unused=True)
        results = []
        for path in paths:
            if case.kind.startswith("transposed"):
                g = transposed_grid_to_graph(image, TransposedGeometry.from_module(layer))
            elif case.kind == "masked2d":
                g = image_to_graph(image, layer, mask=mask)
            elif case.kind == "sparse2d":
                b, r, c = mask.nonzero(as_tuple=True)
                g = sparse_to_graph(torch.stack([b, r, c], 1), image[b, :, r, c], case.grid, layer,
                                    num_images=case.batch)
            elif case.kind == "points2d":
                b, r, c = mask.nonzero(as_tuple=True)
                jitter = (torch.rand(b.numel(), 2, generator=gen, dtype=torch.float64) - 0.5) * 0.49
                pos = torch.stack([r, c], 1).double() + jitter.to(device)
                g = positions_to_graph(pos, image[b, :, r, c], layer, batch=b, num_images=case.batch, size=case.grid)
            else:
                g = grid_to_graph(image, layer.geometry)
            results.append(_compare_path(case, layer, g, path, image, upstream, ref, ref_grads, device, dtype))
    return results


def verify_beyond(cases: Sequence[BeyondCase] = BEYOND_CASES,
                  dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64),
                  devices: Optional[Sequence[Any]] = None, seed: int = 0,
                  progress: Optional[Callable[[LayerReport], None]] = None) -> LayerReport:
    """Run :func:`check_beyond_case` over ``cases`` x ``dtypes`` x ``devices`` (default: every available one).

    ``progress``, if given, is called with the report of each device and dtype as it finishes.

    Example:
        >>> report = verify_beyond(QUICK_BEYOND_CASES, dtypes=[torch.float64], devices=['cpu'])
        >>> report.passed, len(report.results)
        (True, 12)
    """
    return _run_cases(check_beyond_case, cases, dtypes, devices, seed, progress)


# ================================================================================ attention
@dataclass(frozen=True)
class AttentionCase:
    """One ``nn.MultiheadAttention`` configuration on a batch of images, and the pixel graph
    :class:`~gridgraph.PixelAttention` runs on: ``'complete'`` (global attention) or ``'local'`` (the
    ``kernel_size`` graph, checked against the neighbourhood as ``attn_mask``); ``tap_bias`` adds a
    random bias per head per tap, checked against a per-head float ``attn_mask``."""

    embed_dim: int
    num_heads: int
    graph: str = "complete"
    kernel_size: int = 3
    bias: bool = True
    batch_first: bool = True
    tap_bias: bool = False
    image: tuple[int, int] = (4, 5)
    batch: int = 2

    def describe(self) -> str:
        graph = self.graph if self.graph == "complete" else f"local k{self.kernel_size}"
        s = f"attention E{self.embed_dim} h{self.num_heads} {graph}"
        s += (" tap-bias" if self.tap_bias else "") + ("" if self.bias else " nobias")
        return s + ("" if self.batch_first else " seq-first")

    def describe_input(self) -> str:
        """The input it is checked on: batch and image size, e.g. ``'B2 4x5'``."""
        return f"B{self.batch} {self.image[0]}x{self.image[1]}"


#: Global and local attention, with and without biases and a tap bias, both sequence layouts.
ATTENTION_CASES: tuple[AttentionCase, ...] = (
    AttentionCase(8, 2),
    AttentionCase(6, 3, bias=False, batch_first=False, image=(3, 4)),
    AttentionCase(8, 2, "complete", tap_bias=True, image=(3, 3)),
    AttentionCase(8, 2, "local", 3),
    AttentionCase(6, 1, "local", 5, batch_first=False, image=(5, 6)),
    AttentionCase(8, 4, "local", 3, tap_bias=True, batch=3),
)


def check_attention_case(case: AttentionCase, dtype: torch.dtype = torch.float64, device: Any = "cpu",
                         seed: int = 0) -> list[CaseResult]:
    """Check :class:`~gridgraph.PixelAttention` (weights from ``from_multihead_attention``) against the
    ``nn.MultiheadAttention`` itself on the flattened pixels of each image: forward output and the
    gradients of the input and of every weight (the tap bias's through the float mask)."""
    from .nn.attention import PixelAttention, complete_pixel_graph

    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    e, (h, w) = case.embed_dim, case.image
    k = (2 * h - 1, 2 * w - 1) if case.graph == "complete" else (case.kernel_size, case.kernel_size)
    with no_tf32():
        torch.manual_seed(seed)
        mha = torch.nn.MultiheadAttention(e, case.num_heads, bias=case.bias, batch_first=case.batch_first)
        with torch.no_grad():
            for p in mha.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) / e ** 0.5)
        mha = mha.to(device, dtype)
        layer = PixelAttention.from_multihead_attention(mha, kernel_size=k if case.tap_bias else None)
        if case.tap_bias:
            with torch.no_grad():
                layer.tap_bias.copy_(torch.randn(layer.tap_bias.shape, generator=gen))
        image = torch.randn(case.batch, e, h, w, generator=gen, dtype=dtype).to(device).requires_grad_(True)
        seq = image.flatten(2).transpose(1, 2)
        seq = seq if case.batch_first else seq.transpose(0, 1)
        mask = None
        if case.graph != "complete" or case.tap_bias:
            mask = layer.attention_mask(h, w, kernel_size=k, num_images=case.batch)
        ref = mha(seq, seq, seq, attn_mask=mask, need_weights=False)[0]
        ref = (ref if case.batch_first else ref.transpose(0, 1)).transpose(1, 2).reshape(image.shape)
        upstream = torch.randn(ref.shape, generator=gen, dtype=dtype).to(device)
        ref_params = [mha.in_proj_weight, mha.out_proj.weight] + ([mha.in_proj_bias, mha.out_proj.bias]
                                                                   if case.bias else [])
        extra = [layer.tap_bias] if case.tap_bias else []
        ref_grads = torch.autograd.grad(ref, [image, *ref_params, *extra], upstream)
        g = complete_pixel_graph(image) if case.graph == "complete" else \
            image_to_graph(image, kernel_size=k, padding=(k[0] // 2, k[1] // 2))
        out = graph_to_image(layer(g.x, g.edge_index, g.edge_type), g)
        projections = (layer.query, layer.key, layer.value)
        params = [p.weight for p in projections] + [layer.out_proj.weight]
        params += [p.bias for p in projections] + [layer.out_proj.bias] if case.bias else []
        grads = list(torch.autograd.grad(out, [image, *params, *extra], upstream))
        # Pack the graph layer's gradients as nn.MultiheadAttention's parameters: in_proj = [q; k; v].
        packed = [grads[0], torch.cat([gr.view(e, e) for gr in grads[1:4]]), grads[4].view(e, e)]
        if case.bias:
            packed += [torch.cat(grads[5:8]), grads[8]]
        packed += grads[len(grads) - len(extra):] if extra else []
        grad_error = max(_relative_error(a, b) for a, b in zip(packed, ref_grads))
        return [CaseResult(case, str(device), dtype, case.graph, _relative_error(out, ref), grad_error,
                           TOLERANCES[dtype])]


def verify_attention(cases: Sequence[AttentionCase] = ATTENTION_CASES,
                     dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64),
                     devices: Optional[Sequence[Any]] = None, seed: int = 0,
                     progress: Optional[Callable[[LayerReport], None]] = None) -> LayerReport:
    """Run :func:`check_attention_case` over ``cases`` x ``dtypes`` x ``devices`` (default: every available one).

    Example:
        >>> report = verify_attention(dtypes=[torch.float64], devices=['cpu'])
        >>> report.passed, len(report.results)
        (True, 6)
    """
    return _run_cases(check_attention_case, cases, dtypes, devices, seed, progress)

"""Equivalence checks: every gridgraph layer against the torch module it mirrors.

:func:`verify_layers` runs a table of ``nn.Conv2d`` configurations through :class:`~gridgraph.GridConv2d`
(weights moved with ``from_conv2d``) on both computation paths (the neighbour-table fast path and the
general edge-list path), forward and backward, and reports the largest errors. Errors are measured
relative to the data: ``max|out - ref| / max(1, max|ref|)``.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch

from .graph import graph_to_image, image_to_graph
from .nn import GridConv2d

__all__ = ["LayerCase", "CaseResult", "LayerReport", "LAYER_CASES", "QUICK_LAYER_CASES", "TOLERANCES",
           "check_layer_case", "verify_layers", "available_devices", "no_tf32"]

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
        k = self.kernel_size if isinstance(self.kernel_size, int) else "x".join(map(str, self.kernel_size))
        s = f"{self.in_channels}->{self.out_channels} k{k} s{self.stride} p{self.padding!r} d{self.dilation}"
        if self.groups != 1:
            s += f" g{self.groups}"
        if not self.bias:
            s += " nobias"
        if self.padding_mode != "zeros":
            s += f" {self.padding_mode}"
        return s + f" | B{self.batch} {self.image[0]}x{self.image[1]}"


C = LayerCase
#: The built-in table: kernels 1, 2, 3, 5, 7 and rectangular; strides; paddings; dilations; groups;
#: all four padding modes; bias off; odd, non-square, tiny images and batch 0.
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
        head = "| configuration | device | dtype | path | max err fwd | max err grad | result |"
        rows = [head, "|" + "---|" * 7]
        for r in self.results:
            rows.append(f"| {r.case.describe()} | {r.device} | {_short(r.dtype)} | {r.path} | "
                        f"{r.forward_error:.2e} | {r.gradient_error:.2e} | {'pass' if r.passed else 'FAIL'} |")
        return "\n".join(rows)

    def summary(self) -> str:
        failed = sum(not r.passed for r in self.results)
        worst = ", ".join(f"{_short(d)} fwd {self.max_forward_error[d]:.1e} grad {self.max_gradient_error[d]:.1e}"
                          for d in self.max_forward_error)
        verdict = "PASS" if failed == 0 else f"FAIL ({failed} mismatches)"
        return (f"{verdict}: {len(self.results)} checks of {len({r.case for r in self.results})} layer "
                f"configurations in {self.seconds:.1f}s; largest relative errors: {worst}")

    def __str__(self) -> str:
        return self.table() + "\n\n" + self.summary()


def _short(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


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
            edge_index = g.edge_index if path == "table" else g.edge_index.clone()
            out = graph_to_image(layer(g.x, edge_index, g.edge_type, size=g.size()), g, side="output")
            params = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
            grads = torch.autograd.grad(out, [image, *params], upstream, allow_unused=True)
            grad_error = max(_relative_error(_zero_if_none(a, b), _zero_if_none(b, a))
                             for a, b in zip(grads, ref_grads))
            results.append(CaseResult(case, str(device), dtype, path, _relative_error(out, ref), grad_error,
                                      TOLERANCES[dtype]))
    return results


def _zero_if_none(t: Optional[torch.Tensor], like: Optional[torch.Tensor]) -> torch.Tensor:
    if t is not None:
        return t
    return torch.zeros_like(like) if like is not None else torch.zeros(0)


def verify_layers(cases: Sequence[LayerCase] = LAYER_CASES, dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64),
                  devices: Optional[Sequence[Any]] = None, seed: int = 0) -> LayerReport:
    """Run :func:`check_layer_case` over ``cases`` x ``dtypes`` x ``devices`` (default: every available one).

    Example:
        >>> report = verify_layers(LAYER_CASES[:2], dtypes=[torch.float64], devices=['cpu'])
        >>> report.passed, len(report.results)
        (True, 4)
    """
    start = time.perf_counter()
    report = LayerReport()
    for device in devices or available_devices():
        for dtype in dtypes:
            for i, case in enumerate(cases):
                report.results.extend(check_layer_case(case, dtype, device, seed=seed + i))
    report.seconds = time.perf_counter() - start
    return report

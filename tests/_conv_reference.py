"""The equivalence check every layer test uses: ``nn.Conv2d`` (or a torch module mirrored) is the reference.

A case runs the reference module on an image batch and the gridgraph twin on the pixel graph of the same
batch, then compares the output image and the gradients of the input, the weight and the bias for a
random upstream gradient. Three ways to feed the graph layer are covered:

* ``'table'``: the plain call ``layer(g.x, g.edge_index, g.edge_type, size=g.size())``; the pixel graph's
  own ``edge_index`` (a ``PixelEdgeIndex``) carries its structure, so the layer runs the neighbour-table
  kernels;
* ``'edges'``: ``g.edge_index.as_tensor()`` (the plain ``[2, E]`` tensor, no structure), forcing the general
  edge-list kernels;
* ``'shuffled'``: the general path with the edges in a random order.

Which path ran is asserted (with :func:`gridgraph.nn.functional.kernel_trace`), so neither path can
silently stand in for the other.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

import gridgraph
from gridgraph.nn.functional import kernel_trace
from gridgraph.pixel_graph import PixelEdgeIndex

PATHS = ("table", "edges", "shuffled")
DTYPES = (torch.float64, torch.float32)


def assert_same_message(ours: str, theirs: str) -> None:
    """``ours`` reads exactly as torch's message ``theirs``, except that where torch prints a Python set of
    choices (``{'zeros', ...}``, in an order that changes with ``PYTHONHASHSEED``) ours prints the same
    choices as a tuple in the fixed order of :data:`gridgraph.geometry.PADDING_MODES` or
    ``('same', 'valid')``."""
    found = re.search(r"\{([^{}]*)\}", theirs)
    if found is None:
        assert ours == theirs
        return
    prefix, suffix = theirs[:found.start()], theirs[found.end():]
    assert ours.startswith(prefix) and ours.endswith(suffix), f"{ours!r} does not read as {theirs!r}"
    choices = ast.literal_eval(ours[len(prefix):len(ours) - len(suffix)])
    assert isinstance(choices, tuple), f"choices in {ours!r} are not a tuple (fixed order)"
    assert set(choices) == ast.literal_eval(found.group(0)), f"{ours!r} names other choices than {theirs!r}"
    assert choices in (gridgraph.geometry.PADDING_MODES, ("same", "valid")), choices


def tolerances(dtype: torch.dtype, scale: float) -> dict[str, float]:
    """Explicit tolerances: float64 to ~1e-10, float32 to ~1e-5, both scaled to the data's magnitude."""
    scale = max(1.0, float(scale))
    if dtype == torch.float64:
        return {"rtol": 1e-10, "atol": 1e-10 * scale}
    return {"rtol": 1e-5, "atol": 1e-5 * scale}


def assert_matches(got: Optional[Tensor], want: Optional[Tensor], what: str) -> float:
    """Assert ``got`` equals ``want`` within the dtype's tolerance (same shape, dtype, device); return the error."""
    if want is None:
        assert got is None or not bool(got.abs().any()), f"{what}: expected no gradient, got a nonzero one"
        return 0.0
    assert got is not None, f"{what}: missing (the reference has it)"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != reference {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != reference {want.dtype}"
    assert got.device == want.device, f"{what}: device {got.device} != reference {want.device}"
    scale = want.abs().max().item() if want.numel() else 1.0
    torch.testing.assert_close(got, want, **tolerances(want.dtype, scale), msg=lambda m: f"{what}: {m}")
    return (got - want).abs().max().item() if want.numel() else 0.0


@dataclass
class Result:
    """An output image and the gradients a random upstream gradient gives it."""

    out: Tensor
    grad_input: Optional[Tensor]
    grads: dict[str, Optional[Tensor]]  # parameter name -> gradient


def randomise_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Fill every parameter with N(0, 1) values so no weight or bias is accidentally tiny."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p))
    return module


def reference(module: nn.Module, images: Tensor, grad_out: Tensor) -> Result:
    """Run a torch module (the reference) forward and backward."""
    module.zero_grad(set_to_none=True)
    x = images.detach().clone().requires_grad_(True)
    out = module(x)
    out.backward(grad_out)
    return Result(out.detach(), x.grad, {n: p.grad for n, p in module.named_parameters()})


def graph_edges(g: gridgraph.PixelGraph, path: str, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The ``(edge_index, edge_type)`` that feeds ``path``."""
    if path == "table":
        assert isinstance(g.edge_index, PixelEdgeIndex), "the pixel graph lost its structure"
        return g.edge_index, g.edge_type
    if path == "edges":
        edge_index = g.edge_index.as_tensor()
        assert not isinstance(edge_index, PixelEdgeIndex)
        return edge_index, g.edge_type
    if path == "shuffled":
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(g.edge_index.size(1), generator=gen).to(g.edge_index.device)
        return g.edge_index.as_tensor()[:, perm], g.edge_type[perm]
    raise ValueError(f"unknown path {path!r}")


def graph_run(layer: nn.Module, images: Tensor, grad_out: Tensor, path: str, geometry_from: Any = None,
              seed: int = 0) -> Result:
    """Run a gridgraph layer on the pixel graph of ``images`` (geometry from ``geometry_from`` or the layer)."""
    layer.zero_grad(set_to_none=True)
    x = images.detach().clone().requires_grad_(True)
    g = gridgraph.image_to_graph(x, geometry_from if geometry_from is not None else layer)
    edge_index, edge_type = graph_edges(g, path, seed)
    with kernel_trace() as trace:
        out = layer(g.x, edge_index, edge_type, size=g.size())
    if path == "table":
        assert trace and "edges" not in trace, f"the pixel graph's own edge_index should take the table path: {trace}"
    else:
        assert "edges" in trace, f"a plain edge list should take the edge-list path: {trace}"
    image = gridgraph.graph_to_image(out, g, side="output")
    image.backward(grad_out)
    return Result(image.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()})


def compare(got: Result, want: Result, names: Optional[dict[str, str]] = None) -> dict[str, float]:
    """Assert forward and every gradient agree; ``names`` maps the graph layer's parameter names to the
    reference's (default: identical). Returns the largest errors."""
    names = names or {n: n for n in got.grads}
    assert set(names.values()) == set(want.grads), f"parameters {sorted(names.values())} != {sorted(want.grads)}"
    errors = {"forward": assert_matches(got.out, want.out, "forward output")}
    errors["grad input"] = assert_matches(got.grad_input, want.grad_input, "gradient of the input")
    for mine, theirs in names.items():
        errors[f"grad {theirs}"] = assert_matches(got.grads[mine], want.grads[theirs], f"gradient of {theirs}")
    return errors


def check_conv(conv: nn.Conv2d, layer: nn.Module, batch: int, height: int, width: int, path: str,
               seed: int = 0, names: Optional[dict[str, str]] = None, reference_module: Optional[nn.Module] = None,
               geometry_from: Any = None) -> dict[str, float]:
    """Compare ``layer`` with ``reference_module`` (default ``conv``) on a random batch, forward and backward."""
    module = reference_module if reference_module is not None else conv
    p = next(module.parameters())
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, conv.in_channels, height, width, generator=gen, dtype=torch.float64)
    images = images.to(dtype=p.dtype, device=p.device)
    want_out = module(images)
    grad_out = torch.randn(want_out.shape, generator=gen, dtype=torch.float64).to(want_out)
    want = reference(module, images, grad_out)
    got = graph_run(layer, images, grad_out, path, geometry_from, seed)
    return compare(got, want, names)

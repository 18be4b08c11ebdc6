"""Compiled CPU loops (numba) for the lattice kernels that torch's operators serve badly.

Depthwise layers do a few multiply-adds per pixel over many pixels: as torch operations they cost a pass over
memory per tap (9 for a 3x3 kernel, 49 for 7x7), as one compiled loop a single pass. Grouped layers gather
their taps group-major in one pass. Each loop reads the source through the same per-tap shifted views as the
torch path (:mod:`gridgraph.nn.lattice`), so the honesty rule holds: gathers and multiply-adds, no
convolution or unfold. They run on CPU tensors of float32/float64 of 2-D grids; everything else runs the torch
path, which the tests also run.

numba is a dependency of gridgraph (the default install is the fast install). Where it cannot be imported (a
platform without its wheels) or is switched off (``GRIDGRAPH_COMPILED=0`` or :data:`ENABLED` = False), the
torch path computes the same numbers, and a warning says once what that costs.

* :func:`depthwise2d`: ``out[(b, o), c] = bias[c] + sum_k w[k, c] src[b, A*o + E_k, c]``;
* :func:`depthwise_weight_grad2d`: ``grad[k, c] = sum_(b, o) src[b, A*o + E_k, c] g[(b, o), c]``;
* :func:`gather2d`, :func:`gather2d_grouped`: the gathered rows of a block (zeros outside the grid), the
  latter group-major for grouped layers.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
from torch import Tensor

__all__ = ["ENABLED", "available", "describe", "depthwise2d", "depthwise_weight_grad2d", "gather2d",
           "gather2d_grouped"]

#: Use the compiled loops (set False, or the environment variable GRIDGRAPH_COMPILED=0, for torch's ops only).
ENABLED = os.environ.get("GRIDGRAPH_COMPILED", "1") != "0"

#: What the torch path costs where the compiled loops would run (measured on a 2-core CPU, float32: the
#: depthwise layers of MobileNetV2 and ConvNeXt, and RegNet's grouped layers; benchmarks/networks.py).
COST = "depthwise and grouped layers run 3-10x slower"

_KERNELS = None
_FAILED: Optional[str] = None
_WARNED = False


def _build():
    import numpy as np

    from . import _numba_kernels as k

    # The first parallel loop starts numba's threading layer, which (sharing libgomp with torch) sets the
    # calling thread's OpenMP thread count to numba's: torch.get_num_threads() went from a user's 1 to 2
    # after the first compiled call. Start the layer here and give torch back its count.
    threads = torch.get_num_threads()
    k.launch(np.zeros(1, dtype=np.int64))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return {"lattice_gather": k.lattice_gather, "lattice_depthwise": k.lattice_depthwise,
            "lattice_depthwise_weight_grad": k.lattice_depthwise_weight_grad,
            "lattice_gather_grouped": k.lattice_gather_grouped}


def _after_fork_in_child() -> None:
    """A process forked after the compiled loops ran (a ``DataLoader`` worker, ``multiprocessing`` with fork):
    numba's OpenMP pool (GNU OpenMP) cannot run there (it terminates the process), so the torch path runs."""
    global _FAILED, _WARNED
    if _KERNELS is not None and _FAILED is None:
        try:
            import numba
            layer = numba.threading_layer()
        except Exception:  # noqa: BLE001  (no layer started: nothing to protect)
            return
        if layer == "omp":
            _FAILED = ("this process was forked after they ran, and numba's OpenMP threading layer cannot run in "
                       "a forked child; use the 'spawn' start method (e.g. DataLoader(multiprocessing_context="
                       "'spawn')) to keep them")
            _WARNED = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _warn(reason: str) -> None:
    global _WARNED
    if not _WARNED:
        _WARNED = True
        warnings.warn(f"gridgraph's compiled loops are off ({reason}): the same numbers, but {COST}. "
                      "gridgraph info says which kernels are active.", RuntimeWarning, stacklevel=4)


def available(*tensors: Tensor) -> bool:
    """Whether the compiled loops can run on ``tensors`` (numba importable, CPU, float32/float64)."""
    global _KERNELS, _FAILED
    if torch.compiler.is_compiling():
        return False
    if any(t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64)
           for t in tensors if t is not None and t.is_floating_point()):
        return False
    if not ENABLED:
        _warn("GRIDGRAPH_COMPILED=0 or gridgraph.nn.compiled.ENABLED = False")
        return False
    if _FAILED is not None:
        _warn(_FAILED)
        return False
    if _KERNELS is None:
        try:
            _KERNELS = _build()
        except Exception as error:  # numba missing or unusable here: the torch path
            _FAILED = f"numba could not be used: {type(error).__name__}: {error}"
            _warn(_FAILED + "; pip install numba")
            return False
    return True


def describe() -> dict:
    """What runs the lattice kernels' loops here: ``{'compiled': bool, 'numba': version or None, 'threading':
    numba's threading layer or None, 'reason': why not, when not}``."""
    info = {"compiled": False, "numba": None, "threading": None, "reason": None}
    try:
        import numba

        info["numba"] = numba.__version__
    except Exception as error:  # pragma: no cover - where numba is absent
        info["reason"] = f"numba is not installed ({type(error).__name__})"
        return info
    if not ENABLED:
        info["reason"] = "switched off (GRIDGRAPH_COMPILED=0 or gridgraph.nn.compiled.ENABLED = False)"
        return info
    info["compiled"] = available(torch.zeros(1))
    if info["compiled"]:
        try:
            info["threading"] = numba.threading_layer()
        except ValueError:
            info["threading"] = None
    else:
        info["reason"] = _FAILED
    return info


def _np(t: Tensor):
    return t.detach().contiguous().numpy()


def _flat(t: Tensor):
    """A contiguous tensor's memory as a flat numpy array (no copy)."""
    if not t.is_contiguous():
        t = t.contiguous()
    return (t.detach() if t.requires_grad else t).numpy().reshape(-1)


_ZEROS: dict = {}


def _zeros(n: int, dtype: torch.dtype):
    key = (n, dtype)
    z = _ZEROS.get(key)
    if z is None:
        z = _ZEROS[key] = torch.zeros(n, dtype=dtype).numpy()
    return z


_THREADS = [0]


def _threads() -> None:
    """numba's thread count follows torch's (set only when torch's changes: the call costs microseconds)."""
    want = torch.get_num_threads()
    if want != _THREADS[0]:
        import numba

        numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS, want)))
        _THREADS[0] = want


# ------------------------------------------------------------------------------ lattice loops (2-D grids)
def _np_offsets(gather):
    """The gather's per-axis offsets as int64 arrays (made once, kept on the gather)."""
    import numpy as np

    if gather.np_offsets is None:
        gather.np_offsets = tuple(np.asarray(e, dtype=np.int64) for e in gather.offsets)
    return gather.np_offsets


def gather2d(src: Tensor, gather, start: int, stop: int, out: Tensor) -> Tensor:
    """The gathered rows ``start:stop`` of a 2-D lattice gather (:class:`gridgraph.nn.lattice.Gather`) into
    ``out`` ``[stop - start, S * C]`` (zeros outside the grid)."""
    _threads()
    (s0, s1), (o0, o1), (a0, a1) = gather.src_size, gather.out_size, gather.anchor
    e0, e1 = _np_offsets(gather)
    _KERNELS["lattice_gather"](_flat(src), s0, s1, src.size(-1), o0, o1, a0, a1, e0, e1,
                               start // o1, stop // o1, out.numpy().reshape(-1))
    return out


def gather2d_grouped(src: Tensor, gather, groups: int, start: int, stop: int, out: Tensor) -> Tensor:
    """Group-major gathered rows ``start:stop`` of a 2-D lattice gather into ``out`` ``[G, stop - start, S*C/G]``."""
    _threads()
    (s0, s1), (o0, o1), (a0, a1) = gather.src_size, gather.out_size, gather.anchor
    e0, e1 = _np_offsets(gather)
    _KERNELS["lattice_gather_grouped"](_flat(src), s0, s1, src.size(-1), o0, o1, a0, a1, e0, e1, groups,
                                       start // o1, stop // o1, out.numpy().reshape(-1))
    return out


def depthwise2d(src: Tensor, gather, w: Tensor, bias: Optional[Tensor], out: Tensor) -> Tensor:
    """``out[(b, o), c] = bias[c] + sum_k w[k, c] src[b, A*o + E_k, c]`` on a 2-D lattice gather (``w`` ``[S, C]``)."""
    _threads()
    (s0, s1), (o0, o1), (a0, a1) = gather.src_size, gather.out_size, gather.anchor
    e0, e1 = _np_offsets(gather)
    b = _np(bias) if bias is not None else _zeros(src.size(-1), src.dtype)
    _KERNELS["lattice_depthwise"](_flat(src), s0, s1, src.size(-1), o0, o1, a0, a1, e0, e1, gather.num_images,
                                  _flat(w), b, out.numpy().reshape(-1))
    return out


def depthwise_weight_grad2d(src: Tensor, gather, g: Tensor) -> Tensor:
    """``grad[k, c] = sum_(b, o) src[b, A*o + E_k, c] g[(b, o), c]`` on a 2-D lattice gather: ``[S, C]``."""
    _threads()
    (s0, s1), (o0, o1), (a0, a1) = gather.src_size, gather.out_size, gather.anchor
    e0, e1 = _np_offsets(gather)
    c = src.size(-1)
    rows = gather.num_images * o0
    parts = max(1, min(torch.get_num_threads() * 4, rows))
    partial = src.new_zeros(parts, gather.num_slots, c)
    _KERNELS["lattice_depthwise_weight_grad"](_flat(src), s0, s1, c, o0, o1, a0, a1, e0, e1, gather.num_images,
                                              _flat(g), partial.numpy().reshape(parts, -1))
    return partial.sum(0)

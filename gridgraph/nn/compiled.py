"""Compiled CPU loops for the kernels that torch's operators serve badly: numba, when it is installed.

Some of the table kernels read rows much narrower than a cache line (a 3-channel stem gathers 3 floats
per slot) or do a few multiply-adds per row over many rows (depthwise layers): as torch operations they
cost a pass over memory per tap. Each loop here does the same arithmetic in one pass, reading the same
neighbour table (``index[i, t]`` = the source that slot ``t`` of row ``i`` reads, ``-1``: none), so the
honesty rule holds: gathers by the table, no convolution or unfold. They run only on CPU tensors of
float32/float64, only where they return exactly what the torch path returns up to rounding, and only when
numba imports (``pip install gridgraph[fast]``); :data:`ENABLED` turns them off. Every caller keeps its
torch path as the fallback, and the tests run both.

* :func:`gather_rows`: ``out[i, s*C:(s+1)*C] = src[index[i, s]]`` (zeros where ``index`` is ``-1``);
* :func:`gather_sum`: ``out[i] = sum_s src[index[i, s]]`` (``-1`` skipped; the transform-then-gather
  sums, forward and input gradient);
* :func:`depthwise`: ``out[i, c] = bias[c] + sum_s src[index[i, s], c] * w[s, c]`` (depthwise forward,
  and its input gradient on the reverse table);
* :func:`depthwise_weight_grad`: ``grad[s, c] = sum_i src[index[i, s], c] * g[i, c]``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

__all__ = ["ENABLED", "available", "gather_rows", "gather_sum", "depthwise", "depthwise_weight_grad"]

#: Use the compiled loops where numba is installed (set False, or GRIDGRAPH_COMPILED=0, to use torch's ops).
ENABLED = os.environ.get("GRIDGRAPH_COMPILED", "1") != "0"

_KERNELS = None
_FAILED = False


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
    return {"gather_rows": k.gather_rows, "gather_sum": k.gather_sum, "depthwise": k.depthwise,
            "depthwise_weight_grad": k.depthwise_weight_grad, "lattice_gather": k.lattice_gather,
            "lattice_depthwise": k.lattice_depthwise, "lattice_depthwise_weight_grad": k.lattice_depthwise_weight_grad,
            "lattice_gather_grouped": k.lattice_gather_grouped}


def available(*tensors: Tensor) -> bool:
    """Whether the compiled loops can run on ``tensors`` (numba importable, CPU, float32/float64)."""
    global _KERNELS, _FAILED
    if not ENABLED or _FAILED or torch.compiler.is_compiling():
        return False
    if any(t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64)
           for t in tensors if t is not None and t.is_floating_point()):
        return False
    if _KERNELS is None:
        try:
            _KERNELS = _build()
        except Exception:  # numba missing or unusable here: the torch path
            _FAILED = True
            return False
    return True


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


def gather_rows(src: Tensor, index: Tensor, out: Tensor) -> Tensor:
    """``out[i] = concat_s src[index[i, s]]`` (``out`` ``[n, S*C]``, contiguous; zeros for ``-1``)."""
    _threads()
    _KERNELS["gather_rows"](_np(src), index.numpy(), out.numpy())
    return out


def gather_sum(src: Tensor, index: Tensor, out: Tensor) -> Tensor:
    """``out[i] = sum_s src[index[i, s]]`` (``-1`` skipped; ``out`` ``[n, C]`` contiguous)."""
    _threads()
    _KERNELS["gather_sum"](_np(src), index.numpy(), out.numpy())
    return out


def depthwise(src: Tensor, index: Tensor, w: Tensor, bias: Optional[Tensor], out: Tensor) -> Tensor:
    """``out[i, c] = bias[c] + sum_s src[index[i, s], c] * w[s, c]`` (``w`` ``[S, C]``)."""
    _threads()
    b = bias if bias is not None else src.new_zeros(src.size(1))
    _KERNELS["depthwise"](_np(src), index.numpy(), _np(w), _np(b), out.numpy())
    return out


def depthwise_weight_grad(src: Tensor, index: Tensor, g: Tensor) -> Tensor:
    """``grad[s, c] = sum_i src[index[i, s], c] * g[i, c]``: ``[S, C]``."""
    _threads()
    parts = max(1, min(torch.get_num_threads() * 4, index.size(0) // 256 or 1))
    partial = src.new_zeros(parts, index.size(1), src.size(1))
    _KERNELS["depthwise_weight_grad"](_np(src), index.numpy(), _np(g), partial.numpy())
    return partial.sum(0)


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

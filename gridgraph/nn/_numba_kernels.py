"""The numba loops behind :mod:`gridgraph.nn.compiled` (imported only when they are first needed)."""
import numpy as np
from numba import njit, prange

__all__ = ["gather_rows", "gather_sum", "depthwise", "depthwise_weight_grad"]

@njit(parallel=True, cache=True)
def gather_rows(src, index, out):
    n, slots = index.shape
    c = src.shape[1]
    for i in prange(n):
        for s in range(slots):
            j = index[i, s]
            base = s * c
            if j >= 0:
                for k in range(c):
                    out[i, base + k] = src[j, k]
            else:
                for k in range(c):
                    out[i, base + k] = 0

@njit(parallel=True, cache=True)
def gather_sum(src, index, out):
    n, slots = index.shape
    c = src.shape[1]
    chunk = 64
    for ch in prange((n + chunk - 1) // chunk):
        acc = np.empty(c, dtype=src.dtype)
        for i in range(ch * chunk, min(n, ch * chunk + chunk)):
            for k in range(c):
                acc[k] = 0
            for s in range(slots):
                j = index[i, s]
                if j >= 0:
                    for k in range(c):
                        acc[k] += src[j, k]
            for k in range(c):
                out[i, k] = acc[k]

@njit(parallel=True, cache=True)
def depthwise(src, index, w, bias, out):
    n, slots = index.shape
    c = src.shape[1]
    chunk = 64
    for ch in prange((n + chunk - 1) // chunk):
        acc = np.empty(c, dtype=src.dtype)
        for i in range(ch * chunk, min(n, ch * chunk + chunk)):
            for k in range(c):
                acc[k] = bias[k]
            for s in range(slots):
                j = index[i, s]
                if j >= 0:
                    for k in range(c):
                        acc[k] += src[j, k] * w[s, k]
            for k in range(c):
                out[i, k] = acc[k]

@njit(parallel=True, cache=True)
def depthwise_weight_grad(src, index, g, partial):
    n, slots = index.shape
    c = src.shape[1]
    parts = partial.shape[0]
    per = (n + parts - 1) // parts
    for p in prange(parts):
        for i in range(p * per, min(n, p * per + per)):
            for s in range(slots):
                j = index[i, s]
                if j >= 0:
                    for k in range(c):
                        partial[p, s, k] += src[j, k] * g[i, k]

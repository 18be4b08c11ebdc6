"""The numba loops behind :mod:`gridgraph.nn.compiled` (imported only when they are first needed)."""
import numpy as np
from numba import njit, prange

__all__ = ["launch", "gather_rows", "gather_sum", "depthwise", "depthwise_weight_grad"]


@njit(parallel=True, cache=True)
def launch(out):
    """A trivial parallel loop: its first call starts numba's threading layer."""
    for i in prange(out.shape[0]):
        out[i] = i

@njit(parallel=True, cache=True)
def gather_rows(src, index, out):
    n, slots = index.shape
    c = src.shape[1]
    for i in prange(n):
        for s in range(slots):
            j = index[i, s]
            b = s * c
            # One to four channels (an RGB stem, a mask, a grey image) spelled out: with the channel count
            # known, each slot is a few plain moves instead of a loop (the 3-channel gather of a 7x7 stem:
            # 1.3 -> 0.38 ms on one thread). The branch on c is the same for every slot.
            if c == 3:
                if j >= 0:
                    out[i, b] = src[j, 0]; out[i, b + 1] = src[j, 1]; out[i, b + 2] = src[j, 2]
                else:
                    out[i, b] = 0; out[i, b + 1] = 0; out[i, b + 2] = 0
            elif c == 1:
                out[i, b] = src[j, 0] if j >= 0 else 0
            elif c == 2:
                if j >= 0:
                    out[i, b] = src[j, 0]; out[i, b + 1] = src[j, 1]
                else:
                    out[i, b] = 0; out[i, b + 1] = 0
            elif c == 4:
                if j >= 0:
                    out[i, b] = src[j, 0]; out[i, b + 1] = src[j, 1]
                    out[i, b + 2] = src[j, 2]; out[i, b + 3] = src[j, 3]
                else:
                    out[i, b] = 0; out[i, b + 1] = 0; out[i, b + 2] = 0; out[i, b + 3] = 0
            elif j >= 0:
                for k in range(c):
                    out[i, b + k] = src[j, k]
            else:
                for k in range(c):
                    out[i, b + k] = 0

# The sums below take the slots of a row nine (then three) at a time when all of them are present: one
# pass over the channels per group instead of one per slot (a pass over 64-128 channels is a few vector
# instructions, so the loop's own overhead and the accumulator's loads and stores were most of the time).

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
            s = 0
            while s + 9 <= slots:
                j0 = index[i, s]; j1 = index[i, s + 1]; j2 = index[i, s + 2]
                j3 = index[i, s + 3]; j4 = index[i, s + 4]; j5 = index[i, s + 5]
                j6 = index[i, s + 6]; j7 = index[i, s + 7]; j8 = index[i, s + 8]
                if min(j0, j1, j2, j3, j4, j5, j6, j7, j8) < 0:
                    break
                for k in range(c):
                    acc[k] += (src[j0, k] + src[j1, k] + src[j2, k] + src[j3, k] + src[j4, k] + src[j5, k]
                               + src[j6, k] + src[j7, k] + src[j8, k])
                s += 9
            while s + 3 <= slots:
                j0 = index[i, s]; j1 = index[i, s + 1]; j2 = index[i, s + 2]
                if min(j0, j1, j2) < 0:
                    break
                for k in range(c):
                    acc[k] += src[j0, k] + src[j1, k] + src[j2, k]
                s += 3
            for t in range(s, slots):
                j = index[i, t]
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
            if slots == 9:  # a 3x3 row away from the borders: straight into out, no accumulator pass
                j0 = index[i, 0]; j1 = index[i, 1]; j2 = index[i, 2]
                j3 = index[i, 3]; j4 = index[i, 4]; j5 = index[i, 5]
                j6 = index[i, 6]; j7 = index[i, 7]; j8 = index[i, 8]
                if min(j0, j1, j2, j3, j4, j5, j6, j7, j8) >= 0:
                    for k in range(c):
                        out[i, k] = (bias[k] + src[j0, k] * w[0, k] + src[j1, k] * w[1, k] + src[j2, k] * w[2, k]
                                     + src[j3, k] * w[3, k] + src[j4, k] * w[4, k] + src[j5, k] * w[5, k]
                                     + src[j6, k] * w[6, k] + src[j7, k] * w[7, k] + src[j8, k] * w[8, k])
                    continue
            for k in range(c):
                acc[k] = bias[k]
            s = 0
            while s + 9 <= slots:
                j0 = index[i, s]; j1 = index[i, s + 1]; j2 = index[i, s + 2]
                j3 = index[i, s + 3]; j4 = index[i, s + 4]; j5 = index[i, s + 5]
                j6 = index[i, s + 6]; j7 = index[i, s + 7]; j8 = index[i, s + 8]
                if min(j0, j1, j2, j3, j4, j5, j6, j7, j8) < 0:
                    break
                for k in range(c):
                    acc[k] += (src[j0, k] * w[s, k] + src[j1, k] * w[s + 1, k] + src[j2, k] * w[s + 2, k]
                               + src[j3, k] * w[s + 3, k] + src[j4, k] * w[s + 4, k] + src[j5, k] * w[s + 5, k]
                               + src[j6, k] * w[s + 6, k] + src[j7, k] * w[s + 7, k] + src[j8, k] * w[s + 8, k])
                s += 9
            while s + 3 <= slots:
                j0 = index[i, s]; j1 = index[i, s + 1]; j2 = index[i, s + 2]
                if min(j0, j1, j2) < 0:
                    break
                for k in range(c):
                    acc[k] += src[j0, k] * w[s, k] + src[j1, k] * w[s + 1, k] + src[j2, k] * w[s + 2, k]
                s += 3
            for t in range(s, slots):
                j = index[i, t]
                if j >= 0:
                    for k in range(c):
                        acc[k] += src[j, k] * w[t, k]
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

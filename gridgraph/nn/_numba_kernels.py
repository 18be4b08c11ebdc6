"""The numba loops behind :mod:`gridgraph.nn.compiled` (imported only when they are first needed)."""
import numpy as np
from numba import njit, prange

__all__ = ["launch", "lattice_gather", "lattice_depthwise", "lattice_depthwise_weight_grad", "lattice_gather_grouped"]


@njit(parallel=True, cache=True)
def launch(out):
    """A trivial parallel loop: its first call starts numba's threading layer."""
    for i in prange(out.shape[0]):
        out[i] = i

# ------------------------------------------------------------------------------ lattice loops (2-D grids)
# Node features flat ([B*S0*S1*C]); a gather reads, for target (b, o0, o1) and slot (k0, k1), the source pixel
# (b, A0*o0 + E0[k0], A1*o1 + E1[k1]) (nothing / zero outside the S0 x S1 grid). Rows are (b, o0) pairs.

@njit(parallel=True, cache=True, boundscheck=False)
def lattice_gather(src, S0, S1, C, O0, O1, A0, A1, E0, E1, row_lo, row_hi, out):
    """out[(r, o1), (k0, k1, c)] = src[b, A0*o0 + E0[k0], A1*o1 + E1[k1], c], zero outside the grid."""
    K0 = E0.shape[0]
    K1 = E1.shape[0]
    T = K0 * K1 * C
    run = K1 * C
    consecutive = K1 == 1 or E1[K1 - 1] - E1[0] == K1 - 1
    for r in prange(row_hi - row_lo):
        row = row_lo + r
        b = row // O0
        o0 = row - b * O0
        for o1 in range(O1):
            ob = (r * O1 + o1) * T
            w0 = A1 * o1 + E1[0]
            for k0 in range(K0):
                h = A0 * o0 + E0[k0]
                dst = out[ob + k0 * run:ob + (k0 + 1) * run]
                if h < 0 or h >= S0:
                    for q in range(run):
                        dst[q] = 0
                    continue
                sb = (b * S0 + h) * S1
                if consecutive and w0 >= 0 and w0 + K1 <= S1:
                    s = src[(sb + w0) * C:(sb + w0 + K1) * C]
                    for q in range(run):
                        dst[q] = s[q]
                    continue
                for k1 in range(K1):
                    w = A1 * o1 + E1[k1]
                    d = dst[k1 * C:(k1 + 1) * C]
                    if w < 0 or w >= S1:
                        for c in range(C):
                            d[c] = 0
                    else:
                        s = src[(sb + w) * C:(sb + w + 1) * C]
                        for c in range(C):
                            d[c] = s[c]


@njit(parallel=True, cache=True, boundscheck=False)
def lattice_depthwise(src, S0, S1, C, O0, O1, A0, A1, E0, E1, B, w, bias, out):
    """out[(b, o), c] = bias[c] + sum_k w[k, c] src[b, A*o + E_k, c] (slots outside the grid add nothing);
    w flat [K0*K1*C], out flat [B*O0*O1*C]. A window inside the grid sums its taps nine (then three) at a
    time in one expression per pass over the channels; windows at the border go tap by tap."""
    K0 = E0.shape[0]
    K1 = E1.shape[0]
    T = K0 * K1
    off = np.empty(T, dtype=np.int64)  # each tap's source offset from the window's anchor pixel
    for k0 in range(K0):
        for k1 in range(K1):
            off[k0 * K1 + k1] = (E0[k0] * S1 + E1[k1]) * C
    nine = K0 == 3 and K1 == 3
    for row in prange(B * O0):
        b = row // O0
        o0 = row - b * O0
        h0 = A0 * o0
        inside_h = h0 + E0[0] >= 0 and h0 + E0[K0 - 1] < S0
        for o1 in range(O1):
            o = out[(row * O1 + o1) * C:(row * O1 + o1 + 1) * C]
            w0 = A1 * o1
            if nine and inside_h and w0 + E1[0] >= 0 and w0 + E1[2] < S1:  # a 3x3 window: its rows spelled out
                r0 = ((b * S0 + h0 + E0[0]) * S1 + w0) * C
                r1 = ((b * S0 + h0 + E0[1]) * S1 + w0) * C
                r2 = ((b * S0 + h0 + E0[2]) * S1 + w0) * C
                c0 = E1[0] * C
                c1 = E1[1] * C
                c2 = E1[2] * C
                a0 = src[r0 + c0:r0 + c0 + C]; a1 = src[r0 + c1:r0 + c1 + C]; a2 = src[r0 + c2:r0 + c2 + C]
                a3 = src[r1 + c0:r1 + c0 + C]; a4 = src[r1 + c1:r1 + c1 + C]; a5 = src[r1 + c2:r1 + c2 + C]
                a6 = src[r2 + c0:r2 + c0 + C]; a7 = src[r2 + c1:r2 + c1 + C]; a8 = src[r2 + c2:r2 + c2 + C]
                v0 = w[0:C]; v1 = w[C:2 * C]; v2 = w[2 * C:3 * C]; v3 = w[3 * C:4 * C]; v4 = w[4 * C:5 * C]
                v5 = w[5 * C:6 * C]; v6 = w[6 * C:7 * C]; v7 = w[7 * C:8 * C]; v8 = w[8 * C:9 * C]
                for c in range(C):
                    o[c] = (bias[c] + a0[c] * v0[c] + a1[c] * v1[c] + a2[c] * v2[c] + a3[c] * v3[c] + a4[c] * v4[c]
                            + a5[c] * v5[c] + a6[c] * v6[c] + a7[c] * v7[c] + a8[c] * v8[c])
                continue
            if inside_h and w0 + E1[0] >= 0 and w0 + E1[K1 - 1] < S1:
                base = ((b * S0 + h0) * S1 + w0) * C
                t = 0
                while t + 9 <= T:
                    a0 = src[base + off[t]:base + off[t] + C]; a1 = src[base + off[t + 1]:base + off[t + 1] + C]
                    a2 = src[base + off[t + 2]:base + off[t + 2] + C]; a3 = src[base + off[t + 3]:base + off[t + 3] + C]
                    a4 = src[base + off[t + 4]:base + off[t + 4] + C]; a5 = src[base + off[t + 5]:base + off[t + 5] + C]
                    a6 = src[base + off[t + 6]:base + off[t + 6] + C]; a7 = src[base + off[t + 7]:base + off[t + 7] + C]
                    a8 = src[base + off[t + 8]:base + off[t + 8] + C]
                    v0 = w[t * C:(t + 1) * C]; v1 = w[(t + 1) * C:(t + 2) * C]; v2 = w[(t + 2) * C:(t + 3) * C]
                    v3 = w[(t + 3) * C:(t + 4) * C]; v4 = w[(t + 4) * C:(t + 5) * C]; v5 = w[(t + 5) * C:(t + 6) * C]
                    v6 = w[(t + 6) * C:(t + 7) * C]; v7 = w[(t + 7) * C:(t + 8) * C]; v8 = w[(t + 8) * C:(t + 9) * C]
                    if t == 0:
                        for c in range(C):
                            o[c] = (bias[c] + a0[c] * v0[c] + a1[c] * v1[c] + a2[c] * v2[c] + a3[c] * v3[c]
                                    + a4[c] * v4[c] + a5[c] * v5[c] + a6[c] * v6[c] + a7[c] * v7[c] + a8[c] * v8[c])
                    else:
                        for c in range(C):
                            o[c] += (a0[c] * v0[c] + a1[c] * v1[c] + a2[c] * v2[c] + a3[c] * v3[c] + a4[c] * v4[c]
                                     + a5[c] * v5[c] + a6[c] * v6[c] + a7[c] * v7[c] + a8[c] * v8[c])
                    t += 9
                if t == 0:
                    for c in range(C):
                        o[c] = bias[c]
                while t + 3 <= T:
                    a0 = src[base + off[t]:base + off[t] + C]; a1 = src[base + off[t + 1]:base + off[t + 1] + C]
                    a2 = src[base + off[t + 2]:base + off[t + 2] + C]
                    v0 = w[t * C:(t + 1) * C]; v1 = w[(t + 1) * C:(t + 2) * C]; v2 = w[(t + 2) * C:(t + 3) * C]
                    for c in range(C):
                        o[c] += a0[c] * v0[c] + a1[c] * v1[c] + a2[c] * v2[c]
                    t += 3
                while t < T:
                    a0 = src[base + off[t]:base + off[t] + C]
                    v0 = w[t * C:(t + 1) * C]
                    for c in range(C):
                        o[c] += a0[c] * v0[c]
                    t += 1
                continue
            for c in range(C):
                o[c] = bias[c]
            for k0 in range(K0):
                h = h0 + E0[k0]
                if h < 0 or h >= S0:
                    continue
                for k1 in range(K1):
                    x = w0 + E1[k1]
                    if x < 0 or x >= S1:
                        continue
                    sv = src[((b * S0 + h) * S1 + x) * C:((b * S0 + h) * S1 + x + 1) * C]
                    v = w[(k0 * K1 + k1) * C:(k0 * K1 + k1 + 1) * C]
                    for c in range(C):
                        o[c] += sv[c] * v[c]


@njit(parallel=True, cache=True, boundscheck=False)
def lattice_depthwise_weight_grad(src, S0, S1, C, O0, O1, A0, A1, E0, E1, B, g, partial):
    """partial[p, k, c] = sum over the rows of part p of src[b, A*o + E_k, c] * g[(b, o), c]."""
    K0 = E0.shape[0]
    K1 = E1.shape[0]
    parts = partial.shape[0]
    rows = B * O0
    per = (rows + parts - 1) // parts
    for p in prange(parts):
        acc = partial[p]
        for row in range(p * per, min(rows, p * per + per)):
            b = row // O0
            o0 = row - b * O0
            for o1 in range(O1):
                gg = g[(row * O1 + o1) * C:(row * O1 + o1 + 1) * C]
                for k0 in range(K0):
                    h = A0 * o0 + E0[k0]
                    if h < 0 or h >= S0:
                        continue
                    for k1 in range(K1):
                        x = A1 * o1 + E1[k1]
                        if x < 0 or x >= S1:
                            continue
                        s = src[((b * S0 + h) * S1 + x) * C:((b * S0 + h) * S1 + x + 1) * C]
                        a = acc[(k0 * K1 + k1) * C:(k0 * K1 + k1 + 1) * C]
                        for c in range(C):
                            a[c] += s[c] * gg[c]


@njit(parallel=True, cache=True, boundscheck=False)
def lattice_gather_grouped(src, S0, S1, C, O0, O1, A0, A1, E0, E1, G, row_lo, row_hi, out):
    """Group-major gathered rows: out[g, (r, o1), (k0, k1, i)] = src[b, A0*o0 + E0[k0], A1*o1 + E1[k1], g*a + i]
    (a = C / G; zero outside the grid), for the rows (b, o0) in [row_lo, row_hi)."""
    K0 = E0.shape[0]
    K1 = E1.shape[0]
    a = C // G
    T = K0 * K1
    M = (row_hi - row_lo) * O1
    for r in prange(row_hi - row_lo):
        row = row_lo + r
        b = row // O0
        o0 = row - b * O0
        for o1 in range(O1):
            m = r * O1 + o1
            for k0 in range(K0):
                h = A0 * o0 + E0[k0]
                for k1 in range(K1):
                    x = A1 * o1 + E1[k1]
                    t = k0 * K1 + k1
                    inside = h >= 0 and h < S0 and x >= 0 and x < S1
                    sb = ((b * S0 + h) * S1 + x) * C
                    for g in range(G):
                        d = out[(g * M + m) * T * a + t * a:(g * M + m) * T * a + (t + 1) * a]
                        if inside:
                            sv = src[sb + g * a:sb + (g + 1) * a]
                            for i in range(a):
                                d[i] = sv[i]
                        else:
                            for i in range(a):
                                d[i] = 0

"""CPU kernels for NF4 quantisation, compiled by numba. Callers go through :mod:`qtool.nf4`.

Why numba: bitsandbytes' CPU ``quantize_4bit`` is pure torch (one pass per operation, ~12 bytes of temporaries per
parameter). These kernels do the same arithmetic in one fused pass over 16-bit (or 32-bit) input bits, in parallel
over groups of blocks, and reproduce bitsandbytes' results bit for bit:

* element -> fp32 exactly (fp16 via the exponent-rebias multiply, bf16 by a 16-bit shift, fp32 as is);
* absmax of a block = max |x| in fp32 (an input value, so exact), found as the integer max of the sign-cleared bits;
* scale = fp32 reciprocal of absmax (clamped to 1e-38 as bitsandbytes does), then ``x * scale`` in fp32;
* code = number of NF4 thresholds strictly below the scaled value (so a value on a threshold takes the lower code).

Inputs are raw bit patterns: ``uint16`` for fp16/bf16, ``uint32`` for fp32 (``kind`` says which).
"""
from __future__ import annotations

import numba as nb
import numpy as np

KIND_F16, KIND_BF16, KIND_F32 = 0, 1, 2
GROUP_BLOCKS = 256  # blocks per parallel work item: 16 Ki elements at blocksize 64
LANES = 16  # independent partial sums in reconstruction_stats (one AVX-512 register of fp32, two of fp64)
_MIN_ABSMAX = np.float32(1e-38)  # bitsandbytes: absmax.clamp(min=1e-38) before the reciprocal
_F16_REBIAS = np.float32(2.0**112)  # (fp16 magnitude bits << 13) read as fp32, times 2**112, is the fp16 value

_NUMBA = dict(cache=True, nogil=True, boundscheck=False, fastmath=False)


@nb.njit(**_NUMBA)
def _to_f32_bits(src, kind, u):
    """Write the fp32 bit pattern of each input element into ``u`` (uint32); return the count of Inf/NaN inputs."""
    n = src.size
    bad = 0
    if kind == KIND_BF16:
        for j in range(n):
            u[j] = np.uint32(src[j]) << 16
        for j in range(n):
            bad += (np.uint32(src[j]) & np.uint32(0x7FFF)) >= np.uint32(0x7F80)
    elif kind == KIND_F16:
        f = u.view(np.float32)
        for j in range(n):
            u[j] = (np.uint32(src[j]) & np.uint32(0x7FFF)) << 13
        for j in range(n):
            f[j] = f[j] * _F16_REBIAS  # exact for normals and subnormals
        for j in range(n):
            h = np.uint32(src[j])
            bad += (h & np.uint32(0x7FFF)) >= np.uint32(0x7C00)
            u[j] = u[j] | ((h & np.uint32(0x8000)) << 16)
    else:
        for j in range(n):
            u[j] = src[j]
        for j in range(n):
            bad += (np.uint32(src[j]) & np.uint32(0x7FFFFFFF)) >= np.uint32(0x7F800000)
    return bad


@nb.njit(inline="always")
def _nf4_code(s, t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14):
    # 15 branch-free comparisons vectorise well; a value equal to a threshold stays below it (lower code).
    return (np.int32(s > t0) + np.int32(s > t1) + np.int32(s > t2) + np.int32(s > t3) + np.int32(s > t4)
            + np.int32(s > t5) + np.int32(s > t6) + np.int32(s > t7) + np.int32(s > t8) + np.int32(s > t9)
            + np.int32(s > t10) + np.int32(s > t11) + np.int32(s > t12) + np.int32(s > t13) + np.int32(s > t14))


@nb.njit(parallel=True, **_NUMBA)
def quantize_full_blocks(src, kind, n_blocks, blocksize, th, zero_block_code, packed, absmax):
    """Quantise blocks ``0 .. n_blocks-1`` (each ``blocksize`` elements) of ``src``.

    Writes ``packed[0 : n_blocks*blocksize/2]`` (first element of a pair in the high nibble) and ``absmax[0:n_blocks]``.
    An all-zero block gets ``zero_block_code`` for every element (7 on bitsandbytes' CPU path, 0 on its CUDA path).
    Returns the number of Inf/NaN inputs seen.
    """
    t0, t1, t2, t3, t4, t5, t6, t7 = th[0], th[1], th[2], th[3], th[4], th[5], th[6], th[7]
    t8, t9, t10, t11, t12, t13, t14 = th[8], th[9], th[10], th[11], th[12], th[13], th[14]
    n_groups = (n_blocks + GROUP_BLOCKS - 1) // GROUP_BLOCKS
    bad = np.zeros(n_groups, np.int64)
    half = blocksize // 2
    for g in nb.prange(n_groups):
        b0 = np.int64(g) * GROUP_BLOCKS
        nbk = min(b0 + GROUP_BLOCKS, n_blocks) - b0
        m = nbk * blocksize
        e0 = b0 * blocksize
        u = np.empty(m, np.uint32)  # group scratch: fp32 bits, then fp32 values
        f = u.view(np.float32)
        bad[g] = _to_f32_bits(src[e0:e0 + m], kind, u)
        am_bits = np.empty(1, np.uint32)  # to read a block's max |x| bits back as fp32
        am_f = am_bits.view(np.float32)
        for b in range(nbk):
            # per-block views with a 0-based loop: this is the form LLVM vectorises
            ub = u[b * blocksize:(b + 1) * blocksize]
            fb = f[b * blocksize:(b + 1) * blocksize]
            pb = packed[(e0 + b * blocksize) // 2:(e0 + b * blocksize) // 2 + half]
            # max |x| as the integer max of the sign-cleared bits (the same order for finite values): an integer
            # reduction vectorises, a float one does not without fastmath (NaN-aware compare chain, 4 cycles/element)
            mx = np.uint32(0)
            for j in range(blocksize):
                mx = max(mx, ub[j] & np.uint32(0x7FFFFFFF))
            am_bits[0] = mx
            am = am_f[0]
            absmax[b0 + b] = am
            if am == 0.0:
                pb[:] = np.uint8((zero_block_code << 4) | zero_block_code)
                continue
            r = np.float32(1.0) / max(am, _MIN_ABSMAX)
            for j in range(half):  # byte j = element 2j (high nibble), element 2j + 1 (low nibble)
                hi = _nf4_code(fb[2 * j] * r, t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14)
                lo = _nf4_code(fb[2 * j + 1] * r, t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14)
                pb[j] = np.uint8((hi << 4) | lo)
    return bad.sum()


@nb.njit(**_NUMBA)
def nested_codes_lut(y, blocksize, lut, codes, nested_absmax):
    """bitsandbytes 0.50 CPU ``quantize_blockwise`` (csrc/cpu_ops.cpp): 65,536-bin look-up table on ``y * (1/absmax)``.

    The bin index is ``uint16((clamp(v, -1, 1) + 1) * 0.5 * 65535 + 0.5)`` in fp32; an all-zero block gets code 0.
    """
    n = y.size
    for b in range((n + blocksize - 1) // blocksize):
        lo = b * blocksize
        hi = min(lo + blocksize, n)
        am = np.float32(0.0)
        for j in range(lo, hi):
            am = max(am, abs(y[j]))
        nested_absmax[b] = am
        if am == 0.0:
            codes[lo:hi] = 0
            continue
        inv = np.float32(1.0) / am
        for j in range(lo, hi):
            v = min(max(y[j] * inv, np.float32(-1.0)), np.float32(1.0))
            t = (v + np.float32(1.0)) * np.float32(0.5)
            t = t * np.float32(65535.0)
            codes[j] = lut[np.uint16(t + np.float32(0.5))]


@nb.njit(**_NUMBA)
def nested_codes_search(y, blocksize, code, codes, nested_absmax):
    """bitsandbytes CUDA ``kQuantizeBlockwise`` + ``dQuantize<0>``: a 7-step binary search over the 256-entry code,
    then a midpoint test (ties go to the pivot). An all-zero block scales to NaN there, which lands on code 0."""
    n = y.size
    for b in range((n + blocksize - 1) // blocksize):
        lo = b * blocksize
        hi = min(lo + blocksize, n)
        am = np.float32(0.0)
        for j in range(lo, hi):
            am = max(am, abs(y[j]))
        nested_absmax[b] = am
        if am == 0.0:
            codes[lo:hi] = 0
            continue
        inv = np.float32(1.0) / am
        for j in range(lo, hi):
            x = y[j] * inv
            pivot, upper_pivot, lower_pivot = 127, 255, 0
            lower, upper = np.float32(-1.0), np.float32(1.0)
            val = code[pivot]
            step = 64
            while step > 0:
                if x > val:
                    lower_pivot = pivot
                    lower = val
                    pivot += step
                else:
                    upper_pivot = pivot
                    upper = val
                    pivot -= step
                val = code[pivot]
                step >>= 1
            if upper_pivot == 255:
                upper = code[upper_pivot]
            if lower_pivot == 0:
                lower = code[lower_pivot]
            if x > val:
                codes[j] = upper_pivot if x > (upper + val) * np.float32(0.5) else pivot
            else:
                codes[j] = lower_pivot if x < (lower + val) * np.float32(0.5) else pivot


@nb.njit(inline="always")
def _decode_block(pb, a, code, out):
    """Block of 2*len(pb) elements: ``out[2j] = code[hi nibble] * a``, ``out[2j+1] = code[lo nibble] * a``."""
    for j in range(pb.size):
        byte = np.int64(pb[j])
        out[2 * j] = code[byte >> 4] * a
        out[2 * j + 1] = code[byte & 15] * a


@nb.njit(parallel=True, **_NUMBA)
def dequantize_blocks(packed, absmax, code, blocksize, n, out):
    """out[i] = code[nibble i] * absmax[i // blocksize] in fp32, for the n elements (``out`` has n elements)."""
    n_blocks = (n + blocksize - 1) // blocksize
    half = blocksize // 2
    for b in nb.prange(n_blocks):
        lo = np.int64(b) * blocksize
        if lo + blocksize <= n:
            _decode_block(packed[lo // 2:lo // 2 + half], absmax[b], code, out[lo:lo + blocksize])
        else:  # the last, partial block (maybe odd): decode into scratch and copy what exists
            tmp = np.empty(blocksize, np.float32)
            _decode_block(packed[lo // 2:], absmax[b], code, tmp)
            out[lo:n] = tmp[:n - lo]


@nb.njit(inline="always")
def _accumulate(x32, c, stored, exact, lane, a2, e2, i2, mx, nbad):
    x = np.float64(x32)
    xh = c * stored
    d = x - np.float64(xh)
    di = x - np.float64(c * exact)
    a2[lane] += x * x
    e2[lane] += d * d
    i2[lane] += di * di
    mx[lane] = max(mx[lane], abs(d))
    nbad[lane] += not np.isfinite(xh)


@nb.njit(parallel=True, **_NUMBA)
def reconstruction_stats(src, kind, packed, absmax, code, blocksize, n, exact_absmax):
    """Compare the dequantised tensor with its source, block by block, without materialising either in full.

    ``absmax`` is what the loaders use (after double quantisation); each block's exact ``max |x|`` is written to
    ``exact_absmax`` (fp32, one per block) so that the caller can check the stored constants. Returns, with sums in
    fp64:
    (sum x^2, sum (x - x_hat)^2, sum (x - x_ideal)^2, max |x - x_hat|, count of non-finite x_hat), where
    ``x_hat = code[q] * absmax[b]`` exactly as the loaders compute it (fp32; they then round to the model dtype, which
    moves it by less than 1 ulp of that dtype) and ``x_ideal = code[q] * max|x in block|`` is what the same codes
    give with the exact absmax — the error NF4 itself makes on this tensor.
    """
    n_blocks = (n + blocksize - 1) // blocksize
    n_groups = (n_blocks + GROUP_BLOCKS - 1) // GROUP_BLOCKS
    sums = np.zeros((n_groups, 4))  # sum x^2, sum err^2, sum ideal err^2, max |err|
    bad = np.zeros(n_groups, np.int64)
    for g in nb.prange(n_groups):
        b0 = np.int64(g) * GROUP_BLOCKS
        b1 = min(b0 + GROUP_BLOCKS, n_blocks)
        e0 = b0 * blocksize
        e1 = min(b1 * blocksize, n)
        u = np.empty(e1 - e0, np.uint32)
        f = u.view(np.float32)
        _to_f32_bits(src[e0:e1], kind, u)
        c = np.empty(blocksize, np.float32)
        # LANES independent partial sums per quantity: a single fp64 accumulator is a serial chain that LLVM may not
        # reorder; lanes vectorise (the statistics then differ from a serial sum in the last bits only)
        a2 = np.zeros(LANES)
        e2 = np.zeros(LANES)
        i2 = np.zeros(LANES)
        mx = np.zeros(LANES)
        nbad = np.zeros(LANES, np.int64)
        am_bits = np.empty(1, np.uint32)
        am_f = am_bits.view(np.float32)
        for b in range(b0, b1):
            lo = b * blocksize
            m = min(blocksize, n - lo)
            _decode_block(packed[lo // 2:lo // 2 + (m + 1) // 2], np.float32(1.0), code, c)
            ub = u[lo - e0:lo - e0 + m]
            fb = f[lo - e0:lo - e0 + m]
            ex = np.uint32(0)  # max |x| via the bits, as in quantize_full_blocks
            for j in range(m):
                ex = max(ex, ub[j] & np.uint32(0x7FFFFFFF))
            am_bits[0] = ex
            exact = am_f[0]
            exact_absmax[b] = exact
            stored = absmax[b]
            full = m - m % LANES
            for j0 in range(0, full, LANES):
                for lane in range(LANES):
                    _accumulate(fb[j0 + lane], c[j0 + lane], stored, exact, lane, a2, e2, i2, mx, nbad)
            for j in range(full, m):  # the rest of a partial last block
                _accumulate(fb[j], c[j], stored, exact, 0, a2, e2, i2, mx, nbad)
        sums[g, 0] = a2.sum()
        sums[g, 1] = e2.sum()
        sums[g, 2] = i2.sum()
        sums[g, 3] = mx.max()
        bad[g] = nbad.sum()
    emax = sums[:, 3].max() if n_groups else 0.0
    return sums[:, 0].sum(), sums[:, 1].sum(), sums[:, 2].sum(), emax, bad.sum()

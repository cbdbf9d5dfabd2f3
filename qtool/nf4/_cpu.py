"""CPU kernels for NF4 quantisation, compiled by numba. Callers go through :mod:`qtool.nf4.codec`.

Why numba: bitsandbytes' CPU ``quantize_4bit`` is pure torch (one pass per operation, ~12 bytes of temporaries per
parameter). These kernels do the same arithmetic in fused passes over 16-bit (or 32-bit) input bits, in parallel
over groups of blocks, and reproduce bitsandbytes' results bit for bit:

* element -> fp32 exactly (fp16 via the exponent-rebias multiply, bf16 by a 16-bit shift, fp32 as is);
* absmax of a block = max |x| in fp32 (an input value, so exact), found as the integer max of the sign-cleared bits;
* scale = fp32 reciprocal of absmax (clamped to 1e-38 as bitsandbytes does), then ``x * scale`` in fp32;
* code = number of NF4 thresholds strictly below the scaled value (so a value on a threshold takes the lower code).

A conversion makes two passes over each tensor: :func:`block_absmax` (cheap: an integer max over the input bits),
then, once :mod:`qtool.nf4.codec` has double-quantised those constants, :func:`quantize_blocks`, which writes the 4-bit
codes and, in the same pass, measures the reconstruction error against the stored constants. That measurement and
the stand-alone one of :func:`reconstruction_stats` (``qtool verify --source``) share :func:`_measure_block` and the
summation order, so both give the same numbers to the last bit.

Inputs are raw bit patterns: ``uint16`` for fp16/bf16, ``uint32`` for fp32 (``kind`` says which).
"""
from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

KIND_F16, KIND_BF16, KIND_F32 = 0, 1, 2
GROUP_BLOCKS = 256  # blocks per parallel work item: 16 Ki elements at blocksize 64 (= NESTED_BLOCKSIZE of nf4)
LANES = 16  # independent partial sums in _measure_block (one AVX-512 register of fp32, two of fp64)
N_SUMS, N_COUNTS = 4, 2  # per group: (sum x^2, sum err^2, sum ideal err^2, max |err|), (non-finite x_hat, bad constants)
_MIN_ABSMAX = np.float32(1e-38)  # bitsandbytes: absmax.clamp(min=1e-38) before the reciprocal
_F16_REBIAS = np.float32(2.0**112)  # (fp16 magnitude bits << 13) read as fp32, times 2**112, is the fp16 value

_NUMBA = dict(cache=True, nogil=True, boundscheck=False, fastmath=False)


# ------------------------------------------------------------------------------------------------ one block
@intrinsic
def _f32_from_bits(typingctx, u):
    """The fp32 whose bit pattern is the uint32 ``u``: a register move (numba has no scalar ``view``, and a 1-element
    array per call costs a heap allocation per block)."""
    return types.float32(types.uint32), lambda context, builder, sig, args: builder.bitcast(args[0], ir.FloatType())


@intrinsic
def _bits_of_f32(typingctx, x):
    """The uint32 bit pattern of the fp32 ``x`` (inverse of :func:`_f32_from_bits`)."""
    return types.uint32(types.float32), lambda context, builder, sig, args: builder.bitcast(args[0], ir.IntType(32))


@nb.njit(inline="always")
def _to_f32_block(sb, kind, f):
    """fp32 values of one block of input bits ``sb`` into ``f`` (same length). A block is at most a few KiB, so the
    three short loops of the fp16 case run from L1 (converting a whole group first, through a 64 KiB buffer in L2,
    made the kernel ~25% slower)."""
    u = f.view(np.uint32)
    if kind == KIND_F16:
        for j in range(sb.size):
            u[j] = (np.uint32(sb[j]) & np.uint32(0x7FFF)) << 13
        for j in range(sb.size):
            f[j] = f[j] * _F16_REBIAS  # exact for normals and subnormals; Inf/NaN are refused before this runs
        for j in range(sb.size):
            u[j] = u[j] | ((np.uint32(sb[j]) & np.uint32(0x8000)) << 16)
    elif kind == KIND_BF16:
        for j in range(sb.size):
            u[j] = np.uint32(sb[j]) << 16
    else:
        for j in range(sb.size):
            u[j] = sb[j]


@nb.njit(inline="always")
def _block_absmax(sb, kind):
    """(max |x| of the block as fp32, whether it holds Inf/NaN). The max is taken over the sign-cleared bits, which
    order finite values like their magnitudes: an integer reduction vectorises, a float one does not without fastmath
    (a NaN-aware compare chain, 4 cycles/element)."""
    if kind == KIND_F32:
        mx = np.uint32(0)
        for j in range(sb.size):
            mx = max(mx, sb[j] & np.uint32(0x7FFFFFFF))
        return _f32_from_bits(mx), mx >= np.uint32(0x7F800000)
    mx16 = np.uint16(0)
    for j in range(sb.size):
        mx16 = max(mx16, sb[j] & np.uint16(0x7FFF))
    if kind == KIND_BF16:
        return _f32_from_bits(np.uint32(np.uint32(mx16) << 16)), mx16 >= np.uint16(0x7F80)
    return _f32_from_bits(np.uint32(np.uint32(mx16) << 13)) * _F16_REBIAS, mx16 >= np.uint16(0x7C00)


@nb.njit(inline="always")
def _nf4_code(s, t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14):
    # 15 branch-free comparisons vectorise well; a value equal to a threshold stays below it (lower code).
    return (np.int32(s > t0) + np.int32(s > t1) + np.int32(s > t2) + np.int32(s > t3) + np.int32(s > t4)
            + np.int32(s > t5) + np.int32(s > t6) + np.int32(s > t7) + np.int32(s > t8) + np.int32(s > t9)
            + np.int32(s > t10) + np.int32(s > t11) + np.int32(s > t12) + np.int32(s > t13) + np.int32(s > t14))


@nb.njit(inline="always")
def _decode_block(pb, a, code, out):
    """Block of 2*len(pb) elements: ``out[2j] = code[hi nibble] * a``, ``out[2j+1] = code[lo nibble] * a``."""
    for j in range(pb.size):
        byte = np.int64(pb[j])
        out[2 * j] = code[byte >> 4] * a
        out[2 * j + 1] = code[byte & 15] * a


@intrinsic
def _accumulate_lanes(typingctx, fb, c, j0, stored, exact, acc):
    """For the LANES (16) elements ``fb[j0 : j0 + 16]`` (fp32 source values) with code values ``c[j0 : j0 + 16]``,
    lane by lane (fp64 unless noted)::

        x = fb[j]; d = x - (c[j] * stored  in fp32); di = x - (c[j] * exact  in fp32)
        acc[0:16] += x * x;  acc[16:32] += d * d;  acc[32:48] += di * di
        acc[48:64] = |d| where |d| > acc[48:64]

    written as <16 x double> operations. Why not a numba loop: LLVM does not vectorise one (it cannot bound the
    accesses through numba's array structs to rule out overlap), and the scalar version cost 4x more, a third of the
    fused kernel. The arithmetic is IEEE per lane, the same as :func:`_accumulate_one`'s, so a lane's sum does not
    depend on which of the two added its terms."""
    sig = types.none(fb, c, j0, stored, exact, acc)

    def codegen(context, builder, signature, args):
        fb_arr, c_arr, j, st, ex, acc_arr = args
        fb_ty, c_ty, _, _, _, acc_ty = signature.args
        v32, v64 = ir.VectorType(ir.FloatType(), LANES), ir.VectorType(ir.DoubleType(), LANES)

        def vector_at(ary_ty, ary, index, vty):  # pointer to vty at &ary[index]
            data = context.make_array(ary_ty)(context, builder, ary).data
            return builder.bitcast(builder.gep(data, [index]), vty.as_pointer())

        def splat(value, vty):
            v = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
            zeros = ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES)
            return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), zeros)

        x = builder.fpext(builder.load(vector_at(fb_ty, fb_arr, j, v32), align=4), v64)
        code = builder.load(vector_at(c_ty, c_arr, j, v32), align=4)
        d = builder.fsub(x, builder.fpext(builder.fmul(code, splat(st, v32)), v64))
        di = builder.fsub(x, builder.fpext(builder.fmul(code, splat(ex, v32)), v64))
        for k, term in enumerate((builder.fmul(x, x), builder.fmul(d, d), builder.fmul(di, di))):
            at = vector_at(acc_ty, acc_arr, ir.Constant(ir.IntType(64), k * LANES), v64)
            builder.store(builder.fadd(builder.load(at, align=8), term), at, align=8)
        fabs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v64, [v64]), f"llvm.fabs.v{LANES}f64")
        ad = builder.call(fabs, [d])
        at = vector_at(acc_ty, acc_arr, ir.Constant(ir.IntType(64), 3 * LANES), v64)
        top = builder.load(at, align=8)
        builder.store(builder.select(builder.fcmp_ordered(">", ad, top), ad, top), at, align=8)
        return context.get_dummy_value()

    return sig, codegen


@nb.njit(inline="always")
def _accumulate_one(x32, c, stored, exact, lane, acc):
    """:func:`_accumulate_lanes` for one element, into lane ``lane``."""
    x = np.float64(x32)
    d = x - np.float64(c * stored)
    di = x - np.float64(c * exact)
    acc[lane] += x * x
    acc[LANES + lane] += d * d
    acc[2 * LANES + lane] += di * di
    ad = abs(d)
    if ad > acc[3 * LANES + lane]:
        acc[3 * LANES + lane] = ad


@nb.njit(inline="always")
def _measure_block(fb, pb, stored, exact, code, c, acc):
    """Add one block's reconstruction error to the lane sums ``acc`` (fp64, 4 x LANES: sum x^2, sum err^2, sum ideal
    err^2, max |err|); return the count of non-finite ``x_hat`` in it. ``fb`` holds the block's fp32 source values,
    ``pb`` its packed codes (decoded here, as a loader would, rather than taken from the encoder), ``stored``/``exact``
    its constant as the loaders see it and as max |x|. ``c`` is scratch of at least ``2 * len(pb)`` values.

    LANES independent partial sums per quantity: a single fp64 accumulator is a serial chain that LLVM may not
    reorder; lanes vectorise (the statistics then differ from a serial sum in the last bits only). Element j of a
    block goes to lane j % LANES, the rest of a partial block to lane 0."""
    m = fb.size
    _decode_block(pb, np.float32(1.0), code, c)
    full = m - m % LANES
    for j0 in range(0, full, LANES):
        _accumulate_lanes(fb, c, j0, stored, exact, acc)
    for j in range(full, m):
        _accumulate_one(fb[j], c[j], stored, exact, 0, acc)
    # |code| <= 1, so x_hat = code * stored is finite exactly when stored is (0 * inf is NaN too)
    return 0 if np.isfinite(stored) else m


@nb.njit(inline="always")
def _constant_is_off(stored, exact, tol_dq):
    """Whether a block constant ``stored`` is further from the block's exact absmax than double quantisation may move
    it (``tol_dq``: one gap of the 8-bit code times the group's nested absmax, 0 without double quantisation), plus
    fp32 rounding of ``code * nested + offset`` (4 ulp) and the 1e-38 that bitsandbytes stores for a zero tail block.
    NaN compares false: non-finite constants are counted as non-finite output instead."""
    big = abs(stored)
    if exact > big or np.isnan(exact):
        big = exact
    if np.isnan(stored):
        big = stored
    spacing = np.float64(_f32_from_bits(np.uint32(_bits_of_f32(big) + np.uint32(1))) - big)  # np.spacing: the fp32 gap above
    return abs(np.float64(stored) - np.float64(exact)) > tol_dq + (4.0 * spacing + 1e-37)


@nb.njit(inline="always")
def _store_group(g, acc, n_nonfinite, n_off, sums, counts):
    sums[g, 0] = acc[:LANES].sum()
    sums[g, 1] = acc[LANES:2 * LANES].sum()
    sums[g, 2] = acc[2 * LANES:3 * LANES].sum()
    sums[g, 3] = acc[3 * LANES:].max()
    counts[g, 0] = n_nonfinite
    counts[g, 1] = n_off


# ------------------------------------------------------------------------------------------------ whole tensors
@nb.njit(parallel=True, **_NUMBA)
def block_absmax(src, kind, n, blocksize, absmax):
    """``absmax[b] = max |x|`` over block b of the ``n`` elements (the last block may be partial), in fp32.
    Returns the number of blocks holding Inf/NaN (their absmax is then meaningless)."""
    n_blocks = (n + blocksize - 1) // blocksize
    n_groups = (n_blocks + GROUP_BLOCKS - 1) // GROUP_BLOCKS
    bad = np.zeros(n_groups, np.int64)
    for g in nb.prange(n_groups):
        for b in range(g * GROUP_BLOCKS, min((g + 1) * GROUP_BLOCKS, n_blocks)):
            lo = np.int64(b) * blocksize
            am, nonfinite = _block_absmax(src[lo:min(lo + blocksize, n)], kind)
            absmax[b] = am
            bad[g] += nonfinite
    return bad.sum()


@nb.njit(parallel=True, **_NUMBA)
def quantize_blocks(src, kind, n, blocksize, th, zero_block_code, exact, packed, measure, stored, code, tol, tol_blocks,
                    sums, counts):
    """Quantise the full blocks of ``src`` (``n`` elements) given each block's exact absmax ``exact`` (from
    :func:`block_absmax`): writes ``packed[0 : (n // blocksize) * blocksize / 2]``, the first element of a pair in
    the high nibble. An all-zero block gets ``zero_block_code`` for every element (7 on bitsandbytes' CPU path, 0 on
    its CUDA path). The partial last block, if any, is the caller's (bitsandbytes treats it differently).

    With ``measure``, also compares every block, the partial last one included (its codes must already be in
    ``packed``), with its source: per group of GROUP_BLOCKS blocks, ``sums[g] = (sum x^2, sum (x - x_hat)^2,
    sum (x - x_ideal)^2, max |x - x_hat|)`` and ``counts[g] = (non-finite x_hat, constants off)``, where
    ``x_hat = code[q] * stored[b]`` (fp32, as the loaders compute it), ``x_ideal = code[q] * exact[b]``, and a
    constant is off by :func:`_constant_is_off` with ``tol[b // tol_blocks]``. Same numbers as
    :func:`reconstruction_stats`.
    """
    t0, t1, t2, t3, t4, t5, t6, t7 = th[0], th[1], th[2], th[3], th[4], th[5], th[6], th[7]
    t8, t9, t10, t11, t12, t13, t14 = th[8], th[9], th[10], th[11], th[12], th[13], th[14]
    n_blocks = (n + blocksize - 1) // blocksize
    n_full = n // blocksize
    n_groups = (n_blocks + GROUP_BLOCKS - 1) // GROUP_BLOCKS
    zero_byte = np.uint8((zero_block_code << 4) | zero_block_code)
    for g in nb.prange(n_groups):
        f = np.empty(blocksize, np.float32)  # the block's fp32 values
        q = np.empty(blocksize, np.uint8)  # its 4-bit codes, one per byte before packing
        c = np.empty(blocksize, np.float32)  # measure: its decoded code values
        acc = np.zeros(4 * LANES)  # measure: lane sums, see _measure_block
        n_nonfinite = n_off = 0
        for b in range(g * GROUP_BLOCKS, min((g + 1) * GROUP_BLOCKS, n_blocks)):
            lo = np.int64(b) * blocksize
            m = min(blocksize, n - lo)
            fb = f[:m]
            _to_f32_block(src[lo:lo + m], kind, fb)
            pb = packed[lo // 2:lo // 2 + (m + 1) // 2]
            if b < n_full:
                am = exact[b]
                if am == 0.0:
                    pb[:] = zero_byte
                else:
                    r = np.float32(1.0) / max(am, _MIN_ABSMAX)
                    # codes into a byte buffer first: a contiguous loop vectorises, the pairwise one does not
                    for j in range(blocksize):
                        q[j] = _nf4_code(f[j] * r, t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14)
                    for j in range(blocksize // 2):  # byte j = element 2j (high nibble), element 2j + 1 (low)
                        pb[j] = (q[2 * j] << np.uint8(4)) | q[2 * j + 1]
            if measure:
                n_nonfinite += _measure_block(fb, pb, stored[b], exact[b], code, c, acc)
                n_off += _constant_is_off(stored[b], exact[b], tol[b // tol_blocks])
        if measure:
            _store_group(g, acc, n_nonfinite, n_off, sums, counts)


@nb.njit(parallel=True, **_NUMBA)
def reconstruction_stats(src, kind, packed, stored, code, blocksize, n, tol, tol_blocks, sums, counts):
    """:func:`quantize_blocks`' measurement on its own, for a tensor quantised elsewhere (``qtool verify --source``,
    a GPU conversion): each block's exact absmax is found here from ``src``. Fills ``sums`` and ``counts`` alike."""
    n_blocks = (n + blocksize - 1) // blocksize
    n_groups = (n_blocks + GROUP_BLOCKS - 1) // GROUP_BLOCKS
    for g in nb.prange(n_groups):
        f = np.empty(blocksize, np.float32)
        c = np.empty(blocksize, np.float32)
        acc = np.zeros(4 * LANES)  # measure: lane sums, see _measure_block
        n_nonfinite = n_off = 0
        for b in range(g * GROUP_BLOCKS, min((g + 1) * GROUP_BLOCKS, n_blocks)):
            lo = np.int64(b) * blocksize
            m = min(blocksize, n - lo)
            sb = src[lo:lo + m]
            exact, _ = _block_absmax(sb, kind)
            fb = f[:m]
            _to_f32_block(sb, kind, fb)
            n_nonfinite += _measure_block(fb, packed[lo // 2:lo // 2 + (m + 1) // 2], stored[b], exact, code, c, acc)
            n_off += _constant_is_off(stored[b], exact, tol[b // tol_blocks])
        _store_group(g, acc, n_nonfinite, n_off, sums, counts)


@nb.njit(**_NUMBA)
def total_stats(sums, counts):
    """The per-group results of :func:`quantize_blocks` / :func:`reconstruction_stats`, summed over the tensor:
    (sum x^2, sum err^2, sum ideal err^2, max |err|, non-finite x_hat, constants off)."""
    emax = sums[:, 3].max() if sums.shape[0] else 0.0
    return sums[:, 0].sum(), sums[:, 1].sum(), sums[:, 2].sum(), emax, counts[:, 0].sum(), counts[:, 1].sum()


# ------------------------------------------------------------------------------------------ double quantisation
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


# ------------------------------------------------------------------------------------------------ dequantisation
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

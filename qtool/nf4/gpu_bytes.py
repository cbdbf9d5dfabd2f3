"""bitsandbytes' CUDA quantisation arithmetic, reproduced on the GPU: what ``--target cuda --device cuda`` runs, so
that the bytes equal those of transformers' quantise-on-load on the same GPU, bit for bit.

Three things on the GPU cannot be reproduced on the CPU, and are done here as bitsandbytes does them:

* the reciprocal of each block's absmax: bitsandbytes' kernels are built with ``--use_fast_math``, which compiles
  ``1.0f / absmax`` to the PTX instruction ``rcp.approx.ftz.f32`` (within an ulp or so of the IEEE reciprocal; the
  hardware, not a formula, defines its last bit). A one-line Triton kernel issues that instruction;
* flush-to-zero (the ``ftz`` of ``--use_fast_math``): fp32-subnormal inputs (below 2**-126 in magnitude, possible in
  bf16 and fp32 weights, not fp16) count as zero in the absmax and the scaling;
* the double-quantisation offset ``absmax.mean()``: torch's CUDA reduction, whose fp32 summation order differs from
  the CPU's. Taking it with the same call on the same device gives the same value.

Everything else (the 15 NF4 thresholds, the 8-bit binary search of ``dQuantize<0>``, packing) is plain IEEE
arithmetic, identical on both sides. See :mod:`qtool.nf4.codec` for which mode gives which bytes.
"""
from __future__ import annotations

import torch

_FLT_MIN = 2.0**-126  # the smallest normal fp32

try:  # Triton comes with CUDA builds of torch
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - CPU-only machines
    HAVE_TRITON = False

if HAVE_TRITON:

    @triton.jit
    def _rcp_approx_ftz_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=1.0)
        # what nvcc --use_fast_math emits for `1.0f / x` (bitsandbytes' kQuantizeBlockwise*)
        y = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                      pack=1)
        tl.store(out_ptr + offs, y, mask=mask)


def rcp_approx_ftz(x: torch.Tensor) -> torch.Tensor:
    """``rcp.approx.ftz.f32`` of every element of the fp32 CUDA tensor ``x`` (0 -> +inf, as in bitsandbytes)."""
    if not HAVE_TRITON:
        raise RuntimeError("--device cuda with --target cuda needs Triton (it comes with CUDA builds of torch)")
    x = x.contiguous()
    out = torch.empty_like(x)
    block = 1024
    _rcp_approx_ftz_kernel[(triton.cdiv(x.numel(), block),)](x, out, x.numel(), BLOCK=block)
    return out


def flush_subnormals(x: torch.Tensor) -> torch.Tensor:
    """``x`` with fp32-subnormal values replaced by zero of the same sign (``ftz``); NaN and Inf unchanged."""
    return torch.where(x.abs() < _FLT_MIN, x * 0.0, x)


def quantize_4bit(w: torch.Tensor, blocksize: int, thresholds: torch.Tensor, chunk_blocks: int = 1 << 18):
    """(packed uint8 ``[(n + 1) // 2, 1]``, fp32 absmax ``[n_blocks]``, number of NaN/Inf) of the CUDA tensor ``w``,
    as bitsandbytes' CUDA ``kQuantizeBlockwise*<NF4>`` computes them: every block, the partial last one too (padded
    with zeros, as its loads are), scaled by ``rcp.approx.ftz(absmax)``; an all-zero block scales to NaN, which the
    comparison tree sends to code 0."""
    flat = w.detach().reshape(-1)
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    packed = torch.empty(n_blocks * blocksize // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=w.device)
    n_bad = torch.zeros((), dtype=torch.int64, device=w.device)
    for b0 in range(0, n_blocks, chunk_blocks):
        b1 = min(b0 + chunk_blocks, n_blocks)
        x = flat[b0 * blocksize:min(b1 * blocksize, n)].float()
        n_bad += (~torch.isfinite(x)).sum()
        if x.numel() < (b1 - b0) * blocksize:
            x = torch.nn.functional.pad(x, (0, (b1 - b0) * blocksize - x.numel()))
        x = flush_subnormals(x).view(-1, blocksize)
        am = x.abs().amax(dim=1)
        absmax[b0:b1] = am
        scaled = x * rcp_approx_ftz(am).unsqueeze(1)  # 0 * inf = NaN for an all-zero block
        codes = torch.searchsorted(thresholds, scaled.reshape(-1), right=False).view(-1, blocksize)
        codes[torch.isnan(scaled)] = 0  # NaN fails every `x > threshold` of dQuantizeNF4: code 0
        codes = codes.to(torch.uint8)
        packed[b0 * blocksize // 2:b1 * blocksize // 2] = (codes[:, 0::2] << 4 | codes[:, 1::2]).reshape(-1)
    return packed[:(n + 1) // 2].view(-1, 1), absmax, int(n_bad)


def dquantize_search(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' ``dQuantize<0>`` on every element of ``x`` (fp32): a 7-step binary search over the 256 sorted
    values ``code``, then a midpoint test (ties go to the pivot); NaN lands on code 0. uint8 codes."""
    pivot = torch.full_like(x, 127, dtype=torch.int64)
    upper_pivot = torch.full_like(pivot, 255)
    lower_pivot = torch.zeros_like(pivot)
    lower = torch.full_like(x, -1.0)
    upper = torch.full_like(x, 1.0)
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        above = x > val
        lower_pivot, lower = torch.where(above, pivot, lower_pivot), torch.where(above, val, lower)
        upper_pivot, upper = torch.where(above, upper_pivot, pivot), torch.where(above, upper, val)
        pivot = torch.where(above, pivot + step, pivot - step)
        val = code[pivot]
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    up = torch.where(x > (upper + val) * 0.5, upper_pivot, pivot)
    down = torch.where(x < (lower + val) * 0.5, lower_pivot, pivot)
    return torch.where(x > val, up, down).to(torch.uint8)


def quantize_absmax(absmax: torch.Tensor, code: torch.Tensor, nested_blocksize: int = 256):
    """Double quantisation on the GPU, as bitsandbytes' ``quantize_4bit(compress_statistics=True)`` runs it there:
    ``offset = absmax.mean()`` (torch, on this device), then ``kQuantizeBlockwise<float, 256, General8bit>`` of
    ``absmax - offset``. Returns (uint8 codes, fp32 nested absmax, offset as a Python float)."""
    offset = absmax.mean()
    y = absmax - offset
    n = y.numel()
    n_nested = -(-n // nested_blocksize)
    yp = flush_subnormals(torch.nn.functional.pad(y, (0, n_nested * nested_blocksize - n))).view(n_nested, -1)
    nested = yp.abs().amax(dim=1)
    scaled = (yp * rcp_approx_ftz(nested).unsqueeze(1)).reshape(-1)[:n]
    return dquantize_search(scaled, code), nested, float(offset.item())

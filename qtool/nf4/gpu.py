"""GPU dequantisation of NF4 weights: one Triton kernel per weight, fusing the double-quantised absmax.

``out[i] = NF4[q_i] * (DYN8[a_b] * nested[b // 256] + offset)`` with ``b = i // blocksize`` — the same fp32 products
bitsandbytes computes in three launches (8-bit absmax dequant, offset add, 4-bit dequant), here in one, and with
floating-point contraction disabled so that no multiply-add is fused into a differently rounded FMA: the result is
bit-identical to :func:`qtool.nf4.codec.dequantize` (tests/test_kernels_cuda.py checks it on a GPU).

Without Triton or on the CPU, :func:`dequantize_into` falls back to :func:`qtool.nf4.codec.dequantize`.
"""
from __future__ import annotations

import torch

from qtool.nf4 import codec as nf4

try:  # Triton is optional (absent on CPU-only machines)
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised on machines without triton
    HAVE_TRITON = False

_BYTES_PER_PROGRAM = 1024  # 2048 output elements per program

if HAVE_TRITON:

    @triton.jit
    def _dequant_nf4_kernel(packed_ptr, absmax_ptr, nested_ptr, code4_ptr, code8_ptr, offset, out_ptr, n_bytes,
                            n_elements, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BYTES: tl.constexpr):
        pid = tl.program_id(0)
        byte_idx = pid.to(tl.int64) * BYTES + tl.arange(0, BYTES)
        in_range = byte_idx < n_bytes
        byte = tl.load(packed_ptr + byte_idx, mask=in_range, other=0).to(tl.int32)
        block = (byte_idx * 2) // BLOCKSIZE  # both nibbles of a byte share a block: blocksize is even
        if DOUBLE_QUANT:
            q8 = tl.load(absmax_ptr + block, mask=in_range, other=0).to(tl.int32)
            scale = tl.load(code8_ptr + q8) * tl.load(nested_ptr + block // 256, mask=in_range, other=0.0)
            scale = scale + offset
        else:
            scale = tl.load(absmax_ptr + block, mask=in_range, other=0.0)
        hi = tl.load(code4_ptr + (byte >> 4)) * scale
        lo = tl.load(code4_ptr + (byte & 15)) * scale
        vals = tl.interleave(hi, lo)  # element 2j from the high nibble, 2j+1 from the low one
        out_idx = pid.to(tl.int64) * (2 * BYTES) + tl.arange(0, 2 * BYTES)
        tl.store(out_ptr + out_idx, vals.to(out_ptr.dtype.element_ty), mask=out_idx < n_elements)


_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if device not in _TABLES:
        _TABLES[device] = (torch.tensor(nf4.NF4_CODE, dtype=torch.float32, device=device),
                           torch.from_numpy(nf4.dynamic_map_signed()).to(device))
    return _TABLES[device]


def dequantize_into(qw: nf4.QuantizedWeight, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The weight in ``dtype`` shaped like the original; a fresh buffer unless ``out`` is given (CUDA only)."""
    if not (qw.packed.is_cuda and HAVE_TRITON):
        return nf4.dequantize(qw, dtype)
    if out is None:
        out = torch.empty(qw.shape, dtype=dtype, device=qw.packed.device)
    code4, code8 = _tables(qw.packed.device)
    n_bytes = qw.packed.numel()
    grid = (triton.cdiv(n_bytes, _BYTES_PER_PROGRAM),)
    nested = qw.nested_absmax if qw.double_quant else qw.absmax
    _dequant_nf4_kernel[grid](qw.packed, qw.absmax, nested, code4, code8, float(qw.offset or 0.0), out, n_bytes,
                              qw.numel, BLOCKSIZE=qw.blocksize, DOUBLE_QUANT=qw.double_quant,
                              BYTES=_BYTES_PER_PROGRAM, enable_fp_fusion=False)
    return out

"""Fused elementwise steps of the decoder layer (RMSNorm, RoPE, SwiGLU), forward and backward, as Triton kernels.

Why: with the matrix products at the hardware's rate, a QLoRA step on an H200 is dominated by the dozens of small
elementwise kernels transformers' formulation launches per layer (each norm alone is seven, in fp32), run three
times per step (forward, recomputation, backward). Each function here is one kernel forward and one backward, and
saves less for backward (RMSNorm keeps its input and one fp32 per row; RoPE keeps nothing).

Each has a torch reference with transformers' exact arithmetic; the CPU (and any machine without Triton) uses the
reference, so CPU logits stay bit-identical to transformers'. On the GPU the RoPE and SwiGLU forwards are
bit-identical to the references and RMSNorm's is within one rounding (the backward accumulates in fp32);
tests/test_fused_cuda.py compares them, and data/gpu/ records the H200 runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from qtool.nf4.gpu import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl


# ------------------------------------------------------------------------------------------- torch references
def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalise in fp32, round to the input dtype, multiply by the weight."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for x ``[batch, seq, heads, head_dim]``, cos/sin ``[seq, head_dim]``."""
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return x * c + torch.cat((-x2, x1), dim=-1) * s


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


# ----------------------------------------------------------------------------------------------- Triton kernels
if HAVE_TRITON:

    @triton.jit
    def _rms_fwd(X, W, Y, RSTD, N, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / N + eps)
        n = (x * rstd).to(Y.dtype.element_ty)
        w = tl.load(W + cols, mask=mask, other=0.0)
        tl.store(Y + row * N + cols, (n.to(tl.float32) * w.to(tl.float32)).to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _rms_bwd(DY, X, W, RSTD, DX, N, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        dn = tl.load(DY + row * N + cols, mask=mask, other=0.0).to(tl.float32) * \
            tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        dx = rstd * dn - x * (rstd * rstd * rstd) * (tl.sum(dn * x, axis=0) / N)
        tl.store(DX + row * N + cols, dx.to(DX.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope(X, COS, SIN, Y, T, H, D: tl.constexpr, BLOCK_H: tl.constexpr, BACKWARD: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # one (batch, position) row of H heads
        t = row % T
        half: tl.constexpr = D // 2
        heads = tl.arange(0, BLOCK_H)[:, None]
        cols = tl.arange(0, half)[None, :]
        mask = heads < H
        base = X + row * H * D + heads * D
        x1 = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(base + half + cols, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(COS + t * D + cols).to(tl.float32)  # both halves of cos/sin are equal (emb = cat(freqs, freqs))
        s = tl.load(SIN + t * D + cols).to(tl.float32)
        dt = Y.dtype.element_ty
        if BACKWARD:  # the transpose of x -> x*c + rot(x)*s, rot(x) = [-x2, x1]
            y1 = x1 * c + x2 * s
            y2 = x2 * c - x1 * s
        else:  # transformers rounds each product and the sum to the compute dtype
            y1 = ((x1 * c).to(dt).to(tl.float32) + (-x2 * s).to(dt).to(tl.float32))
            y2 = ((x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32))
        out = Y + row * H * D + heads * D
        tl.store(out + cols, y1.to(dt), mask=mask)
        tl.store(out + half + cols, y2.to(dt), mask=mask)

    @triton.jit
    def _swiglu_fwd(G, U, H, n, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        g = tl.load(G + i, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + i, mask=mask, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(H.dtype.element_ty).to(tl.float32)
        tl.store(H + i, (s * u).to(H.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd(DH, G, U, DG, DU, n, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        dh = tl.load(DH + i, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + i, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + i, mask=mask, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-g))
        s = g * sig
        tl.store(DU + i, (dh * s).to(DU.dtype.element_ty), mask=mask)
        tl.store(DG + i, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)


def _warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        rows, n = x2.shape
        y = torch.empty_like(x2)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(n)
        _rms_fwd[(rows,)](x2, weight, y, rstd, n, eps, BLOCK=block, num_warps=_warps(block))
        ctx.save_for_backward(x2, weight, rstd)
        return y.view_as(x)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        rows, n = x2.shape
        dx = torch.empty_like(x2)
        block = triton.next_power_of_2(n)
        _rms_bwd[(rows,)](dy.reshape(rows, n).contiguous(), x2, weight, rstd, dx, n, BLOCK=block,
                          num_warps=_warps(block))
        return dx.view_as(dy), None, None  # the norm weight is frozen


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        b, t, h, d = x.shape
        x = x.contiguous()
        y = torch.empty_like(x)
        # no fused multiply-add: each product must be rounded to the compute dtype before the sum, as in transformers
        _rope[(b * t,)](x, cos, sin, y, t, h, D=d, BLOCK_H=triton.next_power_of_2(h), BACKWARD=False,
                        enable_fp_fusion=False)
        ctx.save_for_backward(cos, sin)
        return y

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        b, t, h, d = dy.shape
        dy = dy.contiguous()
        dx = torch.empty_like(dy)
        _rope[(b * t,)](dy, cos, sin, dx, t, h, D=d, BLOCK_H=triton.next_power_of_2(h), BACKWARD=True)
        return dx, None, None


class _SwiGLU(torch.autograd.Function):
    BLOCK = 2048

    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        h = torch.empty_like(gate)
        n = gate.numel()
        _swiglu_fwd[(triton.cdiv(n, _SwiGLU.BLOCK),)](gate, up, h, n, BLOCK=_SwiGLU.BLOCK)
        ctx.save_for_backward(gate, up)
        return h

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        _swiglu_bwd[(triton.cdiv(n, _SwiGLU.BLOCK),)](dh.contiguous(), gate, up, dg, du, n, BLOCK=_SwiGLU.BLOCK)
        return dg, du


def _use_triton(x: torch.Tensor) -> bool:
    return HAVE_TRITON and x.is_cuda


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _RMSNorm.apply(x, weight, eps) if _use_triton(x) else rms_norm_ref(x, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[batch, seq, heads, head_dim]`` (even head_dim, a power of two on the GPU path)."""
    d = x.shape[-1]
    if _use_triton(x) and d & (d - 1) == 0:
        return _Rope.apply(x, cos.contiguous(), sin.contiguous())
    return rope_ref(x, cos, sin)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _SwiGLU.apply(gate, up) if _use_triton(gate) else swiglu_ref(gate, up)

"""How LoRA factors start. Pure tensor functions: the trainer calls the first two per module, the converter the last
two per 16-bit weight (they change the base, so they must run before it is quantised). Formulas use the paper
symbols: ``W`` the ``(out, in)`` weight in fp32, ``r`` the rank, ``s`` the bypass scale, ``A (r, in)``, ``B (out, r)``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from qtool.errors import InputError


def _uniform(shape: tuple[int, int], bound: float, generator: torch.Generator, dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
    return t.to(device=device, dtype=dtype)


def zero_init(n_out: int, n_in: int, rank: int, generator: torch.Generator, dtype=torch.float32, device="cpu"):
    """``zero``: A ~ U(±1/sqrt(in)) — PEFT's ``kaiming_uniform_(A, a=sqrt(5))``: gain sqrt(1/3), bound
    gain·sqrt(3/in) — and B = 0: the bypass is exactly zero and only B gets a gradient at step 0 (∂L/∂A = s·Bᵀ·G).
    Returns ``(A, B, None)``."""
    a = _uniform((rank, n_in), 1.0 / math.sqrt(n_in), generator, dtype, device)
    return a, torch.zeros(n_out, rank, dtype=dtype, device=device), None


def symmetric_init(n_out: int, n_in: int, rank: int, generator: torch.Generator, dtype=torch.float32, device="cpu"):
    """``symmetric``: A and B both ~ U(±1/sqrt(in)) (the same scale), and their frozen copies ``(A0, B0)`` as the
    offset that cancels ``s·B0·A0`` (see :class:`qtool.adapters.lora.LoRALinear`). Returns ``(A, B, (A0, B0))``."""
    bound = 1.0 / math.sqrt(n_in)
    a = _uniform((rank, n_in), bound, generator, dtype, device)
    b = _uniform((n_out, rank), bound, generator, dtype, device)
    return a, b, (a.clone(), b.clone())


def _svd(w: torch.Tensor, rank: int, name: str, niter: int = 0):
    """Top-``rank`` singular triplets of ``w`` (fp32): exact ``torch.linalg.svd``, or with ``niter > 0`` the
    randomised ``torch.svd_lowrank`` (Halko et al.; PEFT's ``pissa_niter_N``). Raises InputError naming ``name``
    when the SVD fails or returns non-finite values."""
    try:
        if niter > 0:
            u, s, v = torch.svd_lowrank(w, q=min(rank + 8, *w.shape), niter=niter)
            u, s, vh = u[:, :rank], s[:rank], v[:, :rank].t()
        else:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    except RuntimeError as exc:  # torch.linalg.LinAlgError: the algorithm did not converge
        raise InputError(f"{name}: the SVD did not converge ({str(exc).splitlines()[0]})",
                         hint="check the tensor for NaN/Inf or extreme values") from exc
    if not (torch.isfinite(u).all() and torch.isfinite(s).all() and torch.isfinite(vh).all()):
        raise InputError(f"{name}: the SVD returned NaN/Inf values", hint="check the tensor for NaN/Inf values")
    return u, s, vh


def _split(u, s, vh, scale: float):
    """``A = diag(sqrt(S/s)) Vh``, ``B = U diag(sqrt(S/s))``, so that ``s·B·A = U S Vh`` (PEFT ``pissa_init``)."""
    root = torch.sqrt(s / scale)
    return root[:, None] * vh, u * root[None, :]


def pissa_init(w: torch.Tensor, rank: int, scale: float, name: str = "weight", niter: int = 0):
    """PiSSA (Meng et al. 2024): the principal rank-r part of W becomes the adapter and the base keeps the residual.
    Returns ``(A, B, W_res)`` with ``W_res = W - s·B·A`` (fp32); the converter quantises ``W_res`` (QPiSSA)."""
    w = w.float()
    a, b = _split(*_svd(w, rank, name, niter), scale)
    return a, b, w - scale * (b @ a)


def loftq_init(w: torch.Tensor, rank: int, scale: float, quantize: Callable, n_iter: int = 1, name: str = "weight",
               niter: int = 0):
    """LoftQ (Li et al. 2023, Algorithm 1) with the bypass scale taken into account (PEFT issue 1982 ignores it):

        Q_t = NF4(W - s·B_{t-1}·A_{t-1}),   s·B_t·A_t = SVD_r(W - deq(Q_t)),   t = 1..T,  B_0 A_0 = 0

    ``quantize(W_res) -> (qw, deq)`` quantises exactly as the stored base will be (dtype, block size, double
    quantisation, target) and returns the quantised weight and its fp32 dequantisation. T = 1 is QLoRA's own base
    NF4(W) with the adapter fitted to its error. Returns ``(A, B, qw, W_res)`` where ``qw = Q_T`` is the base to store
    and ``W_res = W - s·B_{T-1}·A_{T-1}`` the tensor it quantises."""
    w = w.float()
    w_res = w
    for t in range(n_iter):
        qw, deq = quantize(w_res)
        a, b = _split(*_svd(w - deq, rank, name, niter), scale)
        if t + 1 < n_iter:
            w_res = w - scale * (b @ a)
    return a, b, qw, w_res

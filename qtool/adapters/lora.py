"""LoRA on a frozen NF4 Linear: ``y = x W0ᵀ (+ b) + s · dropout(x) Aᵀ Bᵀ`` with ``s = alpha / rank`` (rsLoRA:
``alpha / sqrt(rank)``). A is ``(rank, in)`` and B is ``(out, rank)``, as PEFT stores them.

With the ``symmetric`` initialisation the module also carries a frozen offset ``(A0, B0)`` — the initial factors —
and computes ``s · (dropout(x) Aᵀ Bᵀ - dropout(x) A0ᵀ B0ᵀ)``. The two products are separate matmuls of bitwise
identical operands at step 0, so their difference is exactly zero and the model is exactly the base model, while
both A and B get gradients from the first step. PEFT sees the same function as a rank-2r LoRA
``[B | -B0] @ [A ; A0]`` (:meth:`LoRALinear.peft_factors`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qtool.adapters.nf4_linear import NF4Linear


class LoRALinear(nn.Module):
    """A trainable low-rank bypass around a frozen :class:`NF4Linear` (``base``)."""

    def __init__(self, base: NF4Linear, a: torch.Tensor, b: torch.Tensor, *, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, offset: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        rank = a.shape[0]
        if a.shape != (rank, base.in_features) or b.shape != (base.out_features, rank):
            raise ValueError(f"A {tuple(a.shape)} / B {tuple(b.shape)} do not fit a {base.out_features}x"
                             f"{base.in_features} weight at rank {rank}")
        self.base = base
        self.rank, self.alpha, self.use_rslora = rank, float(alpha), use_rslora
        self.scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_a = nn.Parameter(a)
        self.lora_b = nn.Parameter(b)
        # the frozen initial factors of the symmetric init (buffers: never trained, moved with the module)
        self.register_buffer("offset_a", None if offset is None else offset[0], persistent=False)
        self.register_buffer("offset_b", None if offset is None else offset[1], persistent=False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        x = self.dropout(x)
        # the adapter runs in the compute dtype; its fp32 master weights get fp32 gradients through the casts
        h = F.linear(x, self.lora_a.to(x.dtype)).reshape(-1, self.rank)
        b = (self.lora_b * self.scale).to(x.dtype)
        flat = y.reshape(-1, y.shape[-1])
        if self.offset_a is None:
            # addmm adds the bypass inside the second product (no separate scale and add passes over y)
            return torch.addmm(flat, h, b.t()).view(y.shape)
        h0 = F.linear(x, self.offset_a.to(x.dtype)).reshape(-1, self.rank)
        b0 = (self.offset_b * self.scale).to(x.dtype)
        return (flat + (h @ b.t() - h0 @ b0.t())).view(y.shape)  # the difference first: exactly 0 at step 0

    def delta_weight(self) -> torch.Tensor:
        """``s · (B A - B0 A0)`` in fp32, ``(out, in)``: what merging adds to W0."""
        dw = self.lora_b.detach().float() @ self.lora_a.detach().float()
        if self.offset_a is not None:
            dw -= self.offset_b.float() @ self.offset_a.float()
        return dw * self.scale

    def peft_factors(self) -> tuple[torch.Tensor, torch.Tensor, int, float]:
        """``(A, B, rank, alpha)`` of the plain PEFT LoRA that computes this module's bypass: the factors themselves,
        or for the symmetric init ``[A ; A0]``, ``[B | -B0]`` at rank 2r with alpha scaled so that ``s`` is kept
        (PEFT's own conversion of mutated initialisations, ``subtract_mutated_init``)."""
        a, b = self.lora_a.detach().float().cpu(), self.lora_b.detach().float().cpu()
        if self.offset_a is None:
            return a, b, self.rank, self.alpha
        a = torch.cat([a, self.offset_a.float().cpu()], 0)
        b = torch.cat([b, -self.offset_b.float().cpu()], 1)
        alpha = self.alpha * (math.sqrt(2) if self.use_rslora else 2)
        return a, b, 2 * self.rank, alpha

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}, offset={self.offset_a is not None}"

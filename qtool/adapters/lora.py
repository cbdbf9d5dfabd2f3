"""The NF4 linear layer and its LoRA bypass: ``y = x W0ᵀ (+ b) + (alpha / rank) · dropout(x) Aᵀ Bᵀ``.

W0 stays packed (4-bit) on its device. Each product dequantises it into a transient buffer in the compute dtype and
drops it: once in the forward, once more in the backward for the input gradient (W0 gets no gradient, so nothing of
the base product is saved for backward — QLoRA's point: only the 4-bit copy stays resident). A is ``(rank, in)``
and B is ``(out, rank)`` as in PEFT; B starts at zero so the first step computes exactly the base model.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qtool.nf4 import gpu as kernels
from qtool.nf4.codec import QuantizedWeight


class NF4Weight(nn.Module):
    """A frozen NF4 weight held as buffers (they move with ``.to(device)``; none is a parameter)."""

    def __init__(self, qw: QuantizedWeight):
        super().__init__()
        self.register_buffer("packed", qw.packed, persistent=False)
        self.register_buffer("absmax", qw.absmax, persistent=False)
        self.register_buffer("nested_absmax", qw.nested_absmax, persistent=False)
        self.offset, self.shape, self.dtype, self.blocksize = qw.offset, qw.shape, qw.dtype, qw.blocksize

    @property
    def quantized(self) -> QuantizedWeight:
        return QuantizedWeight(self.packed, self.absmax, self.nested_absmax, self.offset, self.shape, self.dtype,
                               self.blocksize)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return kernels.dequantize_into(self.quantized, dtype)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, blocksize={self.blocksize}, double_quant={self.nested_absmax is not None}"


class _NF4Matmul(torch.autograd.Function):
    """``x @ W0ᵀ`` with W0 dequantised for the product and freed; backward dequantises again for ``grad @ W0``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Weight) -> torch.Tensor:
        ctx.weight = weight  # a module reference, not a saved activation
        return F.linear(x, weight.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        w = ctx.weight.dequantize(grad_out.dtype)
        return grad_out @ w, None


class LoRALinear(nn.Module):
    """A Linear whose frozen weight is NF4, with an optional trainable low-rank bypass (``rank=0``: none)."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None, rank: int = 0, alpha: float = 16.0,
                 dropout: float = 0.0, adapter_dtype: torch.dtype = torch.float32, use_rslora: bool = False):
        super().__init__()
        self.weight = NF4Weight(weight)
        self.register_buffer("bias", bias, persistent=False)
        self.set_adapter(rank, alpha, dropout, adapter_dtype, use_rslora)

    def set_adapter(self, rank: int, alpha: float = 16.0, dropout: float = 0.0,
                    adapter_dtype: torch.dtype = torch.float32, use_rslora: bool = False) -> None:
        """Replace the bypass by a fresh one (``rank=0``: none): A ~ U(±1/sqrt(in)) as PEFT, B = 0."""
        self.rank, self.alpha = rank, alpha
        self.scale = (alpha / math.sqrt(rank) if use_rslora else alpha / rank) if rank else 0.0
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_a = self.lora_b = None
        if rank:
            out_features, in_features = self.weight.shape
            device = self.weight.packed.device
            self.lora_a = nn.Parameter(torch.empty(rank, in_features, dtype=adapter_dtype, device=device))
            self.lora_b = nn.Parameter(torch.zeros(out_features, rank, dtype=adapter_dtype, device=device))
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _NF4Matmul.apply(x, self.weight)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        if self.rank:
            # the adapter runs in the compute dtype; its fp32 master weights get fp32 gradients through the casts.
            # addmm adds the bypass inside the second product (no separate scale and add passes over y)
            h = F.linear(self.dropout(x), self.lora_a.to(x.dtype))
            b = (self.lora_b * self.scale).to(x.dtype)
            y = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, self.rank), b.t()).view(y.shape)
        return y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scale={self.scale:g}"

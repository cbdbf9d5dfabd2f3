"""The frozen NF4 product ``y = x W0ᵀ (+ b)``: W0 stays packed (4-bit) on its device and is dequantised into a
transient buffer in the compute dtype for each product, then dropped — once in the forward, once more in the backward
for the input gradient. W0 gets no gradient, so nothing of the base product is saved for backward (QLoRA's point:
only the 4-bit copy stays resident). Adapters (:mod:`qtool.adapters.lora`) wrap this module; it knows none of them.
"""
from __future__ import annotations

import contextlib
import threading

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


_state = threading.local()  # the backward (where a recomputation runs) has its own thread on CUDA


@contextlib.contextmanager
def output_values_unused():
    """Within it, the NF4 products build their autograd nodes but compute nothing: their outputs are uninitialised.
    For a recomputation whose last product's output no backward reads (a checkpointed layer's ``x + down(z)``): the
    backward of the product needs only ``grad @ W0``, so its dequantisation and GEMM in the forward are wasted work
    (torch's own checkpoint skips them the same way, by stopping the recomputation early)."""
    _state.values_unused = True
    try:
        yield
    finally:
        _state.values_unused = False


class _NF4Matmul(torch.autograd.Function):
    """``x @ W0ᵀ (+ b)`` with W0 dequantised for the product and freed; backward dequantises again for
    ``grad @ W0``. The bias is added inside the product, as bitsandbytes' ``matmul_4bit`` does (one rounding)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight  # a module reference, not a saved activation
        if getattr(_state, "values_unused", False):  # output_values_unused(): the node without the product
            return x.new_empty(*x.shape[:-1], weight.shape[0])
        return F.linear(x, weight.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        w = ctx.weight.dequantize(grad_out.dtype)
        return grad_out @ w, None, None


class NF4Linear(nn.Module):
    """A frozen Linear whose weight is NF4 (and whose optional bias is a frozen 16-bit buffer)."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = NF4Weight(weight)
        self.register_buffer("bias", bias, persistent=False)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def device(self) -> torch.device:
        return self.weight.packed.device

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W0 as a dense ``(out, in)`` tensor (for initialisations and merging; training never holds it)."""
        return self.weight.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NF4Matmul.apply(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"

"""The training loss: mean next-token cross-entropy of ``h @ Wᵀ`` without materialising all ``[tokens, vocab]`` fp32
logits at once (the head's logits are the largest activation of a QLoRA step)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def loss_chunk_tokens(vocab_size: int) -> int:
    """Tokens per loss chunk: the largest power of two with ``chunk * vocab * 4 bytes <= 256 MiB`` (at least 64)."""
    return max(64, 2 ** int(math.log2(2**26 / vocab_size)))


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``h @ Wᵀ`` without holding all logits: each chunk's fp32 logits live only inside the
    forward (for its log-sum-exp) and again inside the backward (for its softmax); W is frozen."""

    @staticmethod
    def forward(ctx, h, w, targets, chunk):
        n = h.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        for s in range(0, n, chunk):
            logits = F.linear(h[s:s + chunk], w).float()
            lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
            total += (lse[s:s + chunk] - logits.gather(1, targets[s:s + chunk, None]).squeeze(1)).sum()
        ctx.save_for_backward(h, w, targets, lse)
        ctx.chunk = chunk
        return total / n

    @staticmethod
    def backward(ctx, grad):
        h, w, targets, lse = ctx.saved_tensors
        n, chunk = h.shape[0], ctx.chunk
        grad_h = torch.empty_like(h)
        scale = grad / n
        for s in range(0, n, chunk):
            p = torch.exp(F.linear(h[s:s + chunk], w).float() - lse[s:s + chunk, None])  # softmax
            p[torch.arange(p.shape[0], device=p.device), targets[s:s + chunk]] -= 1.0
            grad_h[s:s + chunk] = (p * scale).to(h.dtype) @ w
        return grad_h, None, None, None


def chunked_cross_entropy(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    return _ChunkedCrossEntropy.apply(h, w, targets, chunk)

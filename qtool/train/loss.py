"""The training loss: mean next-token cross-entropy of ``h @ Wᵀ`` without materialising all ``[tokens, vocab]`` fp32
logits at once (the head's logits are the largest activation of a QLoRA step)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def loss_chunk_tokens(vocab_size: int) -> int:
    """Tokens per loss chunk: the largest power of two with ``chunk * vocab * 4 bytes <= 256 MiB`` (at least 64)."""
    return max(64, 2 ** int(math.log2(2**26 / vocab_size)))


def _logits(h: torch.Tensor, w: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """A chunk's fp32 logits: ``h @ Wᵀ`` in the compute dtype, soft-capped there (``c·tanh(z/c)``, as transformers
    caps its logits before its loss casts them to fp32), then cast."""
    z = F.linear(h, w)
    return (z if not softcap else torch.tanh(z / softcap) * softcap).float()


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``h @ Wᵀ`` (optionally soft-capped) without holding all logits: each chunk's fp32 logits
    live only inside the forward (for its log-sum-exp) and again inside the backward (for its softmax); W is frozen.
    With a cap c the gradient of the loss in z is ``(softmax - onehot) · (1 - tanh²(z/c))``."""

    @staticmethod
    def forward(ctx, h, w, targets, chunk, softcap):
        n = h.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        for s in range(0, n, chunk):
            logits = _logits(h[s:s + chunk], w, softcap)
            lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
            total += (lse[s:s + chunk] - logits.gather(1, targets[s:s + chunk, None]).squeeze(1)).sum()
        ctx.save_for_backward(h, w, targets, lse)
        ctx.chunk, ctx.softcap = chunk, softcap
        return total / n

    @staticmethod
    def backward(ctx, grad):
        h, w, targets, lse = ctx.saved_tensors
        n, chunk, cap = h.shape[0], ctx.chunk, ctx.softcap
        grad_h = torch.empty_like(h)
        scale = grad / n
        for s in range(0, n, chunk):
            p = torch.exp(_logits(h[s:s + chunk], w, cap) - lse[s:s + chunk, None])  # softmax
            p[torch.arange(p.shape[0], device=p.device), targets[s:s + chunk]] -= 1.0
            if cap:  # d(c·tanh(z/c))/dz = 1 - tanh²(z/c), from z again (in place: one more fp32 chunk)
                p.mul_(F.linear(h[s:s + chunk], w).float().div_(cap).tanh_().square_().neg_().add_(1.0))
            grad_h[s:s + chunk] = (p * scale).to(h.dtype) @ w
        return grad_h, None, None, None, None


def chunked_cross_entropy(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, chunk: int,
                          softcap: float | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of the logits ``h @ Wᵀ``, soft-capped to ``softcap·tanh(z/softcap)`` when given
    (Gemma 2's final_logit_softcapping)."""
    return _ChunkedCrossEntropy.apply(h, w, targets, chunk, softcap)

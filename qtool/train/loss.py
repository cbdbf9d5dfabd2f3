"""The training loss: mean next-token cross-entropy of ``h Wᵀ (+ u Bᵀ)`` without materialising all ``[tokens, vocab]``
fp32 logits at once (the head's logits are the largest activation of a QLoRA step).

With LoRA on the head (:class:`qtool.adapters.vocab.LoRAHead`) the logits are ``h Wᵀ + s (h Aᵀ) Bᵀ``; the caller
passes ``u = s · h Aᵀ`` ``(tokens, r)`` and ``B`` ``(vocab, r)``, and each chunk's logits are formed as
``addmm(h_c Wᵀ, u_c, Bᵀ)`` — the chunk's own buffer, no second logits-sized tensor — in the forward and again in the
backward. The backward returns the gradients of h, u and B; autograd takes them on to A (through u) and to the
fp32 factors.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# fp32 logits per chunk. The loss backward's transient is about three chunks of them (qtool/plan/transient.py
# loss_bytes): at 64 MiB, 0.19 GiB (0.73 GiB at the 256 MiB used until 2026-12-04) — with a chunk of at least 512
# tokens at a 32k vocabulary (128 at 128k), products still large enough for the GPU's full rate.
LOSS_CHUNK_MIB = 64


def loss_chunk_tokens(vocab_size: int, mib: int = LOSS_CHUNK_MIB) -> int:
    """Tokens per loss chunk: the largest power of two with ``chunk * vocab * 4 bytes <= mib MiB`` (at least 64)."""
    return max(64, 2 ** int(math.log2(mib * 2**18 / vocab_size)))


def _chunk_z(h, w, u, b, s, e):
    """Logits of rows ``s:e`` in the compute dtype: ``h Wᵀ``, plus ``u Bᵀ`` added inside the product's output when
    there is a head LoRA."""
    z = F.linear(h[s:e], w)
    return z if u is None else torch.addmm(z, u[s:e], b.t())


def _chunk_logits(h, w, u, b, s, e, softcap):
    """A chunk's fp32 logits, soft-capped in the compute dtype (``c·tanh(z/c)``, as transformers caps its logits
    before its loss casts them to fp32), then cast."""
    z = _chunk_z(h, w, u, b, s, e)
    return (z if not softcap else torch.tanh(z / softcap) * softcap).float()


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy without holding all logits: each chunk's fp32 logits live only inside the forward (for its
    log-sum-exp) and again inside the backward (for its softmax); W is frozen; ``u``/``b`` are None without a head
    LoRA. With a cap c the gradient of the loss in z is ``(softmax - onehot) · (1 - tanh²(z/c))``."""

    @staticmethod
    def forward(ctx, h, w, targets, chunk, u, b, softcap):
        n = h.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        for s in range(0, n, chunk):
            logits = _chunk_logits(h, w, u, b, s, s + chunk, softcap)
            lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
            total += (lse[s:s + chunk] - logits.gather(1, targets[s:s + chunk, None]).squeeze(1)).sum()
        ctx.save_for_backward(h, w, targets, lse, u, b)
        ctx.chunk, ctx.softcap = chunk, softcap
        return total / n

    @staticmethod
    def backward(ctx, grad):
        h, w, targets, lse, u, b = ctx.saved_tensors
        n, chunk, cap = h.shape[0], ctx.chunk, ctx.softcap
        grad_h = torch.empty_like(h)
        lora = u is not None
        grad_u = torch.empty_like(u) if lora and ctx.needs_input_grad[4] else None
        # B's gradient sums over every chunk: accumulated in fp32 (a bf16 running sum would lose the small chunks)
        grad_b = torch.zeros(b.shape, dtype=torch.float32, device=b.device) if lora and ctx.needs_input_grad[5] \
            else None
        scale = grad / n
        for s in range(0, n, chunk):
            p = torch.exp(_chunk_logits(h, w, u, b, s, s + chunk, cap) - lse[s:s + chunk, None])  # softmax
            p[torch.arange(p.shape[0], device=p.device), targets[s:s + chunk]] -= 1.0
            if cap:  # d(c·tanh(z/c))/dz = 1 - tanh²(z/c), from z again (in place: one more fp32 chunk)
                p.mul_(_chunk_z(h, w, u, b, s, s + chunk).float().div_(cap).tanh_().square_().neg_().add_(1.0))
            g = (p * scale).to(h.dtype)  # dLoss/dlogits of the chunk
            del p
            grad_h[s:s + chunk] = g @ w
            if grad_u is not None:
                grad_u[s:s + chunk] = g @ b
            if grad_b is not None:
                grad_b += g.t() @ u[s:s + chunk]  # (vocab, r) per chunk in h's dtype, summed in fp32
        return (grad_h, None, None, None, grad_u,
                None if grad_b is None else grad_b.to(b.dtype), None)


def chunked_cross_entropy(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, chunk: int,
                          head_lora: tuple[torch.Tensor, torch.Tensor] | None = None,
                          softcap: float | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``h`` ``(tokens, hidden)`` against ``targets`` through the frozen head ``w``
    ``(vocab, hidden)``; ``head_lora``: ``(u, B)`` of a head LoRA (module docstring), all in ``h``'s dtype;
    ``softcap``: the logits are soft-capped to ``softcap·tanh(z/softcap)`` (Gemma 2's final_logit_softcapping)."""
    u, b = head_lora if head_lora is not None else (None, None)
    return _ChunkedCrossEntropy.apply(h, w, targets, chunk, u, b, softcap)

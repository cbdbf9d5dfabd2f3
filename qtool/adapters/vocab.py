"""LoRA on the model-level vocabulary matrices: the input embedding E and the output head W, both ``(vocab, hidden)``,
frozen, in the compute dtype (see :mod:`qtool.adapters.spec` for when each is used and how they share on a tied
model). Factor shapes and initialisations are PEFT's (peft 0.21 ``tuners/lora/layer.py``):

=============  ======================  =====================  =====================================================
module         A                       B                      adds
=============  ======================  =====================  =====================================================
embedding      ``(r, vocab)``, zeros   ``(hidden, r)``, N(0,1)  ``s · Aᵀ[ids] Bᵀ`` to the looked-up rows
head           ``(r, hidden)``, Kaiming  ``(vocab, r)``, zeros  ``s · (h Aᵀ) Bᵀ`` to the logits (inside the loss)
=============  ======================  =====================  =====================================================

The embedding's bypass is computed in fp32 and added to the rows in fp32 before rounding to the compute dtype, as
PEFT's ``Embedding.forward`` does (``result + adapter_output`` promotes, then ``.to(result dtype)``); PEFT applies no
dropout there either. The head never builds its logits here: :meth:`LoRAHead.bypass` returns the two small factors of
the logits' update, ``u = s · dropout(h) Aᵀ`` ``(tokens, r)`` and ``B`` in the compute dtype, and
:func:`qtool.train.loss.chunked_cross_entropy` adds ``u Bᵀ`` chunk by chunk.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRAEmbedding(nn.Module):
    """``lora_a`` ``(rank, vocab)``, ``lora_b`` ``(hidden, rank)`` (trainable); ``scale`` = alpha/rank (rsLoRA:
    alpha/sqrt(rank)). The frozen table is the decoder's buffer, passed to :meth:`forward`."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, *, alpha: float, use_rslora: bool = False):
        super().__init__()
        rank = a.shape[0]
        if b.dim() != 2 or b.shape[1] != rank:
            raise ValueError(f"A {tuple(a.shape)} / B {tuple(b.shape)} do not fit an embedding LoRA of rank {rank}")
        self.rank, self.alpha, self.use_rslora = rank, float(alpha), use_rslora
        self.scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.lora_a = nn.Parameter(a)
        self.lora_b = nn.Parameter(b)

    @classmethod
    def initial(cls, vocab: int, hidden: int, rank: int, gen: torch.Generator, dtype: torch.dtype, device, *,
                alpha: float, use_rslora: bool = False) -> LoRAEmbedding:
        """PEFT's start: A = 0, B ~ N(0, 1) (drawn from ``gen``): step 0 is the base model."""
        a = torch.zeros(rank, vocab, dtype=dtype, device=device)
        b = torch.randn(hidden, rank, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
        return cls(a, b, alpha=alpha, use_rslora=use_rslora)

    def forward(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Rows ``table[ids] + s · Aᵀ[ids] Bᵀ`` in ``table``'s dtype."""
        x = F.embedding(ids, table)
        # gather the r-vectors of the tokens (columns of A) first: (tokens, r), never a (vocab, hidden) product
        delta = F.embedding(ids, self.lora_a.t().float()) @ self.lora_b.t().float() * self.scale
        return (x + delta).to(x.dtype)  # fp32 sum, one rounding (PEFT's order)

    def delta_weight(self) -> torch.Tensor:
        """``s · (B A)ᵀ`` in fp32, ``(vocab, hidden)``: what merging adds to E (PEFT ``Embedding.get_delta_weight``)."""
        return (self.lora_b.detach().float() @ self.lora_a.detach().float()).t() * self.scale

    def peft_factors(self) -> tuple[torch.Tensor, torch.Tensor, int, float]:
        """``(A, B, rank, alpha)`` as PEFT stores them (``lora_embedding_A``/``lora_embedding_B``)."""
        return self.lora_a.detach().float().cpu(), self.lora_b.detach().float().cpu(), self.rank, self.alpha

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}"


class LoRAHead(nn.Module):
    """A Linear LoRA on the frozen head: ``lora_a`` ``(rank, hidden)``, ``lora_b`` ``(vocab, rank)``. ``tied_to``: a
    :class:`LoRAEmbedding` whose factors this head uses, transposed (A = B_embᵀ, B = A_embᵀ; PEFT's
    ``ensure_weight_tying``); then it has no parameters of its own."""

    def __init__(self, a: torch.Tensor | None = None, b: torch.Tensor | None = None, *, alpha: float,
                 dropout: float = 0.0, use_rslora: bool = False, tied_to: LoRAEmbedding | None = None):
        super().__init__()
        if (tied_to is None) == (a is None or b is None):
            raise ValueError("give the head's factors A and B, or the embedding adapter it is tied to, not both")
        rank = tied_to.rank if tied_to is not None else a.shape[0]
        if tied_to is None and (b.dim() != 2 or b.shape[1] != rank):
            raise ValueError(f"A {tuple(a.shape)} / B {tuple(b.shape)} do not fit a head LoRA of rank {rank}")
        self.rank, self.alpha, self.use_rslora = rank, float(alpha), use_rslora
        self.scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_a = None if a is None else nn.Parameter(a)
        self.lora_b = None if b is None else nn.Parameter(b)
        self._tied = [tied_to]  # a list: not registered as a submodule (its parameters belong to the embedding)

    @property
    def tied_to(self) -> LoRAEmbedding | None:
        return self._tied[0]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A (rank, hidden), B (vocab, rank))``, views of the embedding's factors when tied (gradients flow)."""
        emb = self.tied_to
        return (emb.lora_b.t(), emb.lora_a.t()) if emb is not None else (self.lora_a, self.lora_b)

    def bypass(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u, B)`` in ``h``'s dtype with ``u = s · dropout(h) Aᵀ`` ``(tokens, rank)``: the logits' update is
        ``u Bᵀ``, which the chunked loss adds per chunk (the scale sits on the small factor)."""
        a, b = self.factors()
        u = F.linear(self.dropout(h), (a * self.scale).to(h.dtype))
        return u, b.to(h.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``s · B A`` in fp32, ``(vocab, hidden)``: what merging adds to W."""
        a, b = self.factors()
        return b.detach().float() @ a.detach().float() * self.scale

    def peft_factors(self) -> tuple[torch.Tensor, torch.Tensor, int, float]:
        a, b = self.factors()
        return a.detach().float().cpu().contiguous(), b.detach().float().cpu().contiguous(), self.rank, self.alpha

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}, tied={self.tied_to is not None}"

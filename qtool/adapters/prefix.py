"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation"): ``l`` trainable
key and value vectors per layer, prepended to the keys and values of every attention, so each position attends to
them as if the sequence had ``l`` more tokens before it.

Layout (PEFT's ``PREFIX_TUNING``, peft 0.21 ``PeftModel.get_prompt``): one ``(l, 2·L·kv)`` tensor, row ``j`` the
``j``-th virtual token, its columns ``[key of layer 0 | value of layer 0 | key of layer 1 | ...]``, each
``kv = n_kv_heads·head_dim`` wide in ``(head, head_dim)`` order. With reparameterisation (``prefix_projection`` p > 0,
the paper's §4.3 MLP, PEFT's ``PrefixEncoder``) that tensor is computed while training as
``W2 · tanh(W1 · E + b1) + b2`` from an ``(l, kv)`` embedding ``E``; only its output is saved.

Positions (PEFT's convention, checked against ``PeftModel.from_pretrained`` in tests/test_methods.py): the prefix is a
KV cache of length ``l`` — its keys are used as stored, with no rotary embedding applied to them, and the real tokens
take positions ``l .. l+t-1`` (transformers' ``cache_position`` after a cache of ``l`` entries). RoPE is relative, so
the shift changes no score between real tokens beyond rounding; it does use up ``l`` of the model's positions.

Masks: every real position attends to all ``l`` prefix positions and causally to the real ones — a causal mask
aligned to the lower right of the ``t x (l+t)`` score matrix. On CUDA that is
``torch.nn.attention.bias.causal_lower_right``, which SDPA runs in its flash kernel (lower-right is flash's own
causal alignment; grouped-query k and v as they are) or, when flash cannot run, in the memory-efficient kernel with
k and v repeated to the query heads. On the CPU an explicit boolean mask with k and v repeated, as transformers does
when it has a mask.

Initialisation: PEFT's (the embedding N(0, 1), the MLP as ``nn.Linear``), or — what ``qtool train`` does without
reparameterisation — the base model's own keys and values of ``l`` real tokens (:func:`kv_of_tokens`): the paper's
§7.2 finding that "initializing the prefix with activations of real words significantly improves generation". Then
step 0 is the base model reading those ``l`` tokens before each sequence.

Why it cannot be merged into W: the prefix adds ``l`` positions to every softmax — its scores change the
normalisation of each attention row, depending on the input — which no change to any weight can express; at
inference it is ``l`` extra entries of KV cache per sequence and layer.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PrefixTuning(nn.Module):
    """The prefix of a whole model. ``embedding``: ``(l, 2·L·kv)`` — the key/value vectors themselves — or, with
    ``mlp = (W1 (p, kv), b1 (p,), W2 (2·L·kv, p), b2 (2·L·kv,))``, the ``(l, kv)`` input of the reparameterisation."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, embedding: torch.Tensor,
                 mlp: tuple[torch.Tensor, ...] | None = None):
        super().__init__()
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        kv, out = n_kv_heads * head_dim, 2 * n_layers * n_kv_heads * head_dim
        self.length = embedding.shape[0]
        width = kv if mlp is not None else out
        if embedding.dim() != 2 or embedding.shape[1] != width:
            raise ValueError(f"prefix embedding {tuple(embedding.shape)}: expected ({self.length}, {width})")
        self.embedding = nn.Parameter(embedding)
        self.projection = 0
        if mlp is not None:
            w1, b1, w2, b2 = mlp
            p = w1.shape[0]
            if w1.shape != (p, kv) or b1.shape != (p,) or w2.shape != (out, p) or b2.shape != (out,):
                raise ValueError(f"prefix MLP {[tuple(t.shape) for t in mlp]}: expected ({p}, {kv}), ({p},), "
                                 f"({out}, {p}), ({out},)")
            self.projection = p
            self.w1, self.b1, self.w2, self.b2 = (nn.Parameter(t) for t in mlp)

    @classmethod
    def initial(cls, shape, length: int, projection: int, generator: torch.Generator, dtype=torch.float32,
                device="cpu") -> PrefixTuning:
        """PEFT's initialisation: the embedding N(0, 1) (``nn.Embedding``), the MLP's weights and biases
        U(±1/sqrt(fan_in)) (``nn.Linear``). ``shape``: a :class:`qtool.arch.Shape`."""
        kv, out = shape.kv_dim, 2 * shape.n_layers * shape.kv_dim

        def uniform(*size, fan_in):
            b = 1.0 / math.sqrt(fan_in)
            return torch.empty(*size).uniform_(-b, b, generator=generator).to(device=device, dtype=dtype)

        emb = torch.randn(length, kv if projection else out, generator=generator).to(device=device, dtype=dtype)
        mlp = None
        if projection:
            mlp = (uniform(projection, kv, fan_in=kv), uniform(projection, fan_in=kv),
                   uniform(out, projection, fan_in=projection), uniform(out, fan_in=projection))
        return cls(shape.n_layers, shape.n_kv_heads, shape.head_dim, emb, mlp)

    def flat(self) -> torch.Tensor:
        """The ``(l, 2·L·kv)`` key/value vectors in the master dtype (PEFT's ``prompt_embeddings``)."""
        if not self.projection:
            return self.embedding
        return F.linear(torch.tanh(F.linear(self.embedding, self.w1, self.b1)), self.w2, self.b2)

    def key_values(self, dtype: torch.dtype) -> torch.Tensor:
        """``(L, 2, n_kv_heads, l, head_dim)`` in ``dtype`` (a view of one cast): ``[i, 0]`` the keys and ``[i, 1]``
        the values of layer ``i``. Cast after the MLP, as PEFT casts to the base model's dtype."""
        flat = self.flat().to(dtype)
        return flat.view(self.length, self.n_layers, 2, self.n_kv_heads, self.head_dim).permute(1, 2, 3, 0, 4)

    def load_flat(self, flat: torch.Tensor) -> None:
        """Set the key/value vectors (no reparameterisation: inference, or training from given vectors)."""
        if self.projection:
            raise ValueError("a prefix trained through its MLP takes its vectors from the MLP; build it without one")
        with torch.no_grad():
            self.embedding.copy_(flat)

    def extra_repr(self) -> str:
        return (f"length={self.length}, layers={self.n_layers}, kv={self.n_kv_heads}x{self.head_dim}"
                + (f", projection={self.projection}" if self.projection else ""))


def _repeat_kv(t: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``(b, n_kv, s, d) -> (b, n_kv·n_rep, s, d)``, head ``i`` from kv head ``i // n_rep`` (SDPA's enable_gqa)."""
    b, n, s, d = t.shape
    return t[:, :, None].expand(b, n, n_rep, s, d).reshape(b, n * n_rep, s, d)


def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """Causal attention of ``q (b, nh, t, d)`` over the layer's prefix ``kv (2, n_kv, l, d)`` followed by
    ``k, v (b, n_kv, t, d)`` (rotary embedding already applied to ``q`` and ``k``, not to the prefix). Returns
    ``(b, nh, t, d)``. See the module docstring for the mask and the kernels."""
    b, nh, t, _ = q.shape
    k = torch.cat((kv[0].expand(b, -1, -1, -1), k), dim=2)
    v = torch.cat((kv[1].expand(b, -1, -1, -1), v), dim=2)
    s, n_rep = k.shape[2], nh // k.shape[1]
    if q.is_cuda:
        from torch.backends.cuda import SDPAParams, can_use_flash_attention
        from torch.nn.attention.bias import causal_lower_right

        gqa = n_rep > 1
        if gqa and not can_use_flash_attention(SDPAParams(q, k, v, None, 0.0, False, True), False):
            k, v, gqa = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep), False  # the efficient kernel has no GQA
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(t, s), enable_gqa=gqa)
    if n_rep > 1:
        k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@torch.no_grad()
def kv_of_tokens(model, ids: torch.Tensor) -> torch.Tensor:
    """The base model's keys (rotary embedding at positions ``0 .. l-1`` applied) and values of the ``l`` tokens
    ``ids``, as an ``(l, 2·L·kv)`` fp32 prefix (the layout above): what a KV cache holds after reading them. Runs
    ``model`` (a :class:`qtool.train.model.Decoder`) layer by layer without its prefix, taking each layer's keys and
    values as its attention computes them (``DecoderLayer.attention_inputs``: fused projections and q/k norms
    included); Houlsby adapters' effect is included if it has any (it has none when the prefix is the method)."""
    shape = model.shape
    l = ids.shape[-1]
    ids = ids.reshape(1, l).to(model.embed.device)
    x = F.embedding(ids, model.embed)
    cos, sin = model.rope_tables(0, l, x.dtype, ids.device)
    rows = []
    for layer in model.layers:
        _, k, v = layer.attention_inputs(x, cos, sin)  # (1, n_kv, l, head_dim)
        rows += [k.transpose(1, 2).reshape(l, shape.kv_dim), v.transpose(1, 2).reshape(l, shape.kv_dim)]
        x = layer(x, cos, sin)
    return torch.cat(rows, dim=1).float()

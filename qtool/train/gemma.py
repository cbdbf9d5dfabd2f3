"""The Gemma 2 and Gemma 3 (text) decoders on converted NF4 shards, beside the Llama family of :mod:`qtool.train.model`.

What differs from Llama, each with transformers 5's arithmetic (models/gemma2|gemma3/modeling_*.py), so that logits
match its bitsandbytes-4bit model on the same folder bit for bit on the CPU in the same dtype (tests/test_gemma.py):

* the embedding is multiplied by sqrt(hidden) rounded to the compute dtype (bf16: sqrt(1152) = 33.94 becomes 34);
* RMSNorm multiplies by ``1 + weight`` in fp32 and rounds once at the end (Llama rounds before the weight), and every
  block has a norm before and after it: four per layer;
* the MLP is ``down(gelu_tanh(gate(x)) * up(x))``;
* attention scores are scaled by ``query_pre_attn_scalar ** -0.5``; Gemma 3 normalises q and k per head first;
* Gemma 2 soft-caps the scores (``c·tanh(s/c)``, c = 50) before the mask. SDPA cannot, so its layers run an explicit
  attention that materialises the ``(batch, heads, t, t)`` scores: autograd keeps their soft-capped values, the fp32
  probabilities and their compute-dtype copy (the planner's ``softcap_scores``). Gemma 3 uses SDPA;
* sliding-window layers (Gemma 2 every other one, Gemma 3 five in six: ``Shape.layer_types``) attend to the
  ``local_window`` positions ending at each query. Where transformers relies on ``is_causal`` (full layers; sliding
  ones shorter than the window) we do too, and where it builds a mask we build the same one (sdpa: boolean with k, v
  repeated to the query heads; eager: additive, the dtype's minimum where masked), so the same kernels run;
* Gemma 3's sliding layers rotate with their own RoPE base (``rope_local``), its global ones with ``rope`` (linear
  scaling on 4B and larger);
* the head is tied and its logits are soft-capped (Gemma 2: c = 30); the training loss applies the cap inside the
  chunked cross-entropy (:mod:`qtool.train.loss`).

On a GPU, RoPE uses :mod:`qtool.train.fused`'s kernel (the same rotation); the norms stay on the torch path, because
the fused RMSNorm kernel rounds before the weight (Llama's form), which is not Gemma's. Houlsby adapters sit on each
block's projection output (o_proj, down_proj), before its post-norm. Prefix tuning is not supported (refused by
:func:`qtool.train.settings.check_inputs`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qtool.arch import Shape
from qtool.errors import UsageError
from qtool.train import fused
from qtool.train.loss import chunked_cross_entropy, loss_chunk_tokens
from qtool.train.model import Decoder

MODEL_TYPES = ("gemma2", "gemma3_text")
NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: normalise in fp32, multiply by ``1 + weight`` in fp32, round to the input dtype once."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + weight.float())).to(x.dtype)


def inv_freq(head_dim: int, rope: dict) -> torch.Tensor:
    """RoPE inverse frequencies (fp32) of ``rope`` (Shape.rope_params form): default, or linear (divided by the
    factor: positions stretched ``factor`` times, transformers' _compute_linear_scaling_rope_parameters)."""
    inv = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    return inv / rope["factor"] if rope["rope_type"] == "linear" else inv


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``(b, kv, t, d)`` -> ``(b, kv·groups, t, d)``, each kv head repeated for its query heads (transformers'
    repeat_kv: the copy the masked and explicit attentions work on)."""
    if groups == 1:
        return x
    b, kv, t, d = x.shape
    return x[:, :, None].expand(b, kv, groups, t, d).reshape(b, kv * groups, t, d)


class GemmaLayer(nn.Module):
    """One Gemma 2/3 decoder layer: ``x + post(attn(pre(x)))``, then ``x + post(mlp(pre(x)))``."""

    def __init__(self, shape: Shape, index: int, linears: dict[str, nn.Module], norms: dict[str, torch.Tensor]):
        super().__init__()
        self.shape, self.index = shape, index
        self.window = shape.window(index)  # None: full causal attention
        self.local_rope = bool(shape.rope_local) and shape.layer_types[index] == "sliding_attention"
        self.proj = nn.ModuleDict(linears)  # q_proj ... down_proj: NF4Linear, or an adapter wrapping one
        for name in NORMS + (("q_norm", "k_norm") if shape.qk_norm else ()):
            self.register_buffer(name, norms[name], persistent=False)
        self.attn_adapter = None  # Houlsby adapters (qtool.adapters.houlsby) on o_proj's and down_proj's outputs
        self.mlp_adapter = None

    def forward(self, x, cos, sin, mask):
        """``mask``: from :meth:`GemmaDecoder.attention_mask` for this layer's window (None: ``is_causal``)."""
        s, p, eps = self.shape, self.proj, self.shape.rms_norm_eps
        b, t, _ = x.shape
        h = rms_norm(x, self.input_layernorm, eps)
        q = p["q_proj"](h).view(b, t, s.n_heads, s.head_dim)
        k = p["k_proj"](h).view(b, t, s.n_kv_heads, s.head_dim)
        v = p["v_proj"](h).view(b, t, s.n_kv_heads, s.head_dim).transpose(1, 2)
        if s.qk_norm:  # per head, over head_dim (transformers applies it after the transpose: the same rows)
            q, k = rms_norm(q, self.q_norm, eps), rms_norm(k, self.k_norm, eps)
        q = fused.rope(q, cos, sin).transpose(1, 2)
        k = fused.rope(k, cos, sin).transpose(1, 2)
        a = p["o_proj"](self.attention(q, k, v, mask).transpose(1, 2).reshape(b, t, s.q_dim))
        a = a if self.attn_adapter is None else self.attn_adapter(a)
        x = x + rms_norm(a, self.post_attention_layernorm, eps)
        h = rms_norm(x, self.pre_feedforward_layernorm, eps)
        m = p["down_proj"](F.gelu(p["gate_proj"](h), approximate="tanh") * p["up_proj"](h))
        m = m if self.mlp_adapter is None else self.mlp_adapter(m)
        return x + rms_norm(m, self.post_feedforward_layernorm, eps)

    def attention(self, q, k, v, mask):
        """q ``(b, heads, t, d)``, k and v ``(b, kv_heads, t, d)`` -> ``(b, heads, t, d)``."""
        s = self.shape
        scale = s.query_pre_attn_scalar ** -0.5
        groups = s.n_heads // s.n_kv_heads
        cap = s.attn_logit_softcapping
        if cap:  # transformers' eager attention: SDPA cannot soft-cap the scores
            k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
            scores = torch.matmul(q, k.transpose(2, 3)) * scale  # (b, heads, t, t)
            scores = torch.tanh(scores / cap) * cap + mask  # tanh keeps its output for backward
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # fp32 kept, and this copy
            return torch.matmul(probs, v)
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=groups > 1)
        return F.scaled_dot_product_attention(q, _repeat_kv(k, groups), _repeat_kv(v, groups), attn_mask=mask,
                                              scale=scale)


class GemmaDecoder(Decoder):
    """Scaled embeddings, Gemma layers, the final (1 + w) norm and the tied, soft-capped head."""

    def shape_constants(self, device) -> dict[str, torch.Tensor | None]:
        """Gemma's RoPE inverse frequencies (global, and the sliding layers' own on Gemma 3) and its embedding
        scale (see :meth:`Decoder.shape_constants`)."""
        shape = self.shape
        local = inv_freq(shape.head_dim, dict(shape.rope_local)).to(device) if shape.rope_local else None
        # transformers multiplies by sqrt(hidden) cast to the embedding's dtype (Gemma2TextScaledWordEmbedding)
        scale = torch.tensor(shape.hidden ** 0.5).to(device=device, dtype=self.compute_dtype)
        return {"inv_freq": inv_freq(shape.head_dim, shape.rope_params).to(device), "inv_freq_local": local,
                "embed_scale": scale}

    def rope_tables(self, start: int, n: int, dtype: torch.dtype, device, local: bool = False):
        """cos and sin ``(n, head_dim)``, fp32 then cast; ``local``: the sliding layers' own RoPE (Gemma 3)."""
        pos = torch.arange(start, start + n, device=device, dtype=torch.float32)
        freqs = pos[:, None] * (self.inv_freq_local if local else self.inv_freq)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def attention_mask(self, t: int, window: int | None, dtype: torch.dtype, device) -> torch.Tensor | None:
        """The mask of a ``t``-token sequence for layers of ``window`` (None: full causal), as transformers builds it
        (masking_utils): key j is visible from query i when ``i - window < j <= i``. The explicit (soft-capping)
        attention adds a ``(t, t)`` mask of 0 and the dtype's minimum; SDPA gets none (``is_causal``) unless the
        window is no longer than the sequence, then a boolean ``(t, t)`` one (True: visible)."""
        explicit = bool(self.shape.attn_logit_softcapping)
        if not explicit and (window is None or t < window):
            return None
        i = torch.arange(t, device=device)
        visible = i[None, :] <= i[:, None]
        if window is not None:
            visible &= i[None, :] > i[:, None] - window
        if not explicit:
            return visible
        return torch.zeros((t, t), dtype=dtype, device=device).masked_fill_(~visible, torch.finfo(dtype).min)

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.prefix is not None:
            raise UsageError("prefix tuning is not supported on Gemma models", hint="use --method lora or adapter")
        x = self.embed_tokens(input_ids) * self.embed_scale  # the scale applies after an embedding LoRA too
        t, device = input_ids.shape[1], input_ids.device
        tables = {local: self.rope_tables(0, t, x.dtype, device, local) for local in {l.local_rope for l in self.layers}}
        masks = {w: self.attention_mask(t, w, x.dtype, device) for w in {layer.window for layer in self.layers}}
        x = self.run_layers(x, lambda i: (*tables[self.layers[i].local_rope], masks[self.layers[i].window]))
        return rms_norm(x, self.norm, self.shape.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]`` in the compute dtype, soft-capped as transformers does (in that dtype)."""
        h = self.hidden_states(input_ids)
        logits = F.linear(h, self.lm_head)
        lora = self.head_lora(h)
        logits = logits if lora is None else logits + lora[0] @ lora[1].t()
        cap = self.shape.final_logit_softcapping
        return logits if not cap else torch.tanh(logits / cap) * cap

    def loss(self, input_ids: torch.Tensor, chunk_tokens: int | None = None) -> torch.Tensor:
        h = self.hidden_states(input_ids)[:, :-1].reshape(-1, self.shape.hidden)
        targets = input_ids[:, 1:].reshape(-1)
        return chunked_cross_entropy(h, self.lm_head, targets, chunk_tokens or loss_chunk_tokens(self.shape.vocab),
                                     self.head_lora(h), softcap=self.shape.final_logit_softcapping)


def build_layer(shape: Shape, index: int, linears: dict[str, nn.Module], dense) -> GemmaLayer:
    """Layer ``index`` with its norms read through ``dense(key, shape) -> Tensor`` (already on the device, in the
    compute dtype): the four block norms, and Gemma 3's per-head q/k norms."""
    prefix = f"model.layers.{index}"
    norms = {n: dense(f"{prefix}.{n}.weight", (shape.hidden,)) for n in NORMS}
    if shape.qk_norm:
        norms.update({n: dense(f"{prefix}.self_attn.{n}.weight", (shape.head_dim,)) for n in ("q_norm", "k_norm")})
    return GemmaLayer(shape, index, linears, norms)

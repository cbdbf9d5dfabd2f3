"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, Phi-3, SmolLM2) on converted NF4 shards.

Numerics follow transformers' implementation in the compute dtype (RMSNorm in fp32 then cast, RoPE tables in fp32
then cast, SDPA attention), so logits match transformers' bitsandbytes-4bit model on the same folder — bit for bit
on the CPU in the same dtype; on a GPU the fused kernels of :mod:`qtool.train.fused` are used. The shape comes from
:mod:`qtool.arch` (the one config reader); every Linear is a frozen :class:`NF4Linear` until
:func:`qtool.adapters.attach.attach_adapters` wraps some of them. The other methods hook in without touching the
Linears: Houlsby adapters on each block's output (``DecoderLayer.attn_adapter`` / ``mlp_adapter``) and a prefix in
every attention (``Decoder.prefix``); when none is attached the forward is the plain one. LoRA on the embedding and
the head (:mod:`qtool.adapters.vocab`) sits in the two places that read those matrices: :meth:`Decoder.embed_tokens`
and :meth:`Decoder.head_lora` (the head's update goes into the chunked loss, never into full logits).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qtool.adapters.lora import LoRALinear
from qtool.adapters.nf4_linear import NF4Linear, output_values_unused
from qtool.adapters.prefix import prefix_attention
from qtool.arch import Shape
from qtool.train import fused
from qtool.train.loss import chunked_cross_entropy, loss_chunk_tokens
from qtool.train.offload import offloaded_layer

def rope_inv_freq(shape: Shape) -> torch.Tensor:
    """RoPE inverse frequencies of the rotated features (``shape.rotary_dim``), fp32; ``llama3`` applies Llama 3.1's
    wavelength-dependent scaling."""
    d, rope = shape.rotary_dim, shape.rope_params
    inv = 1.0 / (rope["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if rope["rope_type"] == "llama3":
        factor, lo, hi = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
        inv = torch.where(medium, blended, scaled)
    return inv


def window_mask(n: int, window: int, device) -> torch.Tensor:
    """The ``(n, n)`` boolean sliding-window causal mask, True where query i sees key j: ``i - window < j <= i``
    (transformers masking_utils: ``sliding_window_overlay`` on ``causal_mask_function``), so each query sees itself
    and the ``window - 1`` keys before it. One bool per pair, built in place (no int64 index grid: at 32k tokens that
    would be 8 GiB), shared by every head, batch row and layer."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril_().triu_(1 - window)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA of ``q (b, nh, t, d)`` over ``k, v (b, n_kv, t, d)`` under a ``(t, t)`` boolean mask. k and v are repeated
    to the query heads, as transformers does when it has a mask (sdpa_attention.py ``use_gqa_in_sdpa``): on CUDA the
    memory-efficient kernel takes masks but not grouped-query heads, and flash takes no mask; on the CPU it keeps the
    arithmetic identical to transformers'."""
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k, v = (t[:, :, None].expand(-1, -1, n_rep, -1, -1).flatten(1, 2) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class DecoderLayer(nn.Module):
    def __init__(self, shape: Shape, linears: dict[str, NF4Linear], norms: dict[str, torch.Tensor]):
        super().__init__()
        self.shape = shape
        self.proj = nn.ModuleDict(linears)  # q_proj ... down_proj: NF4Linear, or an adapter wrapping one
        self.register_buffer("input_norm", norms["input_layernorm"], persistent=False)
        self.register_buffer("post_norm", norms["post_attention_layernorm"], persistent=False)
        # qwen3: an RMSNorm over head_dim of every query and key head, before RoPE (None elsewhere)
        self.register_buffer("q_norm", norms.get("self_attn.q_norm"), persistent=False)
        self.register_buffer("k_norm", norms.get("self_attn.k_norm"), persistent=False)
        self.attn_adapter = None  # Houlsby adapters (qtool.adapters.houlsby) on the attention and MLP outputs
        self.mlp_adapter = None
        # set by a recomputation that back-propagates from the output without reading it (qtool.train.offload):
        # down_proj's base product is then not computed (its backward needs only grad @ W0)
        self.output_unused = False

    def forward(self, x, cos, sin, prefix_kv=None, window_mask=None):
        """``prefix_kv``: this layer's prefix keys and values ``(2, n_kv, l, head_dim)`` (qtool.adapters.prefix);
        ``window_mask``: the ``(t, t)`` boolean sliding-window mask (:func:`window_mask`) when this layer has one."""
        s, p = self.shape, self.proj
        b, t, _ = x.shape
        q, k, v = self.attention_inputs(x, cos, sin)
        if prefix_kv is not None:
            o = prefix_attention(q, k, v, prefix_kv)
        elif window_mask is not None:
            o = window_attention(q, k, v, window_mask)
        else:  # the fast path: flash attention on CUDA, grouped-query k and v as they are
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=s.n_kv_heads != s.n_heads)
        a = p["o_proj"](o.transpose(1, 2).reshape(b, t, s.n_heads * s.head_dim))
        x = x + (a if self.attn_adapter is None else self.attn_adapter(a))
        h = fused.rms_norm(x, self.post_norm, s.rms_norm_eps)
        if "gate_up_proj" in p:  # phi3: the gate's rows, then the up projection's (Phi3MLP chunks in that order)
            gate, up = p["gate_up_proj"](h).chunk(2, dim=-1)
        else:
            gate, up = p["gate_proj"](h), p["up_proj"](h)
        z = fused.swiglu(gate, up)
        if self.output_unused and self.mlp_adapter is None:  # x + m, never read: no dequantisation, no GEMM
            with output_values_unused():
                m = p["down_proj"](z)
        else:
            m = p["down_proj"](z)
        return x + (m if self.mlp_adapter is None else self.mlp_adapter(m))

    def attention_inputs(self, x, cos, sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``(b, n_heads, t, head_dim)``, k and v ``(b, n_kv_heads, t, head_dim)`` of the layer input ``x``: the
        input norm, the projections (phi3: one qkv_proj, q's rows then k's then v's), qwen3's per-head norms, RoPE."""
        s, p = self.shape, self.proj
        b, t, _ = x.shape
        h = fused.rms_norm(x, self.input_norm, s.rms_norm_eps)
        if "qkv_proj" in p:
            q, k, v = p["qkv_proj"](h).split((s.q_dim, s.kv_dim, s.kv_dim), dim=-1)
            v = v.contiguous()  # attention saves v: as a view it would keep all of q, k, v alive until backward
        else:
            q, k, v = p["q_proj"](h), p["k_proj"](h), p["v_proj"](h)
        q = _rope(self._head_norm(q.view(b, t, s.n_heads, s.head_dim), self.q_norm), cos, sin)
        k = _rope(self._head_norm(k.view(b, t, s.n_kv_heads, s.head_dim), self.k_norm), cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.view(b, t, s.n_kv_heads, s.head_dim).transpose(1, 2)

    def _head_norm(self, heads: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """Qwen3's per-head RMSNorm of ``[b, t, heads, head_dim]`` (the identity without a weight)."""
        return heads if weight is None else fused.rms_norm(heads, weight, self.shape.rms_norm_eps)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of the first ``cos.shape[-1]`` features of each head of ``x [b, t, heads, head_dim]``; the rest pass
    unchanged (Phi-3's ``partial_rotary_factor``, as transformers' apply_rotary_pos_emb)."""
    n = cos.shape[-1]
    if n == x.shape[-1]:
        return fused.rope(x, cos, sin)
    return torch.cat((fused.rope(x[..., :n], cos, sin), x[..., n:]), dim=-1)


class Decoder(nn.Module):
    """Embeddings, decoder layers and head; only adapter factors are parameters."""

    def __init__(self, shape: Shape, layers: list[DecoderLayer], embed: torch.Tensor, norm: torch.Tensor,
                 lm_head: torch.Tensor | None, compute_dtype: torch.dtype):
        super().__init__()
        self.shape, self.compute_dtype = shape, compute_dtype
        self.layers = nn.ModuleList(layers)
        self.register_buffer("embed", embed, persistent=False)
        self.register_buffer("norm", norm, persistent=False)
        self.register_buffer("lm_head", embed if lm_head is None else lm_head, persistent=False)
        for name, constant in self.shape_constants(embed.device).items():
            self.register_buffer(name, constant, persistent=False)
        self.grad_checkpointing = False
        self.offload = None  # ActivationOffload (qtool.train.offload): checkpointed inputs in host memory
        self.uses_rng = False  # dropout in a layer: the recomputation must replay the same random masks
        self.prefix = None  # prefix tuning (qtool.adapters.prefix.PrefixTuning): keys/values before every attention
        self.embed_adapter = None  # LoRA on the input embedding (qtool.adapters.vocab.LoRAEmbedding)
        self.head_adapter = None  # LoRA on the output head (qtool.adapters.vocab.LoRAHead)

    def shape_constants(self, device) -> dict[str, torch.Tensor | None]:
        """The buffers computed from the shape rather than read from the checkpoint (RoPE's inverse frequencies),
        on ``device``: registered here, and computed again when a model built on the meta device is materialised
        (:mod:`qtool.train.sharded`)."""
        return {"inv_freq": rope_inv_freq(self.shape).to(device)}

    def linears(self) -> dict[str, tuple[nn.ModuleDict, str]]:
        """``{transformers module path: (the ModuleDict holding it, its key)}`` for every Linear of every layer."""
        return {self.shape.module_path(i, name): (layer.proj, name)
                for i, layer in enumerate(self.layers) for name in layer.proj}

    def lora_modules(self) -> dict[str, LoRALinear]:
        """``{transformers module path: module}`` for every Linear with a LoRA bypass (PEFT's naming)."""
        return {path: holder[name] for path, (holder, name) in self.linears().items()
                if isinstance(holder[name], LoRALinear)}

    def vocab_lora_modules(self) -> dict[str, nn.Module]:
        """``{transformers module path: module}`` of the embedding and head LoRA (PEFT's naming)."""
        from qtool.adapters.spec import VOCAB_PATHS

        return {VOCAB_PATHS[name]: m for name, m in (("embed_tokens", self.embed_adapter),
                                                       ("lm_head", self.head_adapter)) if m is not None}

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The input embeddings of ``input_ids`` (with the embedding's LoRA when there is one)."""
        if self.embed_adapter is None:
            return F.embedding(input_ids, self.embed)
        return self.embed_adapter(input_ids, self.embed)

    def head_lora(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(u, B)`` of the head's LoRA for normed hidden states ``h``: logits = ``h Wᵀ + u Bᵀ``; None without."""
        return None if self.head_adapter is None else self.head_adapter.bypass(h)

    def rope_tables(self, start: int, n: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``(n, rotary_dim)`` of positions ``start .. start+n-1``, computed in fp32 and cast."""
        pos = torch.arange(start, start + n, device=device, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        # with a prefix the tokens sit after it: positions l .. l+t-1 (PEFT's convention, qtool.adapters.prefix)
        start = 0 if self.prefix is None else self.prefix.length
        cos, sin = self.rope_tables(start, input_ids.shape[1], x.dtype, input_ids.device)
        kv = None if self.prefix is None else self.prefix.key_values(x.dtype)  # (L, 2, n_kv, l, head_dim)
        t, window = input_ids.shape[1], self.shape.sliding_window
        # a window shorter than the sequence needs a mask (alive for the whole forward and backward: t^2 bytes);
        # otherwise it changes nothing and the layers keep is_causal, the fast path
        mask = window_mask(t, window, input_ids.device) if window and t > window and kv is None else None
        x = self.run_layers(x, lambda i: (cos, sin, None if kv is None else kv[i],
                                          mask if self.shape.window(i) else None))
        return fused.rms_norm(x, self.norm, self.shape.rms_norm_eps)

    def run_layers(self, x: torch.Tensor, args_of) -> torch.Tensor:
        """The layers in order on the hidden states ``x``; ``args_of(i)``: layer i's arguments after its input.
        With gradient checkpointing each layer keeps only its input (its activations are recomputed in the
        backward): on the device, or in host memory when ``offload`` is set (:mod:`qtool.train.offload`)."""
        checkpointing = self.grad_checkpointing and torch.is_grad_enabled()
        offload = self.offload if checkpointing else None
        if offload is not None:
            offload.begin_forward()
        for i, layer in enumerate(self.layers):
            if offload is not None:
                x = offloaded_layer(offload, i, layer, x, *args_of(i), preserve_rng=self.uses_rng)
            elif checkpointing:
                x = checkpoint(layer, x, *args_of(i), use_reentrant=False, preserve_rng_state=self.uses_rng)
            else:
                x = layer(x, *args_of(i))
        if offload is not None:
            offload.end_forward()  # the last input's copy joined before anything else may reuse its memory
        return x

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]`` in the compute dtype."""
        h = self.hidden_states(input_ids)
        logits = F.linear(h, self.lm_head)
        lora = self.head_lora(h)
        return logits if lora is None else logits + lora[0] @ lora[1].t()

    def loss(self, input_ids: torch.Tensor, chunk_tokens: int | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy over the sequence (each position predicts the next token)."""
        h = self.hidden_states(input_ids)[:, :-1].reshape(-1, self.shape.hidden)
        targets = input_ids[:, 1:].reshape(-1)
        return chunked_cross_entropy(h, self.lm_head, targets, chunk_tokens or loss_chunk_tokens(self.shape.vocab),
                                     self.head_lora(h))

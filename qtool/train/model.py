"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, SmolLM2) on converted NF4 shards, with LoRA.

Numerics follow transformers' implementation in the compute dtype (RMSNorm in fp32 then cast, RoPE tables in fp32
then cast, SDPA attention), so logits match transformers' bitsandbytes-4bit model on the same folder — bit for bit
on the CPU; on a GPU the fused kernels of :mod:`qtool.train.fused` round the same way in the forward. The loss is a
chunked cross-entropy: the [tokens, vocab] fp32 logits are never materialised at once (see
:func:`chunked_cross_entropy`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qtool.train import fused

from qtool.format import bnb_nf4 as layout
from qtool.errors import InputError, UsageError
from qtool.adapters.lora import LoRALinear
from qtool.nf4.codec import QuantizedWeight

SUPPORTED = ("llama", "mistral", "qwen2")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
TARGET_SETS = {"qkvo": ATTN, "mlp": MLP, "all-linear": ATTN + MLP}


def parse_targets(spec: str | list[str]) -> tuple[str, ...]:
    """``qkvo`` | ``mlp`` | ``all-linear`` | comma-separated module names (q_proj,v_proj,...)."""
    names = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in names:
        for name in str(item).split(","):
            name = name.strip()
            out += TARGET_SETS.get(name, (name,)) if name else ()
    unknown = [n for n in out if n not in ATTN + MLP]
    if unknown:
        raise UsageError(f"--targets: unknown module {unknown[0]!r}",
                         hint=f"use qkvo, mlp, all-linear or names from {', '.join(ATTN + MLP)}")
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class DecoderConfig:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    max_positions: int
    tie_embeddings: bool
    qkv_bias: bool
    mlp_bias: bool
    rope: dict
    sliding_window: int | None = None  # Mistral v0.1: attention sees only the last W tokens

    @classmethod
    def from_dict(cls, cfg: dict, where: str = "config.json") -> "DecoderConfig":
        mt = cfg.get("model_type")
        if mt not in SUPPORTED:
            raise InputError(f"{where}: model_type {mt!r} is not supported by qtool train",
                             hint=f"supported: {', '.join(SUPPORTED)} (Llama 2/3, Mistral, Qwen2/2.5, SmolLM2)")
        heads = cfg["num_attention_heads"]
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise InputError(f"{where}: RoPE type {rope_type!r} is not supported", hint="supported: default, llama3")
        return cls(mt, cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], heads,
                   cfg.get("num_key_value_heads") or heads, cfg.get("head_dim") or cfg["hidden_size"] // heads,
                   cfg["vocab_size"], cfg.get("rms_norm_eps", 1e-6), cfg.get("max_position_embeddings", 4096),
                   bool(cfg.get("tie_word_embeddings", False)),
                   mt == "qwen2" or bool(cfg.get("attention_bias", False)), bool(cfg.get("mlp_bias", False)),
                   {**rope, "rope_type": rope_type},
                   cfg.get("sliding_window") if cfg.get("use_sliding_window", mt != "qwen2") else None)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        h, d = self.hidden_size, self.head_dim
        return {"q_proj": (self.num_heads * d, h), "k_proj": (self.num_kv_heads * d, h),
                "v_proj": (self.num_kv_heads * d, h), "o_proj": (h, self.num_heads * d),
                "gate_proj": (self.intermediate_size, h), "up_proj": (self.intermediate_size, h),
                "down_proj": (h, self.intermediate_size)}


def rope_inv_freq(cfg: DecoderConfig) -> torch.Tensor:
    """RoPE inverse frequencies, fp32; ``llama3`` applies Llama 3.1's wavelength-dependent scaling."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if cfg.rope["rope_type"] == "llama3":
        factor, lo, hi = cfg.rope["factor"], cfg.rope["low_freq_factor"], cfg.rope["high_freq_factor"]
        old = cfg.rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
        inv = torch.where(medium, blended, scaled)
    return inv


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, linears: dict[str, LoRALinear], norms: dict[str, torch.Tensor]):
        super().__init__()
        self.cfg = cfg
        self.proj = nn.ModuleDict(linears)
        self.register_buffer("input_norm", norms["input_layernorm"], persistent=False)
        self.register_buffer("post_norm", norms["post_attention_layernorm"], persistent=False)

    def forward(self, x, cos, sin):
        cfg, p = self.cfg, self.proj
        b, t, _ = x.shape
        h = fused.rms_norm(x, self.input_norm, cfg.rms_norm_eps)
        q = fused.rope(p["q_proj"](h).view(b, t, cfg.num_heads, cfg.head_dim), cos, sin).transpose(1, 2)
        k = fused.rope(p["k_proj"](h).view(b, t, cfg.num_kv_heads, cfg.head_dim), cos, sin).transpose(1, 2)
        v = p["v_proj"](h).view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=cfg.num_kv_heads != cfg.num_heads)
        x = x + p["o_proj"](o.transpose(1, 2).reshape(b, t, cfg.num_heads * cfg.head_dim))
        h = fused.rms_norm(x, self.post_norm, cfg.rms_norm_eps)
        return x + p["down_proj"](fused.swiglu(p["gate_proj"](h), p["up_proj"](h)))


class Decoder(nn.Module):
    """Embeddings, decoder layers and head; only the LoRA factors are parameters."""

    def __init__(self, cfg: DecoderConfig, layers: list[DecoderLayer], embed: torch.Tensor, norm: torch.Tensor,
                 lm_head: torch.Tensor | None, compute_dtype: torch.dtype):
        super().__init__()
        self.cfg, self.compute_dtype = cfg, compute_dtype
        self.layers = nn.ModuleList(layers)
        self.register_buffer("embed", embed, persistent=False)
        self.register_buffer("norm", norm, persistent=False)
        self.register_buffer("lm_head", embed if lm_head is None else lm_head, persistent=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg).to(embed.device), persistent=False)
        self.grad_checkpointing = False
        self.uses_rng = False  # dropout in a layer: the recomputation must replay the same random masks

    def attach_lora(self, targets=ATTN, rank: int = 16, alpha: float = 32.0, dropout: float = 0.0,
                    adapter_dtype: torch.dtype = torch.float32, use_rslora: bool = False, seed: int = 0) -> None:
        """Give every ``targets`` Linear a fresh bypass (A seeded, B = 0) and every other one none."""
        shapes = self.cfg.linear_shapes()
        problems = [f"--rank {rank} is larger than {name} allows (min(out, in) = {min(shapes[name])})"
                    for name in targets if rank > min(shapes[name])]
        if problems:
            raise UsageError(problems)
        torch.manual_seed(seed)
        for layer in self.layers:
            for name, m in layer.proj.items():
                m.set_adapter(rank if name in targets else 0, alpha, dropout, adapter_dtype, use_rslora)
        self.uses_rng = dropout > 0

    def lora_modules(self) -> dict[str, LoRALinear]:
        """``{transformers module path: layer}`` for every layer with a bypass (PEFT's naming)."""
        return {f"model.layers.{i}.{'self_attn' if n in ATTN else 'mlp'}.{n}": m
                for i, layer in enumerate(self.layers) for n, m in layer.proj.items() if m.rank}

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(input_ids, self.embed)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer in self.layers:
            if self.grad_checkpointing and torch.is_grad_enabled():
                # keep only each layer's input; its activations are recomputed in backward
                x = checkpoint(layer, x, cos, sin, use_reentrant=False, preserve_rng_state=self.uses_rng)
            else:
                x = layer(x, cos, sin)
        return fused.rms_norm(x, self.norm, self.cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]`` in the compute dtype."""
        return F.linear(self.hidden_states(input_ids), self.lm_head)

    def loss(self, input_ids: torch.Tensor, chunk_tokens: int | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy over the sequence (each position predicts the next token)."""
        h = self.hidden_states(input_ids)[:, :-1].reshape(-1, self.cfg.hidden_size)
        targets = input_ids[:, 1:].reshape(-1)
        return chunked_cross_entropy(h, self.lm_head, targets, chunk_tokens or loss_chunk_tokens(self.cfg.vocab_size))


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


# ------------------------------------------------------------------------------------------------------- loading
def _open_tensors(folder: Path):
    from qtool.format.safetensors import read_header

    files = [read_header(p) for p in sorted(folder.glob("*.safetensors"))]
    index = {k: f for f in files for k in f.tensors}

    def get(name):
        if name not in index:
            raise KeyError(name)
        return index[name].tensor(name)

    return index, get


def build_decoder(cfg: DecoderConfig, quantized, dense, *, targets=ATTN, rank: int = 16, alpha: float = 32.0,
                  dropout: float = 0.0, device="cpu", compute_dtype: torch.dtype = torch.bfloat16,
                  adapter_dtype: torch.dtype = torch.float32, use_rslora: bool = False, seed: int = 0) -> Decoder:
    """Assemble the decoder from ``quantized(key, shape) -> QuantizedWeight`` and ``dense(key, shape) -> Tensor``
    (each called once per tensor, so a weight can be produced, moved and dropped one at a time), then attach LoRA
    on ``targets`` (see :meth:`Decoder.attach_lora`)."""
    shapes = cfg.linear_shapes()

    def dense_on(key, shape):
        return dense(key, shape).to(device=device, dtype=compute_dtype)

    layers = []
    for i in range(cfg.num_layers):
        linears = {}
        for name, shape in shapes.items():
            prefix = f"model.layers.{i}.{'self_attn' if name in ATTN else 'mlp'}.{name}"
            qw = quantized(f"{prefix}.weight", shape).to(device)
            if qw.shape != shape:
                raise InputError(f"{prefix}.weight has shape {qw.shape}, config.json implies {shape}")
            has_bias = cfg.qkv_bias and name in ("q_proj", "k_proj", "v_proj") or cfg.mlp_bias and name in MLP
            bias = dense_on(f"{prefix}.bias", (shape[0],)) if has_bias else None
            linears[name] = LoRALinear(qw, bias)
        norms = {n: dense_on(f"model.layers.{i}.{n}.weight", (cfg.hidden_size,))
                 for n in ("input_layernorm", "post_attention_layernorm")}
        layers.append(DecoderLayer(cfg, linears, norms))
    embed = dense_on("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))
    head = None if cfg.tie_embeddings else dense_on("lm_head.weight", (cfg.vocab_size, cfg.hidden_size))
    model = Decoder(cfg, layers, embed, dense_on("model.norm.weight", (cfg.hidden_size,)), head, compute_dtype)
    model.attach_lora(targets, rank, alpha, dropout, adapter_dtype, use_rslora, seed)
    return model


def load_decoder(folder, **kwargs) -> Decoder:
    """The decoder of a folder written by ``qtool convert`` (or any bitsandbytes-4bit NF4 checkpoint of a supported
    architecture); keyword arguments as :func:`build_decoder`."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise InputError(f"{folder}: no config.json", hint="pass a folder written by qtool convert")
    cfg = DecoderConfig.from_dict(json.loads(cfg_path.read_text()), str(cfg_path))
    index, get = _open_tensors(folder)
    if not layout.quantized_keys(index):
        raise InputError(f"{folder} is not a 4-bit checkpoint (no bitsandbytes NF4 weights)",
                         hint=f"convert it first: qtool convert {folder} {folder}-nf4")

    def quantized(key, shape):
        return layout.read_weight(key, get, where=str(folder))

    def dense(key, shape):
        try:
            return get(key)
        except KeyError:
            raise InputError(f"{folder}: tensor {key!r} is missing") from None

    return build_decoder(cfg, quantized, dense, **kwargs)


def random_quantized(shape: tuple[int, int], device, generator: torch.Generator, blocksize: int = 64,
                     dtype: torch.dtype = torch.bfloat16) -> QuantizedWeight:
    """A random NF4 weight made directly in its packed form on ``device`` (no 16-bit copy ever exists): for memory
    and speed measurements of real shapes, e.g. a 65B model on one GPU. Values look like N(0, ~0.02) weights."""
    n = shape[0] * shape[1]
    n_blocks = -(-n // blocksize)
    packed = torch.randint(0, 256, ((n + 1) // 2, 1), dtype=torch.uint8, device=device, generator=generator)
    codes = torch.randint(100, 156, (n_blocks,), dtype=torch.uint8, device=device, generator=generator)
    nested = torch.full((-(-n_blocks // 256),), 0.02, dtype=torch.float32, device=device)
    return QuantizedWeight(packed, codes, nested, 0.05, tuple(shape), dtype, blocksize)


def random_decoder(cfg: DecoderConfig, device, seed: int = 0, **kwargs) -> Decoder:
    """A decoder of ``cfg``'s shape with random NF4 weights and random 16-bit embeddings/norms, built layer by layer
    on ``device``."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def quantized(key, shape):
        return random_quantized(shape, device, gen)

    def dense(key, shape):
        if key.endswith("norm.weight") or "layernorm" in key:
            return torch.ones(shape, device=device)
        return torch.randn(shape, device=device, generator=gen) * 0.02

    return build_decoder(cfg, quantized, dense, device=device, seed=seed, **kwargs)

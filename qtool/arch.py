"""Model shape: the few numbers the planner needs, from a known name, a config.json, a model folder, a hub id (local
cache only) or a bare parameter count. Also the per-layer Linear modules with their (in, out) features — what the
converter quantises and what LoRA targets.

Pure Python: no torch, no transformers. ``huggingface_hub`` is imported only when a hub id is looked up.
"""
from __future__ import annotations

import difflib
import json
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from qtool.errors import InputError

# model_type -> (norm, mlp, layout). layout "split": q,k,v,o + gate,up,down; "phi3": fused qkv_proj and gate_up_proj;
# "neox": query_key_value, dense, dense_h_to_4h, dense_4h_to_h (GPT-NeoX, parallel residual).
_ARCHS = {
    "llama": ("rms", "gated", "split"), "mistral": ("rms", "gated", "split"), "qwen2": ("rms", "gated", "split"),
    "qwen3": ("rms", "gated", "split"), "gemma": ("rms", "gated", "split"), "gemma2": ("rms", "gated", "split"),
    "gemma3_text": ("rms", "gated", "split"), "phi3": ("rms", "gated", "phi3"), "gpt_neox": ("layer", "plain", "neox"),
}
MOE_TYPES = {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "dbrx", "jamba", "olmoe",
              "granitemoe", "phimoe", "llama4", "gpt_oss"}
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class Linear:
    """One nn.Linear inside a decoder layer: ``n_in`` -> ``n_out`` features; ``group`` is "attn" or "mlp"."""

    name: str
    n_in: int
    n_out: int
    bias: bool
    group: str


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer as the planner sees it. Field names follow transformers' config.json."""

    name: str
    model_type: str
    hidden: int
    intermediate: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    max_positions: int = 4096
    dtype: str = "bfloat16"
    attention_bias: bool = False  # q,k,v (and o for llama's attention_bias) carry biases
    mlp_bias: bool = False
    source: str = "table"          # where the shape came from, for the report
    note: str = ""                 # an assumption the user should know about (e.g. the shape picked for --params)
    declared_params: int | None = None  # the count given with --params; the fp16 line is declared_params * 2
    sliding_window: int | None = None  # attention window (Mistral v0.1: 4096, Phi-3-mini-4k: 2047); None: full
    full_attention_layers: tuple[int, ...] = ()  # layers exempt from the window (Qwen2/3 below max_window_layers)
    rms_norm_eps: float = 1e-6
    rope: tuple[tuple[str, object], ...] = (("rope_theta", 10000.0), ("rope_type", "default"))  # sorted (key, value)
    # Gemma 2/3 (the defaults elsewhere). Scores are scaled by query_pre_attn_scalar^-1/2 instead of head_dim^-1/2;
    # a soft-cap c maps z to c·tanh(z/c) (attention scores before the mask; the head's logits).
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    layer_types: tuple[str, ...] = ()  # per layer "sliding_attention" | "full_attention"; () = every layer alike
    local_window: int | None = None    # the window of the "sliding_attention" layers (config.json's sliding_window)
    rope_local: tuple[tuple[str, object], ...] = ()  # RoPE of the sliding layers when it differs (gemma3), as `rope`
    hidden_activation: str = "silu"    # the gated MLP's activation: silu, or gelu_pytorch_tanh (gemma)

    @property
    def rope_params(self) -> dict:
        """RoPE parameters as transformers 5 names them (``rope_theta``, ``rope_type`` and the scaling's keys)."""
        return dict(self.rope)

    @property
    def norm(self) -> str:
        return _ARCHS[self.model_type][0]

    @property
    def mlp(self) -> str:
        return _ARCHS[self.model_type][1]

    def window(self, layer: int) -> int | None:
        """The attention window of decoder layer ``layer`` (it attends to itself and the ``window - 1`` positions
        before), None for full causal attention: ``local_window`` on the sliding layers of ``layer_types``, else
        ``sliding_window`` on every layer but ``full_attention_layers`` (Qwen2/3 below max_window_layers). A query at
        position i sees keys i - window < j <= i (transformers' sliding_window_overlay)."""
        if self.layer_types:
            return self.local_window if self.layer_types[layer] == "sliding_attention" else None
        return None if layer in self.full_attention_layers else self.sliding_window

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def n_norms_per_layer(self) -> int:
        """gemma2/3 wrap both blocks in pre- and post-norms; everything else has two."""
        return 4 if self.model_type in ("gemma2", "gemma3_text") else 2

    @property
    def rotary_dim(self) -> int:
        """Leading features of each head that RoPE rotates (Phi-3's ``partial_rotary_factor``; all by default)."""
        return int(self.head_dim * self.rope_params.get("partial_rotary_factor", 1.0))

    @property
    def qk_norm(self) -> bool:
        """qwen3 and gemma3 normalise q and k per head (an RMSNorm of head_dim)."""
        return self.model_type in ("qwen3", "gemma3_text")

    def linears(self) -> list[Linear]:
        """The Linear modules of one decoder layer, in forward order."""
        h, f, q, kv = self.hidden, self.intermediate, self.q_dim, self.kv_dim
        layout = _ARCHS[self.model_type][2]
        qkv_bias = self.attention_bias or self.model_type == "qwen2"
        o_bias = self.attention_bias and self.model_type != "qwen2"  # qwen2: q, k, v biases only
        if layout == "neox":
            return [Linear("query_key_value", h, 3 * h, True, "attn"), Linear("dense", h, h, True, "attn"),
                    Linear("dense_h_to_4h", h, f, True, "mlp"), Linear("dense_4h_to_h", f, h, True, "mlp")]
        if layout == "phi3":
            return [Linear("qkv_proj", h, q + 2 * kv, False, "attn"), Linear("o_proj", q, h, False, "attn"),
                    Linear("gate_up_proj", h, 2 * f, False, "mlp"), Linear("down_proj", f, h, False, "mlp")]
        return [Linear("q_proj", h, q, qkv_bias, "attn"), Linear("k_proj", h, kv, qkv_bias, "attn"),
                Linear("v_proj", h, kv, qkv_bias, "attn"), Linear("o_proj", q, h, o_bias, "attn"),
                Linear("gate_proj", h, f, self.mlp_bias, "mlp"), Linear("up_proj", h, f, self.mlp_bias, "mlp"),
                Linear("down_proj", f, h, self.mlp_bias, "mlp")]

    def module_path(self, layer: int, name: str) -> str:
        """The module path of Linear ``name`` of decoder layer ``layer`` in the transformers model (the names PEFT
        and the checkpoint keys use, without ``.weight``). The one place these paths are built."""
        if self.model_type == "gpt_neox":
            return f"gpt_neox.layers.{layer}.{'attention' if self.group_of(name) == 'attn' else 'mlp'}.{name}"
        return f"model.layers.{layer}.{'self_attn' if self.group_of(name) == 'attn' else 'mlp'}.{name}"

    def group_of(self, name: str) -> str:
        for lin in self.linears():
            if lin.name == name:
                return lin.group
        raise KeyError(f"{self.model_type} layers have no Linear {name!r}")

    def n_norm_params(self) -> int:
        """Norm weights (and LayerNorm biases) of the whole model, final norm included."""
        per_norm = 2 * self.hidden if self.norm == "layer" else self.hidden
        qk = 2 * self.head_dim if self.qk_norm else 0
        return self.n_layers * (self.n_norms_per_layer * per_norm + qk) + per_norm

    def n_bias_params(self) -> int:
        return self.n_layers * sum(lin.n_out for lin in self.linears() if lin.bias)

    def n_linear_params(self) -> int:
        """Weights of all decoder-layer Linears: what the converter quantises."""
        return self.n_layers * sum(lin.n_in * lin.n_out for lin in self.linears())

    def n_embedding_params(self) -> int:
        """Input embeddings plus an untied output head (a tied head shares the embedding matrix)."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    def n_params(self) -> int:
        return self.n_linear_params() + self.n_embedding_params() + self.n_norm_params() + self.n_bias_params()


def shape_problems(shape: Shape) -> list[str]:
    """Inconsistencies in a shape (all of them), e.g. from a hand-edited config.json."""
    problems = []
    for field in ("hidden", "intermediate", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab"):
        if getattr(shape, field) <= 0:
            problems.append(f"{shape.name}: {field} must be positive, got {getattr(shape, field)}")
    if shape.n_heads > 0 and shape.head_dim * shape.n_heads != shape.hidden and shape.hidden % shape.n_heads:
        problems.append(f"{shape.name}: num_attention_heads ({shape.n_heads}) does not divide hidden_size "
                        f"({shape.hidden}) and no head_dim is given")
    if shape.n_kv_heads > 0 and shape.n_heads % shape.n_kv_heads:
        problems.append(f"{shape.name}: num_key_value_heads ({shape.n_kv_heads}) does not divide "
                        f"num_attention_heads ({shape.n_heads})")
    return problems


# --- known shapes ----------------------------------------------------------------------------------------------------
# name: (model_type, hidden, intermediate, layers, heads, kv_heads, head_dim, vocab, tied, max_positions), as in each
# model's published config.json.
_TABLE = {
    "llama-1-7b": ("llama", 4096, 11008, 32, 32, 32, 128, 32000, False, 2048),
    "llama-1-13b": ("llama", 5120, 13824, 40, 40, 40, 128, 32000, False, 2048),
    "llama-1-33b": ("llama", 6656, 17920, 60, 52, 52, 128, 32000, False, 2048),
    "llama-1-65b": ("llama", 8192, 22016, 80, 64, 64, 128, 32000, False, 2048),
    "llama-2-7b": ("llama", 4096, 11008, 32, 32, 32, 128, 32000, False, 4096),
    "llama-2-13b": ("llama", 5120, 13824, 40, 40, 40, 128, 32000, False, 4096),
    "llama-2-70b": ("llama", 8192, 28672, 80, 64, 8, 128, 32000, False, 4096),
    "llama-3-8b": ("llama", 4096, 14336, 32, 32, 8, 128, 128256, False, 8192),
    "llama-3-70b": ("llama", 8192, 28672, 80, 64, 8, 128, 128256, False, 8192),
    "llama-3.1-8b": ("llama", 4096, 14336, 32, 32, 8, 128, 128256, False, 131072),
    "llama-3.1-70b": ("llama", 8192, 28672, 80, 64, 8, 128, 128256, False, 131072),
    "llama-3.1-405b": ("llama", 16384, 53248, 126, 128, 8, 128, 128256, False, 131072),
    "llama-3.2-1b": ("llama", 2048, 8192, 16, 32, 8, 64, 128256, True, 131072),
    "llama-3.2-3b": ("llama", 3072, 8192, 28, 24, 8, 128, 128256, True, 131072),
    "mistral-7b": ("mistral", 4096, 14336, 32, 32, 8, 128, 32000, False, 32768),
    "qwen2.5-0.5b": ("qwen2", 896, 4864, 24, 14, 2, 64, 151936, True, 32768),
    "qwen2.5-1.5b": ("qwen2", 1536, 8960, 28, 12, 2, 128, 151936, True, 32768),
    "qwen2.5-3b": ("qwen2", 2048, 11008, 36, 16, 2, 128, 151936, True, 32768),
    "qwen2.5-7b": ("qwen2", 3584, 18944, 28, 28, 4, 128, 152064, False, 32768),
    "qwen2.5-14b": ("qwen2", 5120, 13824, 48, 40, 8, 128, 152064, False, 32768),
    "qwen2.5-32b": ("qwen2", 5120, 27648, 64, 40, 8, 128, 152064, False, 32768),
    "qwen2.5-72b": ("qwen2", 8192, 29568, 80, 64, 8, 128, 152064, False, 32768),
    "qwen3-0.6b": ("qwen3", 1024, 3072, 28, 16, 8, 128, 151936, True, 40960),
    "qwen3-1.7b": ("qwen3", 2048, 6144, 28, 16, 8, 128, 151936, True, 40960),
    "qwen3-4b": ("qwen3", 2560, 9728, 36, 32, 8, 128, 151936, True, 40960),
    "qwen3-8b": ("qwen3", 4096, 12288, 36, 32, 8, 128, 151936, False, 40960),
    "qwen3-14b": ("qwen3", 5120, 17408, 40, 40, 8, 128, 151936, False, 40960),
    "qwen3-32b": ("qwen3", 5120, 25600, 64, 64, 8, 128, 151936, False, 40960),
    "smollm2-135m": ("llama", 576, 1536, 30, 9, 3, 64, 49152, True, 8192),
    "smollm2-360m": ("llama", 960, 2560, 32, 15, 5, 64, 49152, True, 8192),
    "smollm2-1.7b": ("llama", 2048, 8192, 24, 32, 32, 64, 49152, True, 8192),
    "gemma-2b": ("gemma", 2048, 16384, 18, 8, 1, 256, 256000, True, 8192),
    "gemma-7b": ("gemma", 3072, 24576, 28, 16, 16, 256, 256000, True, 8192),
    "gemma-2-2b": ("gemma2", 2304, 9216, 26, 8, 4, 256, 256000, True, 8192),
    "gemma-2-9b": ("gemma2", 3584, 14336, 42, 16, 8, 256, 256000, True, 8192),
    "gemma-2-27b": ("gemma2", 4608, 36864, 46, 32, 16, 128, 256000, True, 8192),
    "gemma-3-1b": ("gemma3_text", 1152, 6912, 26, 4, 1, 256, 262144, True, 32768),
    "gemma-3-4b": ("gemma3_text", 2560, 10240, 34, 8, 4, 256, 262208, True, 131072),
    "gemma-3-12b": ("gemma3_text", 3840, 15360, 48, 16, 8, 256, 262208, True, 131072),
    "gemma-3-27b": ("gemma3_text", 5376, 21504, 62, 32, 16, 128, 262208, True, 131072),
    "phi-3-mini": ("phi3", 3072, 8192, 32, 32, 32, 96, 32064, False, 4096),
    "pythia-160m": ("gpt_neox", 768, 3072, 12, 12, 12, 64, 50304, False, 2048),
    "pythia-1b": ("gpt_neox", 2048, 8192, 16, 8, 8, 256, 50304, False, 2048),
    "pythia-6.9b": ("gpt_neox", 4096, 16384, 32, 32, 32, 128, 50432, False, 2048),
}
# Models of the table whose every layer attends within a window (their config.json's sliding_window).
_SLIDING_WINDOWS = {"mistral-7b": 4096, "phi-3-mini": 2047}
# The Gemma fields of the table's gemma2/3 models, as in their published config.json (read by _gemma_fields).
_GEMMA2 = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "sliding_window": 4096}
_GEMMA3 = {"sliding_window": 1024, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
           "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
_GEMMA_CONFIGS = {
    "gemma-2-2b": _GEMMA2, "gemma-2-9b": _GEMMA2, "gemma-2-27b": {**_GEMMA2, "query_pre_attn_scalar": 144},
    "gemma-3-1b": {**_GEMMA3, "sliding_window": 512, "rope_scaling": None}, "gemma-3-4b": _GEMMA3,
    "gemma-3-12b": _GEMMA3, "gemma-3-27b": {**_GEMMA3, "query_pre_attn_scalar": 168},
}
_ALIASES = {
    "llama-7b": "llama-1-7b", "llama-13b": "llama-1-13b", "llama-30b": "llama-1-33b", "llama-33b": "llama-1-33b",
    "llama-65b": "llama-1-65b", "llama-1-30b": "llama-1-33b", "meta-llama-3-8b": "llama-3-8b",
    "meta-llama-3-70b": "llama-3-70b", "meta-llama-3.1-8b": "llama-3.1-8b", "meta-llama-3.1-70b": "llama-3.1-70b",
    "meta-llama-3.1-405b": "llama-3.1-405b", "llama-3.3-70b": "llama-3.1-70b", "mistral-7b-v0.1": "mistral-7b",
    "gemma-2-2b-it": "gemma-2-2b", "phi-3-mini-4k": "phi-3-mini",
}
# The shapes a bare --params count is matched against (one canonical shape per size).
_PARAMS_CANDIDATES = ("smollm2-135m", "smollm2-360m", "qwen2.5-0.5b", "qwen2.5-1.5b", "smollm2-1.7b", "qwen2.5-3b",
                      "llama-1-7b", "llama-3.1-8b", "llama-1-13b", "qwen2.5-14b", "qwen2.5-32b", "llama-1-33b",
                      "llama-1-65b", "llama-2-70b", "qwen2.5-72b", "llama-3.1-405b")
_SUFFIXES = ("-hf", "-instruct", "-chat", "-it", "-pt", "-base", "-deduped")


def known_names() -> list[str]:
    return sorted(_TABLE)


def _canonical(name: str) -> str:
    key = name.strip().lower().split("/")[-1].replace("_", "-")
    while key.endswith(_SUFFIXES):  # Llama-2-7b-chat-hf -> llama-2-7b
        key = next(key.removesuffix(x) for x in _SUFFIXES if key.endswith(x))
    return _ALIASES.get(key, key)


def known_shape(name: str) -> Shape:
    """A shape from the table by name or alias (case-insensitive; an org prefix and -hf/-instruct are ignored)."""
    key = _canonical(name)
    if key not in _TABLE:
        close = difflib.get_close_matches(key, list(_TABLE) + list(_ALIASES), n=4, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "see `qtool plan --list-models`"
        raise InputError(f"unknown model name {name!r}",
                         hint=f"{hint} (or pass a config.json, a model folder or --params)")
    model_type, h, f, n_layers, n_heads, n_kv, head_dim, vocab, tied, max_pos = _TABLE[key]
    return Shape(key, model_type, h, f, n_layers, n_heads, n_kv, head_dim, vocab, tied, max_pos, source=f"table:{key}",
                 sliding_window=_SLIDING_WINDOWS.get(key),
                 **_gemma_fields(model_type, n_layers, _GEMMA_CONFIGS.get(key, {})))


# --- config.json -----------------------------------------------------------------------------------------------------

def shape_from_config(config: dict, name: str = "config") -> Shape:
    """A shape from a transformers config.json dict (a nested ``text_config`` is used for multimodal configs)."""
    model_type = config.get("model_type", "")
    if "text_config" in config and model_type in ("gemma3", "llava", "mistral3", "paligemma"):
        config = {**config["text_config"]}
        model_type = config.get("model_type", "gemma3_text")
    model_type = {"gemma3": "gemma3_text"}.get(model_type, model_type)
    if model_type in MOE_TYPES or any(config.get(k) for k in MOE_KEYS):
        raise InputError(f"{name}: {model_type or 'this model'} is a mixture-of-experts model, which qtool does not "
                         "support", hint="plan a dense model (llama, mistral, qwen2/3, gemma, phi3, gpt_neox)")
    if model_type not in _ARCHS:
        raise InputError(f"{name}: model_type {model_type!r} is not supported",
                         hint=f"supported: {', '.join(sorted(_ARCHS))}")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
               if k not in config]
    if missing:
        raise InputError(f"{name}: config.json lacks {', '.join(missing)}")
    h, n_heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    if model_type == "gpt_neox":
        f = int(config.get("intermediate_size", 4 * h))
        n_kv, tied = n_heads, bool(config.get("tie_word_embeddings", False))
    else:
        f = int(config.get("intermediate_size", 0))
        n_kv = int(config.get("num_key_value_heads") or n_heads)
        tied = bool(config.get("tie_word_embeddings", model_type.startswith("gemma")))
    head_dim = config.get("head_dim") or (h // n_heads if n_heads > 0 else 0)
    return Shape(
        name=name, model_type=model_type, hidden=h, intermediate=f, n_layers=int(config["num_hidden_layers"]),
        n_heads=n_heads, n_kv_heads=n_kv, head_dim=int(head_dim), vocab=int(config["vocab_size"]),
        tied_embeddings=tied, max_positions=int(config.get("max_position_embeddings") or 4096),
        dtype=str(config.get("torch_dtype") or config.get("dtype") or "bfloat16"),
        attention_bias=bool(config.get("attention_bias", False)), mlp_bias=bool(config.get("mlp_bias", False)),
        source=f"config:{name}", sliding_window=_sliding_window(model_type, config),
        full_attention_layers=_full_attention_layers(model_type, config),
        rms_norm_eps=float(config.get("rms_norm_eps", config.get("layer_norm_eps", 1e-6))), **{"rope": _rope(config), **_gemma_fields(model_type, int(config["num_hidden_layers"]), config)})


def _gemma_fields(model_type: str, n_layers: int, config: dict) -> dict:
    """Shape's Gemma 2/3 fields from a config.json (transformers 4.x or 5 keys), with the defaults transformers'
    Gemma2Config/Gemma3TextConfig apply when a key is absent; {} for other models. Layer types: config.json's
    ``layer_types``, else every ``sliding_window_pattern``-th layer global (Gemma 2: 2, Gemma 3: 6), the others
    sliding. Gemma 3's RoPE: ``rope_parameters`` per layer type (transformers 5), or ``rope_theta`` (1e6) +
    ``rope_scaling`` for the global layers and ``rope_local_base_freq`` (1e4) for the sliding ones (4.x)."""
    if model_type not in ("gemma2", "gemma3_text"):
        return {}
    gemma3 = model_type == "gemma3_text"
    pattern = int(config.get("sliding_window_pattern") or config.get("_sliding_window_pattern") or (6 if gemma3 else 2))
    types = config.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                          for i in range(n_layers)]
    fields = {"query_pre_attn_scalar": float(config.get("query_pre_attn_scalar") or 256),
              "attn_logit_softcapping": config.get("attn_logit_softcapping", None if gemma3 else 50.0),
              "final_logit_softcapping": config.get("final_logit_softcapping", None if gemma3 else 30.0),
              "layer_types": tuple(types), "local_window": config.get("sliding_window", 4096),
              "hidden_activation": config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"}
    if gemma3:
        params = config.get("rope_parameters") or {}
        if "full_attention" in params or "sliding_attention" in params:
            full, local = dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
        else:
            full, local = dict(config.get("rope_scaling") or {}), {}
            full.setdefault("rope_theta", config.get("rope_theta", 1e6))
            local["rope_theta"] = config.get("rope_local_base_freq", 1e4)
        full.setdefault("rope_theta", 1e6)
        local.setdefault("rope_theta", 1e4)
        for rope in (full, local):
            rope["rope_type"] = rope.get("rope_type", rope.pop("type", "default"))
        fields.update(rope=_frozen(full), rope_local=_frozen(local))
    for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
        fields[cap] = float(fields[cap]) if fields[cap] else None
    fields["local_window"] = int(fields["local_window"]) if fields["local_window"] else None
    return fields


def _rope(config: dict) -> tuple[tuple[str, object], ...]:
    """RoPE parameters from transformers 5's ``rope_parameters`` or 4.x's ``rope_theta`` + ``rope_scaling``, as
    sorted (key, value) pairs with ``rope_type`` (``type`` in old configs) and ``rope_theta`` always present."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    if "partial_rotary_factor" in config:  # 4.x Phi-3 configs keep it at the top level
        rope.setdefault("partial_rotary_factor", config["partial_rotary_factor"])
    rope["rope_type"] = rope.get("rope_type", rope.pop("type", "default"))
    return _frozen(rope)


def _frozen(value):
    """A hashable copy of a JSON value (dicts as sorted (key, value) tuples, lists as tuples): Shape is a cache key."""
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


def _sliding_window(model_type: str, config: dict) -> int | None:
    """The attention window, as transformers reads it: Mistral's ``sliding_window`` (4096 when the key is absent,
    MistralConfig's default; null from v0.2 on) and Phi-3's (null by default; 2047 in Phi-3-mini-4k) for every layer;
    Qwen2/3's only with ``use_sliding_window`` (off in released configs; then from layer ``max_window_layers`` on,
    :func:`_full_attention_layers`). Gemma 2/3 window only some layers: Shape.local_window and layer_types."""
    if model_type == "mistral":
        window = config.get("sliding_window", 4096)
    elif model_type == "phi3":
        window = config.get("sliding_window")
    elif model_type in ("qwen2", "qwen3") and config.get("use_sliding_window"):
        window = config.get("sliding_window")
    else:
        window = None
    return int(window) if window else None


def _full_attention_layers(model_type: str, config: dict) -> tuple[int, ...]:
    """Qwen2/3 with a window: the layers that still attend over everything — those whose ``layer_types`` entry is not
    "sliding_attention" (transformers 5 saves the list), else those below ``max_window_layers`` (Qwen2Config and
    Qwen3Config derive the list that way)."""
    if model_type not in ("qwen2", "qwen3") or not config.get("use_sliding_window"):
        return ()
    n = int(config.get("num_hidden_layers", 0))
    types = config.get("layer_types")
    if isinstance(types, list) and len(types) == n:
        return tuple(i for i, t in enumerate(types) if t != "sliding_attention")
    return tuple(range(min(int(config.get("max_window_layers", 28)), n)))


def read_config(folder, hint: str = "qtool needs the Hugging Face config.json of the model") -> dict:
    """The config.json of a model folder (or the file itself) as a dict; InputError naming the file otherwise."""
    path = Path(folder)
    path = path if path.suffix == ".json" else path / "config.json"
    if not path.is_file():
        raise InputError(f"{path.parent}: no config.json", hint=hint)
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read ({exc})") from exc
    if not isinstance(config, dict):
        raise InputError(f"{path}: not a JSON object")
    return config


def _read_config(path: Path) -> Shape:
    config = read_config(path)
    note = "converted NF4 folder (quantization_config present)" if "quantization_config" in config else ""
    return replace(shape_from_config(config, name=str(path)), note=note)


def _from_hub_cache(repo_id: str) -> Path | None:
    """config.json of ``repo_id`` from huggingface_hub's local cache, or None. Never touches the network."""
    from huggingface_hub import try_to_load_from_cache  # lazy: hub ids only

    found = try_to_load_from_cache(repo_id, "config.json")
    return Path(found) if isinstance(found, str) else None


def resolve_model(model: str) -> Shape:
    """``--model``: a config.json, a model folder, a known name, or a hub id found in the local cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"{path} has no config.json", hint="pass the model folder that holds config.json")
        return _read_config(path / "config.json")
    if path.is_file():
        return _read_config(path)
    if model.endswith(".json") or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise InputError(f"{model}: no such file or folder")
    if _canonical(model) in _TABLE:
        return known_shape(model)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        cached = _from_hub_cache(model)
        if cached is not None:
            return replace(_read_config(cached), name=model, source=f"hub-cache:{model}")
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise InputError(f"{model}: config.json is not in the local Hugging Face cache{offline}",
                         hint=f"run `huggingface-cli download {model} config.json`, or pass a config.json path")
    return known_shape(model)  # raises with suggestions


# --- a bare parameter count ------------------------------------------------------------------------------------------

def parse_param_count(text: str | float | int) -> int:
    """'65e9', '65B', '7b', '135M', 6.7e9 -> an int count. Raises ValueError."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbt]?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"not a parameter count: {text!r} (examples: 65e9, 7B, 135M)")
    return int(float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2).lower()])


def shape_for_params(n_params: int) -> Shape:
    """The known shape closest to ``n_params`` (within 10%), else a Llama-2-style shape derived from the count.

    The derived shape uses vocab 32000, head_dim 128, intermediate = 8/3 hidden rounded up to 256, and the
    hidden/layers ratio of 128 that Llama-2-7B/13B have: P ~ layers * 12 h^2 + 2 V h with layers = h / 128.
    """
    n_params = int(n_params)
    given = f"--params {n_params:.3g}"
    best = min(_PARAMS_CANDIDATES, key=lambda k: abs(known_shape(k).n_params() - n_params))
    shape = known_shape(best)
    if abs(shape.n_params() - n_params) <= 0.10 * n_params:
        return replace(shape, source=f"params:{n_params}", declared_params=n_params,
                       note=f"{given}: assumed the {best} shape ({shape.n_params():,} parameters)")
    vocab = 32000
    h = 256
    while (h / 128) * 12 * h * h + 2 * vocab * h < n_params:
        h += 256
    f = 256 * math.ceil(8 * h / 3 / 256)
    n_layers = max(1, round((n_params - 2 * vocab * h) / (4 * h * h + 3 * h * f + 2 * h)))
    derived = Shape(f"llama-style-{n_params:.3g}", "llama", h, f, n_layers, h // 128, h // 128, 128, vocab, False,
                    4096, source=f"params:{n_params}")
    return replace(derived, declared_params=n_params,
                   note=f"{given}: no known shape within 10%; derived a Llama-2-style shape (hidden {h}, "
                   f"intermediate {f}, {n_layers} layers, {derived.n_params():,} parameters)")

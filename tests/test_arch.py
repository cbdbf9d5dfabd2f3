"""Model shapes: the table against published parameter counts, config parsing against transformers' own models."""
from __future__ import annotations

import json

import pytest

from qtool.arch import (known_names, known_shape, parse_param_count, resolve_model, shape_for_params,
                        shape_from_config, shape_problems)
from qtool.errors import InputError

# Parameter totals as published on the models' cards / printed by transformers for the released checkpoints.
PUBLISHED = {
    "llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320, "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248, "llama-3-70b": 70_553_706_496, "llama-3.1-405b": 405_853_388_800,
    "llama-3.2-1b": 1_235_814_400, "mistral-7b": 7_241_732_096, "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512, "gemma-2-9b": 9_241_705_984, "gemma-7b": 8_537_680_896,
    "smollm2-135m": 134_515_008, "pythia-160m": 162_322_944, "phi-3-mini": 3_821_079_552,
}

# Tiny configs, one per supported architecture: (model_type, extra config fields).
TINY = {
    "llama": {}, "mistral": {"num_key_value_heads": 2}, "qwen2": {"num_key_value_heads": 2},
    "qwen3": {"num_key_value_heads": 2, "head_dim": 32}, "gemma": {"head_dim": 32},
    "gemma2": {"num_key_value_heads": 2, "head_dim": 32}, "gemma3_text": {"num_key_value_heads": 2, "head_dim": 32},
    "phi3": {}, "gpt_neox": {},
}


def tiny_config(model_type: str, **extra):
    from transformers import AutoConfig

    fields = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=1000, max_position_embeddings=512,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    fields.update(TINY[model_type], **extra)
    if model_type == "gpt_neox":
        fields.pop("num_key_value_heads")
    return AutoConfig.for_model(model_type, **fields)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_known_shapes_match_published_totals(name):
    assert known_shape(name).n_params() == PUBLISHED[name]


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_config_parsing_counts_what_transformers_builds(model_type):
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    model = AutoModelForCausalLM.from_config(config)
    shape = shape_from_config(config.to_dict())
    assert shape.n_params() == sum(p.numel() for p in model.parameters())
    linears = {n.rsplit(".", 1)[-1]: m for n, m in model.named_modules() if type(m).__name__ == "Linear"
               and ".layers.0." in n}
    assert {lin.name: (lin.n_in, lin.n_out) for lin in shape.linears()} == \
        {k: (m.in_features, m.out_features) for k, m in linears.items()}


def test_every_name_and_alias_resolves():
    for name in known_names():
        assert not shape_problems(known_shape(name)), name
    assert known_shape("meta-llama/Llama-2-7b-hf").name == "llama-2-7b"
    assert known_shape("Meta-Llama-3.1-8B-Instruct").name == "llama-3.1-8b"
    assert known_shape("llama-30b").name == "llama-1-33b"


def test_unknown_name_suggests_close_ones():
    with pytest.raises(InputError) as err:
        known_shape("llama-2-8b")
    assert "llama-2-7b" in str(err.value) or "llama-3-8b" in str(err.value)


def test_config_file_folder_and_converted_folder(tmp_path):
    config = tiny_config("llama").to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert resolve_model(str(tmp_path / "config.json")).hidden == 128
    assert resolve_model(str(tmp_path)).n_layers == 2
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": {"load_in_4bit": True}}))
    assert "converted NF4" in resolve_model(str(tmp_path)).note
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_hub_id_from_local_cache_only(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(InputError, match="not in the local Hugging Face cache"):
        resolve_model("someorg/tiny-llama")
    snapshot = tmp_path / "models--someorg--tiny-llama" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(tiny_config("llama").to_dict()))
    (tmp_path / "models--someorg--tiny-llama" / "refs").mkdir()
    (tmp_path / "models--someorg--tiny-llama" / "refs" / "main").write_text("abc123")
    shape = resolve_model("someorg/tiny-llama")
    assert (shape.name, shape.hidden, shape.source) == ("someorg/tiny-llama", 128, "hub-cache:someorg/tiny-llama")


def test_sliding_window_as_transformers_reads_it():
    """Mistral's window decides whether transformers materialises an sdpa mask (the plan's hf attention kernel)."""
    from transformers import MistralConfig

    base = {"model_type": "mistral", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 128, "vocab_size": 100}
    assert shape_from_config(base).sliding_window == MistralConfig().sliding_window == 4096  # key absent: default
    assert shape_from_config({**base, "sliding_window": None}).sliding_window is None  # Mistral v0.2 and later
    assert shape_from_config({**base, "model_type": "llama", "sliding_window": 4096}).sliding_window is None
    assert known_shape("mistral-7b").sliding_window == 4096 and known_shape("llama-3-8b").sliding_window is None


def test_moe_and_unsupported_types_are_refused():
    with pytest.raises(InputError, match="mixture-of-experts"):
        shape_from_config({"model_type": "mixtral", "hidden_size": 64, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "vocab_size": 100, "num_local_experts": 8})
    with pytest.raises(InputError, match="not supported"):
        shape_from_config({"model_type": "t5", "hidden_size": 64})


def test_inconsistent_config_lists_every_problem():
    shape = shape_from_config({"model_type": "llama", "hidden_size": 100, "intermediate_size": 256,
                               "num_hidden_layers": 0, "num_attention_heads": 3, "num_key_value_heads": 2,
                               "vocab_size": 100})
    problems = shape_problems(shape)
    assert len(problems) == 3
    assert any("does not divide hidden_size" in p for p in problems)
    assert any("num_key_value_heads (2) does not divide" in p for p in problems)


def test_bare_parameter_counts():
    assert parse_param_count("65e9") == 65_000_000_000
    assert parse_param_count("7B") == 7_000_000_000 and parse_param_count("135m") == 135_000_000
    with pytest.raises(ValueError):
        parse_param_count("lots")
    shape = shape_for_params(65e9)
    assert shape.name == "llama-1-65b" and shape.declared_params == 65_000_000_000 and "llama-1-65b" in shape.note
    derived = shape_for_params(20e9)  # no known shape within 10%: a derived Llama-style one, said so
    assert "derived" in derived.note and abs(derived.n_params() - 20e9) / 20e9 < 0.05
    assert not shape_problems(derived)

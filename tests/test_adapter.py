"""qtool.format.peft_adapter against peft itself: qtool-written adapters load in peft and compute x W0ᵀ + s·x Aᵀ Bᵀ;
peft-written adapters (rank_pattern / alpha_pattern / rsLoRA / lora_bias) read back with the factors and scales peft uses; and
every refusal names the file and the reason."""
from __future__ import annotations

import json
import math
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from qtool.format.peft_adapter import (CONFIG_NAME, LORA_CONFIG_DEFAULTS, PICKLE_NAME, WEIGHTS_NAME, load_adapter,  # noqa: E402
                           lora_scale, save_adapter)
from qtool.errors import InputError, OutputError  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]
# (rank_pattern, alpha_pattern, use_rslora): peft matches a pattern key as a regex against the end of the module
# name at a dot boundary, first key wins — full names, suffixes and regexes all appear here.
VARIANTS = {
    "plain": ({}, {}, False),
    "patterns": ({"model.layers.0.self_attn.q_proj": 4, "down_proj": 2}, {r"layers\.1\.self_attn\.v_proj": 3.5}, False),
    "rslora": ({}, {}, True),
    "rslora+patterns": ({r"layers\.\d\.self_attn\.v_proj": 16}, {"q_proj": 32}, True),
}


def tiny_llama(seed: int = 0, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, **kw)
    return LlamaForCausalLM(cfg).eval()


def lora_layers(peft_model) -> dict:
    """module path (as in the transformers model) -> peft LoRA layer."""
    inner = peft_model.base_model.model
    return {name: mod for name, mod in inner.named_modules() if hasattr(mod, "lora_A") and "default" in mod.lora_A}


def peft_adapter(tmp_path, variant: str, seed: int = 0, **config_kw):
    rank_pattern, alpha_pattern, rslora = VARIANTS[variant]
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, rank_pattern=rank_pattern,
                     alpha_pattern=alpha_pattern, use_rslora=rslora, init_lora_weights=False, **config_kw)
    bias = bool(config_kw.get("lora_bias"))
    model = get_peft_model(tiny_llama(seed, attention_bias=bias, mlp_bias=bias), cfg)
    out = tmp_path / f"peft-{variant}"
    model.save_pretrained(out)
    return model, out


# ------------------------------------------------------------------------------------------------ qtool -> peft
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_qtool_adapter_loads_in_peft_and_computes_the_bypass(tmp_path, variant):
    rank_pattern, alpha_pattern, rslora = VARIANTS[variant]
    base = tiny_llama(1)
    config = dict(LORA_CONFIG_DEFAULTS, r=8, lora_alpha=16, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    from qtool.format.peft_adapter import rank_and_alpha

    g = torch.Generator().manual_seed(2)
    factors, scales = {}, {}
    for name, mod in base.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS:
            r, alpha = rank_and_alpha(config, name)
            factors[name] = (torch.randn(r, mod.in_features, generator=g),
                             torch.randn(mod.out_features, r, generator=g))
            scales[name] = lora_scale(r, alpha, rslora)
    out = save_adapter(tmp_path / "ad", factors, rank=8, alpha=16, target_modules=TARGETS, rank_pattern=rank_pattern,
                       alpha_pattern=alpha_pattern, use_rslora=rslora, extra_files={"train_log.json": "{}"})
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME, "train_log.json"]
    w0 = {name: base.get_submodule(name).weight.detach().clone() for name in factors}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, out)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower()], messages
    layers = lora_layers(model)
    assert set(layers) == set(factors)
    x = torch.randn(3, 5, 64, generator=g)
    for name, (a, b) in factors.items():
        layer = layers[name]
        assert layer.scaling["default"] == pytest.approx(scales[name], rel=1e-12)
        xin = x if a.shape[1] == 64 else torch.randn(3, 5, a.shape[1], generator=g)
        expected = F.linear(xin, w0[name]) + scales[name] * (xin @ a.t() @ b.t())
        with torch.no_grad():
            got = layer(xin)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_config_has_peft_key_set_and_survives_a_peft_round_trip(tmp_path):
    ours = tmp_path / "ours"
    save_adapter(ours, {"model.layers.0.self_attn.q_proj": (torch.ones(4, 64), torch.ones(64, 4))}, rank=4,
                 alpha=8.0, target_modules=["q_proj"], rank_pattern={"q_proj": 4}, dropout=0.05,
                 base_model_name_or_path="org/model")
    text = (ours / CONFIG_NAME).read_text()
    written = json.loads(text)
    assert text == json.dumps(written, indent=2, sort_keys=True)  # peft's formatting: sorted keys, indent 2
    peft_keys = set(LoraConfig(target_modules=["q_proj"]).to_dict()) - {"peft_version", "runtime_config"}
    assert set(written) == peft_keys, "LORA_CONFIG_DEFAULTS drifted from the installed peft's LoraConfig"
    again = tmp_path / "again"
    LoraConfig.from_pretrained(ours).save_pretrained(again)
    resaved = json.loads((again / CONFIG_NAME).read_text())
    resaved.pop("peft_version")
    assert resaved == written
    with safe_open(str(ours / WEIGHTS_NAME), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                                    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]


# ------------------------------------------------------------------------------------------------ peft -> qtool
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_adapter_reads_back_with_peft_factors_and_scales(tmp_path, variant):
    model, path = peft_adapter(tmp_path, variant)
    ad = load_adapter(path)
    layers = lora_layers(model)
    assert set(ad.modules) == set(layers)
    assert ad.fan_in_fan_out is False and ad.config["peft_type"] == "LORA"
    for name, layer in layers.items():
        f = ad.modules[name]
        assert torch.equal(f.a, layer.lora_A["default"].weight.detach())
        assert torch.equal(f.b, layer.lora_B["default"].weight.detach())
        assert f.scale == layer.scaling["default"]
        assert f.rank == layer.r["default"]
        assert f.bias is None
    if "patterns" in variant:  # the patterns really gave modules different ranks/scales
        assert len({(f.rank, f.scale) for f in ad.modules.values()}) >= 3


def test_lora_bias_is_read(tmp_path):
    model, path = peft_adapter(tmp_path, "patterns", lora_bias=True)
    ad = load_adapter(path)
    for name, layer in lora_layers(model).items():
        assert torch.equal(ad.modules[name].bias, layer.lora_B["default"].bias.detach())


def test_adapter_name_in_keys_and_missing_prefix_read_the_same(tmp_path):
    _, path = peft_adapter(tmp_path, "patterns")
    reference = load_adapter(path)
    tensors = load_file(path / WEIGHTS_NAME)
    for label, rename in {"named": lambda k: k.replace(".weight", ".default.weight"),
                          "unprefixed": lambda k: k.removeprefix("base_model.model.")}.items():
        other = tmp_path / label
        shutil.copytree(path, other)
        save_file({rename(k): v for k, v in tensors.items()}, other / WEIGHTS_NAME, metadata={"format": "pt"})
        ad = load_adapter(other)
        assert set(ad.modules) == set(reference.modules)
        for name, f in ad.modules.items():
            assert torch.equal(f.a, reference.modules[name].a) and f.scale == reference.modules[name].scale


# ------------------------------------------------------------------------------------------------------ refusals
def _edit_config(path, **changes):
    cfg = json.loads((path / CONFIG_NAME).read_text())
    cfg.update(changes)
    (path / CONFIG_NAME).write_text(json.dumps(cfg))


def _edit_tensors(path, fn):
    tensors = fn(load_file(path / WEIGHTS_NAME))
    save_file(tensors, path / WEIGHTS_NAME, metadata={"format": "pt"})


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
REFUSALS = {
    "ia3": (lambda p: _edit_config(p, peft_type="IA3"), CONFIG_NAME, "LoRA adapters only"),
    "adalora": (lambda p: _edit_config(p, peft_type="ADALORA"), CONFIG_NAME, "converted to plain LoRA"),
    "dora-config": (lambda p: _edit_config(p, use_dora=True), CONFIG_NAME, "DoRA"),
    "pissa": (lambda p: _edit_config(p, init_lora_weights="pissa_niter_4"), CONFIG_NAME, "changed W0"),
    "modules_to_save": (lambda p: _edit_config(p, modules_to_save=["lm_head"]), CONFIG_NAME, "full trained modules"),
    "unknown-variant": (lambda p: _edit_config(p, use_fancy_lora=True), CONFIG_NAME, "does not know"),
    "pickle": (lambda p: (p / WEIGHTS_NAME).rename(p / PICKLE_NAME), PICKLE_NAME, "never unpickles"),
    "missing-B": (lambda p: _edit_tensors(p, lambda t: {k: v for k, v in t.items() if k != f"{Q0}.lora_B.weight"}),
                  WEIGHTS_NAME, "model.layers.0.self_attn.q_proj: lora_B.weight is missing"),
    "rank-mismatch": (lambda p: _edit_config(p, r=4), WEIGHTS_NAME, "do not match rank 4"),
    "nan": (lambda p: _edit_tensors(p, lambda t: {**t, f"{Q0}.lora_A.weight": t[f"{Q0}.lora_A.weight"] * math.nan}),
            WEIGHTS_NAME, "model.layers.0.self_attn.q_proj: factors hold NaN/Inf"),
    "embedding": (lambda p: _edit_tensors(p, lambda t: {**t, "base_model.model.model.embed_tokens.lora_embedding_A":
                                                         torch.zeros(8, 128)}), WEIGHTS_NAME,
                  "lora_embedding_B is missing"),  # embedding LoRA is read, but whole
    "dora-tensor": (lambda p: _edit_tensors(p, lambda t: {**t, f"{Q0}.lora_magnitude_vector": torch.ones(64)}),
                    WEIGHTS_NAME, "DoRA"),
    "not-targeted": (lambda p: _edit_config(p, target_modules=["q_proj", "down_proj"]), WEIGHTS_NAME,
                     "does not select it"),
    "two-names": (lambda p: _edit_tensors(p, lambda t: {(k.replace(".weight", ".other.weight") if "layers.1" in k
                                                          else k): v for k, v in t.items()}), WEIGHTS_NAME,
                  "several adapter names"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refuses_what_cannot_be_merged_exactly(tmp_path, case):
    _, path = peft_adapter(tmp_path, "plain")
    edit, culprit, reason = REFUSALS[case]
    edit(path)
    with pytest.raises(InputError) as exc:
        load_adapter(path)
    assert culprit in str(exc.value) and reason in str(exc.value)


def test_real_peft_dora_adapter_is_refused(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    model.save_pretrained(tmp_path / "dora")
    with pytest.raises(InputError, match="use_dora=true: DoRA"):
        load_adapter(tmp_path / "dora")


def test_named_adapter_subfolder_is_pointed_at(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]), adapter_name="mine")
    model.save_pretrained(tmp_path / "multi")
    with pytest.raises(InputError, match="subfolder") as exc:
        load_adapter(tmp_path / "multi")
    assert str(tmp_path / "multi" / "mine") in str(exc.value)
    assert set(load_adapter(tmp_path / "multi" / "mine").modules) == {"model.layers.0.self_attn.q_proj",
                                                                      "model.layers.1.self_attn.q_proj"}


# ------------------------------------------------------------------------------------------------ save validation
def test_save_validates_and_collects_every_problem_naming_the_module(tmp_path):
    good = (torch.ones(8, 64), torch.ones(64, 8))
    factors = {"model.layers.0.self_attn.q_proj": good,
               "model.layers.1.self_attn.q_proj": (torch.ones(4, 64), torch.ones(64, 8)),  # A has rank 4
               "model.layers.0.self_attn.v_proj": (torch.ones(8, 64), torch.full((32, 8), math.inf)),
               "model.layers.0.mlp.gate_proj": good}  # not in target_modules
    with pytest.raises(InputError) as exc:
        save_adapter(tmp_path / "bad", factors, rank=8, alpha=16, target_modules=["q_proj", "v_proj"])
    msg = str(exc.value)
    assert "model.layers.1.self_attn.q_proj: A (4, 64) and B (64, 8) do not fit rank 8" in msg
    assert "model.layers.0.self_attn.v_proj: A or B holds NaN/Inf" in msg
    assert "model.layers.0.mlp.gate_proj: not selected by target_modules" in msg
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))


def test_save_keeps_dtype_refuses_existing_and_replaces_only_when_asked(tmp_path):
    out = tmp_path / "ad"
    a, b = torch.randn(2, 64, dtype=torch.bfloat16), torch.randn(64, 2, dtype=torch.bfloat16)
    save_adapter(out, {"model.layers.0.self_attn.q_proj": (a, b)}, rank=2, alpha=4, target_modules=["q_proj"])
    with pytest.raises(OutputError, match="already exists"):
        save_adapter(out, {"model.layers.0.self_attn.q_proj": (a, b)}, rank=2, alpha=4, target_modules=["q_proj"])
    ad = load_adapter(out)
    f = ad.modules["model.layers.0.self_attn.q_proj"]
    assert f.a.dtype == torch.bfloat16 and torch.equal(f.a, a) and f.scale == 2.0
    with pytest.raises(InputError):  # a failed overwrite leaves the old adapter in place
        save_adapter(out, {"model.layers.0.self_attn.q_proj": (a, a)}, rank=2, alpha=4, target_modules=["q_proj"],
                     overwrite=True)
    assert torch.equal(load_adapter(out).modules["model.layers.0.self_attn.q_proj"].b, b)
    save_adapter(out, {"model.layers.0.self_attn.q_proj": (a.float(), b.float())}, rank=2, alpha=8,
                 target_modules=["q_proj"], overwrite=True)
    assert load_adapter(out).modules["model.layers.0.self_attn.q_proj"].scale == 4.0

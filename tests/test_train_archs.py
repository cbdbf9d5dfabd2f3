"""qtool train beyond Llama: Qwen3 (q/k norms, explicit head_dim), sliding-window attention (Mistral, and any config
with a window), Phi-3 (fused qkv_proj and gate_up_proj, partial rotary), and the clear refusal of MoE models.
The oracle is transformers' own bitsandbytes-4bit model of the same converted folder, in train mode (bitsandbytes
dequantises and calls F.linear), compared in the same dtype. GPU checks at the end (skipped on the CPU)."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from qtool.adapters.spec import AdapterSpec
from qtool.errors import InputError
from qtool.train.load import load_decoder

FP32 = dict(compute_dtype=torch.float32)
# Each architecture's tiny model (tests/conftest.py TINY: hidden 64, 4 heads, 2 kv heads, vocab 256) with the
# features that make it differ from Llama switched on.
CONFIGS = {
    "qwen3": dict(head_dim=32),  # q_dim 128 != hidden 64: head_dim is not hidden / heads
    # half of each head rotated (Phi-4-mini's kind of config), and an 8-token window (Phi-3-mini-4k has 2047)
    "phi3": dict(sliding_window=8, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                    "partial_rotary_factor": 0.5}),
}


def _build(folder: Path, arch: str, seed: int = 0, **overrides) -> Path:
    """A tiny random ``arch`` model saved by transformers and converted with bitsandbytes' CPU bytes. Norm weights
    (q_norm/k_norm included) are drawn around 1 so that a norm applied to the wrong tensor shows in the logits."""
    import transformers as tf
    from transformers import AutoModelForCausalLM

    from qtool.convert.pipeline import convert
    from tests.conftest import TINY

    cls = {"qwen3": tf.Qwen3Config, "mistral": tf.MistralConfig, "phi3": tf.Phi3Config, "llama": tf.LlamaConfig}[arch]
    cfg = cls(**{**TINY, "num_key_value_heads": 2, **CONFIGS.get(arch, {}), **overrides},
              bos_token_id=1, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.3)
    model.save_pretrained(folder / "src")
    convert(folder / "src", folder / "nf4", target="cpu")
    return folder / "nf4"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """``converted(arch, **config)`` -> the NF4 folder, built once per module for each distinct request."""
    cache = {}

    def get(arch: str, **overrides) -> Path:
        key = (arch, json.dumps(overrides, sort_keys=True))
        if key not in cache:
            cache[key] = _build(tmp_path_factory.mktemp(arch), arch, **overrides)
        return cache[key]

    return get


def _oracle(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").train()


def _ids(seq: int, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------------------ Qwen3
def test_qwen3_logits_and_loss_equal_transformers(converted):
    folder = converted("qwen3")
    ours, hf = load_decoder(folder), _oracle(folder)
    assert ours.shape.q_dim == 128 != ours.shape.hidden
    assert ours.layers[0].q_norm.shape == ours.layers[0].k_norm.shape == (32,)
    ids = _ids(16)
    with torch.no_grad():
        assert torch.equal(ours(ids), hf(ids).logits)
        assert ours.loss(ids).item() == pytest.approx(hf(ids, labels=ids).loss.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------ sliding window
def test_qwen3_window_applies_from_max_window_layers(converted):
    """Qwen3 with ``use_sliding_window``: layer 0 (below ``max_window_layers``) attends over everything, layer 1
    within the window — bit-equal to transformers, and different from windowing both layers."""
    from dataclasses import replace

    folder = converted("qwen3", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    ours, hf = load_decoder(folder), _oracle(folder)
    assert (ours.shape.sliding_window, ours.shape.full_attention_layers) == (8, (0,))
    ids = _ids(24)
    with torch.no_grad():
        want = hf(ids).logits
        assert torch.equal(ours(ids), want)
        ours.shape = replace(ours.shape, full_attention_layers=())
        assert not torch.equal(ours(ids), want)


def test_window_gradients_survive_checkpointing(converted):
    folder = converted("mistral", sliding_window=8)
    grads = []
    for gc in (False, True):
        model = load_decoder(folder, AdapterSpec("all-linear", rank=4), **FP32)
        for m in model.lora_modules().values():
            torch.nn.init.normal_(m.lora_b, std=0.05, generator=torch.Generator().manual_seed(1))
        model.grad_checkpointing = gc
        model.loss(_ids(24)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0


# ------------------------------------------------------------------------------------------------------ Phi-3
def test_phi3_logits_equal_transformers_with_partial_rotary_and_window(converted):
    from dataclasses import replace

    from qtool.train.model import rope_inv_freq

    folder = converted("phi3")
    ours, hf = load_decoder(folder), _oracle(folder)
    assert set(ours.layers[0].proj) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert (ours.shape.rotary_dim, ours.shape.head_dim, ours.shape.sliding_window) == (8, 16, 8)
    ids = _ids(24)
    with torch.no_grad():
        want = hf(ids).logits
        assert torch.equal(ours(ids), want)
        assert ours.loss(ids).item() == pytest.approx(hf(ids, labels=ids).loss.item(), rel=1e-5)
        full = replace(ours.shape, rope=tuple((k, 1.0 if k == "partial_rotary_factor" else v)
                                              for k, v in ours.shape.rope))
        again = load_decoder(folder)
        again.shape, again.inv_freq = full, rope_inv_freq(full)
        assert not torch.equal(again(ids), want)  # rotating every feature is another model


def test_phi3_lora_round_trips_through_peft_and_merges(converted, tmp_path):
    """--targets qkvo,mlp on Phi-3 are PEFT's qkv_proj, o_proj, gate_up_proj, down_proj; the saved adapter loads in
    PEFT on transformers' model with our logits, and `qtool merge` folds it into the fused weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qtool.format.peft_adapter import save_trained
    from qtool.merge.pipeline import merge

    folder = converted("phi3")
    spec = AdapterSpec("qkvo,mlp", rank=4)
    model = load_decoder(folder, spec, **FP32)
    assert {p.rsplit(".", 1)[-1] for p in model.lora_modules()} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    with torch.no_grad():
        for m in model.lora_modules().values():
            m.lora_b.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    out = save_trained(tmp_path / "adapter", model.lora_modules(), spec, base_dir=folder)
    config = json.loads((out / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    ids = _ids(24)
    bf16 = load_decoder(folder, spec)  # the compute dtype of transformers' bnb model of this folder
    for name, m in bf16.lora_modules().items():
        m.lora_a.data.copy_(model.lora_modules()[name].lora_a)
        m.lora_b.data.copy_(model.lora_modules()[name].lora_b)
    peft = PeftModel.from_pretrained(_oracle(folder), out)
    rel = lambda x, y: ((x - y).norm() / y.norm()).item()  # noqa: E731
    with torch.no_grad():
        a, b = bf16(ids).float(), peft(ids).logits.float()
        for name, p in peft.named_parameters():  # PEFT's own bypass in bf16: the rounding floor
            if "lora_" in name:
                p.data = p.data.bfloat16()
        c = peft(ids).logits.float()
        ours = model(ids)
    # our bypass runs in bf16, PEFT's in fp32: we differ from PEFT no more than PEFT in bf16 differs from itself
    assert rel(a, b) <= 2 * rel(c, b) and rel(a, b) < 0.05, (rel(a, b), rel(c, b))
    merged = merge(folder, out, tmp_path / "merged", dtype="fp32")
    dense = AutoModelForCausalLM.from_pretrained(merged.out, device_map="cpu", dtype=torch.float32)
    with torch.no_grad():
        assert rel(ours, dense(ids).logits) < 1e-4  # W0 (the NF4 dequantised) + s·B·A, no bypass

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

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


# ------------------------------------------------------------------------------------------ every architecture
@pytest.mark.parametrize("arch,overrides", [("qwen3", {}), ("phi3", {}), ("mistral", {"sliding_window": 8})],
                         ids=["qwen3", "phi3", "mistral-window"])
def test_training_lowers_the_loss_of_a_fixed_batch(converted, arch, overrides):
    """A few AdamW steps at a high learning rate on one fixed batch (all-linear LoRA, fp32): the loss falls."""
    model = load_decoder(converted(arch, **overrides), AdapterSpec("all-linear", rank=8), **FP32)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, losses = _ids(24), []
    for _ in range(8):
        loss = model.loss(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert torch.isfinite(torch.tensor(losses)).all() and losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("name", ["qwen3-8b", "phi-3-mini", "mistral-7b"])
def test_random_decoder_builds_each_architecture(name):
    """The GPU bench builds real-size random models with random_decoder; here the same shapes, two layers."""
    from dataclasses import replace

    from qtool.arch import known_shape
    from qtool.train.load import random_decoder

    shape = replace(known_shape(name), n_layers=2, vocab=512)
    model = random_decoder(shape, "cpu", spec=AdapterSpec("all-linear", rank=4), compute_dtype=torch.float32)
    assert {lin.name for lin in shape.linears()} == set(model.layers[0].proj)
    assert (model.layers[0].q_norm is not None) == (shape.model_type == "qwen3")
    with torch.no_grad():
        logits = model(torch.randint(0, 512, (1, 8)))
    assert logits.shape == (1, 8, 512) and torch.isfinite(logits).all()


@pytest.mark.parametrize("config", [
    {"model_type": "mixtral", "num_local_experts": 8}, {"model_type": "qwen2_moe", "num_experts": 60},
    {"model_type": "qwen3_moe", "num_experts": 128}, {"model_type": "llama", "num_local_experts": 4},
    {"model_type": "gpt_neox"}, {"model_type": "gpt2"}])
def test_unsupported_models_are_refused_naming_the_type_and_what_works(config):
    from qtool.train.settings import SUPPORTED, decoder_shape

    base = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 256}
    with pytest.raises(InputError) as err:
        decoder_shape({**base, **config}, "m/config.json")
    text = str(err.value)
    assert f"model_type {config['model_type']!r}" in text and "m/config.json" in text
    assert ", ".join(SUPPORTED) in text and "transformers + PEFT/TRL" in text
    assert ("mixture-of-experts" in text) == any(k.startswith("num_") and "expert" in k for k in config)


def test_longrope_is_refused_clearly():
    from qtool.train.settings import decoder_shape

    config = {"model_type": "phi3", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "vocab_size": 256, "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8,
                                                  "long_factor": [2.0] * 8}}
    with pytest.raises(InputError, match=r"(?s)'longrope' \(Phi-3 128k.*4k Phi-3 models use 'default'"):
        decoder_shape(config)


def test_plan_counts_what_the_new_architectures_keep():
    """qwen3-8b: q/k-norm inputs (and rstd) per head, in both the CPU and the fused GPU plan. mistral-7b beyond its
    window: the (s, s) bool mask, a 16-bit copy of it per layer call and k/v repeated — none of it at the window."""
    from dataclasses import replace

    from qtool.arch import known_shape
    from qtool.plan import transient as acts
    from qtool.plan.planner import Settings, plan

    qwen = known_shape("qwen3-8b")
    plain = replace(qwen, model_type="qwen2")  # the same numbers without q/k norms (qwen2: biases, not kept)
    for device in ("cuda", "cpu"):
        st = Settings(seq_len=2048, device=device).check(qwen)
        extra = acts.layer_saved_bytes(qwen, st) - acts.layer_saved_bytes(plain, st)
        width = 2 if device == "cuda" else 4  # the fused norm keeps bf16 input, the torch one its fp32 upcast
        assert extra == 2048 * (width * (qwen.q_dim + qwen.kv_dim) + 4 * (qwen.n_heads + qwen.n_kv_heads)), device
    mistral = known_shape("mistral-7b")
    at, beyond = (Settings(seq_len=s).check(mistral) for s in (4096, 8192))
    assert acts.window_mask_bytes(mistral, at) == 0 and acts.window_mask_bytes(mistral, beyond) == 8192 ** 2
    assert acts.attention_kernel(mistral, at) == "flash" and acts.attention_kernel(mistral, beyond) == "efficient"
    p = plan(mistral, beyond)
    assert any(r.name == "attention mask" and r.bytes == 8192 ** 2 for r in p.rows)
    assert any("builds one (seq x seq) boolean mask" in n for n in p.notes)
    # per layer: k and v repeated to the 32 query heads, and the bf16 copy of the mask
    unmasked = replace(mistral, sliding_window=None)
    extra = acts.layer_saved_bytes(mistral, beyond) - acts.layer_saved_bytes(unmasked, beyond)
    assert extra == 8192 * 2 * 2 * (mistral.q_dim - mistral.kv_dim) + 2 * 8192 * 8192
    phi = known_shape("phi-3-mini")  # its config.json: sliding_window 2047, so 4096 tokens need the mask
    assert acts.window_mask_bytes(phi, Settings(seq_len=4096).check(phi)) == 4096 ** 2
    assert acts.window_mask_bytes(phi, Settings(seq_len=2047).check(phi)) == 0


# ------------------------------------------------------------------------------------------------------- GPU
GPU_CONFIGS = {  # head dims and rotary dims powers of two: the Triton RoPE path
    "qwen3": {"model_type": "qwen3", "head_dim": 128},
    "phi3": {"model_type": "phi3", "sliding_window": 48, "partial_rotary_factor": 0.5},
    "mistral-window": {"model_type": "mistral", "sliding_window": 48},
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI is CPU-only)")
@pytest.mark.parametrize("arch", list(GPU_CONFIGS))
def test_new_architectures_train_on_cuda_with_the_graph(arch):
    """Fused kernels (q/k norms, partial RoPE), the efficient-kernel window at seq 64 > 48, the CUDA-graph step:
    finite, falling loss on a learnable sequence, and graph replay equal to eager steps."""
    from qtool.train.data import Blocks
    from qtool.train.load import random_decoder
    from qtool.train.recipe import TrainSettings, train
    from qtool.train.settings import decoder_shape

    shape = decoder_shape({"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 3,
                           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
                           **GPU_CONFIGS[arch]})
    pattern = torch.arange(64).repeat(40, 1) % 13
    blocks = Blocks(pattern[:36], pattern[36:], 0)
    runs = {}
    for graphs in (False, True):
        model = random_decoder(shape, "cuda", spec=AdapterSpec("all-linear", rank=8))
        runs[graphs] = train(model, blocks, TrainSettings(steps=8, seq_len=64, batch_size=2, grad_accum=2, lr=3e-3,
                                                          measure_after=2, cuda_graphs=graphs),
                             device=torch.device("cuda"))
    assert runs[True].cuda_graph == "on" and runs[False].cuda_graph == "off"
    losses = torch.tensor(runs[True].losses)
    assert torch.isfinite(losses).all() and losses[-1] < 0.7 * losses[0], losses
    assert torch.allclose(losses, torch.tensor(runs[False].losses), rtol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI is CPU-only)")
@pytest.mark.parametrize("model_type,tied", [("llama", False), ("llama", True), ("gemma2", True)])
def test_embedding_and_head_lora_train_on_cuda_with_the_graph(model_type, tied):
    """LoRA on embed_tokens and lm_head (the head's update inside the chunked loss; Gemma 2's soft-capped logits) in
    the CUDA-graph step: finite, falling loss, and graph replay equal to eager steps."""
    from qtool.train.data import Blocks
    from qtool.train.load import random_decoder
    from qtool.train.recipe import TrainSettings, train
    from qtool.train.settings import decoder_shape

    shape = decoder_shape({"model_type": model_type, "hidden_size": 256, "intermediate_size": 704,
                           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                           "head_dim": 64, "vocab_size": 512, "tie_word_embeddings": tied})
    pattern = torch.arange(64).repeat(40, 1) % 13
    blocks = Blocks(pattern[:36], pattern[36:], 0)
    runs = {}
    for graphs in (False, True):
        torch.manual_seed(0)
        spec = AdapterSpec("q_proj,v_proj,embed_tokens,lm_head", rank=8)
        model = random_decoder(shape, "cuda", spec=spec)
        runs[graphs] = train(model, blocks, TrainSettings(steps=8, seq_len=64, batch_size=2, lr=1e-3, measure_after=2,
                                                          targets=spec.targets, rank=8, cuda_graphs=graphs),
                             device=torch.device("cuda"))
    assert runs[True].cuda_graph == "on" and runs[False].cuda_graph == "off"
    losses = torch.tensor(runs[True].losses)
    assert torch.isfinite(losses).all() and losses[-1] < losses[0], losses
    assert torch.allclose(losses, torch.tensor(runs[False].losses), rtol=2e-3)


"""Gemma 2 and Gemma 3 (text) in the trainer (qtool.train.gemma), against transformers' bitsandbytes-4bit model on
the same converted folder: logits and loss, the soft-capped loss against autograd, training, the PEFT round trip,
merge, real-size random models and bad input. Tiny models: 2 layers (one sliding, one global), window 8, sequences
of 24 tokens, so every window path runs."""
import json
import shutil
from dataclasses import replace

import pytest
import torch

from qtool.adapters.spec import AdapterSpec
from qtool.errors import InputError, UsageError
from qtool.train.load import load_decoder
from tests.conftest import tiny_config

FP32 = dict(compute_dtype=torch.float32)
WINDOW = 8
# Gemma 3: a global layer with linear RoPE scaling (as 4B and larger) and its own base, beside a sliding layer
GEMMA3 = dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
ARCHS = {"gemma2": dict(sliding_window=WINDOW), "gemma3": GEMMA3}


def _save(folder, arch):
    """A tiny random bf16 ``arch`` model, its norm weights random too (transformers initialises Gemma's to 0)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch)
    for key, value in ARCHS[arch].items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=list(ARCHS))
def nf4(request, tmp_path_factory):
    """(arch, converted folder)."""
    from qtool.convert.pipeline import convert

    root = tmp_path_factory.mktemp(request.param)
    out = root / "nf4"
    convert(_save(root / "src", request.param), out, target="cpu")
    return request.param, out


@pytest.fixture(scope="module")
def hf(nf4):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(nf4[1], device_map="cpu").train()  # the dequantise + F.linear path


def _ids(t=24, seed=0):
    return torch.randint(0, 256, (2, t), generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_shape_reads_the_gemma_fields(nf4):
    arch, folder = nf4
    shape = load_decoder(folder).shape
    assert shape.layer_types == ("sliding_attention", "full_attention") and shape.local_window == WINDOW
    assert [shape.window(i) for i in range(2)] == [WINDOW, None] and shape.sliding_window is None
    assert shape.query_pre_attn_scalar == 256 and shape.hidden_activation == "gelu_pytorch_tanh"
    if arch == "gemma2":
        assert (shape.attn_logit_softcapping, shape.final_logit_softcapping) == (50.0, 30.0) and not shape.rope_local
    else:
        assert shape.attn_logit_softcapping is None and shape.final_logit_softcapping is None
        assert shape.rope_params == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
        assert dict(shape.rope_local) == {"rope_type": "default", "rope_theta": 1e4}


@pytest.mark.parametrize("t", [6, WINDOW, 24])
def test_logits_and_loss_equal_transformers_bnb_4bit(nf4, hf, t):
    """Bit-identical logits in bf16, shorter than, as long as and longer than the window (where transformers
    switches from is_causal to a mask on Gemma 3); the loss to fp32 summation order."""
    ours = load_decoder(nf4[1])
    ids = _ids(t)
    with torch.no_grad():
        a, b = ours(ids), hf(ids).logits
        assert a.dtype == b.dtype == torch.bfloat16
        assert torch.equal(a, b)
        assert ours.loss(ids).item() == pytest.approx(hf(ids, labels=ids).loss.item(), rel=1e-5)


def test_window_and_local_rope_are_used(nf4, hf):
    """Without its window (or, on Gemma 3, with the global RoPE on the sliding layer) the model differs beyond the
    window and not within it: the equality above exercises both."""
    ours = load_decoder(nf4[1])
    with torch.no_grad():
        ref = ours(_ids())
        ours.layers[0].window = None
        full = ours(_ids())
    assert torch.equal(full[:, :WINDOW], ref[:, :WINDOW]) and not torch.equal(full, ref)
    if nf4[0] == "gemma3":
        ours = load_decoder(nf4[1])
        ours.layers[0].local_rope = False
        with torch.no_grad():
            assert not torch.equal(ours(_ids()), ref)


@pytest.mark.parametrize("cap", [None, 3.0])
def test_softcapped_chunked_loss_equals_autograd(cap):
    """Value and input gradient of the chunked loss (3 chunks) against autograd of the plain formula, fp32."""
    from qtool.train.loss import chunked_cross_entropy

    gen = torch.Generator().manual_seed(0)
    h = torch.randn(40, 16, generator=gen, dtype=torch.float64).float().requires_grad_()
    w = torch.randn(50, 16, generator=gen) * 0.8
    targets = torch.randint(0, 50, (40,), generator=gen)
    ours = chunked_cross_entropy(h, w, targets, 16, softcap=cap)
    (g_ours,) = torch.autograd.grad(ours * 1.7, h)
    z = h @ w.t()
    ref = torch.nn.functional.cross_entropy(z if cap is None else cap * torch.tanh(z / cap), targets)
    (g_ref,) = torch.autograd.grad(ref * 1.7, h)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-7)
    if cap:  # the cap changes both (the logits reach ±cap·tanh(...))
        assert not torch.allclose(ours, torch.nn.functional.cross_entropy(z, targets))


def test_gradient_checkpointing_does_not_change_gradients(nf4):
    grads = []
    for gc in (False, True):
        model = load_decoder(nf4[1], AdapterSpec("all-linear", rank=4), seed=3, **FP32)
        for m in model.lora_modules().values():
            torch.nn.init.normal_(m.lora_b, std=0.05, generator=torch.Generator().manual_seed(1))
        model.grad_checkpointing = gc
        model.loss(_ids()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_training_a_fixed_batch_lowers_the_loss(nf4, method):
    from qtool.train.data import Blocks
    from qtool.train.recipe import TrainSettings, train

    st = TrainSettings(steps=6, seq_len=24, batch_size=2, rank=8, lr=1e-2, targets="all-linear", method=method,
                       adapter_size=16)
    model = load_decoder(nf4[1], st.spec, **FP32)
    ids = _ids()
    res = train(model, Blocks(ids, ids, ids.numel()), st, device=torch.device("cpu"))
    assert all(torch.isfinite(torch.tensor(res.losses)))
    assert res.losses[-1] < res.losses[0] - 0.1 and res.eval_loss < res.eval_loss_before - 0.1, res.losses


@pytest.mark.parametrize("targets", ["qkvo", "mlp", "all-linear"])
def test_adapter_round_trips_through_peft_and_merges(nf4, hf, tmp_path, targets):
    """A trained-looking LoRA saved in PEFT's format: PeftModel on transformers' bnb model gives our logits (to the
    bf16 rounding of the bypass), and `qtool merge` writes a 16-bit model that transformers loads with the same
    logits (merge verifies it against base + bypass itself)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qtool.format.peft_adapter import save_trained
    from qtool.merge.pipeline import merge

    spec = AdapterSpec(targets, rank=4)
    ours = load_decoder(nf4[1], spec)
    with torch.no_grad():
        for m in ours.lora_modules().values():
            m.lora_b.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    out = save_trained(tmp_path / "adapter", ours.lora_modules(), spec, base_dir=nf4[1])
    saved = json.loads((out / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == sorted(spec.module_ranks(ours.shape))
    ids = _ids()
    peft = PeftModel.from_pretrained(hf, out)
    try:
        with torch.no_grad():
            a, b = ours(ids), peft(ids).logits
    finally:
        peft.unload()
    with torch.no_grad():
        plain = hf(ids).logits
    assert _rel(a, b) < 0.02 and _rel(b, plain) > 5 * _rel(a, b), (_rel(a, b), _rel(b, plain))
    res = merge(nf4[1], out, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(res.out, dtype=torch.float32)
    fp32 = load_decoder(nf4[1], spec, **FP32)
    for name, m in fp32.lora_modules().items():
        m.lora_b.data.copy_(ours.lora_modules()[name].lora_b)
        m.lora_a.data.copy_(ours.lora_modules()[name].lora_a)
    with torch.no_grad():
        assert _rel(merged(ids).logits, fp32(ids)) < 0.02


def test_random_decoder_builds_real_size_gemma():
    """The GPU bench's random models at real widths (2 layers, a small vocabulary): resident bytes as planned, a
    finite loss, and a backward that reaches the adapter."""
    from qtool.arch import known_shape
    from qtool.plan.planner import plan
    from qtool.plan.settings import Settings
    from qtool.train.load import random_decoder
    from tests.test_plan import _allocated

    for name in ("gemma-2-2b", "gemma-3-1b"):
        shape = replace(known_shape(name), n_layers=2, vocab=512)
        model = random_decoder(shape, "cpu", spec=AdapterSpec("q_proj,down_proj", rank=8))
        assert [layer.window for layer in model.layers] == [shape.local_window, None if name == "gemma-2-2b"
                                                            else shape.local_window]
        p = plan(shape, Settings(rank=8, targets="q_proj,down_proj", device="cpu"))  # no CUDA block rounding
        assert p.after_load_allocated_bytes == _allocated(list(model.parameters()) + list(model.buffers())), name
        loss = model.loss(torch.randint(0, 512, (1, 16)))
        loss.backward()
        assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


# ------------------------------------------------------------------------------------------------------ bad input
def test_prefix_and_multimodal_gemma3_are_refused(nf4, tmp_path):
    from qtool.train.settings import TrainSettings, check_inputs

    data = tmp_path / "d.txt"
    data.write_text("some text\n")
    with pytest.raises(UsageError, match="--method prefix is not supported"):
        check_inputs(nf4[1], data, None, TrainSettings(steps=1, seq_len=16, method="prefix"))
    folder = tmp_path / "mm"
    shutil.copytree(nf4[1], folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": cfg}))
    with pytest.raises(InputError, match="Gemma 3 text-only"):
        check_inputs(folder, data, None, TrainSettings(steps=1, seq_len=16))


# --------------------------------------------------------------------------------------------------------- planner
@pytest.fixture
def one_thread():
    """One intra-op thread, as tests/test_plan.py's allocation traces use."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("model_type,gc,targets,seq_len,batch_size,kv_heads,window", [
    ("gemma2", False, "qkvo", 384, 1, 4, 128), ("gemma2", True, "all-linear", 300, 2, 2, 128),
    ("gemma3_text", False, "qkvo", 384, 1, 4, 128), ("gemma3_text", True, "all-linear", 300, 2, 2, 128),
    ("gemma3_text", False, "all-linear", 128, 1, 2, 2048),
    ("gemma2", True, "all-linear", 1024, 1, 4, 4096)])  # the scores dominate: softmax's backward is the peak
def test_plan_matches_allocation_trace(one_thread, model_type, gc, targets, seq_len, batch_size, kv_heads, window):
    """qtool's Gemma trainer on the CPU against `qtool plan --device cpu`, as tests/test_plan.py does for Llama: the
    soft-capped explicit attention's (b, heads, s, s) scores, the sliding layers' masks (window shorter than the
    sequence) and the global ones' is_causal SDPA, four norms and q/k norms, the soft-capped loss, with and without
    checkpointing. Within 2%."""
    from qtool.arch import shape_from_config
    from qtool.plan.settings import Settings
    from qtool.train.load import random_decoder
    from qtool.train.settings import decoder_shape
    from tests.test_plan import _planned_transient, _traced_sgd_step

    config = {"model_type": model_type, "hidden_size": 256, "intermediate_size": 704, "head_dim": 32,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": kv_heads, "vocab_size": 2000,
              "sliding_window": window, "layer_types": ["sliding_attention", "full_attention"]}
    shape = shape_from_config(config)
    model = random_decoder(decoder_shape(config), "cpu", spec=AdapterSpec(targets, rank=16))
    ids = torch.randint(0, 2000, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    traced = _traced_sgd_step(model, ids, gc)
    planned, phase = _planned_transient(shape, Settings(rank=16, targets=targets, seq_len=seq_len, optimizer="sgd",
                                                        batch_size=batch_size, grad_checkpointing=gc, device="cpu"))
    assert abs(planned - traced) / traced < 0.02, (planned, traced, phase)


def test_plan_of_the_real_models_names_the_gemma_costs():
    from qtool.arch import known_shape
    from qtool.plan import transient as acts
    from qtool.plan.planner import plan
    from qtool.plan.settings import Settings

    g2, g3 = known_shape("gemma-2-2b"), known_shape("gemma-3-1b")
    st = Settings(seq_len=2048)
    assert acts.attention_kernel(g2, st.check(g2)) == "eager"
    assert any("soft-caps its attention" in n for n in plan(g2, st).notes)
    assert any("sliding layers pass SDPA" in n for n in plan(g3, st).notes)
    assert not any("sliding layers" in n for n in plan(g3, replace(st, seq_len=256)).notes)  # window 512
    # the soft-capped scores grow with seq^2: 4x the sequence, well over 4x the recomputed layer
    small, large = (acts.recompute_bytes(g2, replace(st, seq_len=s).check(g2)) for s in (1024, 4096))
    assert large > 6 * small

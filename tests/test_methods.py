"""LoRA vs Houlsby adapters vs prefix tuning (issue 10): the modules against independent oracles (PEFT's
PREFIX_TUNING on the transformers model of the same folder, hooks on the base model, a FLOP counter, allocation
traces), the two formats round-tripping, merge refusing with the reason, and bad flags caught before torch loads."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from qtool.adapters.attach import houlsby_modules, load_adapter_into
from qtool.adapters.prefix import kv_of_tokens
from qtool.adapters.spec import AdapterSpec
from qtool.arch import known_shape, shape_from_config
from qtool.cli import main
from qtool.errors import InputError, UsageError
from qtool.plan import methods
from qtool.plan.planner import Settings, plan
from qtool.train.load import load_decoder, random_decoder
from qtool.train.recipe import save_own_modules
from qtool.train.settings import TrainSettings, decoder_shape

from conftest import TINY, save_tiny
from test_plan import PERSISTENT_ROWS, _traced_sgd_step, one_thread  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parent.parent
CONFIG = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300}
SHAPE = decoder_shape(CONFIG)
ADAPTER = AdapterSpec(method="adapter", adapter_size=16)
PREFIX = AdapterSpec(method="prefix", prefix_len=6)
PREFIX_MLP = AdapterSpec(method="prefix", prefix_len=6, prefix_projection=24)
FP32 = dict(compute_dtype=torch.float32)


def _ids(n=16, batch=2, vocab=300, seed=0):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def _randomise(model, std=0.05, seed=1):
    """Non-zero values in every trainable tensor (a trained adapter, not step 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


@pytest.fixture(scope="module")
def tiny_nf4(tmp_path_factory) -> Path:
    """A tiny GQA Llama (hidden 64, 2 layers, 2 of 4 heads for k/v, vocab 256) converted for the CPU."""
    from qtool.convert.pipeline import convert

    root = tmp_path_factory.mktemp("methods")
    out = root / "nf4"
    convert(save_tiny(root / "src", "llama"), out, target="cpu")
    return out


@pytest.fixture
def tiny_hf(tiny_nf4):
    from transformers import AutoModelForCausalLM

    warnings.filterwarnings("ignore")
    return AutoModelForCausalLM.from_pretrained(tiny_nf4, device_map="cpu").train()  # bitsandbytes' F.linear path


# --------------------------------------------------------------------------------------------------- the modules
@pytest.mark.parametrize("spec", [ADAPTER, PREFIX, PREFIX_MLP], ids=["adapter", "prefix", "prefix-mlp"])
def test_trainable_count_is_the_modules_the_planner_and_peft(spec):
    model = random_decoder(SHAPE, "cpu", spec=spec)
    counted = sum(p.numel() for p in model.parameters())
    assert spec.n_trainable(SHAPE) == counted == plan(SHAPE, Settings(
        method=spec.method, adapter_size=spec.adapter_size, prefix_len=spec.prefix_len,
        prefix_projection=spec.prefix_projection)).n_trainable
    assert spec.method != "adapter" or counted == 2 * 2 * (2 * 128 * 16 + 128 + 16)  # Houlsby §2.1, per adapter
    if spec.method == "prefix":
        from peft import PrefixTuningConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM

        hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in CONFIG.items() if k != "model_type"}))
        cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=spec.prefix_len,
                                 prefix_projection=bool(spec.prefix_projection),
                                 encoder_hidden_size=spec.prefix_projection or None)
        assert get_peft_model(hf, cfg).get_nb_trainable_parameters()[0] == counted


def test_adapter_starts_at_the_base_and_only_the_up_projection_learns_first():
    ids = _ids()
    base = random_decoder(SHAPE, "cpu", **FP32)
    model = random_decoder(SHAPE, "cpu", spec=ADAPTER, **FP32)
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))
    model.loss(ids).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert len(grads) == 2 * 2 * 4
    assert all(torch.count_nonzero(g) == 0 for n, g in grads.items() if n.endswith(("down", "down_bias")))
    assert all(torch.count_nonzero(g) > 0 for n, g in grads.items() if n.endswith(("up", "up_bias")))


def test_adapters_sit_on_the_attention_and_mlp_outputs():
    """A trained adapter equals the base model with ``y + W_up gelu(W_down y + b) + c`` hooked onto the outputs of
    o_proj and down_proj."""
    ids = _ids()
    model = _randomise(random_decoder(SHAPE, "cpu", spec=ADAPTER, **FP32))
    base = random_decoder(SHAPE, "cpu", **FP32)
    for layer, ours in zip(base.layers, model.layers):
        for name, a in (("o_proj", ours.attn_adapter), ("down_proj", ours.mlp_adapter)):
            layer.proj[name].register_forward_hook(lambda mod, args, y, a=a: y + F.linear(
                F.gelu(F.linear(y, a.down, a.down_bias)), a.up, a.up_bias))
    with torch.no_grad():
        got, want, plain = model(ids), base(ids), random_decoder(SHAPE, "cpu", **FP32)(ids)
    assert torch.allclose(got, want, rtol=0, atol=1e-5) and not torch.allclose(got, plain, atol=1e-2)


def test_prefix_from_tokens_is_the_base_model_reading_them():
    """Started from the base's own keys/values of l tokens, the model is the base model with those tokens before the
    sequence (positions included: the sequence sits at l .. l+t-1)."""
    ids, tokens = _ids(), _ids(6, 1, seed=3)[0]
    base = random_decoder(SHAPE, "cpu", **FP32)
    model = random_decoder(SHAPE, "cpu", spec=PREFIX, **FP32)
    model.prefix.load_flat(kv_of_tokens(model, tokens))
    with torch.no_grad():
        want = base(torch.cat([tokens.expand(2, -1), ids], 1))[:, 6:]
        got = model(ids)
    assert (got - want).abs().max() < 1e-4


@pytest.mark.parametrize("spec", [ADAPTER, PREFIX_MLP], ids=["adapter", "prefix-mlp"])
def test_gradient_checkpointing_does_not_change_gradients(spec):
    ids, grads = _ids(), []
    for gc in (False, True):
        model = _randomise(random_decoder(SHAPE, "cpu", spec=spec, **FP32))
        model.grad_checkpointing = gc
        model.loss(ids).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0


def test_inference_flops_equal_a_flop_counter():
    """The planner's extra FLOPs per token against torch's FLOP counter on the real modules (attention through the
    math kernel, whose matmuls the counter sees; it counts full score matrices, so the difference is the prefix's)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    ids = _ids(32, 1)

    def flops(spec):
        model = random_decoder(SHAPE, "cpu", spec=spec, **FP32)
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            model.hidden_states(ids)
        return counter.get_total_flops()

    base = flops(None)
    for spec in (AdapterSpec("qkvo", rank=8), AdapterSpec("q_proj,down_proj=4", rank=8), ADAPTER, PREFIX):
        assert (flops(spec) - base) / 32 == methods.inference_cost(SHAPE, spec).extra_flops_per_token, spec


# ------------------------------------------------------------------------------------ PEFT's prefix, qtool's adapter
@pytest.mark.parametrize("spec", [PREFIX, PREFIX_MLP], ids=["prefix", "prefix-mlp"])
def test_prefix_logits_equal_peft_prefix_tuning(tiny_nf4, tiny_hf, tmp_path, spec):
    """Saved in PEFT's format, loaded by PeftModel.from_pretrained onto transformers' bitsandbytes model of the same
    folder: the logits are ours, bit for bit (GQA, bf16; PEFT's positions and mask)."""
    from peft import PeftModel

    ids = _ids(12, 2, vocab=256)
    ours = _randomise(load_decoder(tiny_nf4, spec), std=0.5)
    out = save_own_modules(tmp_path / "prefix", ours, spec, base_dir=tiny_nf4)
    assert json.loads((out / "adapter_config.json").read_text())["prefix_projection"] == bool(spec.prefix_projection)
    with torch.no_grad():
        plain = tiny_hf(ids).logits
        peft = PeftModel.from_pretrained(tiny_hf, out)  # prompt learning leaves the transformers model as it is
        a, b = ours(ids), peft(ids).logits
    assert a.dtype == b.dtype == torch.bfloat16
    assert torch.equal(a, b)
    assert not torch.equal(a, plain)  # the prefix does something


def test_peft_config_keys_are_peft_prefix_tuning_keys():
    from peft import PrefixTuningConfig

    from qtool.format.prefix_adapter import PREFIX_CONFIG_DEFAULTS

    theirs = set(PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4).to_dict()) - {"peft_version"}
    assert set(PREFIX_CONFIG_DEFAULTS) == theirs


@pytest.mark.parametrize("spec", [AdapterSpec("q_proj,v_proj=4,down_proj", rank=8), ADAPTER, PREFIX, PREFIX_MLP],
                         ids=["lora", "adapter", "prefix", "prefix-mlp"])
def test_saved_adapters_load_back_for_inference(tiny_nf4, tmp_path, spec):
    from qtool.format import peft_adapter

    ids = _ids(12, 2, vocab=256)
    trained = _randomise(load_decoder(tiny_nf4, spec, **FP32), std=0.2)
    if spec.method == "lora":
        out = peft_adapter.save_trained(tmp_path / "a", trained.lora_modules(), spec, base_dir=tiny_nf4)
    else:
        out = save_own_modules(tmp_path / "a", trained, spec, base_dir=tiny_nf4)
    fresh = load_decoder(tiny_nf4, **FP32)
    with torch.no_grad():
        before = fresh(ids)
    got = load_adapter_into(fresh, out)
    assert got.method == spec.method
    with torch.no_grad():
        a, b = fresh(ids), trained(ids)
    assert torch.allclose(a, b, rtol=0, atol=1e-5) and not torch.allclose(a, before, atol=1e-3)


def test_houlsby_folder_problems_name_the_culprit(tiny_nf4, tmp_path):
    from safetensors.torch import load_file, save_file

    from qtool.format.houlsby_adapter import WEIGHTS_NAME

    out = save_own_modules(tmp_path / "h", random_decoder(SHAPE, "cpu", spec=ADAPTER), ADAPTER, base_dir=tiny_nf4)
    model = load_decoder(tiny_nf4)
    with pytest.raises(InputError, match="down.weight: torch.float32 \\(16, 128\\), expected a float tensor of "
                                         "shape \\(16, 64\\)"):
        load_adapter_into(model, out)  # made for hidden 128, loaded onto hidden 64
    small = AdapterSpec(method="adapter", adapter_size=4)
    out = save_own_modules(tmp_path / "h2", load_decoder(tiny_nf4, small), small, base_dir=tiny_nf4)
    tensors = load_file(out / WEIGHTS_NAME)
    del tensors["model.layers.1.mlp_adapter.up.bias"]
    save_file(tensors, out / WEIGHTS_NAME)
    with pytest.raises(InputError, match="model.layers.1.mlp_adapter.up.bias: missing"):
        load_adapter_into(model, out)


def test_prefix_for_another_model_is_refused(tiny_nf4, tmp_path):
    out = save_own_modules(tmp_path / "p", random_decoder(SHAPE, "cpu", spec=PREFIX), PREFIX, base_dir=tiny_nf4)
    with pytest.raises(InputError, match="made for 2 layers of 2 key/value heads, 64 wide; the model has 2 layers "
                                         "of 2 heads, 32 wide"):
        load_adapter_into(load_decoder(tiny_nf4), out)


# ------------------------------------------------------------------------------------------------------ merge
def test_merge_refuses_adapters_and_prefixes_with_the_reason(tiny_nf4, tmp_path):
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    houlsby = save_own_modules(tmp_path / "h", load_decoder(tiny_nf4, ADAPTER), ADAPTER, base_dir=tiny_nf4)
    ours = save_own_modules(tmp_path / "p", load_decoder(tiny_nf4, PREFIX), PREFIX, base_dir=tiny_nf4)
    theirs = tmp_path / "peft-prefix"  # written by PEFT itself: no qtool record
    get_peft_model(AutoModelForCausalLM.from_config(tiny_config("llama")),
                   PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=9)).save_pretrained(theirs)
    for folder, sentence in ((houlsby, "the adapter's non-linearity sits between its two products, so no matrix "
                                       "added to W reproduces it"),
                             (ours, "the prefix adds keys/values to attention (6 extra positions in every softmax), "
                                    "which no change to W can express"),
                             (theirs, "(9 extra positions in every softmax)")):
        r = CliRunner().invoke(main, ["merge", str(tiny_nf4), str(folder), str(tmp_path / "merged")])
        assert r.exit_code != 0 and sentence in r.output, r.output
        assert not (tmp_path / "merged").exists()
    code = ("import sys\nfrom qtool.cli import main\ntry:\n    main()\nexcept SystemExit as e:\n"
            "    print('EXIT', e.code, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, "merge", str(tiny_nf4), str(houlsby), str(tmp_path / "m")],
                          capture_output=True, text=True, cwd=ROOT)
    assert "EXIT 2 False" in proc.stdout and "cannot be merged" in proc.stderr, (proc.stdout, proc.stderr)


# -------------------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text("to be or not to be " * 50)
    return path


@pytest.mark.parametrize("args, message", [
    (["--method", "prefix", "--prefix-len", "2040", "--seq-len", "8"],
     "--prefix-len 2040 with --seq-len 8: the prefix takes positions before the sequence, so it must be below the "
     "model's 2048 positions minus --seq-len = 2040; use --prefix-len 2039 or less"),
    (["--method", "adapter", "--adapter-size", "0"], "--adapter-size must be at least 1 (got 0)"),
    (["--method", "adapter", "--adapter-size", "65"], "--adapter-size 65 is larger than the hidden size 64"),
    (["--method", "adapter", "--targets", "qkvo"], "--targets given with --method adapter, which ignores it"),
    (["--method", "prefix", "--rank", "8", "--rslora"], "--rank, --rslora given with --method prefix, which ignores "
                                                        "them: the prefix goes into every attention layer"),
    (["--prefix-len", "5"], "--prefix-len given with --method lora, which ignores it; it sizes --method prefix"),
    (["--method", "lora", "--adapter-size", "8"], "--adapter-size given with --method lora, which ignores it"),
])
def test_bad_method_flags_are_reported(tiny_nf4, text, args, message):
    r = CliRunner().invoke(main, ["train", str(tiny_nf4), "--data", str(text), "--steps", "1", *args])
    assert r.exit_code == 2 and message in " ".join(r.output.split()), r.output


def test_ignored_settings_are_reported_by_the_library_too():
    st = TrainSettings(method="adapter", targets="mlp", dropout=0.1)
    assert st.problems() == ["--targets, --dropout given with --method adapter, which ignores them: Houlsby adapters go "
                             "after every attention and MLP block (their size: --adapter-size), with no rank, target or "
                             "LoRA init; drop them"]
    with pytest.raises(UsageError, match="--targets given with --method prefix"):
        plan(SHAPE, Settings(method="prefix", targets="mlp"))


def test_method_flag_errors_come_before_torch_is_imported(tiny_nf4, text):
    code = ("import sys\nfrom qtool.cli import main\ntry:\n    main()\nexcept SystemExit as e:\n"
            "    print('EXIT', e.code, 'torch' in sys.modules)")
    for args in (["--method", "prefix", "--prefix-len", "5000"], ["--method", "adapter", "--targets", "mlp"]):
        proc = subprocess.run([sys.executable, "-c", code, "train", str(tiny_nf4), "--data", str(text), *args],
                              capture_output=True, text=True, cwd=ROOT)
        assert "EXIT 2 False" in proc.stdout, (args, proc.stdout, proc.stderr)


# ------------------------------------------------------------------------------------------------------ planner
def _planned_transient(shape, settings) -> tuple[int, str]:
    p = plan(shape, settings)
    persistent = PERSISTENT_ROWS + ("Houlsby adapters (", "prefix (")
    return sum(r.bytes for r in p.rows if r.counter == "allocated" and not r.name.startswith(persistent)), \
        p.peak_phase


@pytest.mark.parametrize("gc,kv_heads,seq_len,batch_size,vocab,spec", [
    (False, 4, 384, 1, 2000, AdapterSpec(method="adapter", adapter_size=32)),
    (True, 2, 300, 2, 2000, AdapterSpec(method="adapter", adapter_size=32)),
    (False, 2, 256, 2, 1000, AdapterSpec(method="prefix", prefix_len=64)),
    (True, 4, 300, 2, 2000, AdapterSpec(method="prefix", prefix_len=64)),
    (True, 2, 300, 2, 2000, AdapterSpec(method="prefix", prefix_len=64, prefix_projection=96))],
    ids=["adapter", "adapter-gc-gqa", "prefix-gqa", "prefix-gc", "prefix-mlp-gc-gqa"])
def test_plan_matches_allocation_trace(one_thread, gc, kv_heads, seq_len, batch_size, vocab, spec):
    """The trainer on the CPU against ``qtool plan --device cpu``, as tests/test_plan.py does for LoRA: the
    adapters' saved tensors (and none in layer 0's attention, which needs no gradient), the prefix's longer keys
    and values (repeated for GQA) and masks per layer, its copy kept by checkpointing, its MLP's activations.
    These cases peak at the loss; where a layer's backward is the peak (tiny vocabularies), the CPU's masked SDPA
    backward adds ~2·s² bytes the plan does not model (see qtool.plan.methods)."""
    warnings.filterwarnings("ignore")
    config = {**CONFIG, "hidden_size": 256, "intermediate_size": 704, "num_key_value_heads": kv_heads,
              "vocab_size": vocab}
    model = random_decoder(decoder_shape(config), "cpu", spec=spec)
    traced = _traced_sgd_step(model, torch.randint(0, vocab, (batch_size, seq_len)), gc)
    planned, phase = _planned_transient(shape_from_config(config), Settings(
        method=spec.method, adapter_size=spec.adapter_size, prefix_len=spec.prefix_len,
        prefix_projection=spec.prefix_projection, seq_len=seq_len, batch_size=batch_size, optimizer="sgd",
        grad_checkpointing=gc, device="cpu"))
    assert abs(planned - traced) / traced < 0.02, (planned, traced, phase)


def test_compare_methods_at_equal_budgets():
    shape = known_shape("llama-2-7b")
    specs = methods.matched_specs(shape, AdapterSpec(rank=16))
    assert (specs["adapter"].adapter_size, specs["prefix"].prefix_len) == (31, 64)
    budget = specs["lora"].n_trainable(shape)
    assert all(abs(s.n_trainable(shape) - budget) / budget < 0.02 for m, s in specs.items() if m != "adalora")
    assert (specs["adalora"].rank, specs["adalora"].adalora.target_rank) == (24, 16)  # ends at LoRA's budget
    r = CliRunner().invoke(main, ["plan", "llama-2-7b", "--compare-methods", "--json"])
    rows = json.loads(r.stdout)["methods"]
    assert [row["method"] for row in rows] == ["lora", "adalora", "adapter", "prefix"]
    inf = {row["method"]: row["inference"] for row in rows}
    assert [inf[m]["mergeable"] for m in ("lora", "adalora", "adapter", "prefix")] == [True, True, False, False]
    assert inf["adalora"]["n_stored"] == budget and inf["adalora"]["extra_flops_per_token"] == 2 * budget
    assert inf["adalora"]["n_trainable"] == 32 * 24 * 4 * (4096 + 4096 + 1)  # P, λ, Q at the initial rank
    peaks = {row["method"]: row["peak_allocated_bytes"] for row in rows}
    assert peaks["adalora"] > peaks["lora"]  # trained at 1.5x the rank, with importance EMAs
    assert inf["prefix"]["extra_kv_cache_bytes"] == 2 * 32 * 64 * 4096 * 2  # 32 MiB of bf16 cache per sequence
    assert inf["adapter"]["extra_flops_per_token"] == 32 * 2 * 4 * 4096 * 31
    text = CliRunner().invoke(main, ["plan", "llama-2-7b", "--compare-methods"]).output
    assert "Houlsby adapters, size 31" in text and "prefix of 64" in text and "mergeable" in text
    r = CliRunner().invoke(main, ["plan", "llama-2-7b", "--method", "adapter", "--compare-methods"])
    assert r.exit_code == 2 and "drop --method" in r.output


def test_plan_shows_the_method_and_its_inference_cost():
    r = CliRunner().invoke(main, ["plan", "smollm2-135m", "--method", "prefix", "--prefix-len", "32"])
    assert r.exit_code == 0, r.output
    assert "prefix of 32 (368,640 trainable)" in r.output and "prefix (368,640 params, float32)" in r.output
    out = json.loads(CliRunner().invoke(main, ["plan", "smollm2-135m", "--method", "adapter", "--json"]).stdout)
    assert out["n_trainable"] == 30 * 2 * (2 * 576 * 64 + 576 + 64) and out["inference"]["mergeable"] is False
    r = CliRunner().invoke(main, ["plan", "smollm2-135m", "--method", "adapter", "--fit", "24GB", "--solve", "rank"])
    assert r.exit_code == 2 and "--method adapter has no rank" in r.output


def test_planner_seq_len_bound_leaves_the_prefix_its_positions():
    """The fit search stops at the longest --seq-len that qtool train accepts with the prefix before it."""
    from qtool.plan.fit import knob_limit, largest_fitting
    from qtool.train.settings import _prefix_problems

    for name, want in (("smollm2-135m", 8192 - 16 - 1), ("mistral-7b", 4096 - 16)):  # positions; sliding window
        shape = known_shape(name)
        value, why = knob_limit(shape, Settings(method="prefix", prefix_len=16), "seq_len")
        assert value == want and "prefix of 16" in why, (name, value, why)
        train = TrainSettings(method="prefix", prefix_len=16, seq_len=value)
        assert not _prefix_problems(train, shape) and _prefix_problems(train.__class__(
            method="prefix", prefix_len=16, seq_len=value + 1), shape)
    fit = largest_fitting(known_shape("smollm2-135m"), Settings(method="prefix", prefix_len=16), 10**12)
    assert fit.value == 8192 - 17 and fit.limited
    assert knob_limit(known_shape("smollm2-135m"), Settings(), "seq_len")[0] == 8192  # LoRA: all positions
    r = CliRunner().invoke(main, ["plan", "smollm2-135m", "--method", "prefix", "--prefix-len", "16"])
    assert "8,175 (capped)" in r.output, r.output
    notes = [plan(known_shape("smollm2-135m"), Settings(method="prefix", prefix_len=16, seq_len=s)).notes
             for s in (8175, 8176)]
    assert not any("to generate into" in n for n in notes[0]) and any("to generate into" in n for n in notes[1])


def test_measured_latency_comes_from_a_matching_record(tmp_path):
    shape = known_shape("llama-2-7b")
    record = {"model": "llama-2-7b", "device": "NVIDIA H200", "inference": [
        {"variant": "base", "config": {}, "decode_ms_per_token": 20.0, "decode_vs_base_pct": 0.0},
        {"variant": "lora-merged", "config": {"rank": 16, "targets": "qkvo"}, "decode_vs_base_pct": 0.3},
        {"variant": "lora-unmerged", "config": {"rank": 16, "targets": "qkvo"}, "decode_vs_base_pct": 12.0},
        {"variant": "adapter", "config": {"adapter_size": 31}, "decode_vs_base_pct": 25.0}]}
    (tmp_path / "h200.json").write_text(json.dumps(record))
    records = methods.load_records(tmp_path)
    lora = methods.inference_cost(shape, AdapterSpec(rank=16), records).measured
    assert lora["decode_vs_base_pct"] == 12.0 and lora["merged_decode_vs_base_pct"] == 0.3
    assert methods.inference_cost(shape, AdapterSpec(method="adapter", adapter_size=31), records).measured[
        "decode_vs_base_pct"] == 25.0
    assert methods.inference_cost(shape, AdapterSpec(method="adapter", adapter_size=32), records).measured is None
    assert methods.inference_cost(known_shape("llama-3-8b"), AdapterSpec(rank=16), records).measured is None


# ------------------------------------------------------------------------------------------- end to end (SmolLM2)
@pytest.mark.slow  # ~10-25 s each on the shared 2-core CPU (two SmolLM2 steps, loads, evaluations)
@pytest.mark.parametrize("method", ["adapter", "prefix"])
def test_train_saves_an_adapter_that_loads_back(smollm2_nf4_cpu, shakespeare_path, tmp_path, method):
    """``qtool train --method adapter|prefix`` on the real model: it learns, writes its format, and the folder loads
    back to the trained model (and, for the prefix, into PEFT)."""
    from qtool.arch import read_config
    from qtool.train.recipe import run

    size = {"adapter_size": 8} if method == "adapter" else {"prefix_len": 8}
    st = TrainSettings(method=method, steps=2, seq_len=32, batch_size=2, lr=5e-3, eval_blocks=2,
                       grad_checkpointing=False, **size)  # checkpointing: test_gradient_checkpointing_... above
    res = run(smollm2_nf4_cpu, shakespeare_path, tmp_path / "out", st)
    shape = decoder_shape(read_config(smollm2_nf4_cpu))
    assert res.eval_loss < res.eval_loss_before and res.trainable_params == st.spec.n_trainable(shape)
    meta = json.loads((res.adapter / "qtool_adapter.json").read_text())
    assert meta["spec"]["method"] == method and meta["base"]["shards_sha256"]
    ids = torch.randint(0, shape.vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    model = load_decoder(smollm2_nf4_cpu, compute_dtype=torch.float32)
    with torch.no_grad():
        plain = model(ids)
    load_adapter_into(model, res.adapter)
    if method == "adapter":
        assert len(houlsby_modules(model)) == 2 * shape.n_layers
    else:
        assert model.prefix.length == 8
    with torch.no_grad():
        assert not torch.allclose(model(ids), plain, atol=1e-3)
    if method == "prefix":  # and PEFT reads it onto transformers' model of the folder: the same logits, bf16
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        ours = load_decoder(smollm2_nf4_cpu, compute_dtype=torch.bfloat16)
        load_adapter_into(ours, res.adapter)
        hf = AutoModelForCausalLM.from_pretrained(smollm2_nf4_cpu, device_map="cpu").train()
        with torch.no_grad():
            assert torch.equal(ours(ids), PeftModel.from_pretrained(hf, res.adapter)(ids).logits)


# ------------------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI is CPU-only)")
@pytest.mark.parametrize("n_kv", [8, 2], ids=["mha", "gqa"])
def test_prefix_attention_on_cuda_equals_the_explicit_mask(n_kv):
    """CUDA: SDPA with a lower-right causal bias (flash, or efficient with k/v repeated) against the CPU path's
    explicit mask on the same inputs, forward and backward, in bf16."""
    from qtool.adapters.prefix import prefix_attention

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 100, 64, generator=gen)
    k, v = (torch.randn(2, n_kv, 100, 64, generator=gen) for _ in range(2))
    kv = torch.randn(2, n_kv, 16, 64, generator=gen)
    grad = torch.randn(2, 8, 100, 64, generator=gen)
    out = {}
    for device in ("cpu", "cuda"):
        ts = [t.to(device, torch.bfloat16).requires_grad_() for t in (q, k, v, kv)]
        o = prefix_attention(*ts)
        o.backward(grad.to(device, torch.bfloat16))
        out[device] = [o.float().cpu()] + [t.grad.float().cpu() for t in ts]
    for a, b in zip(out["cuda"], out["cpu"]):
        assert ((a - b).norm() / b.norm()).item() < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI is CPU-only)")
@pytest.mark.parametrize("spec", [ADAPTER, PREFIX, PREFIX_MLP], ids=["adapter", "prefix", "prefix-mlp"])
def test_methods_train_on_cuda_with_the_graph(spec):
    """The CUDA-graph step (fused kernels, flash attention with the prefix) trains and matches eager steps. (Random
    weights and random tokens: six steps need not lower a held-out loss, so "trains" is checked as every trainable
    tensor having moved; the graph/eager agreement of all six losses is the claim.)"""
    from qtool.train.data import Blocks
    from qtool.train.recipe import train

    config = {**CONFIG, "hidden_size": 512, "intermediate_size": 1408, "num_attention_heads": 8,
              "num_key_value_heads": 2}
    shape = decoder_shape(config)
    gen = torch.Generator().manual_seed(0)
    blocks = Blocks(torch.randint(0, 300, (16, 128), generator=gen), torch.randint(0, 300, (2, 128), generator=gen), 0)
    losses = {}
    for graphs in (True, False):
        size = {k: getattr(spec, k) for k in ("adapter_size",) if spec.method == "adapter"} or \
            {"prefix_len": spec.prefix_len, "prefix_projection": spec.prefix_projection}
        st = TrainSettings(method=spec.method, steps=6, seq_len=128, batch_size=2, lr=1e-3, eval_blocks=2,
                           cuda_graphs=graphs, optimizer="adamw_torch", **size)
        model = random_decoder(shape, torch.device("cuda"), spec=st.spec)
        trainable = [p for p in model.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in trainable]
        res = train(model, blocks, st, device=torch.device("cuda"))
        assert res.cuda_graph == ("on" if graphs else "off")
        assert trainable and all(not torch.equal(a, p.detach()) for a, p in zip(before, trainable))
        losses[graphs] = res.losses
    assert max(abs(a - b) for a, b in zip(losses[True], losses[False])) < 2e-2

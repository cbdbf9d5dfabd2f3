"""qtool merge on the real SmolLM2-135M fixture, against independent oracles: bitsandbytes' own fp32 dequantisation
for W0, peft's training, bypass forward and merge_and_unload for the adapter, and plain transformers for loading.

The adapter is trained by peft for a few AdamW steps on Shakespeare on the dequantised (fp32) NF4 base, i.e. the
model a QLoRA run trains; rank_pattern and alpha_pattern are set so that per-module scales differ.
"""
from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")
from click.testing import CliRunner  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.initialization import no_init_weights  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from tools import fixtures  # noqa: E402

from qtool.format.peft_adapter import load_adapter, save_adapter  # noqa: E402
from qtool.cli import main  # noqa: E402
from qtool.convert.pipeline import convert  # noqa: E402
from qtool.errors import InputError, OutputError  # noqa: E402
from qtool.merge.math import delta_weight, merge_rounded, merged_weight, update_kept  # noqa: E402
from qtool.merge.pipeline import REPORT_NAME, ROUNDING_WARNING_ERROR, VERIFY_TOLERANCE, merge  # noqa: E402
from qtool.format.safetensors import read_header  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The 2-core test machine is shared: with 2 threads (torch's pool and the C kernels' pthreads), spin-waiting
    under load made this file 3-4x slower than with one (measured: 70 s vs 16 s for the training fixture); restored
    afterwards."""
    from qtool.nf4 import _cpu

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    _cpu.set_threads(1)
    yield
    torch.set_num_threads(n)
    _cpu.set_threads(None)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("merge")


@pytest.fixture(scope="module")
def smollm2():
    return fixtures.smollm2()


@pytest.fixture(scope="module")
def nf4_dir(smollm2_nf4_cpu):
    return smollm2_nf4_cpu  # the session's conversion (conftest), shared with the other test files


def tokens(vocab: int, seed: int = 0):
    """The verification's sample: 2 x 32 ids uniform over the vocabulary, fixed seed (qtool.merge.verify.verify_merged)."""
    return torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(seed))


def bnb_dequantised_model(nf4_dir):
    """The NF4 base as a plain fp32 model, dequantised by bitsandbytes itself (not by qtool)."""
    q = AutoModelForCausalLM.from_pretrained(nf4_dir)
    state = {}
    for name, mod in q.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            qs = copy.copy(mod.weight.quant_state)
            qs.dtype = torch.float32  # the fp32 product code * absmax, before any rounding to bf16
            state[f"{name}.weight"] = bnb.functional.dequantize_4bit(mod.weight.data, qs)
    for key, t in q.state_dict().items():
        if key not in state and key.endswith(("weight", "bias")) and t.is_floating_point():
            state[key] = t.float()
    config = copy.deepcopy(q.config)
    del config.quantization_config
    with no_init_weights():  # every weight is loaded below: skip 135M random numbers (half this helper's time)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model.eval()


@pytest.fixture(scope="module")
def trained(nf4_dir, smollm2, work):
    """peft LoRA trained 4 AdamW steps on the dequantised NF4 base; returns what the tests compare against."""
    base = bnb_dequantised_model(nf4_dir)
    ids = tokens(base.config.vocab_size)
    with torch.no_grad():
        base_logits = base(ids).logits
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM",
                     rank_pattern={"down_proj": 4}, alpha_pattern={r"layers\.0\.self_attn\.q_proj": 32})
    torch.manual_seed(0)  # peft draws lora_A from torch's global generator
    model = get_peft_model(base, cfg)
    tok = AutoTokenizer.from_pretrained(smollm2)
    text = fixtures.shakespeare().read_text()[20000:60000]
    batch = tok(text, return_tensors="pt").input_ids[0, : 2 * 64].view(2, 64)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    model.train()
    for _ in range(4):  # a few steps on one batch: the loss must go down
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    adapter = work / "adapter"
    model.save_pretrained(adapter)
    with torch.no_grad():
        bypass_logits = model(ids).logits
    v7 = model.base_model.model.model.layers[7].self_attn.v_proj.base_layer.weight.detach().clone()
    merged = model.merge_and_unload()  # peft's own merge, on the fp32 dequantised base
    weights = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    return {"adapter": adapter, "ids": ids, "base_logits": base_logits, "bypass_logits": bypass_logits,
            "peft_merged": weights, "losses": losses, "bnb_base_v7": v7}


@pytest.fixture(scope="module")
def merged_bf16(nf4_dir, trained, work):
    return merge(nf4_dir, trained["adapter"], work / "merged-bf16")


def rel(x, ref):
    return float((x - ref).norm() / ref.norm())


# ------------------------------------------------------------------------------------------------- pure functions
def test_merged_weight_is_pure_and_matches_peft_delta_for_conv1d():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16))
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                                          init_lora_weights=False))
    layer = pm.base_model.model.transformer.h[0].attn.c_attn
    w0 = layer.base_layer.weight.detach().clone()  # Conv1D: (in, out) = (32, 96)
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    w = merged_weight(w0, a, b, layer.scaling["default"], fan_in_fan_out=True, name="h.0.attn.c_attn")
    assert w.shape == (32, 96) and w is not w0
    torch.testing.assert_close(w, w0 + layer.get_delta_weight("default"), rtol=0, atol=1e-7)
    assert torch.equal(layer.base_layer.weight, w0)  # untouched
    with pytest.raises(InputError, match="module 'h.0.attn.c_attn': the adapter's update s·B·A holds 3072 NaN"):
        merged_weight(w0, a, b * math.inf, 1.0, fan_in_fan_out=True, name="h.0.attn.c_attn")


def test_update_kept_definition():
    dw = torch.randn(64, 64)
    assert update_kept(dw + 5, torch.full_like(dw, 5), dw) == pytest.approx({"kept": 1.0, "rel_error": 0.0}, abs=1e-6)
    assert update_kept(torch.zeros(64, 64), torch.zeros(64, 64), dw)["kept"] == 0.0
    assert update_kept(0.5 * dw, torch.zeros(64, 64), dw)["kept"] == pytest.approx(0.5)


# -------------------------------------------------------------------------------------------------- end to end
def test_trained_adapter_reads_back(trained):
    ad = load_adapter(trained["adapter"])
    assert len(ad.modules) == 30 * 7
    assert ad.modules["model.layers.0.mlp.down_proj"].rank == 4
    assert ad.modules["model.layers.0.self_attn.q_proj"].scale == 4.0
    assert ad.modules["model.layers.1.self_attn.q_proj"].scale == 2.0
    assert trained["losses"][-1] < trained["losses"][0] - 0.1  # it did learn something


def test_fp32_merge_equals_peft_merge_and_unload(nf4_dir, trained, work):
    res = merge(nf4_dir, trained["adapter"], work / "merged-fp32", dtype="fp32", verify=False)
    peft_w = trained["peft_merged"]
    with read_header(res.out / "model.safetensors") as st:
        assert set(st.tensors) == set(peft_w) - {"lm_head.weight"}  # tied: no lm_head written, as in the source
        worst = max(float((st.tensor(k) - peft_w[k]).abs().max()) for k in st.tensors)
    assert worst <= 1e-6, worst
    assert {r["module"] for r in res.modules} == {f"model.layers.{i}.{p}.{n}" for i in range(30)
                                                  for p, ns in (("self_attn", TARGETS[:4]), ("mlp", TARGETS[4:]))
                                                  for n in ns}
    kept = [r["dw_kept"] for r in res.modules]  # fp32 keeps dW up to the rounding of W0 + dW
    assert min(kept) > 1 - 1e-4 and max(kept) < 1 + 1e-4, (min(kept), max(kept))


def test_bf16_merge_is_the_trained_model(merged_bf16, trained):
    """Plain transformers loads the merged folder; its logits equal peft's bypass on the dequantised base within
    bf16 rounding, and are far closer to it than the adapter's own effect."""
    model, info = AutoModelForCausalLM.from_pretrained(merged_bf16.out, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with torch.no_grad():
        logits = model(trained["ids"]).logits
    err = rel(logits, trained["bypass_logits"])
    effect = rel(trained["bypass_logits"], trained["base_logits"])
    assert err < VERIFY_TOLERANCE[torch.bfloat16]
    assert err < 0.3 * effect, (err, effect)
    v = merged_bf16.verification
    assert v["passed"] and v["tokens"] == [2, 32]
    # the built-in check used our own bypass (forward hooks), peft's bypass is the oracle for the same tokens
    assert v["adapter_effect"]["rel"] == pytest.approx(effect, rel=1e-4)
    assert v["merged_vs_bypass"]["rel"] == pytest.approx(err, rel=1e-3)


def test_bf16_output_folder(merged_bf16, smollm2):
    out = merged_bf16.out
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert json.loads((smollm2 / "config.json").read_text()) == config  # the source model's config, exactly
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([p.name for p in smollm2.iterdir()] + [REPORT_NAME])  # tokenizer etc. copied, no NF4 report
    with read_header(out / "model.safetensors") as st, read_header(smollm2 / "model.safetensors") as src:
        assert {k: (v.dtype, v.shape) for k, v in st.tensors.items()} == \
               {k: (v.dtype, v.shape) for k, v in src.tensors.items()}
        assert torch.equal(st.tensor("model.norm.weight"), src.tensor("model.norm.weight"))
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["base_kind"] == "nf4" and len(report["modules"]) == 210
    assert report["verification"]["merged_vs_bypass"]["rel"] == merged_bf16.verification["merged_vs_bypass"]["rel"]
    assert all(0 < r["dw_rel"] < 1 and r["dw_max_abs"] > 0 for r in report["modules"])


def test_16bit_base_adds_quantisation_error_back(smollm2, trained, work):
    res = merge(smollm2, trained["adapter"], work / "merged-16", dtype="fp32")
    assert res.base_kind == "16-bit"
    assert "adds the quantisation error back" in res.notes[0]
    qe = res.quantisation_error
    assert qe["n_weights"] == 210 and 0.03 < qe["rel_error"] < 0.2
    v = res.verification
    assert v["passed"] and v["merged_vs_bypass"]["rel"] < VERIFY_TOLERANCE[torch.float32]
    # the merged 16-bit model is further from the trained (NF4) model than the adapter's whole effect
    assert v["merged_vs_trained_nf4"]["rel"] > v["adapter_effect"]["rel"]
    ad = load_adapter(trained["adapter"])
    f = ad.modules["model.layers.5.mlp.up_proj"]
    with read_header(res.out / "model.safetensors") as st, read_header(smollm2 / "model.safetensors") as src:
        key = "model.layers.5.mlp.up_proj.weight"
        expected = src.tensor(key).float() + (f.b @ f.a) * f.scale
        assert torch.equal(st.tensor(key), expected)


def test_requantize_keeps_little_of_the_update(nf4_dir, trained, work):
    res = merge(nf4_dir, trained["adapter"], work / "merged-nf4", requantize_nf4=True, target="cpu", verify=False)
    kept = sorted(r["dw_kept"] for r in res.modules)
    assert kept[len(kept) // 2] < 0.5  # most of a small update rounds away
    # independent check of one module: bitsandbytes loads the output and dequantises it
    model = AutoModelForCausalLM.from_pretrained(res.out)
    mod = model.model.layers[7].self_attn.v_proj
    assert isinstance(mod, bnb.nn.Linear4bit)
    qs = copy.copy(mod.weight.quant_state)
    qs.dtype = torch.float32
    back = bnb.functional.dequantize_4bit(mod.weight.data, qs)
    base = trained["bnb_base_v7"]  # layer 7's v_proj as bitsandbytes dequantises the base (fp32)
    f = load_adapter(trained["adapter"]).modules["model.layers.7.self_attn.v_proj"]
    expect = update_kept(back, base, delta_weight(f.a, f.b, f.scale))
    row = next(r for r in res.modules if r["module"] == "model.layers.7.self_attn.v_proj")
    assert row["dw_kept"] == pytest.approx(expect["kept"], abs=1e-6)
    # weights without an adapter are copied byte for byte
    with read_header(res.out / "model.safetensors") as st, read_header(nf4_dir / "model.safetensors") as src:
        for k in ("model.embed_tokens.weight", "model.layers.3.input_layernorm.weight"):
            assert torch.equal(st.tensor(k), src.tensor(k))


def test_cli_json_sharded_fp16(nf4_dir, trained, work, smollm2):
    out = work / "merged-cli"
    r = CliRunner().invoke(main, ["merge", str(nf4_dir), str(trained["adapter"]), str(out), "--dtype", "fp16",
                                  "--max-shard-size", "100MB", "--no-verify", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["settings"]["dtype"] == "float16" and summary["verification"] is None
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) == 3 and shards[0] == "model-00001-of-00003.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    # total_size counts tensor bytes, as transformers does: the source's, since bf16 -> fp16 keeps every size
    with read_header(smollm2 / "model.safetensors") as src:
        assert index["metadata"]["total_size"] == sum(info.nbytes for info in src.tensors.values())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float16
    with torch.no_grad():
        logits = model.float()(trained["ids"]).logits
    assert rel(logits, trained["bypass_logits"]) < VERIFY_TOLERANCE[torch.float16]


def test_cli_table_and_errors(nf4_dir, trained, merged_bf16, work, tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["merge", "-h"])
    assert r.exit_code == 0 and "qtool merge ./llama2-7b-nf4 ./adapter ./llama2-7b-merged" in r.output
    r = runner.invoke(main, ["merge", str(nf4_dir), str(trained["adapter"]), str(merged_bf16.out)])
    assert r.exit_code == OutputError.exit_code and "already exists" in r.stderr
    dora = tmp_path / "dora"
    save_adapter(dora, {"model.layers.0.self_attn.q_proj": (torch.ones(2, 576), torch.ones(576, 2))}, rank=2,
                 alpha=2, target_modules=["q_proj"])
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    r = runner.invoke(main, ["merge", str(nf4_dir), str(dora), str(tmp_path / "out")])
    assert r.exit_code == InputError.exit_code and "DoRA" in r.stderr and "adapter_config.json" in r.stderr
    assert not (tmp_path / "out").exists()


def test_refusals_leave_nothing_behind(nf4_dir, tmp_path):
    big = tmp_path / "huge"  # finite factors whose scaled product overflows fp32
    save_adapter(big, {"model.layers.2.mlp.up_proj": (torch.full((2, 576), 1e30), torch.full((1536, 2), 1e30))},
                 rank=2, alpha=2, target_modules=["up_proj"])
    with pytest.raises(InputError, match="module 'model.layers.2.mlp.up_proj'.*NaN/Inf"):
        merge(nf4_dir, big, tmp_path / "out")
    wrong = tmp_path / "wrong"  # embedding factors for the head, a Linear
    save_adapter(wrong, {"lm_head": (torch.ones(2, 49152), torch.ones(576, 2))}, rank=2, alpha=2,
                 target_modules=["lm_head"], embeddings={"lm_head"})
    with pytest.raises(InputError, match="lm_head: a Linear, but the adapter holds embedding factors"):
        merge(nf4_dir, wrong, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge", "wrong"]  # no output, no partial folder


def test_gpt2_conv1d_through_nf4(tmp_path):
    """Conv1D weights are stored (in, out) and quantised transposed; the merge must write them back (in, out)."""
    torch.manual_seed(0)
    src = tmp_path / "gpt2"
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=128, n_positions=64))
    model.to(torch.bfloat16).save_pretrained(src)
    nf4 = convert(src, tmp_path / "gpt2-nf4", target="cpu").out
    pm = get_peft_model(GPT2LMHeadModel.from_pretrained(src, dtype=torch.float32),
                        LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                   init_lora_weights=False))
    pm.save_pretrained(tmp_path / "ad")
    res = merge(nf4, tmp_path / "ad", tmp_path / "out", dtype="fp32")
    assert res.verification["passed"] and res.verification["merged_vs_bypass"]["rel"] < 1e-5
    layer = pm.base_model.model.transformer.h[1].attn.c_attn
    with read_header(res.out / "model.safetensors") as st, read_header(nf4 / "model.safetensors") as q:
        from qtool.format import bnb_nf4 as layout
        from qtool.nf4 import codec as nf4_mod

        key = "transformer.h.1.attn.c_attn.weight"
        w0 = nf4_mod.dequantize(layout.read_weight(key, q.tensor), torch.float32).t()
        got = st.tensor(key)
        assert got.shape == (64, 192)
        torch.testing.assert_close(got, w0 + layer.get_delta_weight("default"), rtol=0, atol=1e-6)


def test_verification_catches_a_wrong_merge(tiny_llama_template, tmp_path, monkeypatch):
    """The built-in check can fail: with the update dropped, the merged model is the bare base, whose logits are
    the adapter's whole effect away from base + adapter — far beyond fp32 rounding. Nothing is written."""
    import qtool.merge.pipeline as m
    from qtool.errors import VerificationError

    adapter = tiny_adapter(tmp_path / "ad", b_std=0.05)
    ok = merge(tiny_llama_template, adapter, tmp_path / "right", dtype="fp32")  # the same merge, unpatched, passes
    assert ok.verification["adapter_effect"]["rel"] > 100 * ok.verification["tolerance_rel"]
    monkeypatch.setattr(m, "delta_weight",
                        lambda a, b, scale, fan_in_fan_out=False: torch.zeros(b.shape[0], a.shape[1]))
    with pytest.raises(VerificationError, match="merged logits differ from base \\+ adapter"):
        merge(tiny_llama_template, adapter, tmp_path / "wrong", dtype="fp32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "right"]


# ------------------------------------------------------------------------------- tiny model: rounding and its report
def tiny_adapter(folder: Path, b_std: float, seed: int = 0) -> Path:
    """LoRA r=4, alpha 8 on q_proj and v_proj of the tiny Llama (conftest: hidden 64, kv 32, 2 layers), with B drawn
    at ``b_std``: |dW|/|W0| is about 25 · b_std (W0 ~ N(0, 0.02) from transformers' init)."""
    g = torch.Generator().manual_seed(seed)
    factors = {f"model.layers.{i}.self_attn.{n}": (torch.randn(4, 64, generator=g) / 8,
                                                   torch.randn(out, 4, generator=g) * b_std)
               for i in range(2) for n, out in (("q_proj", 64), ("v_proj", 32))}
    return save_adapter(folder, factors, rank=4, alpha=8, target_modules=["q_proj", "v_proj"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("conv1d", [False, True])
def test_merge_rounded_matches_the_definitions(dtype, conv1d):
    """The merge's one-pass numbers equal merged_weight + update_kept and plain norms; nothing is modified."""
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(96, 64, generator=g) * 0.02
    a, b = torch.randn(4, 96 if conv1d else 64, generator=g), torch.randn(64 if conv1d else 96, 4, generator=g) * 1e-4
    dw = delta_weight(a, b, 2.0, fan_in_fan_out=conv1d)
    w0_before, dw_before = w0.clone(), dw.clone()
    out, row = merge_rounded(w0, dw, dtype, "m")
    assert torch.equal(w0, w0_before) and torch.equal(dw, dw_before)
    assert out.dtype == dtype and torch.equal(out, merged_weight(w0, a, b, 2.0, conv1d).to(dtype))
    ref = update_kept(out, w0.to(dtype), dw)
    assert row["dw_kept"] == pytest.approx(ref["kept"], rel=1e-5)
    assert row["dw_rel_error"] == pytest.approx(ref["rel_error"], rel=1e-5)
    assert row["w0_norm"] == pytest.approx(float(w0.double().norm()), rel=1e-6)
    assert row["dw_norm"] == pytest.approx(float(dw.double().norm()), rel=1e-6)
    assert row["dw_max_abs"] == float(dw.abs().max())
    assert row["dw_rel"] == pytest.approx(row["dw_norm"] / row["w0_norm"])


def test_rounding_that_erases_the_update_warns(tiny_llama_template, tmp_path):
    """An update far below bf16's resolution of the weights (|dW|/|W0| ~ 1e-4, bf16 rounds by up to 4e-3) is mostly
    rounded away: 'dW error' near 1, a warning that suggests --dtype fp32; in fp32 it is kept and nothing warns."""
    small = tiny_adapter(tmp_path / "small", b_std=4e-6)
    res = merge(tiny_llama_template, small, tmp_path / "bf16")  # the model's dtype: bf16
    errors = sorted(r["dw_rel_error"] for r in res.modules)
    assert res.settings["dtype"] == "bfloat16" and errors[len(errors) // 2] > 0.9
    assert len(res.warnings) == 1 and "bf16 rounding erases most of the adapter's update" in res.warnings[0]
    assert "--dtype fp32" in res.warnings[0] and "--dtype fp16" in res.warnings[0]
    assert json.loads((res.out / REPORT_NAME).read_text())["warnings"] == res.warnings
    res = merge(tiny_llama_template, small, tmp_path / "fp32", dtype="fp32")
    assert res.warnings == [] and all(r["dw_rel_error"] < 1e-2 and abs(r["dw_kept"] - 1) < 1e-2 for r in res.modules)
    res = merge(tiny_llama_template, tiny_adapter(tmp_path / "big", b_std=2e-3), tmp_path / "big-bf16")
    assert res.warnings == [] and max(r["dw_rel_error"] for r in res.modules) < ROUNDING_WARNING_ERROR


def test_cli_explains_the_columns_and_prints_the_warning(tiny_llama_template, tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["merge", "-h"])
    text = " ".join(r.output.split())  # click wraps the help to the terminal's width
    assert r.exit_code == 0 and '"dW kept" (the share of dW that the written weights carry' in text
    assert '"dW error" (|e - dW|/|dW|' in text and "suggests --dtype fp32 or fp16" in text
    small = tiny_adapter(tmp_path / "small", b_std=4e-6)
    r = runner.invoke(main, ["merge", str(tiny_llama_template), str(small), str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "warning: bf16 rounding erases most of the adapter's update" in r.stderr
    assert "dW kept: the share of dW that the written weights carry" in r.stdout
    assert "dW error: |e - dW|/|dW|" in r.stdout and "largest updates (4 of 4)" in r.stdout
    r = runner.invoke(main, ["merge", str(tiny_llama_template), str(small), str(tmp_path / "out32"), "--dtype",
                             "fp32"])
    assert r.exit_code == 0 and "warning" not in r.stderr

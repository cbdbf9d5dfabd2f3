"""AdaLoRA (issue 9): the SVD-form bypass on NF4, the rank allocator against PEFT's as an oracle (schedule,
importance, masking, regulariser), PEFT's AdaLoRA format both ways, the exact export to plain LoRA (PEFT and
qtool merge load it), the planner's rows, the budget report, and bad input before any work."""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from qtool.adapters.adalora import AdaLoRALinear, RankAllocator, adalora_modules, orthogonality
from qtool.adapters.spec import AdaLoRASchedule, AdapterSpec, adalora_scale
from qtool.cli import main
from qtool.errors import InputError, UsageError
from qtool.train.data import Blocks
from qtool.train.load import load_decoder
from qtool.train.recipe import TrainSettings, train

ROOT = Path(__file__).resolve().parent.parent
FP32 = dict(compute_dtype=torch.float32)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def ada_spec(init=4, target=2, targets="all-linear", steps=10, **kw):
    return AdapterSpec(targets, rank=init, alpha=8.0, method="adalora",
                       adalora=AdaLoRASchedule(target_rank=target, total_steps=steps, **kw))


@pytest.fixture(scope="module")
def tiny_nf4(tmp_path_factory):
    """A tiny Llama (hidden 64, 2 layers, 14 Linears) converted to NF4 with bitsandbytes' CPU bytes."""
    from qtool.convert.pipeline import convert
    from tests.conftest import save_tiny

    work = tmp_path_factory.mktemp("ada")
    torch.manual_seed(0)
    src = save_tiny(work / "src", "llama", dtype="float32")
    convert(src, work / "nf4", target="cpu")
    return work / "nf4"


@pytest.fixture(scope="module")
def hf_nf4(tiny_nf4):
    """transformers' bitsandbytes-4bit model of the same folder (an fp32 source: it computes in fp32, like our FP32
    decoder)."""
    from transformers import AutoModelForCausalLM

    assert json.loads((tiny_nf4 / "config.json").read_text())["quantization_config"]["bnb_4bit_compute_dtype"] == \
        "float32"
    return AutoModelForCausalLM.from_pretrained(tiny_nf4, device_map="cpu", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def tiny_blocks(n=24, seq=16):
    gen = torch.Generator().manual_seed(1)
    return Blocks(torch.randint(0, 256, (n, seq), generator=gen), torch.randint(0, 256, (2, seq), generator=gen), 0)


def trained_tiny(tiny_nf4, steps=10, **kw):
    st = TrainSettings(steps=steps, seq_len=16, batch_size=2, method="adalora", init_rank=4, target_rank=2, tinit=2,
                       tfinal=3, targets="all-linear", lr=2e-2, alpha=8.0, **kw)
    model = load_decoder(tiny_nf4, st.spec, **FP32)
    return model, st, train(model, tiny_blocks(), st, device=torch.device("cpu"))


def peft_adalora(model, **config):
    """PEFT's AdaLoRA on a transformers model (the oracle)."""
    from peft import AdaLoraConfig, get_peft_model

    cfg = dict(init_r=4, target_r=2, total_step=10, target_modules=TARGETS, lora_alpha=8, task_type="CAUSAL_LM")
    return get_peft_model(model, AdaLoraConfig(**{**cfg, **config}))


def rel(x, y):
    return ((x - y).norm() / y.norm()).item()


# ------------------------------------------------------------------------------------------------ the module
def test_step0_is_the_base_model_and_only_the_singular_values_get_gradients(tiny_nf4, ids):
    base = load_decoder(tiny_nf4, **FP32)
    model = load_decoder(tiny_nf4, ada_spec(), **FP32)
    modules = adalora_modules(model)
    assert len(modules) == 14 and all(m.rank == 4 and m.scale == adalora_scale(8.0, 4) for m in modules.values())
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))  # λ = 0: the bypass adds exact zeros
    model.loss(ids).backward()
    for m in modules.values():
        assert torch.count_nonzero(m.lora_e.grad) > 0
        assert torch.count_nonzero(m.lora_a.grad) == 0 and torch.count_nonzero(m.lora_b.grad) == 0  # ∝ λ = 0


def test_scale_is_peft_ranknum_plus_guard():
    ranknum = torch.tensor([12.0]) + 1e-5  # PEFT: an fp32 tensor, kept at init_r after pruning
    assert adalora_scale(16.0, 12) == pytest.approx(16.0 / ranknum.item(), rel=1e-15)
    assert adalora_scale(16.0, 12) != 16.0 / 12


# --------------------------------------------------------------------------------------- allocator vs PEFT's
def test_budget_schedule_matches_peft():
    from peft.tuners.adalora.layer import RankAllocator as PeftAllocator

    # the worked example of shared/research/lora_algorithms.md §5.2 (init_r 6, target 2, 6 matrices)
    s = AdaLoRASchedule(target_rank=2, tinit=2, tfinal=3, total_steps=12)
    assert [s.budget(t, 36, 6)[0] for t in range(13)] == [36, 36, 36, 27, 20, 16, 13, 12, 12, 12, 12, 12, 12]
    for tinit, tfinal, total, delta_t in ((2, 3, 12, 1), (0, 5, 40, 3), (7, 1, 30, 2)):
        ours = AdaLoRASchedule(target_rank=3, tinit=tinit, tfinal=tfinal, total_steps=total, delta_t=delta_t)
        fake = SimpleNamespace(init_bgt=70, target_bgt=30, peft_config=SimpleNamespace(
            tinit=tinit, tfinal=tfinal, total_step=total, deltaT=delta_t))
        for t in range(ours.final_step):  # PEFT forces the mask at T - tfinal (update_and_allocate)
            assert ours.budget(t, 70, 10) == PeftAllocator.budget_schedule(fake, t), (tinit, tfinal, total, t)
        assert ours.budget(ours.final_step, 70, 10) == (30, True)
        assert PeftAllocator.budget_schedule(fake, total - tfinal)[0] == 30


def test_importance_and_masking_match_peft_rank_allocator(tiny_nf4):
    """The same weights and gradients for three steps into both allocators: the same EMAs, the same kept triplets
    (PEFT's RankAllocator.update_ipt + mask_to_budget as the oracle; random values, so no ties)."""
    from tests.conftest import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    peft = peft_adalora(AutoModelForCausalLM.from_config(tiny_config("llama")))
    ours = adalora_modules(load_decoder(tiny_nf4, ada_spec(), **FP32))
    allocator = RankAllocator(ours, ada_spec().adalora)
    gen = torch.Generator().manual_seed(3)
    for step in range(3):
        for path, m in ours.items():
            theirs = peft.base_model.model.get_submodule(path)
            for mine, name in ((m.lora_a, "lora_A"), (m.lora_e, "lora_E"), (m.lora_b, "lora_B")):
                value, grad = torch.randn(mine.shape, generator=gen), torch.randn(mine.shape, generator=gen)
                p = getattr(theirs, name)["default"]
                mine.data.copy_(value), p.data.copy_(value)
                mine.grad, p.grad = grad.clone(), grad.clone()
        allocator.observe(step)
        peft.base_model.rankallocator.update_ipt(peft.base_model.model)
    for i, (path, m) in enumerate(ours.items()):
        for k, name in enumerate(("lora_A", "lora_E", "lora_B")):
            key = f"{path}.{name}.default"
            torch.testing.assert_close(allocator.sensitivity[3 * i + k],
                                       peft.base_model.rankallocator.exp_avg_ipt[key], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(allocator.uncertainty[3 * i + k],
                                       peft.base_model.rankallocator.exp_avg_unc[key], rtol=1e-5, atol=1e-7)
    allocator._mask_to(23)
    pattern = peft.base_model.rankallocator.mask_to_budget(peft.base_model.model, 23)
    assert sum(allocator.ranks().values()) == 23
    for path, m in ours.items():
        assert m.kept.tolist() == pattern[f"{path}.lora_E.default"], path
        assert torch.equal(m.lora_e.detach(), peft.base_model.model.get_submodule(path).lora_E["default"].detach())


def test_exactly_the_budget_is_kept_even_with_ties(tiny_nf4):
    ours = adalora_modules(load_decoder(tiny_nf4, ada_spec(), **FP32))
    allocator = RankAllocator(ours, ada_spec().adalora)  # all scores 0: PEFT's `<=` would mask everything
    allocator._mask_to(20)
    assert sum(allocator.ranks().values()) == 20
    assert [m.kept.sum().item() for m in ours.values()][:5] == [4, 4, 4, 4, 4]  # ties go to the first positions


def test_orthogonality_regulariser_is_peft_mean_of_norms(tiny_nf4):
    from tests.conftest import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    peft = peft_adalora(AutoModelForCausalLM.from_config(tiny_config("llama")), orth_reg_weight=0.5)
    ours = adalora_modules(load_decoder(tiny_nf4, ada_spec(), **FP32))
    for path, m in ours.items():
        theirs = peft.base_model.model.get_submodule(path)
        m.lora_a.data.copy_(theirs.lora_A["default"]), m.lora_b.data.copy_(theirs.lora_B["default"])
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        with_reg = peft(input_ids=ids, labels=ids).loss
        peft.peft_config["default"].orth_reg_weight = 0.0
        without = peft(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(orthogonality(list(ours.values())).detach(), (with_reg - without) / 0.5,
                               rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------- the trainer
def test_training_shrinks_the_budget_on_schedule_and_is_deterministic(tiny_nf4):
    model, st, res = trained_tiny(tiny_nf4)
    a = res.adalora
    assert a["init_budget"] == 56 and a["target_budget"] == a["final_budget"] == 28 and a["mask_fixed"]
    schedule = st.spec.adalora
    assert a["mask_steps"] == [3, 4, 5, 6, 7]  # after tinit, every step, fixed at T - tfinal = 7
    assert a["budgets"] == [schedule.budget(t, 56, 14)[0] for t in a["mask_steps"]]
    for m in adalora_modules(model).values():  # the fixed mask holds after the last optimizer steps
        assert torch.all(m.lora_e.detach()[~m.kept] == 0) and torch.all(m.lora_e.detach()[m.kept] != 0)
    assert res.eval_loss < res.eval_loss_before
    again = trained_tiny(tiny_nf4)[2]
    assert again.losses == res.losses and again.adalora["ranks"] == a["ranks"]


# ------------------------------------------------------------------------------------ PEFT's format, export
@pytest.fixture(scope="module")
def saved(tiny_nf4, tmp_path_factory):
    """A trained tiny AdaLoRA saved in PEFT's format, with one module forced to rank 0 (0-size tensors)."""
    from qtool.format.peft_adalora import save_adalora

    model, st, res = trained_tiny(tiny_nf4)
    modules = adalora_modules(model)
    dead = "model.layers.1.self_attn.k_proj"
    with torch.no_grad():
        modules[dead].kept.fill_(False)
        modules[dead].lora_e.zero_()
    out = save_adalora(tmp_path_factory.mktemp("saved") / "ada", modules, st.spec, base_dir=tiny_nf4)
    return SimpleNamespace(out=out, model=model, modules=modules, dead=dead)


def test_saved_adalora_loads_in_peft_and_computes_the_same(saved, hf_nf4, ids):
    from peft import PeftModel
    from safetensors import safe_open

    config = json.loads((saved.out / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["init_r"] == 4 and config["target_r"] == 2
    with safe_open(saved.out / "adapter_model.safetensors", "pt") as f:
        assert f.get_slice(f"base_model.model.{saved.dead}.lora_A").get_shape() == [0, 64]
        q = "model.layers.0.self_attn.q_proj"
        kept = sum(config["rank_pattern"][q + ".lora_E"])
        assert f.get_slice(f"base_model.model.{q}.lora_E").get_shape() == [kept, 1]
    peft = PeftModel.from_pretrained(hf_nf4, saved.out)
    try:
        for path, m in saved.modules.items():
            layer = peft.base_model.model.get_submodule(path)
            assert layer.r["default"] == int(m.kept.sum())
            assert float(layer.ranknum["default"]) == (4.0 if m.kept.any() else 0.0)  # PEFT keeps init_r as ranknum
        with torch.no_grad():
            a, b = saved.model(ids), peft(ids).logits
        with peft.disable_adapter(), torch.no_grad():
            base = peft(ids).logits
        assert rel(a, b) < 1e-5 and rel(b, base) > 1e-3, (rel(a, b), rel(b, base))  # the adapter matters, and matches
    finally:
        peft.unload()


def test_export_lora_is_exact_and_loads_in_peft_and_merge(saved, tiny_nf4, hf_nf4, ids, tmp_path):
    from peft import PeftModel

    from qtool.format.peft_adapter import load_adapter
    from qtool.merge.pipeline import merge

    r = CliRunner().invoke(main, ["adapter", "export-lora", str(saved.out), str(tmp_path / "lora"), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    dead = sorted(p for p, m in saved.modules.items() if not m.kept.any())
    assert saved.dead in dead and report["dropped"] == dead
    lora = load_adapter(tmp_path / "lora")
    assert set(lora.modules) == set(saved.modules) - set(dead)
    for path, f in lora.modules.items():
        m = saved.modules[path]
        assert f.rank == int(m.kept.sum()) and f.scale == 1.0
        torch.testing.assert_close(f.scale * f.b @ f.a, m.delta_weight(), rtol=1e-5, atol=1e-8)
    with torch.no_grad():
        ada = PeftModel.from_pretrained(hf_nf4, saved.out)
        want = ada(ids).logits
        ada.unload()
        plain = PeftModel.from_pretrained(hf_nf4, tmp_path / "lora")
        got = plain(ids).logits
        plain.unload()
    assert rel(got, want) < 1e-6, rel(got, want)
    res = merge(tiny_nf4, tmp_path / "lora", tmp_path / "merged", dtype="fp32")  # verifies itself
    from safetensors.torch import load_file

    merged = {k: v for p in sorted((tmp_path / "merged").glob("*.safetensors")) for k, v in load_file(p).items()}
    q = "model.layers.0.self_attn.q_proj"
    w0 = load_decoder(tiny_nf4).layers[0].proj["q_proj"].dequantized(torch.float32)
    torch.testing.assert_close(merged[q + ".weight"] - w0, saved.modules[q].delta_weight(), rtol=1e-4, atol=1e-6)
    assert res is not None


def test_export_of_a_peft_trained_adalora(tmp_path, ids):
    """PEFT trains and saves an AdaLoRA adapter; ours converts it; PEFT computes the same with both."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qtool.format.peft_adalora import export_lora
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_config("llama"))
    model = peft_adalora(base, tinit=2, tfinal=3, total_step=12, target_modules=["q_proj", "v_proj", "down_proj"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(12):
        x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(step))
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()
    model.save_pretrained(tmp_path / "peft-ada")
    report = export_lora(tmp_path / "peft-ada", tmp_path / "lora")
    assert sum(report["ranks"].values()) == 2 * 6  # target_r x modules, the rank-0 ones dropped
    base = model.unload()
    with torch.no_grad():
        ada = PeftModel.from_pretrained(base, tmp_path / "peft-ada")
        want = ada(ids).logits
        base = ada.unload()
        got = PeftModel.from_pretrained(base, tmp_path / "lora")(ids).logits
    assert rel(got, want) < 1e-6


def test_export_refuses_what_is_not_adalora(tmp_path):
    from qtool.format.peft_adapter import save_adapter

    save_adapter(tmp_path / "lora", {"model.layers.0.self_attn.q_proj": (torch.zeros(2, 64), torch.zeros(64, 2))},
                 rank=2, alpha=4, target_modules=["q_proj"])
    r = CliRunner().invoke(main, ["adapter", "export-lora", str(tmp_path / "lora"), str(tmp_path / "out")])
    assert r.exit_code == 2 and "is not an AdaLoRA adapter (peft_type 'LORA'" in r.output, r.output
    assert "loads in qtool merge and PEFT as it is" in r.output and not (tmp_path / "out").exists()
    # before torch is imported, and a broken adapter_config.json is named (not a traceback)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{not json")
    code = ("import sys\nfrom qtool.cli import main\ntry:\n    main()\nexcept SystemExit as e:\n"
            "    print('EXIT', e.code, 'torch' in sys.modules)")
    for args, needle in ((["export-lora", str(tmp_path / "lora"), str(tmp_path / "out")], "is not an AdaLoRA adapter"),
                         (["budget", str(tmp_path / "lora")], "is not an AdaLoRA adapter"),
                         (["budget", str(tmp_path / "bad")], "adapter_config.json: not a readable JSON file")):
        r = subprocess.run([sys.executable, "-c", code, "adapter", *args], capture_output=True, text=True, cwd=ROOT)
        assert "EXIT 2 False" in r.stdout and needle in r.stderr, (args, r.stdout, r.stderr)


def test_merge_of_an_adalora_adapter_names_the_export(saved, tiny_nf4, tmp_path):
    from qtool.merge.pipeline import merge

    with pytest.raises(InputError, match="qtool adapter export-lora ADALORA_DIR OUT"):
        merge(tiny_nf4, saved.out, tmp_path / "merged")


# ------------------------------------------------------------------------------------------------- budget
def test_budget_summary_table_and_heat_map(saved):
    from qtool.adapters.budget import heatmap_png, summarise

    ranks = {f"model.layers.{i}.{g}.{n}": (i + j) % 5 for i in range(3)
             for j, (g, n) in enumerate([("self_attn", "v_proj"), ("self_attn", "q_proj"), ("mlp", "down_proj")])}
    s = summarise(ranks, 4)
    assert s["module_types"] == ["q_proj", "v_proj", "down_proj"] and s["layers"] == [0, 1, 2]
    assert s["grid"] == [[1, 0, 2], [2, 1, 3], [3, 2, 4]] and s["final_budget"] == 18
    assert [t["rank"] for t in s["by_type"]] == [6, 3, 9] and [r["rank"] for r in s["by_layer"]] == [3, 6, 9]
    png, why = heatmap_png(s)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and why == ""
    r = CliRunner().invoke(main, ["adapter", "budget", str(saved.out), "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    assert got["modules"] == {p: int(m.kept.sum()) for p, m in saved.modules.items()}
    assert got["modules"][saved.dead] == 0 and got["module_types"] == TARGETS
    text = CliRunner().invoke(main, ["adapter", "budget", str(saved.out)]).output
    kept = sum(int(m.kept.sum()) for m in saved.modules.values())
    assert f"AdaLoRA rank budget: {kept} of 56 triplets kept" in text and "down" in text


# ------------------------------------------------------------------------------------------------- planner
def test_plan_counts_p_lambda_q_and_the_emas():
    from transformers import AutoModelForCausalLM

    from qtool.arch import shape_from_config
    from qtool.plan.planner import Settings, plan
    from qtool.plan.resident import tensors_alloc
    from tests.conftest import tiny_config

    cfg = tiny_config("llama")
    peft = peft_adalora(AutoModelForCausalLM.from_config(cfg), init_r=6)
    trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    shape = shape_from_config(cfg.to_dict())
    p = plan(shape, Settings(method="adalora", rank=6, target_rank=2, targets="all-linear", seq_len=64))
    assert p.n_trainable == trainable
    rows = {r.name: r.bytes for r in p.rows}
    numels = [n for m in adalora_modules_shapes(peft) for n in m]
    assert rows["AdaLoRA importance EMAs (sensitivity, uncertainty; fp32)"] == 2 * tensors_alloc(numels, 4)
    lora = plan(shape, Settings(rank=6, targets="all-linear", seq_len=64))
    assert p.peak_allocated_bytes > lora.peak_allocated_bytes


def adalora_modules_shapes(peft):
    return [[m.lora_A["default"].numel(), m.lora_E["default"].numel(), m.lora_B["default"].numel()]
            for m in peft.modules() if hasattr(m, "lora_E") and "default" in m.lora_E]


def test_plan_cli_adalora_flags_without_torch():
    code = ("import sys\nfrom qtool.cli import main\ntry:\n    main()\nexcept SystemExit as e:\n"
            "    print('EXIT', e.code, 'torch' in sys.modules)")
    ok = subprocess.run([sys.executable, "-c", code, "plan", "llama-2-7b", "--method", "adalora", "--init-rank",
                         "12", "--target-rank", "8", "--json"], capture_output=True, text=True, cwd=ROOT)
    assert "EXIT 0 False" in ok.stdout
    plan_json = json.loads(ok.stdout[:ok.stdout.rindex("EXIT")])
    assert any(r["name"].startswith("AdaLoRA importance EMAs") for r in plan_json["rows"])
    for args, needle in ((["--init-rank", "4", "--target-rank", "8"], "--target-rank 8 is above --init-rank 4"),
                         (["--rank", "8"], "--rank is LoRA's"), (["--method", "lora", "--init-rank", "4"],
                                                                  "--init-rank is an AdaLoRA setting")):
        args = (["--method", "adalora"] if "--method" not in args else []) + args
        r = subprocess.run([sys.executable, "-c", code, "plan", "llama-2-7b", *args], capture_output=True,
                           text=True, cwd=ROOT)
        assert "EXIT 2 False" in r.stdout and needle in r.stderr, (args, r.stdout, r.stderr)


# ------------------------------------------------------------------------------------------------ bad input
def test_settings_problems():
    def problems(**kw):
        return TrainSettings(steps=10, method="adalora", **kw).problems()

    assert any("--target-rank 8 is above --init-rank 4" in p for p in problems(init_rank=4, target_rank=8))
    assert any("--tinit 5 + --tfinal 5 >= --steps 10" in p for p in problems(tinit=5, tfinal=5))
    assert any("--init symmetric: AdaLoRA has its own" in p for p in problems(init="symmetric"))
    assert any("give module names without =RANK" in p for p in problems(targets="q_proj=4"))
    assert any("--delta-t must be at least 1" in p for p in problems(delta_t=0))
    assert TrainSettings(tinit=3).problems() == ["--tinit is an AdaLoRA setting; add --method adalora (or leave it "
                                                 "out)"]
    assert problems() == [] and TrainSettings(steps=10, method="adalora").spec.rank == 12


def test_train_flag_errors_come_before_torch(tiny_nf4, tmp_path):
    data = tmp_path / "t.txt"
    data.write_text("hello world " * 200)
    code = ("import sys\nfrom qtool.cli import main\ntry:\n    main()\nexcept SystemExit as e:\n"
            "    print('EXIT', e.code, 'torch' in sys.modules)")
    for args, needle in ((["--method", "adalora", "--init-rank", "4", "--target-rank", "8"], "is above --init-rank"),
                         (["--method", "adalora", "--tinit", "5", "--tfinal", "5", "--steps", "10"],
                          "no step is left"),
                         (["--method", "adalora", "--rank", "8"], "--rank is LoRA's"),
                         (["--tfinal", "2"], "--tfinal is an AdaLoRA setting"),
                         (["--export", "lora", "--out", str(tmp_path / "o")], "--export lora converts an AdaLoRA"),
                         (["--method", "adalora", "--export", "lora"], "it needs --out")):
        r = subprocess.run([sys.executable, "-c", code, "train", str(tiny_nf4), "--data", str(data), *args],
                           capture_output=True, text=True, cwd=ROOT)
        assert "EXIT 2 False" in r.stdout and needle in r.stderr, (args, r.stdout, r.stderr)


# ----------------------------------------------------------------------------------------- SmolLM2 end to end
@pytest.mark.slow
def test_smollm2_cli_adalora_to_peft_and_export(smollm2_nf4_cpu, shakespeare_path, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qtool.format.peft_adalora import load_adalora

    out = tmp_path / "ada"
    r = CliRunner().invoke(main, ["train", str(smollm2_nf4_cpu), "--data", str(shakespeare_path), "--method",
                                  "adalora", "--init-rank", "4", "--target-rank", "2", "--tinit", "1", "--tfinal", "1",
                                  "--steps", "5", "--seq-len", "32", "--batch-size", "2", "--lr", "1e-2",
                                  "--targets", "q_proj,v_proj,down_proj", "--eval-blocks", "1", "--out", str(out),
                                  "--export", "lora", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output[r.output.index("{"):])
    assert res["lora_export"]["adapter"] == str(out / "lora") and res["lora_export"]["source"] == str(out)
    assert res["adalora"]["final_budget"] == 2 * 90 and (out / "adalora_budget.png").is_file()
    assert res["adalora"]["summary"]["module_types"] == ["q_proj", "v_proj", "down_proj"]
    # ours, rebuilt from the saved (pruned) tensors, against PEFT loading the same folder
    saved = load_adalora(out)
    ours = load_decoder(smollm2_nf4_cpu, AdapterSpec("q_proj,v_proj,down_proj", rank=4, alpha=32.0, method="adalora",
                                                      adalora=AdaLoRASchedule(target_rank=2)), **FP32)
    with torch.no_grad():
        for path, m in adalora_modules(ours).items():
            f = saved.modules[path]
            keep = torch.tensor(f.mask)
            m.kept.copy_(keep)
            m.lora_a[keep], m.lora_e[keep], m.lora_b[:, keep] = f.a, f.e, f.b
            m.lora_e[~keep] = 0
    import bitsandbytes as bnb

    hf = AutoModelForCausalLM.from_pretrained(smollm2_nf4_cpu, device_map="cpu").eval()
    for module in hf.modules():  # fp32 compute, like ours (the checkpoint says bf16)
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = torch.float32
    for p in hf.parameters():
        if p.dtype == torch.bfloat16:  # embeddings and norms; the packed NF4 weights are uint8
            p.data = p.data.float()
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = hf(ids).logits.float()
        peft = PeftModel.from_pretrained(hf, out)
        theirs = peft(ids).logits.float()
        mine = ours(ids).float()
    assert rel(mine, theirs) < 1e-4 and rel(theirs, base) > 1e-3, (rel(mine, theirs), rel(theirs, base))
    with torch.no_grad():  # train --export lora wrote OUT/lora
        base_model = peft.unload()
        lora = PeftModel.from_pretrained(base_model, out / "lora")(ids).logits.float()
    assert rel(lora, theirs) < 1e-5, rel(lora, theirs)


# ------------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CUDA-graph trainer)")
def test_cuda_graph_path_masks_in_place_like_the_eager_path():
    from qtool.arch import known_shape
    from qtool.train.load import random_decoder
    from qtool.train.settings import decoder_shape
    from bench.gpu_worker import hf_config_dict

    shape = decoder_shape(hf_config_dict(known_shape("smollm2-135m")))
    gen = torch.Generator().manual_seed(0)
    blocks = Blocks(torch.randint(0, shape.vocab, (16, 256), generator=gen),
                    torch.randint(0, shape.vocab, (2, 256), generator=gen), 0)
    results = {}
    for graphs in (True, False):
        st = TrainSettings(steps=8, seq_len=256, method="adalora", init_rank=6, target_rank=2, tinit=1, tfinal=2,
                           targets="all-linear", cuda_graphs=graphs, lr=1e-3)
        model = random_decoder(shape, torch.device("cuda"), spec=st.spec)
        results[graphs] = train(model, blocks, st, device=torch.device("cuda"))
        for m in adalora_modules(model).values():
            assert torch.all(m.lora_e.detach()[~m.kept] == 0)
    assert results[True].cuda_graph == "on" and results[False].cuda_graph == "off"
    assert results[True].adalora["final_budget"] == results[False].adalora["final_budget"] == 2 * 210
    torch.testing.assert_close(torch.tensor(results[True].losses), torch.tensor(results[False].losses), rtol=2e-2,
                               atol=0)


@pytest.mark.parametrize("seq_len,rank", [(256, 8), (16, 96)])
def test_planned_transient_matches_allocation_trace(seq_len, rank):
    """One eager AdaLoRA step of the real trainer code on the CPU (loss + regulariser, backward, importance update,
    SGD step, masking) traced like tests/test_plan.py does for LoRA: activation-bound (long sequence, low rank) and
    bound by the importance update (one fp32 per trainable element beside the gradients: short sequence, high rank)."""
    import warnings

    from qtool.arch import shape_from_config
    from qtool.plan.planner import Settings, plan
    from qtool.train.load import random_decoder
    from qtool.train.settings import decoder_shape
    from tests.test_plan import _traced_peak

    warnings.filterwarnings("ignore")
    config = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 2000}
    spec = AdapterSpec("all-linear", rank=rank, alpha=2.0 * rank, method="adalora",
                       adalora=AdaLoRASchedule(target_rank=rank // 2, total_steps=100))
    model = random_decoder(decoder_shape(config), "cpu", spec=spec)
    model.train()
    allocator = RankAllocator(adalora_modules(model), spec.adalora)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 2000, (1, seq_len))

    def step():
        (model.loss(ids) + allocator.regulariser()).backward()
        allocator.observe(5)
        optimizer.step()
        allocator.allocate(5)
        optimizer.zero_grad(set_to_none=True)

    traced = _traced_peak(step)
    p = plan(shape_from_config(config), Settings(method="adalora", rank=rank, target_rank=rank // 2,
                                                 targets="all-linear", seq_len=seq_len, optimizer="sgd",
                                                 grad_checkpointing=False, device="cpu"))
    existing = ("NF4", "embeddings", "lm_head", "norms", "AdaLoRA P, λ, Q", "AdaLoRA importance EMAs", "optimizer")
    planned = sum(r.bytes for r in p.rows if r.counter == "allocated" and not r.name.startswith(existing))
    print(f"planned {planned} traced {traced} ({(planned - traced) / traced:+.2%}, {p.peak_phase})")
    assert abs(planned - traced) / traced < 0.02, (planned, traced, p.peak_phase)
    assert (p.peak_phase == "AdaLoRA importance update") == (rank == 96), p.peak_phase

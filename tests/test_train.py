"""The trainer on the CPU with the real SmolLM2 fixture: transformers parity, B = 0 start, gradients, learning,
the PEFT round trip, and bad input. (GPU checks: tests/test_kernels_cuda.py, tests/test_fused_cuda.py.)"""
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from qtool.cli import main
from qtool.train.data import Blocks, pack
from qtool.errors import InputError, UsageError
from qtool.adapters.spec import AdapterSpec
from qtool.train.load import load_decoder
from qtool.train.recipe import TrainSettings, oom_error, run, train

ROOT = Path(__file__).resolve().parent.parent
FP32 = dict(compute_dtype=torch.float32)  # training tests: fast on every CPU (bf16 has no hardware path on AVX2)
ALL_LINEAR = AdapterSpec("all-linear", rank=8)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def hf_model(smollm2_nf4_cpu):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_nf4_cpu, device_map="cpu")
    return model.train()  # the training path: bitsandbytes dequantises and calls F.linear


def test_logits_equal_transformers_bnb_4bit(smollm2_nf4_cpu, hf_model, ids):
    ours = load_decoder(smollm2_nf4_cpu)
    with torch.no_grad():
        a, b = ours(ids), hf_model(ids).logits
    assert a.dtype == b.dtype == torch.bfloat16
    assert torch.equal(a, b)


def test_logits_close_to_transformers_eval_kernel(smollm2_nf4_cpu, ids):
    """In eval mode bitsandbytes repacks the weights for its CPU gemv kernel (for good), which rounds differently."""
    from transformers import AutoModelForCausalLM

    ours = load_decoder(smollm2_nf4_cpu)
    hf_eval = AutoModelForCausalLM.from_pretrained(smollm2_nf4_cpu, device_map="cpu").eval()
    with torch.no_grad():
        a, b = ours(ids).float(), hf_eval(ids).logits.float()
    assert ((a - b).norm() / b.norm()).item() < 2e-2
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8


def test_loss_equals_transformers_loss(smollm2_nf4_cpu, hf_model, ids):
    ours = load_decoder(smollm2_nf4_cpu)
    with torch.no_grad():
        assert ours.loss(ids).item() == pytest.approx(hf_model(ids, labels=ids).loss.item(), rel=1e-5)


def test_step0_is_the_base_model_and_only_lora_trains(smollm2_nf4_cpu, ids):
    base = load_decoder(smollm2_nf4_cpu, **FP32)
    model = load_decoder(smollm2_nf4_cpu, AdapterSpec("q_proj,v_proj,down_proj", rank=8), **FP32)
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))  # B = 0
    assert list(base.parameters()) == []  # frozen: NF4 tensors, embeddings and norms are buffers
    params = dict(model.named_parameters())
    assert params and all(n.endswith(("lora_a", "lora_b")) for n in params)
    assert sum(p.numel() for p in params.values()) == 30 * 8 * ((576 + 576) + (576 + 192) + (1536 + 576))
    model.grad_checkpointing = True
    model.loss(ids).backward()
    a_grads = [p.grad for n, p in params.items() if n.endswith("lora_a")]
    b_grads = [p.grad for n, p in params.items() if n.endswith("lora_b")]
    assert all(g is not None for g in a_grads + b_grads)
    assert all(torch.count_nonzero(g) == 0 for g in a_grads)  # B = 0: no gradient reaches A at step 0
    assert all(torch.count_nonzero(g) > 0 for g in b_grads)


def test_gradient_checkpointing_does_not_change_gradients(smollm2_nf4_cpu, ids):
    grads = []
    for gc in (False, True):
        model = load_decoder(smollm2_nf4_cpu, AdapterSpec(rank=4), seed=3, **FP32)
        for m in model.lora_modules().values():
            torch.nn.init.normal_(m.lora_b, std=0.01, generator=torch.Generator().manual_seed(1))
        model.grad_checkpointing = gc
        model.loss(ids).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.equal(grads[0], grads[1])


def test_training_lowers_held_out_loss_and_is_deterministic(smollm2_nf4_cpu, shakespeare_path):
    from transformers import AutoTokenizer

    blocks = pack(shakespeare_path, AutoTokenizer.from_pretrained(smollm2_nf4_cpu), 64, max_eval_blocks=4)
    model = load_decoder(smollm2_nf4_cpu, ALL_LINEAR, **FP32)
    with torch.no_grad():
        before = model.loss(blocks.eval).item()
    st = TrainSettings(steps=8, seq_len=64, batch_size=2, rank=8, lr=2e-3, targets="all-linear")
    res = train(model, blocks, st, device=torch.device("cpu"))
    assert res.eval_loss_before == pytest.approx(before, rel=1e-6)
    assert res.eval_loss < before - 0.05, (before, res.eval_loss)
    assert sum(res.losses[-3:]) < sum(res.losses[:3])
    again = [train(load_decoder(smollm2_nf4_cpu, ALL_LINEAR, **FP32), blocks,
                   TrainSettings(steps=2, seq_len=64, batch_size=2, rank=8, lr=2e-3), device=torch.device("cpu"))
             for _ in range(2)]
    assert again[0].losses == again[1].losses == res.losses[:2]  # fixed seed: the same loss list


def test_adapter_round_trips_through_peft(smollm2_nf4_cpu, shakespeare_path, hf_model, tmp_path, ids):
    from peft import PeftModel

    out = tmp_path / "adapter"
    res = run(smollm2_nf4_cpu, shakespeare_path, out,
              TrainSettings(steps=3, seq_len=32, batch_size=2, rank=4, lr=5e-3, targets="q_proj,v_proj,up_proj",
                            eval_blocks=1))
    assert res.adapter == out and (out / "adapter_model.safetensors").exists()
    log = json.loads((out / "qtool_train_log.json").read_text())
    assert log["losses"] == res.losses
    ours = load_decoder(smollm2_nf4_cpu, AdapterSpec("q_proj,v_proj,up_proj", rank=4))
    from qtool.format.peft_adapter import load_adapter

    adapter = load_adapter(out)
    for name, m in ours.lora_modules().items():
        m.lora_a.data.copy_(adapter.modules[name].a)
        m.lora_b.data.copy_(adapter.modules[name].b)
        assert m.scale == adapter.modules[name].scale
    peft = PeftModel.from_pretrained(hf_model, out)
    try:
        with torch.no_grad():
            a, b = ours(ids).float(), peft(ids).logits.float()
            for name, p in peft.named_parameters():  # PEFT's own bypass in bf16: the rounding floor
                if "lora_" in name:
                    p.data = p.data.bfloat16()
            c = peft(ids).logits.float()
        rel = lambda x, y: ((x - y).norm() / y.norm()).item()  # noqa: E731
        # our bypass runs in bf16, PEFT's in fp32: we differ from PEFT no more than PEFT in bf16 differs from itself
        assert rel(a, b) <= 2 * rel(c, b), (rel(a, b), rel(c, b))
        assert rel(a, b) < 0.05
    finally:
        peft.unload()


def test_lm_head_lora_training_lowers_the_loss(smollm2_nf4_cpu, shakespeare_path):
    """--targets q_proj,v_proj,lm_head on the real fixture: the head's update trains inside the chunked loss."""
    from transformers import AutoTokenizer

    blocks = pack(shakespeare_path, AutoTokenizer.from_pretrained(smollm2_nf4_cpu), 48, max_eval_blocks=2)
    spec = AdapterSpec("q_proj,v_proj,lm_head", rank=8)
    model = load_decoder(smollm2_nf4_cpu, spec, **FP32)
    assert model.head_adapter is not None and model.head_adapter.lora_b.shape == (49152, 8)
    st = TrainSettings(steps=5, seq_len=48, batch_size=2, rank=8, lr=3e-3, targets="q_proj,v_proj,lm_head")
    res = train(model, blocks, st, device=torch.device("cpu"))
    assert res.trainable_params == spec.n_trainable(model.shape)
    assert res.eval_loss < res.eval_loss_before - 0.05, (res.eval_loss_before, res.eval_loss)
    assert sum(res.losses[-2:]) < sum(res.losses[:2])
    assert model.head_adapter.lora_b.abs().sum() > 0  # B started at zero and moved


def test_tied_embedding_and_head_adapter_round_trips_through_peft(smollm2_nf4_cpu, shakespeare_path, hf_model,
                                                                    tmp_path, ids):
    """SmolLM2 ties its embeddings: embed_tokens + lm_head train as one shared adapter, which PEFT loads (its
    ensure_weight_tying) on the transformers bitsandbytes model with our logits."""
    from peft import PeftModel

    from qtool.adapters.attach import load_adapter_into

    out = tmp_path / "adapter"
    targets = "q_proj,embed_tokens,lm_head"
    run(smollm2_nf4_cpu, shakespeare_path, out, TrainSettings(steps=2, seq_len=32, batch_size=2, rank=4, lr=5e-3,
                                                              targets=targets, eval_blocks=1))
    assert json.loads((out / "adapter_config.json").read_text())["ensure_weight_tying"] is True
    ours = load_decoder(smollm2_nf4_cpu)
    load_adapter_into(ours, out, dtype=torch.bfloat16)
    assert ours.head_adapter.tied_to is ours.embed_adapter
    base = load_decoder(smollm2_nf4_cpu)
    peft = PeftModel.from_pretrained(hf_model, out)
    try:
        with torch.no_grad():
            a, b, c = ours(ids).float(), peft(ids).logits.float(), base(ids).float()
            for name, p in peft.named_parameters():  # PEFT's own bypass in bf16: the rounding floor
                if "lora_" in name:
                    p.data = p.data.bfloat16()
            d = peft(ids).logits.float()
        rel = lambda x, y: ((x - y).norm() / y.norm()).item()  # noqa: E731
        assert rel(a, b) <= 2 * rel(d, b) and rel(a, b) < 0.05 * rel(b, c), (rel(a, b), rel(d, b), rel(b, c))
    finally:
        peft.unload()


# ------------------------------------------------------------------------------------------------------ bad input
def test_unconverted_folder_says_convert_first(smollm2_dir, shakespeare_path):
    r = CliRunner().invoke(main, ["train", str(smollm2_dir), "--data", str(shakespeare_path), "--steps", "1"])
    assert r.exit_code != 0 and "convert it first" in r.output


def test_unsupported_architecture(tmp_path, smollm2_nf4_cpu, shakespeare_path):
    import shutil

    folder = tmp_path / "neox"
    shutil.copytree(smollm2_nf4_cpu, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="supported: llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3_text .*transformers \\+ PEFT/TRL"):
        run(folder, shakespeare_path, None, TrainSettings(steps=1))


def test_settings_problems_are_reported_together(smollm2_nf4_cpu, shakespeare_path):
    with pytest.raises(UsageError) as err:
        run(smollm2_nf4_cpu, shakespeare_path, None,
            TrainSettings(steps=0, seq_len=100_000, lr=-1, targets="q_proj,nope"))
    msg = str(err.value)
    for needle in ("--steps", "beyond the model's 8192 positions", "--lr", "nope"):
        assert needle in msg


def test_rank_larger_than_layer(smollm2_nf4_cpu, shakespeare_path):
    with pytest.raises(UsageError, match="rank 200 of k_proj exceeds min"):
        run(smollm2_nf4_cpu, shakespeare_path, None, TrainSettings(steps=1, seq_len=32, rank=200, targets="qkvo"))


@pytest.mark.parametrize("text,needle", [("", "empty"), (" \n\n ", "empty"), ("tiny", "block"), ('{"nottext": 1}\n', "field 'text'"),
                                         ("{broken\n", "not valid JSON")])
def test_bad_data_files(tmp_path, smollm2_nf4_cpu, text, needle):
    path = tmp_path / ("d.jsonl" if text.startswith("{") else "d.txt")
    path.write_text(text)
    with pytest.raises(InputError, match=needle):
        run(smollm2_nf4_cpu, path, None, TrainSettings(steps=1, seq_len=32))


def test_interrupted_run_leaves_no_adapter(smollm2_nf4_cpu, shakespeare_path, tmp_path, monkeypatch):
    import qtool.format.peft_adapter

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(qtool.format.peft_adapter, "write_text", boom)  # killed after the tensors, before the config
    out = tmp_path / "adapter"
    with pytest.raises(KeyboardInterrupt):
        run(smollm2_nf4_cpu, shakespeare_path, out, TrainSettings(steps=1, seq_len=32, eval_blocks=1))
    assert not out.exists() and not list(tmp_path.glob(".adapter*"))


def test_oom_message_names_the_item_and_what_fits(smollm2_nf4_cpu):
    cfg = json.loads((smollm2_nf4_cpu / "config.json").read_text())
    from qtool.arch import shape_from_config

    err = oom_error(shape_from_config(cfg), TrainSettings(seq_len=65536, batch_size=8), 8 * 2**30, smollm2_nf4_cpu)
    text = str(err)
    assert "largest item is" in text and "--seq-len" in text and "fit" in text


def test_train_cli_json(smollm2_nf4_cpu, shakespeare_path):
    r = CliRunner().invoke(main, ["train", str(smollm2_nf4_cpu), "--data", str(shakespeare_path), "--steps", "2",
                                  "--seq-len", "32", "--rank", "2", "--eval-blocks", "2", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output[r.output.index("{"):])
    assert len(out["losses"]) == 2 and out["optimizer"] == "adamw_torch"
    assert out["eval_loss_before"] > 0 and out["eval_loss"] > 0 and out["compute_dtype"]
    assert {row["name"] for row in out["plan_comparison"]} >= {"peak allocated", "NVML used"}


def test_blocks_pack_and_hold_out(smollm2_nf4_cpu, shakespeare_path):
    from transformers import AutoTokenizer

    b = pack(shakespeare_path, AutoTokenizer.from_pretrained(smollm2_nf4_cpu), 128, max_eval_blocks=5)
    assert isinstance(b, Blocks) and b.train.shape[1] == 128 and b.eval.shape == (5, 128)
    assert b.n_tokens >= (len(b.train) + 5) * 128


def test_seq_len_beyond_sliding_window_equals_transformers(tmp_path):
    """Mistral with an 8-token window at --seq-len 24: the window applied (a query sees itself and the 7 keys before
    it, as transformers' sliding_window_overlay), bit-equal to transformers' bnb-4bit model; a window one shorter or
    longer, or none, gives other logits (so the mask is really used, and its off-by-one is transformers')."""
    from dataclasses import replace

    from tests.test_train_archs import _build, _oracle

    folder = _build(tmp_path, "mistral", sliding_window=8)
    ours, hf = load_decoder(folder), _oracle(folder)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(ids).logits
        assert torch.equal(ours(ids), want)
        assert ours.loss(ids).item() == pytest.approx(hf(ids, labels=ids).loss.item(), rel=1e-5)
        for other in (7, 9, None):
            ours.shape = replace(ours.shape, sliding_window=other)
            assert not torch.equal(ours(ids), want), other


def test_prefix_beyond_sliding_window_is_refused(tmp_path, smollm2_nf4_cpu, shakespeare_path):
    import shutil

    folder = tmp_path / "mistral"
    shutil.copytree(smollm2_nf4_cpu, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="mistral", sliding_window=32)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match=r"prefix-len 8 \+ --seq-len 32 is beyond the model's sliding attention"):
        run(folder, shakespeare_path, None, TrainSettings(steps=1, seq_len=32, method="prefix", prefix_len=8))


# ------------------------------------------------------------------------------------- adapters, inits, loading
def test_symmetric_init_starts_at_the_base_and_exports_to_peft(smollm2_nf4_cpu, hf_model, ids, tmp_path):
    from peft import PeftModel

    from qtool.format.peft_adapter import load_adapter, save_trained

    base = load_decoder(smollm2_nf4_cpu)
    spec = AdapterSpec("q_proj,v_proj", rank=4, init="symmetric")
    model = load_decoder(smollm2_nf4_cpu, spec)
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))  # B0·A0 cancelled exactly, although A and B are non-zero
    fp32 = load_decoder(smollm2_nf4_cpu, spec, **FP32)
    fp32.loss(ids).backward()
    assert all(torch.count_nonzero(m.lora_a.grad) > 0 for m in fp32.lora_modules().values())
    with torch.no_grad():  # a trained-looking update, then the export must be the same function
        for m in model.lora_modules().values():
            m.lora_b.add_(torch.randn(m.lora_b.shape, generator=torch.Generator().manual_seed(1)) * 0.02)
    out = save_trained(tmp_path / "sym", model.lora_modules(), spec, base_dir=smollm2_nf4_cpu)
    saved = load_adapter(out)
    assert saved.config["r"] == 8 and saved.config["lora_alpha"] == 64
    for name, m in model.lora_modules().items():
        f = saved.modules[name]
        torch.testing.assert_close(f.scale * f.b @ f.a, m.delta_weight(), rtol=1e-4, atol=1e-7)
    peft = PeftModel.from_pretrained(hf_model, out)
    try:
        with torch.no_grad():
            a, b = model(ids).float(), peft(ids).logits.float()
        assert ((a - b).norm() / b.norm()).item() < 0.05
    finally:
        peft.unload()


def test_converter_inits_need_the_converted_initial_adapter(smollm2_nf4_cpu, shakespeare_path):
    with pytest.raises(UsageError, match=r"needs the 16-bit weights.*qtool convert SRC .* --lora-init pissa"):
        run(smollm2_nf4_cpu, shakespeare_path, None, TrainSettings(steps=1, seq_len=32, init="pissa"))


def test_compute_dtype_follows_the_cpu(monkeypatch):
    from qtool.train import load

    monkeypatch.setattr(load, "cpu_has_fast_bf16", lambda: False)
    assert load.compute_dtype_for("auto", torch.device("cpu"))[0] == torch.float32
    monkeypatch.setattr(load, "cpu_has_fast_bf16", lambda: True)
    assert load.compute_dtype_for("auto", torch.device("cpu"))[0] == torch.bfloat16
    assert load.compute_dtype_for("float16", torch.device("cpu"))[0] == torch.float16


def test_a_tensor_the_model_does_not_use_is_an_error(smollm2_nf4_cpu, tmp_path):
    import shutil

    from safetensors.torch import save_file

    folder = tmp_path / "extra"
    shutil.copytree(smollm2_nf4_cpu, folder)
    save_file({"model.layers.0.self_attn.o_proj.bias": torch.zeros(576, dtype=torch.bfloat16)},
              folder / "more.safetensors")
    with pytest.raises(InputError, match=r"has no place for.*model.layers.0.self_attn.o_proj.bias"):
        load_decoder(folder)


def test_attention_bias_reaches_o_proj(tmp_path):
    """Llama with ``attention_bias: true`` has biases on q, k, v and o: all four are used, as transformers does."""
    import transformers as tf
    from transformers import AutoModelForCausalLM

    from qtool.convert.pipeline import convert
    from tests.conftest import TINY

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(**TINY, num_key_value_heads=2, attention_bias=True, bos_token_id=1, eos_token_id=1)
    src = tmp_path / "src"
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.bias.normal_(0, 0.5)  # large enough to matter
    model.save_pretrained(src)
    out = tmp_path / "nf4"
    convert(src, out, target="cpu")
    ours = load_decoder(out)
    assert ours.layers[0].proj["o_proj"].bias is not None
    hf = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").train()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(ids), hf(ids).logits)


def test_flag_and_path_errors_come_before_torch_is_imported(smollm2_nf4_cpu, shakespeare_path, tmp_path):
    """`qtool train` reports bad flags and paths without importing torch (a user waited 17-30 s for such errors)."""
    import subprocess
    import sys

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code = ("import sys\nfrom qtool.cli import main\ntry:\n    main()\nexcept SystemExit as e:\n"
            "    print('EXIT', e.code, 'torch' in sys.modules, 'transformers' in sys.modules)")
    for args in (["--steps", "0"], ["--seq-len", "100000"], ["--targets", "nope"], ["--init", "loftq"]):
        proc = subprocess.run([sys.executable, "-c", code, "train", str(smollm2_nf4_cpu), "--data",
                               str(shakespeare_path), *args], capture_output=True, text=True, cwd=ROOT)
        assert "EXIT 2 False False" in proc.stdout, (args, proc.stdout, proc.stderr)
    proc = subprocess.run([sys.executable, "-c", code, "train", str(smollm2_nf4_cpu), "--data", str(empty)],
                          capture_output=True, text=True, cwd=ROOT)
    assert "EXIT 2 False False" in proc.stdout and "empty" in proc.stderr, (proc.stdout, proc.stderr)

"""`qtool convert --lora-init pissa|loftq`: the residual base, the initial adapter beside it, what transformers + PEFT
and our trainer make of the pair at step 0, verification, merging, and bad input. Tiny Llama (hidden 64)."""
import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from qtool.adapters.spec import AdapterSpec
from qtool.cli import main
from qtool.convert.pipeline import convert
from qtool.errors import InputError, UsageError
from qtool.format.adapter_meta import INIT_ADAPTER_DIR, read_qtool_meta
from qtool.format.peft_adapter import load_adapter
from qtool.train.load import load_decoder

SPEC = dict(rank=4, alpha=8.0, targets="all-linear")


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_llama_template):
    """The tiny Llama converted plain, with PiSSA and with LoftQ (5 iterations), all with --target cpu."""
    root = tmp_path_factory.mktemp("lora-init")
    out = {"plain": convert(tiny_llama_template, root / "plain", target="cpu").out}
    for name, spec in (("pissa", AdapterSpec(init="pissa", **SPEC)),
                       ("loftq", AdapterSpec(init="loftq", loftq_iter=5, **SPEC))):
        out[name] = convert(tiny_llama_template, root / name, target="cpu", lora_init=spec).out
    return out


def _report(folder):
    return json.loads((folder / "qtool_report.json").read_text())


@pytest.mark.parametrize("init", ["pissa", "loftq"])
def test_initial_adapter_and_report(converted, init):
    folder = converted[init]
    adapter = load_adapter(folder / INIT_ADAPTER_DIR)
    assert len(adapter.modules) == 2 * 7 and all(f.rank == 4 and f.scale == 2.0 for f in adapter.modules.values())
    meta = read_qtool_meta(folder / INIT_ADAPTER_DIR)
    assert meta["spec"]["init"] == init
    assert meta["base"]["shards_sha256"] == {n: s["sha256"] for n, s in _report(folder)["shards"].items()}
    li = _report(folder)["lora_init"]
    assert len(li["tensors"]) == 14 and li["spec"]["init"] == init
    # the point of both: the initial model is closer to W than plain NF4(W)
    assert li["mean_init_rel_error"] < li["mean_nf4_rel_error"]
    for t in li["tensors"]:
        assert t["init_rel_error"] < t["nf4_rel_error"], t


def test_loftq_one_iteration_keeps_the_plain_base(tiny_llama_template, converted, tmp_path):
    one = convert(tiny_llama_template, tmp_path / "loftq1", target="cpu",
                  lora_init=AdapterSpec(init="loftq", loftq_iter=1, **SPEC)).out
    assert (one / "model.safetensors").read_bytes() != b""  # a single shard for the tiny model
    from qtool.format.safetensors import read_header

    with read_header(one / "model.safetensors") as a, read_header(converted["plain"] / "model.safetensors") as b:
        for k in a.tensors:
            assert torch.equal(a.tensor(k), b.tensor(k)), k  # T = 1: Q = NF4(W), the QLoRA base


@pytest.mark.parametrize("init", ["pissa", "loftq"])
def test_step0_in_transformers_peft_and_qtool_is_the_same_model(converted, init):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = converted[init]
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    # both sides in fp32: transformers keeps a pre-quantised folder's other weights in its bnb compute dtype
    hf = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").train()
    for t in list(hf.parameters()) + list(hf.buffers()):  # not .float(): refused for quantised models
        if t.dtype.is_floating_point:
            t.data = t.data.float()
    for m in hf.modules():
        if hasattr(m, "compute_dtype"):
            m.compute_dtype = torch.float32
    peft = PeftModel.from_pretrained(hf, folder / INIT_ADAPTER_DIR)
    factors = {m: (f.a, f.b) for m, f in load_adapter(folder / INIT_ADAPTER_DIR).modules.items()}
    ours = load_decoder(folder, AdapterSpec(init=init, **SPEC), compute_dtype=torch.float32, initial=factors)
    with torch.no_grad():
        a, b = ours(ids), peft(ids).logits
    assert ((a - b).norm() / b.norm()).item() < 1e-5


def test_train_from_pissa_then_merge_onto_the_residual_base(converted, tmp_path):
    from qtool.merge.pipeline import merge
    from qtool.train.recipe import TrainSettings, run

    folder = tmp_path / "pissa"
    shutil.copytree(converted["pissa"], folder)
    _word_tokenizer().save_pretrained(folder)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"t{i % 50}" for i in range(4000)))
    st = TrainSettings(steps=2, seq_len=16, init="pissa", lr=1e-3, eval_blocks=1, **SPEC)
    res = run(folder, text, tmp_path / "adapter", st)
    assert res.eval_loss_before > 0 and (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    merged = merge(folder, tmp_path / "adapter", tmp_path / "merged", dtype="fp32")
    assert merged.verification["passed"], merged.verification
    with pytest.raises(InputError, match="trained with --init pissa"):  # not onto the 16-bit model
        merge(_source(converted["pissa"]), tmp_path / "adapter", tmp_path / "merged-16")
    with pytest.raises(InputError, match="trained on another base"):  # not onto another NF4 conversion
        merge(converted["plain"], tmp_path / "adapter", tmp_path / "merged-plain")


def _word_tokenizer():
    """A real tokenizer for the tiny model's 256 ids: words t0..t255."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(256)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1")


def _source(folder):
    from pathlib import Path

    return Path(_report(folder)["settings"]["source"])


def test_train_refuses_other_settings_than_the_conversion(converted, tmp_path):
    from qtool.train.recipe import TrainSettings, run

    text = tmp_path / "t.txt"
    text.write_text("word " * 2000)
    with pytest.raises(UsageError, match=r"--rank 8 \(the folder was converted with 4\)"):
        run(converted["loftq"], text, None, TrainSettings(steps=1, seq_len=16, init="loftq", rank=8, alpha=8.0,
                                                          targets="all-linear"))


@pytest.mark.parametrize("init", ["pissa", "loftq"])
def test_verify_checks_the_initial_model_against_the_source(converted, init, tiny_llama_template):
    r = CliRunner().invoke(main, ["verify", str(converted[init]), "--source", str(tiny_llama_template), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert "initialisation" in out["requantize_note"]


def test_verify_catches_a_damaged_initial_adapter(converted, tiny_llama_template, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "damaged"
    shutil.copytree(converted["pissa"], folder)
    path = folder / INIT_ADAPTER_DIR / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("q_proj.lora_B.weight"))
    tensors[key] = tensors[key] * 1.5
    save_file(tensors, path)
    r = CliRunner().invoke(main, ["verify", str(folder), "--source", str(tiny_llama_template)])
    assert r.exit_code == 4 and "initial model" in r.output, r.output


# ------------------------------------------------------------------------------------------------------ bad input
def test_lora_init_needs_the_16bit_model(converted, tmp_path):
    r = CliRunner().invoke(main, ["convert", str(converted["plain"]), str(tmp_path / "x"), "--lora-init", "pissa"])
    assert r.exit_code == 2 and "already quantised" in r.output and "16/32-bit" in r.output, r.output


def test_rank_beyond_a_module_is_refused_before_work(tiny_llama_template, tmp_path):
    r = CliRunner().invoke(main, ["convert", str(tiny_llama_template), str(tmp_path / "x"), "--lora-init", "loftq",
                                  "--rank", "40", "--targets", "all-linear"])
    assert r.exit_code == 2 and "exceeds min(in, out)" in r.output and not (tmp_path / "x").exists()


def test_nan_weight_names_the_tensor(tiny_llama_template, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "nan"
    shutil.copytree(tiny_llama_template, src)
    key = "model.layers.1.self_attn.q_proj.weight"
    shard = next(p for p in src.glob("*.safetensors") if key in load_file(p))
    tensors = load_file(shard)
    tensors[key][3, 5] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(InputError, match=key):
        convert(src, tmp_path / "out", lora_init=AdapterSpec(init="pissa", **SPEC))
    assert not (tmp_path / "out").exists()

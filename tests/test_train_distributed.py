"""Training over several processes (``qtool train --nproc N``: torchrun, FSDP2 on gloo; qtool.train.distributed and
qtool.train.sharded) against the same run in one process, on a tiny converted Llama with a character tokenizer: the
same losses and held-out losses, the same adapter files, each rank holding half of the model; and the checks and the
command line of --nproc.

Each two-process run takes ~10-20 s on the shared 2-core CPU, nearly all of it the processes importing torch and
transformers (the steps themselves take ~1 s); torchrun's ``--standalone`` rendezvous picks a free port, and every
run has a timeout.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from qtool.cli import main
from qtool.errors import UsageError
from qtool.train.recipe import TrainSettings, run

ROOT = Path(__file__).resolve().parent.parent
WORDS = "the of and to in is was he that it for on with as his by at from this had not are but which be".split()


@pytest.fixture(scope="module")
def tiny_nf4(tmp_path_factory) -> Path:
    """A tiny random Llama (hidden 64, 2 layers, vocab 256, untied) converted with bitsandbytes' CPU bytes, with a
    character-level tokenizer whose ids fit its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from conftest import save_tiny
    from qtool.convert.pipeline import convert

    folder = tmp_path_factory.mktemp("dist")
    src = save_tiny(folder / "src", "llama")
    (src / "tokenizer.json").unlink()
    vocab = {chr(i) if 32 <= i < 127 else f"<{i}>": i for i in range(256)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # one token per character
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<1>", unk_token="<0>").save_pretrained(src)
    convert(src, folder / "nf4", target="cpu")
    return folder / "nf4"


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    gen = torch.Generator().manual_seed(0)
    words = [WORDS[i] for i in torch.randint(0, len(WORDS), (6000,), generator=gen).tolist()]
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text(" ".join(words))
    return path


def _train_in_processes(nproc: int, model: Path, data: Path, out: Path, flags: list[str]) -> dict:
    """``qtool train ... --nproc N --json`` as a user runs it; returns the JSON rank 0 printed (the only stdout)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "qtool", "train", str(model), "--data", str(data), "--out", str(out), "--device", "cpu",
           "--json", "--nproc", str(nproc), *flags]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-6000:]
    return json.loads(done.stdout)


def _train_here(model: Path, data: Path, out: Path, flags: list[str]) -> dict:
    r = CliRunner().invoke(main, ["train", str(model), "--data", str(data), "--out", str(out), "--device", "cpu",
                                  "--json", *flags])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def _assert_same_adapter(one: Path, many: Path, rel: float, adam_step_bound: float | None = None) -> None:
    """The same files; JSON configs byte for byte; every tensor within ``rel`` of its largest value. With
    ``adam_step_bound`` (AdamW: what its updates can move an element in all, ~2 x steps x lr): each tensor's mean
    difference within ``rel`` of its mean magnitude and no element further apart than the bound — Adam normalises each
    gradient by its own magnitude, so the summation order changes near-zero-gradient elements by up to a step."""
    from safetensors.torch import load_file

    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in many.iterdir())
    for name in names:
        if name.endswith(".safetensors"):
            a, b = load_file(one / name), load_file(many / name)
            assert a.keys() == b.keys()
            for key, x in a.items():
                assert x.dtype == b[key].dtype and x.shape == b[key].shape, key
                diff = (x - b[key]).abs()
                if adam_step_bound is None:
                    assert diff.max() <= rel * x.abs().max(), key
                else:
                    assert diff.mean() <= rel * x.abs().mean() and diff.max() <= adam_step_bound, \
                        (key, float(diff.mean() / x.abs().mean()), float(diff.max()))
        elif name != "qtool_train_log.json":  # the log holds timings
            assert (one / name).read_bytes() == (many / name).read_bytes(), name


def _assert_halves(result: dict) -> None:
    """Each rank holds its share of every parameter: the shards partition the model, about 1/N each (the last rows of
    a tensor whose rows do not divide evenly go to the first ranks)."""
    ranks = result["distributed"]["ranks"]
    assert [r["rank"] for r in ranks] == list(range(len(ranks)))
    total = ranks[0]["model_param_bytes"]
    assert sum(r["param_bytes"] for r in ranks) == total
    for r in ranks:
        assert r["param_bytes"] == pytest.approx(total / len(ranks), rel=0.01), ranks
        assert r["buffer_bytes"] < 1024  # only the RoPE table is replicated


def test_two_processes_train_what_one_does(tiny_nf4, text, tmp_path):
    """SGD: the update is the gradient itself, so the adapter shows the distributed arithmetic directly (gradients
    averaged by FSDP's reduce-scatter, shards loaded and gathered back) within fp32 rounding — not bit for bit: each
    rank sums its half of the tokens' gradients, then the two halves are added (another order of the same sum). The
    head's LoRA lives in the root group (the embedding and head), the layers' in their own; gradient accumulation;
    the held-out blocks (5) split into batches of 4 (shared by the ranks) and 1 (run whole on both)."""
    # fp32 on any CPU: "auto" picks bf16 where the CPU has bf16 matrix instructions, and bf16 rounding is not this
    # test's subject
    flags = ["--compute-dtype", "float32", "--steps", "3", "--seq-len", "32", "--batch-size", "4", "--grad-accum", "2",
             "--lr", "0.2",
             "--optimizer", "sgd", "--max-grad-norm", "0", "--targets", "all-linear,lm_head", "--eval-blocks", "5"]
    one = _train_here(tiny_nf4, text, tmp_path / "one", flags)
    two = _train_in_processes(2, tiny_nf4, text, tmp_path / "two", flags)
    print("losses", one["losses"], two["losses"], "held-out", one["eval_loss"], two["eval_loss"])
    assert one["eval_loss"] < one["eval_loss_before"] - 0.3  # it trains
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert two["eval_loss_before"] == pytest.approx(one["eval_loss_before"], rel=1e-6)
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)
    assert two["distributed"]["world_size"] == 2 and two["distributed"]["backend"] == "gloo"
    assert two["cuda_graph"] == "off" and two["plan_comparison"] == []
    _assert_same_adapter(tmp_path / "one", tmp_path / "two", rel=1e-5)
    _assert_halves(two)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # written once, no partial folder left


@pytest.mark.slow  # ~25-35 s on the shared 2-core CPU: both processes dequantise every SmolLM2 weight per product
def test_smollm2_over_two_processes_with_adamw_and_the_symmetric_init(smollm2_nf4_cpu, shakespeare_path, tmp_path):
    """The real fixture (tied embedding and head), the default optimizer (torch AdamW on the DTensor shards) and the
    symmetric init, whose frozen offsets are sharded like the factors and gathered back for the rank-2r PEFT export.
    Adam divides each gradient by its own running magnitude (plus eps = 1e-8), which enlarges the rounding of
    near-zero gradients up to a step (lr) per element: each tensor agrees on average within 1e-3 of its mean
    magnitude and no element moves more than 2 x steps x lr (largest measured: 4.4e-5 to 8.9e-5), the losses to
    fp32 rounding. No process holds the whole model: each
    rank's resident memory grows by its half and a few MB while loading (measured: 96 and 92 MB for shards of 88 MB of
    the 176 MB model; one process loading it all grows by ~188 MB)."""
    flags = ["--compute-dtype", "float32", "--steps", "2", "--seq-len", "32", "--batch-size", "2", "--lr", "2e-3",
             "--targets", "q_proj,v_proj", "--init", "symmetric", "--eval-blocks", "2"]  # fp32 on any CPU (above)
    text = tmp_path / "plays.txt"
    text.write_bytes(shakespeare_path.read_bytes()[:60_000])  # every process tokenises all of it: keep it short
    one = _train_here(smollm2_nf4_cpu, text, tmp_path / "one", flags)
    two = _train_in_processes(2, smollm2_nf4_cpu, text, tmp_path / "two", flags)
    assert two["optimizer"] == one["optimizer"] == "adamw_torch"
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)
    _assert_same_adapter(tmp_path / "one", tmp_path / "two", rel=1e-3, adam_step_bound=2 * 2 * 2e-3)
    _assert_halves(two)
    ranks = two["distributed"]["ranks"]
    print("resident growth while loading, MB:", [r["resident_growth_bytes"] / 1e6 for r in ranks],
          "shards:", [r["param_bytes"] / 1e6 for r in ranks], "model:", ranks[0]["model_param_bytes"] / 1e6)
    for r in ranks:  # a full copy would be >= model_param_bytes
        assert r["param_bytes"] <= r["resident_growth_bytes"] < 0.75 * r["model_param_bytes"], ranks


# ----------------------------------------------------------------------------------- checks and the command line
@pytest.mark.parametrize("flags, needle", [
    (["--nproc", "2", "--batch-size", "3"], "give a multiple of 2 (e.g. --batch-size 4)"),
    (["--nproc", "2", "--batch-size", "2", "--method", "adalora"], "--method adalora with --nproc 2"),
    (["--nproc", "2", "--batch-size", "2", "--method", "prefix"], "--method prefix with --nproc 2"),
    (["--nproc", "2", "--batch-size", "2", "--offload-activations"], "--offload-activations with --nproc 2"),
    (["--nproc", "2", "--batch-size", "2", "--optimizer", "paged_adamw_8bit"], "untested on FSDP's DTensor shards"),
    (["--nproc", "0"], "--nproc must be at least 1"),
])
def test_nproc_flags_are_checked_before_any_process_starts(tiny_nf4, text, flags, needle):
    r = CliRunner().invoke(main, ["train", str(tiny_nf4), "--data", str(text), *flags])
    assert r.exit_code == 2 and needle in r.output, r.output


def test_nproc_under_torchrun_is_refused(tiny_nf4, text):
    r = CliRunner(env={"WORLD_SIZE": "2"}).invoke(main, ["train", str(tiny_nf4), "--data", str(text), "--nproc", "2"])
    assert r.exit_code == 2 and "already one of 2 that torchrun started" in r.output, r.output
    with pytest.raises(UsageError, match=r"settings for 2 process\(es\) \(nproc\) in a run of 1"):  # the library: --nproc without torchrun
        run(tiny_nf4, text, None, TrainSettings(nproc=2, batch_size=2))


def test_command_line_given_to_each_process_parses_back(tiny_nf4, text):
    from qtool.cli.train import command_line, train_cmd

    args = [str(tiny_nf4), "--data", str(text), "--steps", "3", "--no-grad-checkpointing", "--rslora", "--lr", "0.0005",
            "--targets", "q_proj=8,v_proj", "--max-grad-norm", "0", "--json", "--nproc", "2", "--out", "o"]
    ctx = train_cmd.make_context("train", list(args))
    again = command_line(ctx, leave_out=("nproc",))
    assert "--nproc" not in again and "--seed" not in again  # only what was given, less --nproc
    assert train_cmd.make_context("train", list(again)).params == {**ctx.params, "nproc": 1}


def test_cpu_dequantisation_leaves_its_inputs_resizable():
    """FSDP2 frees a gathered parameter by resizing its storage to 0; ``Tensor.numpy()`` forbids that for good."""
    from qtool.nf4 import codec

    made = codec.quantize(torch.randn(64, 96), 64, True, target="cpu")
    qw = codec.QuantizedWeight(made.packed.clone(), made.absmax.clone(), made.nested_absmax.clone(), made.offset,
                               made.shape, made.dtype, made.blocksize)  # fresh storages, as FSDP's gather makes
    ref = codec.dequantize(made)
    assert all(t.untyped_storage().resizable() for t in (qw.packed, qw.absmax, qw.nested_absmax))
    assert torch.equal(codec.dequantize(qw), ref)

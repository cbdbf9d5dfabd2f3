"""The converter end to end, judged by its consumers: transformers loads the output with no extra arguments, turns
exactly the modules into Linear4bit that its own quantise-on-load does, and computes identical logits (target cpu);
transformers' own save_pretrained of a quantised model has the same tensors, byte for byte. Plus the output
structure, the real SmolLM2 fixture, streaming memory, and SIGKILL at any point."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import ROOT, folder_digest, save_tiny, write_llama_checkpoint
from qtool.format import bnb_nf4 as layout
from qtool.convert.pipeline import convert
from qtool.errors import InputError
from qtool.convert.verify import REPORT_NAME, sha256_file, verify_folder

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

DTYPE = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def bnb_config(dtype=torch.bfloat16, double_quant=True, skip=None) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=skip)


def load(folder, **kwargs):
    """from_pretrained on the CPU; asserts that every key of the files was used and none was missing."""
    model, info = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", output_loading_info=True, **kwargs)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    return model.eval()


def linear4bit_names(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def logits(model, vocab=256, seed=0) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits.float()


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def assert_same_tensors(ours: Path, theirs: Path) -> None:
    a, b = folder_tensors(ours), folder_tensors(theirs)
    assert set(a) == set(b), (sorted(set(a) - set(b))[:5], sorted(set(b) - set(a))[:5])
    for k in a:
        assert (a[k].dtype, a[k].shape) == (b[k].dtype, b[k].shape), k
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k


# --------------------------------------------------------------------------------------------- every architecture
ARCHS = [("llama", False), ("llama", True), ("mistral", None), ("qwen2", True), ("qwen3", None), ("gemma2", None),
         ("gemma3", None), ("phi3", None), ("gpt_neox", None), ("gpt2", None), ("mixtral", None)]


@pytest.mark.parametrize("arch, tied", ARCHS, ids=[f"{a}-{'tied' if t else 'untied' if t is False else 'default'}"
                                                  for a, t in ARCHS])
def test_architecture_matches_transformers_quantise_on_load(tmp_path, arch, tied):
    src = save_tiny(tmp_path / "src", arch, tied=tied)
    assert len(list(src.glob("*.safetensors"))) > 1  # sharded input
    before = folder_digest(src)
    out = tmp_path / "nf4"
    result = convert(src, out, target="cpu", max_shard_bytes=50_000)
    assert folder_digest(src) == before
    assert len(result.shards) > 1 and (out / "model.safetensors.index.json").exists()

    ours = load(out)  # no extra arguments
    ref = load(src, quantization_config=bnb_config())
    names = linear4bit_names(ref)
    assert names and linear4bit_names(ours) == names
    assert {t.name for t in result.tensors if t.quantized} == {f"{n}.weight" for n in names}
    ref_saved = tmp_path / "ref-saved"
    ref.save_pretrained(ref_saved)  # before any forward: bnb's CPU forward repacks weights in place
    assert_same_tensors(out, ref_saved)
    assert json.loads((ref_saved / "config.json").read_text())["quantization_config"] == \
        json.loads((out / "config.json").read_text())["quantization_config"]
    expected = logits(ref)
    assert torch.equal(logits(ours), expected)

    # the default target reproduces bitsandbytes' CUDA bytes: loads the same way, logits close
    out_cuda = tmp_path / "nf4-cuda"
    convert(src, out_cuda)
    ours_cuda = load(out_cuda)
    assert linear4bit_names(ours_cuda) == names
    got = logits(ours_cuda)
    assert float((got - expected).norm() / expected.norm()) < 0.02


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_fp16_and_fp32_sources(tmp_path, dtype):
    src = save_tiny(tmp_path / "src", "llama", dtype=dtype)
    out = tmp_path / "nf4"
    convert(src, out, target="cpu")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["bnb_4bit_compute_dtype"] == dtype
    ref = load(src, quantization_config=bnb_config(DTYPE[dtype]))
    ref.save_pretrained(tmp_path / "ref-saved")
    assert_same_tensors(out, tmp_path / "ref-saved")
    assert torch.equal(logits(load(out)), logits(ref))


def test_skip_module(tmp_path, tiny_llama):
    out = tmp_path / "nf4"
    result = convert(tiny_llama, out, target="cpu", skip=["model.layers.1.mlp"])
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["llm_int8_skip_modules"] == ["lm_head", "model.layers.1.mlp"]
    assert result.settings["skip"] == ["model.layers.1.mlp"]
    ours = load(out)
    ref = load(tiny_llama, quantization_config=bnb_config(skip=["lm_head", "model.layers.1.mlp"]))
    assert linear4bit_names(ours) == linear4bit_names(ref) and len(linear4bit_names(ours)) == 11
    assert type(ours.model.layers[1].mlp.up_proj) is torch.nn.Linear
    assert ours.model.layers[1].mlp.up_proj.weight.dtype == torch.bfloat16
    assert torch.equal(logits(ours), logits(ref))


def test_no_double_quant(tmp_path, tiny_llama):
    out = tmp_path / "nf4"
    convert(tiny_llama, out, target="cpu", double_quant=False)
    tensors = folder_tensors(out)
    absmax = tensors["model.layers.0.mlp.up_proj.weight.absmax"]
    assert absmax.dtype == torch.float32 and not any(k.endswith("nested_absmax") for k in tensors)
    ref = load(tiny_llama, quantization_config=bnb_config(double_quant=False))
    ref.save_pretrained(tmp_path / "ref-saved")
    assert_same_tensors(out, tmp_path / "ref-saved")
    assert torch.equal(logits(load(out)), logits(ref))


def test_other_block_size_is_bit_exact_and_loads(tmp_path, tiny_llama):
    out = tmp_path / "nf4"
    convert(tiny_llama, out, target="cpu", blocksize=32)
    tensors = folder_tensors(out)
    src = folder_tensors(tiny_llama)
    for key in layout.quantized_keys(tensors):
        packed, qs = bnb.functional.quantize_4bit(src[key], blocksize=32, quant_type="nf4", compress_statistics=True)
        assert torch.equal(tensors[key], packed) and torch.equal(tensors[f"{key}.absmax"], qs.absmax), key
    model = load(out)
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama, device_map="cpu").eval()
    got, exact = logits(model), logits(plain)
    assert 0 < float((got - exact).norm() / exact.norm()) < 0.3  # NF4 error, not garbage


def test_output_structure_and_report(tmp_path, tiny_llama):
    out = tmp_path / "nf4"
    result = convert(tiny_llama, out, target="cpu", max_shard_bytes=60_000)
    # every other file of the source, byte for byte
    src_files, out_files = folder_digest(tiny_llama), folder_digest(out)
    for rel in ("tokenizer.json", "LICENSE", "extra/notes.txt", "generation_config.json"):
        assert out_files[rel] == src_files[rel], rel
    # config: the source's plus quantization_config
    cfg, src_cfg = json.loads((out / "config.json").read_text()), json.loads((tiny_llama / "config.json").read_text())
    assert {k: v for k, v in cfg.items() if k != "quantization_config"} == src_cfg
    assert cfg["quantization_config"] == layout.quantization_config(torch.bfloat16)
    # index: every key of every shard, in the shard that holds it
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) == len(result.shards) > 2
    held = {}
    for shard in shards:
        with safe_open(shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            held.update({k: shard.name for k in f.keys()})
        assert shard.stat().st_size <= 60_000 + 4096  # a shard may pass the limit by its header only
    assert index["weight_map"] == held
    # a quantised weight and its companions share a shard
    for key in layout.quantized_keys(held):
        assert {held[f"{key}.{s}"] for s in layout.AUX_SUFFIXES} == {held[key]}
    # the report
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["shards"] == {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in shards}
    assert report["n_quantized"] == 14 and len(report["tensors"]) == len(json.loads(
        (tiny_llama / "model.safetensors.index.json").read_text())["weight_map"])
    q = next(t for t in report["tensors"] if t["quantized"])
    assert 0.05 < q["rel_error"] < 0.2 and q["snr_db"] > 10 and q["nonfinite"] == 0 and q["max_abs_error"] > 0
    assert report["peak_rss_bytes"] > 0 and report["settings"]["target"] == "cpu"
    assert not [p for p in out.parent.iterdir() if ".qtool-partial-" in p.name]
    assert verify_folder(out, tiny_llama).ok


def test_conversion_is_deterministic(tmp_path, tiny_llama):
    convert(tiny_llama, tmp_path / "a")
    convert(tiny_llama, tmp_path / "b")
    a, b = folder_digest(tmp_path / "a"), folder_digest(tmp_path / "b")
    a.pop(REPORT_NAME), b.pop(REPORT_NAME)  # timings and paths
    assert a == b


def test_tensors_are_converted_in_parallel_within_the_memory_budget():
    """_in_order: results in input order, at most N_WORKERS jobs running and, beyond one, only within the byte
    budget; a failing job is raised in order, after the jobs in flight have finished."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from qtool.convert.pipeline import N_WORKERS, _in_order

    lock, running, seen = threading.Lock(), set(), []  # jobs running now; the set of running jobs at each start

    def job(g):
        with lock:
            running.add(g)
            seen.append(frozenset(running))
        time.sleep(0.01 * (g % 3))  # finish out of order
        with lock:
            running.discard(g)
        if g == 13:
            raise ValueError("job 13")
        return g * 10

    cost = lambda g: 450 if g == 7 else 100  # noqa: E731
    with ThreadPoolExecutor(N_WORKERS) as pool:
        got = []
        with pytest.raises(ValueError, match="job 13"):
            for g, r in _in_order(list(range(20)), job, pool, cost, budget=500):
                got.append((g, r))
                time.sleep(0.005)  # the caller's share of each job (release, bookkeeping)
    assert got == [(g, g * 10) for g in range(13)]
    assert max(map(len, seen)) == N_WORKERS  # in parallel...
    assert all(s == {7} for s in seen if 7 in s)  # ...but the job that takes most of the budget alone
    assert not running  # nothing still ran after the error was raised


def test_cuda_device_without_cuda_is_refused(tmp_path, tiny_llama):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present (covered by test_nf4_cuda.py)")
    with pytest.raises(InputError, match="--device cuda: no CUDA device"):
        convert(tiny_llama, tmp_path / "o", device="cuda")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- the real fixture
def test_smollm2_bit_exact_and_logits_identical(smollm2_dir, smollm2_nf4_cpu, shakespeare_path, tmp_path):
    """The real model: every tensor equals what transformers + bitsandbytes write for the same model (so every
    quantised weight is bit-identical to bitsandbytes' CPU quantize_4bit), and the logits are identical."""
    from transformers import AutoTokenizer

    ours = folder_tensors(smollm2_nf4_cpu)
    keys = layout.quantized_keys(ours)
    assert len(keys) == 30 * 7 and "lm_head.weight" not in ours  # tied embeddings: no head
    with safe_open(smollm2_dir / "model.safetensors", "pt") as src:  # directly against quantize_4bit, a few
        for key in (keys[0], keys[len(keys) // 2], keys[-1]):
            packed, qs = bnb.functional.quantize_4bit(src.get_tensor(key), blocksize=64, quant_type="nf4",
                                                      compress_statistics=True)
            theirs = {key: packed, **{f"{key}.{k}": v for k, v in qs.as_dict(packed=True).items()}}
            for name, t in theirs.items():
                assert torch.equal(ours[name].view(-1).view(torch.uint8), t.view(-1).view(torch.uint8)), name
    ref = load(smollm2_dir, quantization_config=bnb_config())  # bitsandbytes quantises every Linear on the CPU
    ours_model = load(smollm2_nf4_cpu)
    assert linear4bit_names(ours_model) == linear4bit_names(ref) and len(linear4bit_names(ref)) == 210
    ref.save_pretrained(tmp_path / "ref-saved")  # before any forward: bnb's CPU forward repacks weights in place
    assert_same_tensors(smollm2_nf4_cpu, tmp_path / "ref-saved")  # all of them, byte for byte

    tok = AutoTokenizer.from_pretrained(smollm2_nf4_cpu)  # the tokenizer files were copied
    ids = tok(shakespeare_path.read_text()[20_000:21_500], return_tensors="pt").input_ids[:, :96]
    with torch.no_grad():
        a, b = ours_model(ids).logits, ref(ids).logits
    assert torch.equal(a, b)
    acc = float((a[0, :-1].argmax(-1) == ids[0, 1:]).float().mean())
    assert acc > 0.25, acc  # and it still models text: next-token accuracy on Shakespeare well above chance


# ------------------------------------------------------------------------------------ memory and crash safety
def _qtool(*args, env=None) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from qtool.cli import main; main()", *map(str, args)]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


# Runs a command as its child and prints the child's exit code and ru_maxrss (KiB) as JSON on stderr. The hop matters:
# the kernel carries a process's RSS high-water mark across fork + exec, so a child spawned straight from pytest
# (hundreds of MB) would report at least pytest's RSS; a child of this small launcher starts from the launcher's.
_LAUNCHER = ("import json, os, subprocess, sys; p = subprocess.Popen(sys.argv[1:]); _, st, ru = os.wait4(p.pid, 0); "
             "print(json.dumps({'rc': os.waitstatus_to_exitcode(st), 'maxrss_kib': ru.ru_maxrss}), file=sys.stderr)")


@pytest.fixture(scope="session")
def synthetic_llama(tmp_path_factory) -> Path:
    """~830 MB fp16 Llama-shaped checkpoint in 5 shards; largest tensors 64 MiB (embedding, head)."""
    return write_llama_checkpoint(tmp_path_factory.mktemp("synthetic") / "llama", hidden=1024, intermediate=4096,
                                  n_layers=24, vocab=32768, dtype="float16", shard_bytes=200 * 2**20)


@pytest.mark.slow
def test_streaming_peak_rss(tmp_path, synthetic_llama):
    """Peak RSS of the converting process <= 2 x the largest tensor + 512 MiB, on a checkpoint larger than that."""
    input_bytes = sum(p.stat().st_size for p in synthetic_llama.glob("*.safetensors"))
    largest = 32768 * 1024 * 2
    bound = 2 * largest + 512 * 2**20
    assert input_bytes > bound  # a converter that held the model could not pass
    out = tmp_path / "nf4"
    cmd = [sys.executable, "-c", "from qtool.cli import main; main()", "convert", str(synthetic_llama), str(out),
           "--json", "--max-shard-size", "100MB"]
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], cwd=ROOT, capture_output=True, text=True)
    child = json.loads(proc.stderr.strip().splitlines()[-1])
    assert child["rc"] == 0, proc.stderr
    peak = child["maxrss_kib"] * 1024
    summary = json.loads(proc.stdout)
    assert summary["largest_tensor_bytes"] == largest
    assert summary["input_bytes"] == pytest.approx(input_bytes, rel=1e-3)  # tensor bytes, without headers
    assert 0.9 * peak <= summary["peak_rss_bytes"] <= peak  # the converter's own figure agrees
    print(f"peak RSS {peak / 2**20:.0f} MiB for {input_bytes / 2**20:.0f} MiB of input; bound {bound / 2**20:.0f} MiB")
    assert peak <= bound
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) > 0


def _partials(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.qtool-partial-")]


def _wait_for(condition, proc, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, "the run ended before the kill point: " + proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.002)


@pytest.mark.slow
def test_sigkill_at_any_point_leaves_nothing_finished(tmp_path, tiny_llama):
    """SIGKILL `qtool convert` during start-up, as the partial folder appears, mid-way through the tensors, and when
    everything is written but not yet renamed. OUT never exists afterwards (only hidden partial folders may), and a
    rerun succeeds, verifies, and writes the same bytes as an uninterrupted run."""
    out = tmp_path / "out"
    # The test hook (see qtool.convert.pipeline.TEST_SLEEP_ENV) sleeps after each tensor and before the final rename.
    env = {"QTOOL_TEST_SLEEP_AFTER_TENSOR": "0.1"}
    shard = lambda: [f for p in _partials(out) for f in p.glob("*.safetensors")]  # noqa: E731
    complete = lambda: [f for p in _partials(out) for f in p.glob("qtool_report.json")]  # noqa: E731
    kill_points = {
        "start-up": lambda proc: time.sleep(0.3),
        "partial folder appears": lambda proc: _wait_for(lambda: _partials(out), proc),
        "mid-way through the tensors": lambda proc: (_wait_for(shard, proc), time.sleep(0.5)),
        "complete, not yet renamed": lambda proc: _wait_for(complete, proc),
    }
    with_partial = []
    for what, wait in kill_points.items():
        # the previous kill's leftover would satisfy the next wait at once (before this run removes it and makes its
        # own): remove it here; the last one is left for the rerun below to clean up
        for p in _partials(out):
            shutil.rmtree(p)
        proc = _qtool("convert", tiny_llama, out, "--target", "cpu", env=env)
        wait(proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, what
        assert not out.exists(), what
        if _partials(out):
            with_partial.append(what)
    assert set(kill_points) - {"start-up"} <= set(with_partial), with_partial  # the kills after start-up hit a partial
    proc = _qtool("convert", tiny_llama, out, "--target", "cpu")
    assert proc.wait() == 0, proc.stderr.read().decode()
    assert not _partials(out)  # the rerun cleared what the killed runs left
    assert verify_folder(out, tiny_llama).ok
    convert(tiny_llama, tmp_path / "reference", target="cpu")
    a, b = folder_digest(out), folder_digest(tmp_path / "reference")
    a.pop(REPORT_NAME), b.pop(REPORT_NAME)
    assert a == b

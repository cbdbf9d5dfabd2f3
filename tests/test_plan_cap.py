"""An allocator cap (issue 11): the plan's verdict per optimizer (qtool.plan.cap), `qtool plan --allocator-cap`, and
bench/paged_oom.py's CPU path. The configuration is the one the bench runs on the H200."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from bench import paged_oom
from qtool.arch import known_shape
from qtool.cli import main
from qtool.errors import UsageError
from qtool.plan import cap
from qtool.plan import resident as items
from qtool.plan.planner import Settings, plan
from qtool.plan.fit import GPUS
from qtool.train.measure import plan_settings
from qtool.units import MiB

ROOT = Path(__file__).resolve().parents[1]
BENCH_ARGS = ("llama-3.2-1b", "--rank", "512", "--targets", "all-linear", "--seq-len", "128")


def bench_config():
    args = paged_oom.parser().parse_args([])
    return args, known_shape(args.model), plan_settings(paged_oom.train_settings(args, args.optimizer, "cuda"))


def test_the_bench_cap_lets_paged_state_fit_and_ooms_the_same_state_on_the_device():
    args, shape, settings = bench_config()
    assert (args.model, args.rank, args.targets, args.seq_len) == ("llama-3.2-1b", 512, "all-linear", 128)
    cap_bytes, checks = paged_oom.planned(args)
    assert cap_bytes == cap.separating_cap(shape, settings)
    unpaged, paged = checks["adamw_32bit"], checks["paged_adamw_32bit"]
    assert list(checks) == ["adamw_32bit", "paged_adamw_32bit"]
    assert (unpaged.verdict, paged.verdict) == ("oom", "fits")
    assert cap_bytes == (unpaged.peak_reserved_bytes + paged.peak_reserved_bytes) // 2
    # clear of the planner's reserved error on both sides: the paged run's reserved measured 19% over its plan on
    # the H200 (bench/paged_oom.py's docstring); the records' worst the other way is 12%
    assert cap_bytes >= 1.19 * paged.peak_reserved_bytes
    assert cap_bytes <= 0.88 * unpaged.peak_reserved_bytes
    # the managed memory is the optimizer state alone, far below an H200's
    assert paged.paged_bytes == unpaged.device_optimizer_bytes and paged.paged_bytes < 0.03 * GPUS["H200"] * MiB
    assert paged.device_optimizer_bytes == 0 and unpaged.paged_bytes == 0


def _state_bytes_moved(shape, st: Settings) -> tuple[int, int]:
    """(device bytes, managed bytes) of the fp32 Adam moments that bitsandbytes pages: two per LoRA tensor of
    >= PAGED_MIN_NUMEL elements, from the shape's Linear widths (not the planner's tensor list) — or two for the one
    flat buffer of qtool's CUDA-graph trainer (qtool/train/flat.py)."""
    ranks = st.module_ranks(shape)
    numels = [n for lin in shape.linears() if lin.name in ranks
              for n in (ranks[lin.name] * lin.n_in, lin.n_out * ranks[lin.name])] * shape.n_layers
    if st.flat_params:
        numels = [sum(numels)]
    moved = [n for n in numels if n >= items.PAGED_MIN_NUMEL]
    page = items.PAGED_GRANULARITY_BYTES
    return (sum(2 * items.alloc(4 * n) for n in moved), sum(2 * -(-4 * n // page) * page for n in moved))


@pytest.mark.parametrize("model,rank,targets,seq,flat", [
    ("llama-3.2-1b", 512, "all-linear", 128, True),   # the bench's: every tensor is paged
    ("llama-3.2-1b", 16, "all-linear", 512, True),    # one flat buffer: all of it paged
    ("llama-3.2-1b", 16, "all-linear", 512, False),   # A of k/v/q... (16 x 2048 = 32k) stay on the device
    ("llama-2-7b", 64, "qkvo", 2048, True),
])
@pytest.mark.parametrize("expandable", [False, True])
def test_the_reserved_difference_is_the_optimizer_state_that_paging_moves_out(model, rank, targets, seq, flat,
                                                                              expandable):
    shape = known_shape(model)
    st = Settings(rank=rank, targets=targets, seq_len=seq, optimizer="paged_adamw_32bit", flat_params=flat,
                  expandable_segments=expandable)
    unpaged, paged = cap.check_cap(shape, st, 1)
    device_bytes, managed_bytes = _state_bytes_moved(shape, st.check(shape))
    assert unpaged.peak_phase == paged.peak_phase
    # the replay's reserved moves by the moments: within 1 MiB with the default allocator (they are whole
    # segments), within one 20 MiB page with expandable segments (they share the pages around them)
    tolerance = 20 * MiB if expandable else MiB
    assert abs(unpaged.peak_reserved_bytes - paged.peak_reserved_bytes - device_bytes) < tolerance
    assert unpaged.peak_allocated_bytes - paged.peak_allocated_bytes == device_bytes
    assert unpaged.device_optimizer_bytes - paged.device_optimizer_bytes == device_bytes
    assert paged.paged_bytes == managed_bytes
    if not flat:  # the small A factors keep their state on the device, inside the cap
        assert paged.device_optimizer_bytes > 0 and device_bytes < unpaged.device_optimizer_bytes


def test_verdicts_at_the_boundaries():
    shape = known_shape("llama-3.2-1b")
    p = plan(shape, Settings(rank=512, targets="all-linear", seq_len=128, optimizer="adamw_32bit"))
    assert cap.verdict(p, p.peak_reserved_bytes) == "fits"
    assert cap.verdict(p, p.peak_reserved_bytes - 1) == "oom"
    assert cap.check(p, p.peak_allocated_bytes).live_tensors_fit  # an OOM of the allocator's cache alone
    assert not cap.check(p, p.peak_allocated_bytes - 1).live_tensors_fit
    assert cap.optimizers_to_compare("adamw_8bit") == ("adamw_8bit", "paged_adamw_8bit")
    assert cap.optimizers_to_compare("adamw_torch") == ("adamw_torch",)


def test_no_separating_cap_is_a_usage_error_that_says_what_to_change():
    with pytest.raises(UsageError, match="differ by less than 30%") as exc:
        cap.separating_cap(known_shape("llama-2-7b"), Settings(rank=8))
    assert "--rank" in exc.value.hint
    with pytest.raises(UsageError, match="no paged counterpart"):
        cap.separating_cap(known_shape("llama-2-7b"), Settings(optimizer="adamw_torch"))
    with pytest.raises(UsageError, match="CUDA setting"):
        cap.check_cap(known_shape("llama-2-7b"), replace(Settings(), device="cpu"), 10**9)
    with pytest.raises(UsageError, match="--allocator-cap '6 apples' is not a size"):
        cap.parse_cap("6 apples")


# --- qtool plan --allocator-cap ----------------------------------------------------------------------------------

def test_cli_prints_the_verdicts_and_that_paged_state_is_outside_the_cap():
    result = CliRunner().invoke(main, ["plan", *BENCH_ARGS, "--allocator-cap", "6GiB"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "--allocator-cap 6.44 GB = 6.00 GiB" in out
    line = {row.split()[0]: row for row in out.splitlines() if row.startswith(("adamw_32bit", "paged_adamw_32bit"))}
    assert "OOM expected" in line["adamw_32bit"] and "fits under the cap" in line["paged_adamw_32bit"]
    assert "outside the allocator cap" in out
    assert line["adamw_32bit"].rstrip().endswith("no") and line["paged_adamw_32bit"].rstrip().endswith("yes")
    cache = CliRunner().invoke(main, ["plan", *BENCH_ARGS, "--allocator-cap", "6.6GiB", "--optimizer", "adamw"])
    row = next(r for r in cache.stdout.splitlines() if r.startswith("adamw_32bit"))
    assert "OOM expected" in row and row.rstrip().endswith("yes")  # 6.56 GiB of live tensors, 6.65 reserved


def test_cli_json_carries_the_cap_checks():
    result = CliRunner().invoke(main, ["plan", *BENCH_ARGS, "--allocator-cap", "6GiB", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    block = data["allocator_cap"]
    assert block["cap_bytes"] == 6 * 2**30 and "managed memory" in block["note"]
    by_name = {c["optimizer"]: c for c in block["checks"]}
    assert by_name["adamw_32bit"]["verdict"] == "oom" and by_name["paged_adamw_32bit"]["verdict"] == "fits"
    assert by_name["adamw_32bit"]["live_tensors_fit"] is False
    assert by_name["paged_adamw_32bit"]["peak_reserved_bytes"] == data["peak_reserved_bytes"]  # the default optimizer
    assert by_name["paged_adamw_32bit"]["reserved_margin_bytes"] == 6 * 2**30 - data["peak_reserved_bytes"]
    assert "allocator_cap" not in json.loads(CliRunner().invoke(main, ["plan", *BENCH_ARGS, "--json"]).stdout)


@pytest.mark.parametrize("args,message", [
    (["--allocator-cap", "lots"], "error: --allocator-cap 'lots' is not a size"),
    (["--allocator-cap", "0"], "error: --allocator-cap '0' must be positive"),
    (["--allocator-cap", "6GiB", "--compare-methods"], "error: --compare-methods plans all four methods at LoRA's "
                                                      "budget: drop --allocator-cap"),
])
def test_cli_bad_cap_is_a_usage_error(args, message):
    result = CliRunner().invoke(main, ["plan", "llama-3.2-1b", *args])
    assert result.exit_code == 2 and result.stderr.startswith(message), result.stderr


# --- bench/paged_oom.py ------------------------------------------------------------------------------------------

def test_bench_dry_run_trains_both_runs_in_subprocesses_and_prints_a_table():
    done = subprocess.run([sys.executable, "bench/paged_oom.py", "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    runs = [json.loads(line) for line in lines if line.startswith("{")]
    assert [r["optimizer"] for r in runs] == ["adamw_32bit", "paged_adamw_32bit"]
    for r in runs:
        assert (r["outcome"], r["optimizer_run"], r["steps_done"]) == ("trained", "adamw_torch", 3)
        assert r["cap_bytes"] is None
        assert r["predicted"] == r["planned"]["verdict"] and r["as_predicted"] is None
    assert [r["predicted"] for r in runs] == ["oom", "fits"]
    assert any(line.startswith("optimizer") and "predicted" in line for line in lines)
    assert lines[-1] == "2/2 runs completed"


def test_bench_records_an_out_of_memory_as_an_outcome(monkeypatch):
    import torch

    import qtool.train.recipe as recipe

    def train_until_oom(model, blocks, st, *, device, progress=None, **_):
        progress(0, 7.0, 0.1)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr(recipe, "train", train_until_oom)
    job = {"config": {"model": "llama-3.2-1b", "targets": "qkvo", **paged_oom.DRY_RUN}, "optimizer": "adamw_32bit",
           "device": "cpu", "cap_bytes": None, "dry_run": True}
    out = paged_oom.measure(job)
    assert (out["outcome"], out["oom_phase"], out["steps_done"]) == ("oom", "train", 1)
    assert out["error"].startswith("CUDA out of memory") and out["paged_state_bytes"] is None

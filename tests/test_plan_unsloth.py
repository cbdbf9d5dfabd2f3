"""``qtool plan --profile unsloth`` against the Unsloth records of bench/results/unsloth_h200_2026-12-04.json (read
here, not copied), its refusals and its CLI path."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from qtool.arch import resolve_model
from qtool.cli import main
from qtool.errors import UsageError
from qtool.plan import unsloth
from qtool.plan.planner import Settings, plan
from qtool.plan.records import plan_for_record
from qtool.plan.resident import lora_tensors

RECORDS = Path(__file__).resolve().parents[1] / "bench" / "results" / "unsloth_h200_2026-12-04.json"
UNSLOTH = [r for r in json.loads(RECORDS.read_text()) if r["profile"] == "unsloth" and not r["error"]]
COUNTERS = {"peak_allocated_bytes": "peak_allocated_bytes", "peak_reserved_bytes": "peak_reserved_bytes",
            "peak_nvml_bytes": "nvml_used_bytes", "after_load_allocated_bytes": "after_load_allocated_bytes"}


def test_the_records_are_the_three_rows():
    assert sorted(r["id"] for r in UNSLOTH) == ["unsloth-llama-2-7b-s2048-b1-r16-qkvo-gc",
                                                "unsloth-llama-2-7b-s512-b1-r16-qkvo-gc",
                                                "unsloth-llama-3-8b-s2048-b1-r16-qkvo-gc"]


@pytest.mark.parametrize("record", UNSLOTH, ids=lambda r: r["id"])
def test_each_counter_within_5_percent(record):
    p = plan_for_record(record)
    assert p.n_trainable == record["trainable_params"]
    for planned, measured in COUNTERS.items():
        got, want = getattr(p, planned), record["measured"][measured]
        assert abs(got - want) <= 0.05 * want, (planned, got, want)


@pytest.mark.parametrize("record", UNSLOTH, ids=lambda r: r["id"])
def test_the_steps_own_bytes_within_8_percent(record):
    """Peak less after-load: the step's terms alone (Adam state, staging buffers, scratch, workspaces, the recomputed
    layer, the MLP's backward, the gradients), so that dropping any large one fails here."""
    p = plan_for_record(record)
    got = p.peak_allocated_bytes - p.after_load_allocated_bytes
    m = record["measured"]
    want = m["peak_allocated_bytes"] - m["after_load_allocated_bytes"]
    assert abs(got - want) <= 0.08 * want, (got, want)


@pytest.mark.parametrize("term", ["optimizer state", "recomputed layer's saved tensors", "MLP backward",
                                  "LoRA gradients of the other"])
def test_dropping_a_term_breaks_a_record(term):
    missed = []
    for record in UNSLOTH:
        p = plan_for_record(record)
        dropped = sum(r.bytes for r in p.rows if r.name.startswith(term) and r.counter == "allocated")
        assert dropped, term
        m = record["measured"]
        missed.append(abs(p.peak_allocated_bytes - dropped - m["peak_allocated_bytes"])
                      > 0.08 * (m["peak_allocated_bytes"] - m["after_load_allocated_bytes"]))
    assert any(missed)


@pytest.mark.parametrize("record", UNSLOTH, ids=lambda r: r["id"])
def test_checkpoint_buffers_match_what_unsloth_reported(record):
    p = plan_for_record(record)
    assert unsloth.gc_device_bytes(p.shape, p.settings) == record["unsloth"]["gc_device_buffer_bytes"]
    assert unsloth.gc_host_bytes(p.shape, p.settings) == record["unsloth"]["gc_host_buffer_bytes"]


def test_loss_chunk_rows():
    """fused_linear_rows: the whole sequence for Llama 2's 32,000 entries, 512 rows for Llama 3's 128,256."""
    st = Settings(profile="unsloth", seq_len=2048)
    assert unsloth.ce_rows(resolve_model("llama-2-7b"), st) == 2047
    assert unsloth.ce_rows(resolve_model("llama-3-8b"), st) == 512


def test_adam_state_is_on_the_device_not_paged():
    shape = resolve_model("llama-2-7b")
    st = Settings(profile="unsloth").check(shape)
    assert all(n < 100_000 for n in lora_tensors(shape, st))
    p = plan(shape, st)
    assert not any(r.where == "paged" for r in p.rows)
    assert any(r.name.startswith("optimizer state") and r.bytes == 2 * 4 * p.n_trainable for r in p.rows)


def test_short_sequences_keep_every_layer_input_on_the_gpu():
    shape = resolve_model("llama-2-7b")
    st = Settings(profile="unsloth", seq_len=256)  # 2 MiB inputs: not over Unsloth's threshold
    assert not unsloth.offloaded(shape, st) and unsloth.gc_device_bytes(shape, st) == 0
    assert any("checkpointed inputs of 32 layers" in r.name for r in plan(shape, st).rows)


@pytest.mark.parametrize("change, words", [
    ({"offload_activations": True}, "--offload-activations"),
    ({"targets": "all-linear"}, "q, k, v, o"),
    ({"method": "adalora"}, "--method adalora"),
    ({"gpus": 2, "batch_size": 2}, "--gpus 2"),
    ({"grad_checkpointing": False}, "--no-grad-checkpointing"),
    ({"device": "cpu"}, "--device cpu"),
    ({"loss": "full"}, "--loss full"),
    ({"compute_dtype": "float16"}, "--compute-dtype"),
    ({"attention": "flash"}, "--attention"),
])
def test_refusals(change, words):
    with pytest.raises(UsageError) as err:
        plan(resolve_model("llama-2-7b"), replace(Settings(profile="unsloth"), **change))
    assert words in str(err.value)


def test_non_llama_is_refused():
    with pytest.raises(UsageError, match="Llama"):
        plan(resolve_model("mistral-7b"), Settings(profile="unsloth"))


def test_cli_json_and_help():
    result = CliRunner().invoke(main, ["plan", "llama-2-7b", "--seq-len", "2048", "--profile", "unsloth", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    plan_json = out.get("plan", out)
    assert plan_json["settings"]["profile"] == "unsloth"
    record = next(r for r in UNSLOTH if r["settings"]["seq_len"] == 2048 and r["model"]["name"] == "llama-2-7b")
    assert abs(plan_json["peak_allocated_bytes"] - record["measured"]["peak_allocated_bytes"]) \
        <= 0.05 * record["measured"]["peak_allocated_bytes"]
    assert any(row["name"].startswith("Unsloth checkpoint staging") for row in plan_json["rows"])
    helped = CliRunner().invoke(main, ["plan", "--help"])
    assert "unsloth" in helped.stdout

"""`qtool plan` end to end: real output through CliRunner, JSON on stdout, errors, and start-up without torch."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from qtool.cli import main
from qtool.cli.plan import plan_cmd

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str):
    return CliRunner().invoke(main, ["plan", *args])


def test_bare_parameter_count_prints_the_fp16_contrast_and_the_assumed_shape():
    result = run("--params", "65e9", "--rank", "16")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "fp16 130.00 GB (121.07 GiB) -> 4-bit" in out
    assert "assumed the llama-1-65b shape" in out
    for word in ("NF4 weights and quantisation constants", "peak (during", "NVML used", "H200", "RTX 4090"):
        assert word in out


def test_json_is_one_object_on_stdout():
    result = CliRunner().invoke(main, ["plan", "-m", "llama-2-7b", "--profile", "hf", "--json", "--fit", "A100-40GB"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("rows", "peak_allocated_bytes", "peak_reserved_bytes", "peak_nvml_bytes", "fp16_weights_bytes",
                "nf4_weights_bytes", "fit_table", "fit"):
        assert key in data
    assert all({"name", "bytes", "where"} <= set(row) and row["where"] in ("device", "paged", "host")
               for row in data["rows"])
    assert data["fp16_weights_bytes"] == 2 * 6_738_415_616
    assert data["fit"]["knob"] == "seq_len" and data["fit"]["value"] > 0
    allocated = sum(r["bytes"] for r in data["rows"] if r["counter"] == "allocated")
    assert allocated == data["peak_allocated_bytes"]


def test_hf_prepare_profile_names_its_recipe():
    """--profile hf-prepare: the prepare-only loop, named in the notes, with the reentrant checkpoint's row; -h says
    which loop each hf profile is."""
    result = run("llama-2-7b", "--seq-len", "512", "--profile", "hf-prepare")
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "profile hf-prepare;" in out and "recomputed layer's output (reentrant checkpointing)" in out
    assert "- profile hf-prepare: transformers + PEFT + bitsandbytes in a loop right after " \
           "prepare_model_for_kbit_training(model)" in out
    data = json.loads(run("llama-2-7b", "--profile", "hf-prepare", "--json").stdout)
    assert data["settings"]["profile"] == "hf-prepare" and data["settings"]["loss"] == "full"
    assert any("reentrant" in note for note in data["notes"])
    helptext = " ".join(run("-h").stdout.split())
    assert "hf-prepare (the same stack in a loop right after prepare_model_for_kbit_training: reentrant " \
           "checkpointing)" in helptext


def test_fit_answers_the_largest_value():
    result = run("-m", "llama-2-13b", "--fit", "24GB", "--solve", "batch-size", "--seq-len", "1024")
    assert result.exit_code == 0, result.output
    assert "largest --batch-size that fits is" in result.output


def test_bad_input_reports_all_problems_and_fails():
    result = run("-m", "llama-2-7b", "--rank", "9999", "--optimizer", "adam", "--targets", "q_proj,gate")
    assert result.exit_code == 2
    assert "several problems" in result.output
    assert "exceeds min(in, out)" in result.output and "'adam'" in result.output and "'gate'" in result.output
    unknown = run("-m", "llama-2-8b")
    assert unknown.exit_code != 0 and "did you mean" in unknown.output
    assert run().exit_code != 0 and run("-m", "x", "--params", "7B").exit_code != 0
    assert "nor a known GPU" in run("--params", "7B", "--fit", "B200X").output


def test_inconsistent_config_and_bad_settings_are_reported_together(tmp_path):
    config = {"model_type": "llama", "hidden_size": 100, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 3, "num_key_value_heads": 2, "vocab_size": 100}
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = run(str(tmp_path), "--rank", "0", "--optimizer", "lion")
    assert result.exit_code == 2
    assert "does not divide hidden_size" in result.output and "'lion'" in result.output
    assert "--rank must be at least 1" in result.output


def test_help_and_model_list():
    assert "Examples:" in run("-h").output
    assert "llama-2-70b" in run("--list-models").output.split()


# What `qtool -h` and `qtool plan` must not import. Their start-up time is measured by bench/cli_startup.py, not
# here; tabulate is listed because its import (importlib.metadata, email, zipfile, ...) was a third of it.
HEAVY = ("torch", "numpy", "transformers", "huggingface_hub", "safetensors", "tabulate", "tqdm")


@pytest.mark.parametrize("args", [["-h"], ["plan", "-h"], ["plan", "--params", "65e9", "--rank", "16"],
                                  ["plan", "--list-models"], ["plan", "--list-models", "--json"],
                                  ["plan", "llama-3-8b", "--profile", "hf", "--fit", "24GiB", "--json"]])
def test_imports_no_torch_numpy_or_transformers(args):
    code = ("import sys; from qtool.cli import main; sys.argv = ['qtool'] + sys.argv[1:]\n"
            "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "[]", done.stderr


# --- defects reported by a user (issue 13) --------------------------------------------------------------------

def test_list_models_json_is_json_with_shapes():
    result = run("--list-models", "--json")
    assert result.exit_code == 0, result.output
    models = {m["name"]: m for m in json.loads(result.stdout)["models"]}
    assert set(models) >= {"llama-2-7b", "smollm2-135m", "mistral-7b"}
    assert models["llama-2-7b"]["n_params"] == 6_738_415_616 and models["llama-2-7b"]["hidden"] == 4096
    assert models["smollm2-135m"]["max_positions"] == 8192 and models["mistral-7b"]["sliding_window"] == 4096
    text = run("--list-models").stdout
    assert "llama-2-70b" in text.split() and "max positions" in text


@pytest.mark.parametrize("solve", ["rank", "seq-len", "batch-size"])
def test_solve_without_fit_is_a_usage_error(solve):
    result = run("-m", "llama-2-7b", "--solve", solve)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: --solve {solve} needs --fit") and "\n  -> add --fit" in result.stderr
    assert result.stdout == ""


def test_sizes_say_whether_they_are_gb_or_gib():
    decimal = run("-m", "llama-2-7b", "--fit", "24GB")
    assert decimal.exit_code == 0, decimal.output
    assert "--fit 24GB (24.00 GB = 22.35 GiB): largest --seq-len" in decimal.stdout
    binary = run("-m", "llama-2-7b", "--fit", "24Gi", "--json")
    assert json.loads(binary.stdout)["fit"]["capacity_bytes"] == 24 * 2**30
    gpu = run("-m", "llama-2-7b", "--fit", "rtx 4090").stdout
    assert "--fit RTX 4090 (25.76 GB = 23.99 GiB)" in gpu
    table = gpu.splitlines()
    head = next(line for line in table if line.startswith("GPU "))
    row = next(line for line in table if line.startswith("RTX 4090 "))
    assert head.split()[1:5] == ["memory", "GB", "memory", "GiB"] and row.split()[2:4] == ["25.76", "23.99"]
    assert "units: GB = 10^9 bytes, GiB = 2^30 bytes" in gpu
    assert "24GB is 24 x 10^9 bytes, 24GiB (or 24Gi) 24 x 2^30 bytes" in " ".join(run("-h").stdout.split())


def test_max_seq_len_is_capped_at_the_model_positions():
    result = run("-m", "smollm2-135m", "--fit", "H200")
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if line.startswith(("RTX 4090 ", "A100-", "H200 "))]
    assert len(rows) == 4 and all(row.endswith("8,192 (capped)") for row in rows), rows
    assert "(capped): 8,192 fits, and the search stops there, at the max_position_embeddings of smollm2-135m" \
        in result.stdout
    assert "largest --seq-len that fits is 8,192" in result.stdout and "max_position_embeddings" in \
        result.stdout.split("largest --seq-len")[1]
    data = json.loads(run("-m", "smollm2-135m", "--fit", "H200", "--json").stdout)
    assert {(g["max_seq_len"], g["max_seq_len_limited"]) for g in data["fit_table"]} == {(8192, True)}
    assert (data["fit"]["value"], data["fit"]["limited"]) == (8192, True)
    assert data["seq_len_limit"] == {"value": 8192, "reason": "max_position_embeddings of smollm2-135m"}
    window = run("-m", "mistral-7b", "--fit", "H200").stdout
    assert "32,768" in window and "max_position_embeddings of mistral-7b" in window  # the window is no limit now
    assert "builds one (seq x seq) boolean mask" in run("-m", "mistral-7b", "--seq-len", "8192").stdout
    roomy = json.loads(run("-m", "llama-3.1-8b", "--json").stdout)["fit_table"]  # 131,072 positions: memory binds
    assert not roomy[0]["max_seq_len_limited"] and roomy[0]["gpu"] == "RTX 4090" and roomy[0]["max_seq_len"] < 131072


def test_every_option_has_help():
    missing = [p.name for p in plan_cmd.params if isinstance(p, click.Option) and not p.help]
    assert not missing, f"options without help: {missing}"


def test_fixed_value_options_list_their_values_and_take_aliases():
    text = " ".join(run("-h").stdout.split())
    for flag, values in [("--profile", "qtool|hf|hf-prepare|unsloth"), ("--attention", "sdpa|flash|eager"),
                         ("--loss", "chunked|full"),
                         ("--compute-dtype", "bfloat16|float16|float32"),
                         ("--adapter-dtype", "bfloat16|float16|float32"),
                         ("--optimizer", "paged_adamw_32bit|adamw_32bit|paged_adamw_8bit|adamw_8bit|adamw_torch|sgd"),
                         ("--solve", "seq-len|batch-size|rank")]:
        assert f"{flag} [{values}]" in text, flag
    result = run("-m", "llama-2-7b", "--compute-dtype", "BF16", "--adapter-dtype", "fp16", "--optimizer", "AdamW",
                 "--attention", "flash_attention_2", "--profile", "HF", "--loss", "Full", "--json")
    assert result.exit_code == 0, result.output
    st = json.loads(result.stdout)["settings"]
    assert (st["compute_dtype"], st["adapter_dtype"], st["optimizer"], st["attention"], st["profile"], st["loss"]) == \
        ("bfloat16", "float16", "adamw_32bit", "flash", "hf", "full")
    bad = run("-m", "llama-2-7b", "--compute-dtype", "int4", "--rank", "0")  # reported with the other problems
    assert bad.exit_code == 2 and "several problems" in bad.stderr
    assert "--compute-dtype 'int4' is not one of bfloat16, float16, float32" in bad.stderr


# --- one error style -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,message,command", [
    (["plan", "--rank", "x"], "error: invalid value for '--rank' / '-r': 'x' is not a valid integer", "qtool plan"),
    (["plan", "--solve", "width", "--fit", "H200"], "error: invalid value for '--solve': 'width' is not one of",
     "qtool plan"),
    (["plan", "--rnak", "8"], "error: no such option '--rnak'", "qtool plan"),
    (["convert"], "error: missing argument 'SOURCE'", "qtool convert"),
    (["merge", "a"], "error: missing argument 'ADAPTER_DIR'", "qtool merge"),
    (["plann"], "error: no such command 'plann'", "qtool"),
])
def test_click_usage_errors_come_out_in_qtool_style(args, message, command):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert result.stderr.startswith(message), result.stderr
    assert result.stderr.rstrip().endswith(f"\n  -> see {command} -h"), result.stderr
    assert "Usage:" not in result.output and "Error:" not in result.output and "Try '" not in result.output


def test_qtool_errors_keep_their_message_hint_and_code():
    result = run("-m", "llama-2-8b")
    assert result.exit_code == 2 and result.stderr.startswith("error: unknown model name 'llama-2-8b'")
    assert "\n  -> did you mean" in result.stderr

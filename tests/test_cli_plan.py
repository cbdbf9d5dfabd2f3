"""`qtool plan` end to end: real output through CliRunner, JSON on stdout, errors, and start-up without torch."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from qtool.cli import main


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


def test_starts_fast_and_imports_no_torch():
    code = ("import sys; from click.testing import CliRunner; from qtool.cli import main; "
            "r = CliRunner().invoke(main, ['plan', '--params', '65e9', '--rank', '16']); assert r.exit_code == 0; "
            "print(sorted(m for m in ('torch', 'numpy', 'transformers', 'huggingface_hub') if m in sys.modules))")
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert imported.strip() == "[]"
    best = float("inf")
    for _ in range(3):  # best of three: the first run may pay for a cold file cache
        start = time.perf_counter()
        subprocess.run([str(Path(sys.executable).parent / "qtool"), "plan", "--params", "65e9", "--rank", "16"],
                       capture_output=True, check=True)
        best = min(best, time.perf_counter() - start)
    assert best < 0.5, f"qtool plan took {best:.2f} s"

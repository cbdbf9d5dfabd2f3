"""``qtool convert`` / ``qtool verify`` through click's CliRunner: real output, and every kind of bad input with a
clear error (naming the file or tensor, and the remedy), a non-zero exit code, and nothing lost: the input is never
touched and no output or partial folder is left behind."""
from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import folder_digest
from qtool.cli import main
from qtool.convert.verify import REPORT_NAME

INDEX = "model.safetensors.index.json"
SHARD1 = "model-00001-of-00003.safetensors"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or ".qtool-partial-" in p.name)


# ------------------------------------------------------------------------------------------------------ happy path
def test_convert_prints_a_table_and_a_summary(tmp_path, tiny_llama):
    out = tmp_path / "out"
    r = run("convert", tiny_llama, out, "--target", "cpu")
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[0].split()[:2] == ["worst", "tensors"]
    assert "14 tensors quantised, 7 copied, 0 flagged" in r.stdout
    assert f"wrote {out}" in r.stdout and (out / REPORT_NAME).exists()


def test_convert_json_parses(tmp_path, tiny_llama):
    r = run("convert", tiny_llama, tmp_path / "out", "--json", "--max-shard-size", "60KB", "--no-double-quant")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["n_quantized"] == 14 and len(summary["shards"]) > 1 and len(summary["worst"]) == 10
    assert summary["settings"]["double_quant"] is False and summary["settings"]["target"] == "cuda"
    assert summary["worst"][0]["rel_error"] >= summary["worst"][-1]["rel_error"]


def test_verify_command(tmp_path, tiny_llama):
    out = tmp_path / "out"
    assert run("convert", tiny_llama, out).exit_code == 0
    r = run("verify", out, "--source", tiny_llama)
    assert r.exit_code == 0, r.output
    assert "14 quantised weights, 14 re-quantised from the source, 1 of 1 shard hashes match, 0 problems" in r.stdout
    r = run("verify", out, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["ok"] is True
    from qtool.format.safetensors import read_header

    key = "model.layers.0.mlp.up_proj.weight"
    with read_header(out / "model.safetensors") as f:
        begin = f.tensors[key].begin  # a byte of a packed NF4 weight: any value is a valid code
    data = bytearray((out / "model.safetensors").read_bytes())
    data[begin + 10] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(data))
    r = run("verify", out)
    assert r.exit_code == 4
    assert "14 quantised weights, 1 of 1 shard hashes differ, 1 problem\n" in r.stdout
    assert "model.safetensors: sha256 differs from the report" in r.stderr
    r = run("verify", out, "--source", tiny_llama)
    assert r.exit_code == 4 and "1 of 1 shard hashes differ, 2 problems" in r.stdout
    assert f"{key}: 1 of {128 * 64 // 2} packed bytes differ" in r.stderr
    r = run("verify", out, "--json")
    summary = json.loads(r.stdout)
    assert r.exit_code == 4 and summary["ok"] is False
    assert summary["hashes_checked"] == 1 and summary["hashes_differ"] == 1


def test_verify_json_without_source_says_errors_were_not_measured(tmp_path, tiny_llama):
    out = tmp_path / "out"
    assert run("convert", tiny_llama, out).exit_code == 0
    summary = json.loads(run("verify", out, "--json").stdout)
    assert summary["source"] is None and summary["errors_measured"] is False
    assert len(summary["tensors"]) == 14
    for t in summary["tensors"]:  # not measured: null, never a made-up 0.0
        assert t["measured"] is False
        assert [t[k] for k in ("rel_error", "ideal_rel_error", "max_abs_error", "snr_db", "nonfinite")] == [None] * 5
    summary = json.loads(run("verify", out, "--json", "--source", tiny_llama).stdout)
    assert summary["source"] == str(tiny_llama) and summary["errors_measured"] is True
    assert summary["requantized"] == 14 and summary["requantize_note"] is None
    assert all(t["measured"] and 0.05 < t["rel_error"] < 0.2 for t in summary["tensors"])


def test_verify_of_a_folder_that_was_never_converted_is_an_input_error(tiny_llama):
    r = run("verify", tiny_llama)
    assert r.exit_code == 2, r.output
    assert "not an NF4 checkpoint" in r.stderr and "-> verify checks what `qtool convert` wrote" in r.stderr


def test_convert_a_cached_hub_id(tmp_path, tiny_llama, monkeypatch):
    from huggingface_hub import constants

    commit = "a" * 40
    root = tmp_path / "hub" / "models--acme--tiny"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_llama, root / "snapshots" / commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = run("convert", "acme/tiny", tmp_path / "out")
    assert r.exit_code == 0, r.output
    r = run("convert", "acme/absent", tmp_path / "out2")
    assert r.exit_code == 2
    assert "acme/absent: not a local folder and not in the Hugging Face cache (HF_HUB_OFFLINE is set)" in r.stderr
    assert "huggingface-cli download acme/absent" in r.stderr


def test_help_has_examples_and_exit_codes():
    for cmd, codes in (("convert", "0234"), ("verify", "024")):
        r = run(cmd, "-h")
        assert r.exit_code == 0 and "Examples:" in r.stdout and f"qtool {cmd} " in r.stdout
        listed = r.stdout.split("Exit codes:")[1].split("Options:")[0]
        assert "".join(line.split()[0] for line in listed.strip().splitlines()) == codes


# ------------------------------------------------------------------------------- argument checks before imports
_PROBE = ("import sys\nfrom qtool.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as exc:\n"
          "    code = exc.code\nprint('EXIT', code, sorted(m for m in ('torch', 'transformers', 'numpy') if m in "
          "sys.modules))")


def _probe(*args) -> tuple[int, list[str], str]:
    """Run the CLI in a fresh process; return its exit code, which of torch/transformers/numpy it imported, stderr."""
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.run([sys.executable, "-c", _PROBE, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    line = proc.stdout.strip().splitlines()[-1].split(" ", 2)
    return int(line[1]), eval(line[2]), proc.stderr  # noqa: S307 - our own probe's list literal


@pytest.mark.parametrize("case", ["missing source", "source is a file", "output exists", "output inside source",
                                  "bad block size", "bad device", "bad max-rel-error", "verify missing folder",
                                  "verify folder without config", "verify missing --source"])
def test_argument_and_path_errors_come_before_any_import(tmp_path, tiny_llama_template, case):
    """Every check of an argument or a path comes first: no torch (let alone transformers or a forked child), so the
    error is immediate (it took 12-32 s when it came after the selection)."""
    src, out = tiny_llama_template, tmp_path / "out"
    (tmp_path / "exists").mkdir()
    args, code, needle = {
        "missing source": (["convert", tmp_path / "nope", out], 2, "nope: no such folder"),
        "source is a file": (["convert", src / "config.json", out], 2, "is a file"),
        "output exists": (["convert", src, tmp_path / "exists"], 3, "already exists"),
        "output inside source": (["convert", src, src / "nf4", "--overwrite"], 3, "overlaps the input"),
        "bad block size": (["convert", src, out, "--block-size", "48"], 2, "--block-size 48"),
        "bad device": (["convert", src, out, "--device", "tpu"], 2, "--device 'tpu'"),
        "bad max-rel-error": (["convert", src, out, "--max-rel-error", "-1"], 2, "--max-rel-error -1.0"),
        "verify missing folder": (["verify", tmp_path / "nope"], 2, "no such folder"),
        "verify folder without config": (["verify", tmp_path / "exists"], 2, "no config.json"),
        "verify missing --source": (["verify", src, "--source", tmp_path / "nope"], 2, "no such folder"),
    }[case]
    exit_code, imported, stderr = _probe(*args)
    assert exit_code == code and needle in stderr, stderr
    assert imported == [], imported
    assert not out.exists() and not (src / "nf4").exists()


# -------------------------------------------------------------------------------------------------- bad input
def _rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def _by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _first_tensor(header: dict) -> str:
    return _by_offset(header)[0]


def _shift_second_tensor_back(header: dict) -> None:
    """Move the second tensor's data two bytes back, into the first one's."""
    entry = header[_by_offset(header)[1]]
    entry["data_offsets"] = [o - 2 for o in entry["data_offsets"]]


def _shift_second_tensor_forward(header: dict) -> None:
    """Move the second tensor's data two bytes on: a gap after the first one (and a tensor past the file's end, or
    overlapping the third: whichever, the file is refused)."""
    entry = header[_by_offset(header)[1]]
    entry["data_offsets"] = [o + 2 for o in entry["data_offsets"]]


def _set_weight(folder: Path, key: str, value: float) -> None:
    """Write ``value`` into element 3 of tensor ``key`` (bf16) in place."""
    shard = folder / json.loads((folder / INDEX).read_text())["weight_map"][key]
    raw = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    begin = json.loads(raw[8:8 + n])[key]["data_offsets"][0] + 8 + n
    raw[begin + 6:begin + 8] = torch.tensor([value], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()
    shard.write_bytes(bytes(raw))


def _pickle_only(folder: Path, name: str) -> None:
    for p in folder.glob("*.safetensors"):
        p.unlink()
    (folder / INDEX).unlink()
    (folder / name).write_bytes(pickle.dumps({"w": _Marker(folder.parent / "UNPICKLED")}))


class _Marker:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _index_entry(folder: Path, value: str) -> None:
    index = json.loads((folder / INDEX).read_text())
    index["weight_map"][sorted(index["weight_map"])[0]] = value
    (folder / INDEX).write_text(json.dumps(index))


# name -> (how to break the source folder, exit code, [strings the message must contain])
BAD_INPUTS = {
    "truncated file": (lambda f: (f / SHARD1).write_bytes((f / SHARD1).read_bytes()[:-5000]), 2,
                       [SHARD1, "fall outside the data section", "truncated", "-> the file is truncated"]),
    "truncated header": (lambda f: (f / SHARD1).write_bytes((f / SHARD1).read_bytes()[:5]), 2,
                         [SHARD1, "truncated file (5 bytes", "-> the download or copy was interrupted"]),
    "header length beyond the file": (
        lambda f: (f / SHARD1).write_bytes(struct.pack("<Q", 10**7) + (f / SHARD1).read_bytes()[8:]), 2,
        [SHARD1, "header length 10,000,000 bytes runs beyond the end of the file", "-> the file is truncated"]),
    "invalid header JSON": (
        lambda f: (f / SHARD1).write_bytes((f / SHARD1).read_bytes()[:8] + b"[" + (f / SHARD1).read_bytes()[9:]), 2,
        [SHARD1, "header is not valid JSON", "-> the file is corrupt"]),
    "out-of-bounds offsets": (
        lambda f: _rewrite_header(f / SHARD1, lambda h: h[_first_tensor(h)].update(data_offsets=[10**9, 10**9 + 128])),
        2, [SHARD1, "fall outside the data section", "->"]),
    "overlapping offsets": (lambda f: _rewrite_header(f / SHARD1, _shift_second_tensor_back), 2,
                            [SHARD1, "overlap in the data section", "-> the file is corrupt"]),
    "gap in the data section": (lambda f: _rewrite_header(f / SHARD1, _shift_second_tensor_forward), 2,
                                [SHARD1, "belong to no tensor", "contiguous", "-> the file is corrupt"]),
    "unknown dtype": (
        lambda f: _rewrite_header(f / SHARD1, lambda h: h[_first_tensor(h)].update(dtype="F4")), 2,
        [SHARD1, "has unknown dtype 'F4'", "-> qtool reads"]),
    "index names a missing shard": (lambda f: _index_entry(f, "model-00007-of-00009.safetensors"), 2,
                                    [INDEX, "model-00007-of-00009.safetensors", "missing", "-> the download is"]),
    "index path outside the folder": (lambda f: _index_entry(f, "../" + SHARD1), 2,
                                      [INDEX, "points outside the model folder", "->"]),
    "pickle .bin": (lambda f: _pickle_only(f, "pytorch_model.bin"), 2,
                    ["pytorch_model.bin", "never unpickles", "-> convert them to safetensors"]),
    "pickle .pt": (lambda f: _pickle_only(f, "model.pt"), 2, ["model.pt", "never unpickles", "->"]),
    "already quantised (config)": (
        lambda f: (f / "config.json").write_text(json.dumps({**json.loads((f / "config.json").read_text()),
                                                             "quantization_config": {"quant_method": "gptq"}})),
        2, ["already quantised (gptq", "-> convert the original 16/32-bit checkpoint"]),
    "NaN weight": (lambda f: _set_weight(f, "model.layers.1.mlp.up_proj.weight", float("nan")), 2,
                   ["'model.layers.1.mlp.up_proj.weight' holds 1 NaN/Inf values", "-> fix the source checkpoint"]),
    "Inf weight": (lambda f: _set_weight(f, "model.layers.0.self_attn.o_proj.weight", float("-inf")), 2,
                   ["'model.layers.0.self_attn.o_proj.weight' holds 1 NaN/Inf values", "->"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(tmp_path, tiny_llama, case):
    breaker, code, needles = BAD_INPUTS[case]
    breaker(tiny_llama)
    before = folder_digest(tiny_llama)
    out = tmp_path / "out"
    r = run("convert", tiny_llama, out)
    assert r.exit_code == code, r.output
    assert r.stderr.startswith("error: ") and "Traceback" not in r.output
    for needle in needles:
        assert needle in r.stderr, (needle, r.stderr)
    assert folder_digest(tiny_llama) == before  # the input is never touched
    assert leftovers(out) == []
    assert not (tmp_path / "UNPICKLED").exists()


def test_already_quantised_output_as_input(tmp_path, tiny_llama):
    assert run("convert", tiny_llama, tmp_path / "nf4").exit_code == 0
    before = folder_digest(tmp_path / "nf4")
    r = run("convert", tmp_path / "nf4", tmp_path / "again")
    assert r.exit_code == 2 and "is already quantised (bitsandbytes" in r.stderr
    assert folder_digest(tmp_path / "nf4") == before and leftovers(tmp_path / "again") == []


def test_existing_output_is_refused_unless_overwrite(tmp_path, tiny_llama):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run("convert", tiny_llama, out)
    assert r.exit_code == 3 and f"{out} already exists" in r.stderr and "--overwrite" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    r = run("convert", tiny_llama, out, "--overwrite")
    assert r.exit_code == 0, r.output
    assert not (out / "keep.txt").exists() and (out / REPORT_NAME).exists()
    assert leftovers(out) == ["out"]


@pytest.mark.parametrize("where", ["inside", "same", "parent"])
def test_output_overlapping_the_input_is_refused(tmp_path, tiny_llama, where):
    out = {"inside": tiny_llama / "nf4", "same": tiny_llama, "parent": tiny_llama.parent}[where]
    before = folder_digest(tiny_llama)
    r = run("convert", tiny_llama, out, "--overwrite")
    assert r.exit_code == 3 and "overlaps the input" in r.stderr and "outside the input folder" in r.stderr
    assert folder_digest(tiny_llama) == before
    assert not (tiny_llama / "nf4").exists()


def test_max_rel_error_is_fatal_and_writes_nothing(tmp_path, tiny_llama):
    out = tmp_path / "out"
    r = run("convert", tiny_llama, out, "--max-rel-error", "0.01")
    assert r.exit_code == 4
    assert "reconstructs with relative error" in r.stderr and "> --max-rel-error 0.01" in r.stderr
    assert leftovers(out) == []
    assert run("convert", tiny_llama, out, "--max-rel-error", "0.5").exit_code == 0


@pytest.mark.parametrize("args, match", [(["--block-size", "48"], "--block-size 48 is not one bitsandbytes supports"),
                                         (["--skip", "model.nothing"], "--skip model.nothing: no module"),
                                         (["--device", "cuda:0"], "--device cuda:0")])
def test_bad_flags(tmp_path, tiny_llama, args, match):
    if "--device" in args and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    r = run("convert", tiny_llama, tmp_path / "out", *args)
    assert r.exit_code == 2 and match in r.stderr, r.output
    assert leftovers(tmp_path / "out") == []


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("when", ["first shard write", "later shard write", "shard fsync", "copying other files",
                                  "writing config.json"])
def test_disk_full_leaves_nothing(tmp_path, tiny_llama, monkeypatch, when):
    out = tmp_path / "out"
    if when.endswith("shard write"):
        real, calls = os.pwrite, []

        def pwrite(fd, data, offset):
            calls.append(1)
            if len(calls) > (0 if when == "first shard write" else 25):
                _enospc()
            return real(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", pwrite)
    elif when == "shard fsync":
        monkeypatch.setattr(os, "fsync", _enospc)
    elif when == "copying other files":
        monkeypatch.setattr(shutil, "copyfile", _enospc)
    else:
        monkeypatch.setattr(Path, "write_text", _enospc)
    before = folder_digest(tiny_llama)
    r = run("convert", tiny_llama, out, "--max-shard-size", "60KB")
    monkeypatch.undo()
    assert r.exit_code == 3, r.output
    assert "No space left on device" in r.stderr and "-> free disk space" in r.stderr
    assert leftovers(out) == []
    assert folder_digest(tiny_llama) == before
    assert run("convert", tiny_llama, out).exit_code == 0  # and a rerun works


# ----------------------------------------------------------------------------------- a run killed while replacing
def _dead_pid() -> int:
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid  # reaped: no process has it (for the moment of the test)


def test_a_replacement_killed_between_its_renames_is_undone(tmp_path, tiny_llama):
    """The state SIGKILL leaves between `out -> .out.qtool-old-PID` and `partial -> out`: out is missing, its previous
    contents are under the old name. The next run moves them back (and says so), then goes on as usual."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("mine")
    pid = _dead_pid()
    out.rename(tmp_path / f".out.qtool-old-{pid}")
    (tmp_path / f".out.qtool-partial-{pid}").mkdir()  # the killed run's new folder, complete or not
    with pytest.warns(RuntimeWarning, match=f"{out}: restored from .out.qtool-old-{pid}"):
        r = run("convert", tiny_llama, out)
    assert r.exit_code == 3 and "already exists" in r.stderr  # it was put back, so it is not overwritten silently
    assert (out / "previous.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []
    assert run("convert", tiny_llama, out, "--overwrite").exit_code == 0
    assert not (out / "previous.txt").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_an_old_folder_left_after_the_renames_is_removed(tmp_path, tiny_llama):
    out = tmp_path / "out"
    assert run("convert", tiny_llama, out).exit_code == 0
    old = tmp_path / f".out.qtool-old-{_dead_pid()}"
    old.mkdir()
    (old / "x").write_text("left by a run killed while removing it")
    alive = tmp_path / f".out.qtool-old-{os.getppid()}"  # a run that is still going: not touched
    alive.mkdir()
    assert run("convert", tiny_llama, out, "--overwrite").exit_code == 0
    assert not old.exists() and alive.exists()


def test_an_old_folder_that_cannot_be_moved_back_is_named(tmp_path, tiny_llama, monkeypatch):
    out = tmp_path / "out"
    old = tmp_path / f".out.qtool-old-{_dead_pid()}"
    old.mkdir()
    real = os.rename

    def refuse(a, b):
        if Path(a) == old:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        return real(a, b)

    monkeypatch.setattr(os, "rename", refuse)
    r = run("convert", tiny_llama, out)
    assert r.exit_code == 3 and f"{old} holds the previous out" in r.stderr and f"mv '{old}' '{out}'" in r.stderr


def test_sigkill_between_the_renames_of_overwrite(tmp_path, tiny_llama):
    """A real SIGKILL in the window between the two renames of --overwrite (held open by a test hook)."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    out = tmp_path / "out"
    assert run("convert", tiny_llama, out, "--target", "cpu").exit_code == 0
    before = folder_digest(out)
    proc = subprocess.Popen([sys.executable, "-c", "from qtool.cli import main; main()", "convert", str(tiny_llama),
                             str(out), "--overwrite", "--target", "cuda"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "QTOOL_TEST_SLEEP_BETWEEN_RENAMES": "60"})
    old = tmp_path / f".out.qtool-old-{proc.pid}"
    deadline = time.monotonic() + 120
    while not old.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run never reached the renames"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and old.exists()  # the window: the previous output only under the old name
    r = run("verify", out)  # read-only: says where the output is
    assert r.exit_code == 2 and f"{old} holds its previous contents" in r.stderr
    with pytest.warns(RuntimeWarning, match="restored from"):
        r = run("convert", tiny_llama, out)  # the next conversion moves it back first
    assert r.exit_code == 3 and "already exists" in r.stderr
    assert folder_digest(out) == before and not old.exists()
    assert run("verify", out).exit_code == 0

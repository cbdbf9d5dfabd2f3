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
    assert "14 quantised weights, 1 shard hashes checked, 0 problem(s)" in r.stdout
    r = run("verify", out, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["ok"] is True
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-100] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(data))
    r = run("verify", out)
    assert r.exit_code == 4
    assert "model.safetensors: sha256 differs from the report" in r.stderr
    r = run("verify", out, "--json")
    assert r.exit_code == 4 and json.loads(r.stdout)["ok"] is False


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


def test_help_has_examples():
    for cmd in ("convert", "verify"):
        r = run(cmd, "-h")
        assert r.exit_code == 0 and "Examples:" in r.stdout and f"qtool {cmd} " in r.stdout


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

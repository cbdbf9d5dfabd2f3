"""Per-tensor checks and ``verify_folder``: it must catch changed bytes, missing shards, edited indexes, and —
against the source — damaged block constants and changed copies even when the report's hashes were updated."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from qtool.nf4 import codec as nf4
from qtool.convert.pipeline import convert
from qtool.errors import InputError
from qtool.format.safetensors import read_header
from qtool.convert.verify import REPORT_NAME, check_tensor, gaussian_rel_error, sha256_file, verify_folder

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="session")
def converted_template(tiny_llama_template, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("verify") / "nf4"
    convert(tiny_llama_template, out, max_shard_bytes=60_000)
    return out


@pytest.fixture
def converted(converted_template, tmp_path) -> Path:
    dest = tmp_path / "nf4"
    shutil.copytree(converted_template, dest)
    return dest


def _locate(folder: Path, key: str) -> tuple[Path, int, int]:
    """(shard, absolute begin, end) of tensor ``key`` in a converted folder."""
    shard = folder / json.loads((folder / INDEX).read_text())["weight_map"][key]
    with read_header(shard) as f:
        info = f.tensors[key]
    return shard, info.begin, info.end


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _rehash(folder: Path) -> None:
    """Update the report's hashes, as someone covering their tracks (or a buggy tool) would."""
    report = json.loads((folder / REPORT_NAME).read_text())
    for name, meta in report["shards"].items():
        meta["sha256"] = sha256_file(folder / name)
    (folder / REPORT_NAME).write_text(json.dumps(report))


def test_a_fresh_conversion_verifies(converted, tiny_llama_template):
    n_shards = len(list(converted.glob("*.safetensors")))
    assert n_shards > 2
    r = verify_folder(converted)
    assert r.ok, r.problems
    assert r.hashes_checked == n_shards and r.n_quantized == 14
    r = verify_folder(converted, tiny_llama_template)
    assert r.ok, r.problems
    assert len(r.tensors) == 14 and all(0.05 < t.rel_error < 0.2 and not t.flag for t in r.tensors)
    assert r.to_json()["ok"] is True


def test_flipped_byte_in_a_shard(converted):
    shard, begin, _ = _locate(converted, "model.layers.0.mlp.up_proj.weight")
    data = bytearray(shard.read_bytes())
    _patch(shard, begin + 10, bytes([data[begin + 10] ^ 0x01]))
    r = verify_folder(converted)
    assert not r.ok and r.problems == [f"{shard.name}: sha256 differs from the report (the file changed after "
                                       "conversion)"]


def test_deleted_shard(converted):
    shard, _, _ = _locate(converted, "model.layers.1.self_attn.q_proj.weight")
    shard.unlink()
    r = verify_folder(converted)
    assert f"{REPORT_NAME}: shard {shard.name} is missing" in r.problems
    assert any(p.startswith(f"{INDEX}: 'model.layers.1.self_attn.q_proj.weight' is not in {shard.name}")
               for p in r.problems)


@pytest.mark.parametrize("edit", ["move a key", "drop a key", "unknown shard"])
def test_edited_index(converted, edit):
    path = converted / INDEX
    index = json.loads(path.read_text())
    wm = index["weight_map"]
    key = "model.layers.0.self_attn.k_proj.weight.absmax"
    names = sorted(set(wm.values()))
    if edit == "move a key":
        wm[key] = next(n for n in names if n != wm[key])
    elif edit == "drop a key":
        del wm[key]
    else:
        wm[key] = "model-00099-of-00099.safetensors"
    path.write_text(json.dumps(index))
    r = verify_folder(converted)
    expected = f"{INDEX}: {key!r} is missing from the weight map" if edit == "drop a key" else \
        f"{INDEX}: {key!r} is not in {wm[key]}"
    assert r.problems == [expected]


@pytest.mark.parametrize("name", ["config.json", INDEX, REPORT_NAME])
def test_unreadable_json_is_named(converted, name):
    (converted / name).write_text('{"weight_map": ')
    with pytest.raises(InputError, match=f"{name}: not valid JSON") as exc:
        verify_folder(converted)
    assert "convert again" in exc.value.hint


def test_missing_report(converted):
    (converted / REPORT_NAME).unlink()
    assert verify_folder(converted).problems == [f"no {REPORT_NAME}; shard hashes cannot be checked"]


def test_damaged_block_constants_are_caught_against_the_source(converted, tiny_llama_template):
    key = "model.layers.1.mlp.down_proj.weight"
    shard, begin, end = _locate(converted, f"{key}.nested_absmax")
    nested = torch.frombuffer(bytearray(shard.read_bytes()[begin:end]), dtype=torch.float32)
    _patch(shard, begin, (nested * 1.5).numpy().tobytes())
    _rehash(converted)
    assert verify_folder(converted).ok  # hashes and structure alone cannot see it
    r = verify_folder(converted, tiny_llama_template)
    assert [p.split(" (")[0] for p in r.problems] == [f"{key}: 1 of 1 nested_absmax values differ",
                                                      f"{key}: constants"]


def test_a_changed_packed_weight_is_caught_against_the_source(converted, tiny_llama_template):
    """A flipped nibble in a packed NF4 weight is a valid code, so only the hash sees it; once the hashes are
    updated too, re-quantising the source with the report's settings still does (the error measure may not)."""
    key = "model.layers.1.self_attn.o_proj.weight"
    shard, begin, end = _locate(converted, key)
    _patch(shard, begin + 100, bytes([shard.read_bytes()[begin + 100] ^ 0x10]))  # one code, one step
    _rehash(converted)
    assert verify_folder(converted).ok
    r = verify_folder(converted, tiny_llama_template)
    assert r.problems == [f"{key}: 1 of {end - begin} packed bytes differ (re-quantising the source with the report's "
                          "settings gives other bytes: the weight changed after conversion)"]
    assert r.requantized == 14 and r.requantize_note is None


@pytest.mark.parametrize("settings", ["missing", "made on a GPU"])
def test_when_bytes_cannot_be_rederived_verify_says_why(converted, tiny_llama_template, settings):
    report = json.loads((converted / REPORT_NAME).read_text())
    if settings == "missing":
        del report["settings"]
    else:
        report["settings"]["device"] = "cuda"
    (converted / REPORT_NAME).write_text(json.dumps(report))
    if settings == "made on a GPU" and torch.cuda.is_available():
        pytest.skip("a GPU is here: the bytes are re-derived on it")
    r = verify_folder(converted, tiny_llama_template)
    assert r.ok and r.requantized == 0
    assert ("no settings" if settings == "missing" else "no GPU is here") in r.requantize_note
    assert all(t.measured for t in r.tensors)  # the errors are still measured


def test_requantising_uses_the_conversions_torch_thread_count(converted, tiny_llama_template, monkeypatch):
    """The offset is torch.mean, whose last bit depends on torch's thread count: verify re-quantises with the count
    the report names, whatever this process uses."""
    seen = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), real(n)))
    report = json.loads((converted / REPORT_NAME).read_text())
    assert report["settings"]["torch_threads"] == torch.get_num_threads()
    report["settings"]["torch_threads"] = 3
    (converted / REPORT_NAME).write_text(json.dumps(report))
    verify_folder(converted, tiny_llama_template)
    assert seen.count(3) == 14


def test_changed_copy_and_missing_tensor_are_caught(converted, tiny_llama_template):
    shard, begin, _ = _locate(converted, "model.norm.weight")
    _patch(shard, begin, b"\x00\x00")
    _rehash(converted)
    r = verify_folder(converted, tiny_llama_template)
    assert r.problems == ["'model.norm.weight' differs from the source (it should be copied unchanged)"]
    # a source with a tensor the output lacks
    src = converted.parent / "src"
    shutil.copytree(tiny_llama_template, src)
    from safetensors.torch import save_file

    save_file({"model.extra.weight": torch.zeros(3)}, src / "model-extra.safetensors")
    index = json.loads((src / INDEX).read_text())
    index["weight_map"]["model.extra.weight"] = "model-extra.safetensors"
    (src / INDEX).write_text(json.dumps(index))
    r = verify_folder(converted, src)
    assert "source tensor 'model.extra.weight' is missing from the output" in r.problems


def test_max_rel_error(converted, tiny_llama_template):
    r = verify_folder(converted, tiny_llama_template, max_rel_error=0.01)
    assert len(r.problems) == 14 and all("> --max-rel-error 0.01" in p for p in r.problems)


# ---------------------------------------------------------------------------------------------- per-tensor flags
def test_gaussian_reference_error():
    assert 0.09 < gaussian_rel_error(64) < 0.095  # NF4 on N(0, 1) at block size 64 (research: 0.0921)
    assert gaussian_rel_error(32) < gaussian_rel_error(64) < gaussian_rel_error(256)


def test_flags():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 256, generator=g) * 0.02
    assert check_tensor("w", w, nf4.quantize(w)).flag == ""
    # outlier columns: double quantisation costs ~10% of the error there, which is correct output, not damage
    outliers = w.clone()
    outliers[:, [5, 77]] *= 100
    c = check_tensor("outliers", outliers, nf4.quantize(outliers))
    assert c.flag == "" and c.rel_error > 1.05 * c.ideal_rel_error
    # values half-way between the two largest codes: NF4 fits them worse than Gaussian weights (an informative flag)
    misfit = torch.full((256, 256), 0.5 * (nf4.NF4_CODE[14] + nf4.NF4_CODE[15])) * torch.randn(256, 256).sign()
    misfit[:, ::64] = 1.0
    assert check_tensor("misfit", misfit, nf4.quantize(misfit)).flag == "nf4-misfit"
    qw = nf4.quantize(w)
    for factor in (1.5, 0.9):
        damaged = nf4.QuantizedWeight(qw.packed, qw.absmax, qw.nested_absmax * factor, qw.offset, qw.shape, qw.dtype)
        assert check_tensor("w", w, damaged).flag == "constants"
    one_block = qw.absmax.clone()
    one_block[17] = (int(one_block[17]) + 40) % 256  # a single damaged block constant among 1,024
    damaged = nf4.QuantizedWeight(qw.packed, one_block, qw.nested_absmax, qw.offset, qw.shape, qw.dtype)
    assert check_tensor("w", w, damaged).flag == "constants"
    plain = nf4.quantize(w, double_quant=False)
    assert check_tensor("w", w, plain).flag == ""
    damaged = nf4.QuantizedWeight(plain.packed, plain.absmax * (1 + 1e-6), None, None, plain.shape, plain.dtype)
    assert check_tensor("w", w, damaged).flag == "constants"
    broken = nf4.QuantizedWeight(qw.packed, qw.absmax, qw.nested_absmax * float("inf"), qw.offset, qw.shape, qw.dtype)
    c = check_tensor("w", w, broken)
    assert c.flag == "nonfinite" and c.nonfinite > 0
    assert c.to_json()["name"] == "w"


@pytest.mark.parametrize("target", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_correct_outputs_are_never_flagged_constants(target, dtype):
    g = torch.Generator().manual_seed(1)
    cases = [torch.randn(300, 200, generator=g), torch.zeros(5, 13),
             torch.distributions.StudentT(torch.tensor(0.8)).sample((128, 300)).clamp(-6e4, 6e4)]
    for w in cases:
        for dq in (True, False):
            w = w.to(dtype)
            assert nf4.reconstruction_error(w, nf4.quantize(w, double_quant=dq, target=target))["bad_constants"] == 0


@pytest.mark.parametrize("size", [0, 1, 4095, 3 * 4096 + 17])
def test_sha256_file(tmp_path, size):
    import hashlib
    import os

    path = tmp_path / "f"
    path.write_bytes(os.urandom(size))
    assert sha256_file(path, chunk=4096) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_check_tensor_takes_a_measured_error():
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    qw, error = nf4.quantize_with_error(w, target="cpu")
    assert check_tensor("w", w, qw, error) == check_tensor("w", w, qw)

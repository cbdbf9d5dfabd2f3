"""Resolving and validating a checkpoint before any work: local folders, hub ids in the cache, shards + index, and
the inputs qtool refuses (pickles, quantised checkpoints, hostile indexes)."""
from __future__ import annotations

import json
import pickle
import shutil
import socket
from pathlib import Path

import pytest

from qtool.errors import InputError
from qtool.format.checkpoint import open_checkpoint, resolve


def test_sharded_folder(tiny_llama):
    ck = open_checkpoint(tiny_llama)
    try:
        assert len(ck.shards) == 3 and ck.folder == tiny_llama
        index = json.loads((tiny_llama / "model.safetensors.index.json").read_text())["weight_map"]
        assert sorted(ck.keys) == sorted(index)
        assert all(ck.key_shard[k].path.name == f for k, f in index.items())
        for shard in ck.shards:  # keys come in file order inside each shard
            offsets = [shard.tensors[k].begin for k in shard.tensors]
            assert offsets == sorted(offsets)
        assert ck.config["model_type"] == "llama"
        assert sorted(map(str, ck.other_files)) == ["LICENSE", "extra/notes.txt", "generation_config.json",
                                                   "tokenizer.json"]
    finally:
        ck.close()


def test_single_file_and_unindexed_shards(tmp_path):
    from safetensors.torch import save_file
    import torch

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"a": torch.zeros(2)}, tmp_path / "model.safetensors")
    ck = open_checkpoint(tmp_path)
    assert [s.path.name for s in ck.shards] == ["model.safetensors"] and ck.keys == ["a"]
    ck.close()
    (tmp_path / "model.safetensors").rename(tmp_path / "part-2.safetensors")
    save_file({"b": torch.zeros(2)}, tmp_path / "part-1.safetensors")
    ck = open_checkpoint(tmp_path)
    assert [s.path.name for s in ck.shards] == ["part-1.safetensors", "part-2.safetensors"]
    ck.close()


# ---------------------------------------------------------------------------------------------- hub ids (cache)
def _fake_hub_cache(cache: Path, repo: str, src: Path) -> Path:
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    shutil.copytree(src, snap)
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_llama):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snap = _fake_hub_cache(cache, "acme/tiny-llama", tiny_llama)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read at import time by huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("qtool must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    return snap


def test_hub_id_resolves_from_the_cache(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve("acme/tiny-llama") == hub_cache
    ck = open_checkpoint("acme/tiny-llama")
    assert len(ck.shards) == 3
    ck.close()


@pytest.mark.parametrize("offline", ["1", ""])
def test_uncached_hub_id_is_a_clear_error(hub_cache, monkeypatch, offline):
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    with pytest.raises(InputError, match="acme/other: not a local folder and not in the Hugging Face cache") as exc:
        resolve("acme/other")
    assert ("HF_HUB_OFFLINE is set" in str(exc.value)) == bool(offline)
    assert "huggingface-cli download acme/other" in exc.value.hint


@pytest.mark.parametrize("spec, match", [("./no/such/folder", "no such folder"), ("a/b/c", "no such folder")])
def test_missing_local_folder(spec, match):
    with pytest.raises(InputError, match=match):
        resolve(spec)


def test_a_file_is_not_a_model_folder(tiny_llama):
    with pytest.raises(InputError, match="is a file"):
        resolve(tiny_llama / "config.json")


@pytest.mark.parametrize("spec", ["./no/such/folder", "a/b/c", "config.json"])
def test_the_early_path_check_says_what_resolve_says(tiny_llama, spec, monkeypatch):
    """`qtool convert` checks the source path before loading torch (qtool.convert.arguments); its message for a
    missing folder or a file is resolve's own."""
    from qtool.convert.arguments import check_source_path

    monkeypatch.chdir(tiny_llama)
    with pytest.raises(InputError) as early:
        check_source_path(spec)
    with pytest.raises(InputError) as late:
        resolve(spec)
    assert str(early.value) == str(late.value)
    assert check_source_path("acme/model") is None and check_source_path(tiny_llama) == tiny_llama  # hub ids later


# -------------------------------------------------------------------------------------------------- bad folders
def _edit_index(folder: Path, edit) -> None:
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    edit(index["weight_map"])
    path.write_text(json.dumps(index))


def _first_key(wm):
    return sorted(wm)[0]


@pytest.mark.parametrize("edit, match", [
    (lambda wm: wm.update({_first_key(wm): "model-00009-of-00009.safetensors"}),
     "names shard 'model-00009-of-00009.safetensors', which is missing"),
    (lambda wm: wm.update({_first_key(wm): "../outside.safetensors"}), "points outside the model folder"),
    (lambda wm: wm.update({_first_key(wm): "/etc/passwd"}), "points outside the model folder"),
    (lambda wm: wm.update({_first_key(wm): "sub\\..\\..\\x.safetensors"}), "points outside the model folder"),
    (lambda wm: wm.update({"model.ghost.weight": "model-00001-of-00003.safetensors"}),
     "1 tensors are not where the index says, e.g. 'model.ghost.weight'"),
])
def test_bad_index_is_refused(tiny_llama, edit, match):
    (tiny_llama.parent / "outside.safetensors").write_bytes(b"\0" * 16)
    _edit_index(tiny_llama, edit)
    with pytest.raises(InputError, match=match) as exc:
        open_checkpoint(tiny_llama)
    assert "model.safetensors.index.json" in str(exc.value) and exc.value.hint


def test_invalid_index_json(tiny_llama):
    (tiny_llama / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(InputError, match="model.safetensors.index.json: not a valid safetensors index"):
        open_checkpoint(tiny_llama)


def test_tensor_in_two_shards_is_refused(tmp_path):
    from safetensors.torch import save_file
    import torch

    (tmp_path / "config.json").write_text("{}")
    save_file({"a": torch.zeros(2)}, tmp_path / "x-1.safetensors")
    save_file({"a": torch.zeros(2)}, tmp_path / "x-2.safetensors")
    with pytest.raises(InputError, match="'a' appears in both x-1.safetensors and x-2.safetensors"):
        open_checkpoint(tmp_path)


class _Marker:
    """Unpickling this creates the file ``path``: proof that something unpickled the checkpoint."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "consolidated.pth"])
def test_pickle_only_checkpoint_is_refused_never_unpickled(tmp_path, name):
    folder = tmp_path / "model"
    folder.mkdir()
    marker = tmp_path / "UNPICKLED"
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (folder / name).write_bytes(pickle.dumps({"w": _Marker(marker)}))
    with pytest.raises(InputError, match=f"only pickle checkpoints found \\({name}\\).*never unpickles") as exc:
        open_checkpoint(folder)
    assert "safetensors" in exc.value.hint
    assert not marker.exists()
    pickle.loads((folder / name).read_bytes())  # the marker is real: unpickling does create the file
    assert marker.exists()


def test_already_quantised_config_is_refused(tiny_llama):
    cfg = json.loads((tiny_llama / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tiny_llama / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="already quantised \\(bitsandbytes") as exc:
        open_checkpoint(tiny_llama)
    assert "original 16/32-bit checkpoint" in exc.value.hint


def test_quantised_tensors_without_config_are_refused(tmp_path):
    import torch
    from safetensors.torch import save_file

    from qtool.format import bnb_nf4 as layout

    from qtool.nf4 import codec as nf4

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file(layout.weight_entries("lm.weight", nf4.quantize(torch.randn(8, 64))), tmp_path / "model.safetensors")
    with pytest.raises(InputError, match="holds bitsandbytes 4-bit tensors \\(e.g. 'lm.weight'\\)"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("problem, match", [
    ("no config", "no config.json"), ("bad config", "config.json: cannot read"),
    ("no weights", "no safetensors weights found"),
])
def test_incomplete_folder(tmp_path, problem, match):
    if problem != "no config":
        (tmp_path / "config.json").write_text("{" if problem == "bad config" else "{}")
    with pytest.raises(InputError, match=match):
        open_checkpoint(tmp_path)

"""Writing checkpoint folders (qtool.format.checkpoint), shared by convert and merge: shard planning and names
against huggingface_hub's own splitter, the index against what transformers' save_pretrained writes, and which
files of the source are copied."""
from __future__ import annotations

import json
import shutil

import torch

from qtool.convert.verify import REPORT_NAME as CONVERT_REPORT
from qtool.format.checkpoint import (INDEX_NAME, open_checkpoint, other_files, plan_shards, shard_name,
                                     write_metadata)
from qtool.merge.pipeline import REPORT_NAME as MERGE_REPORT


def test_plan_shards_matches_huggingface_hub_when_no_tensor_exceeds_the_limit():
    from huggingface_hub import split_torch_state_dict_into_shards

    sizes = [40, 30, 30, 1, 60, 50, 50, 10, 100, 3]  # bytes (uint8 tensors)
    state = {f"t{i}": torch.zeros(n, dtype=torch.uint8) for i, n in enumerate(sizes)}
    for limit in (100, 101, 150, 1000):
        ours = plan_shards([(k, t.nbytes) for k, t in state.items()], limit)
        hub = split_torch_state_dict_into_shards(state, max_shard_size=limit,
                                                 filename_pattern="model{suffix}.safetensors")
        assert [shard_name(i, len(ours)) for i in range(len(ours))] == list(hub.filename_to_tensors)
        assert {f: list(keys) for f, keys in hub.filename_to_tensors.items()} == \
               {shard_name(i, len(ours)): keys for i, keys in enumerate(ours)}
        assert hub.metadata["total_size"] == sum(sizes)


def test_plan_shards_gives_an_oversized_group_its_own_shard_in_file_order():
    assert plan_shards([("a", 10), ("big", 500), ("b", 10), ("c", 10)], 100) == [["a"], ["big"], ["b", "c"]]
    assert plan_shards([("big", 500)], 100) == [["big"]]
    assert plan_shards([], 100) == [[]]  # no tensors: one empty shard, as save_pretrained writes
    assert shard_name(0, 1) == "model.safetensors" and shard_name(11, 12) == "model-00012-of-00012.safetensors"


def test_write_metadata_writes_the_index_transformers_writes(tiny_llama, tmp_path):
    """Given transformers' own shards, the index has its weight_map and total_size (tensor bytes, not file sizes)."""
    ck = open_checkpoint(tiny_llama)
    stage = tmp_path / "out"
    stage.mkdir()
    for shard in ck.shards:
        shutil.copyfile(shard.path, stage / shard.path.name)
    theirs = json.loads((tiny_llama / INDEX_NAME).read_text())
    write_metadata(stage, {**ck.config, "note": "changed"}, theirs["weight_map"], ck)
    ck.close()
    ours = json.loads((stage / INDEX_NAME).read_text())
    assert ours["weight_map"] == theirs["weight_map"]
    assert ours["metadata"]["total_size"] == theirs["metadata"]["total_size"]
    assert sum(p.stat().st_size for p in stage.glob("*.safetensors")) > ours["metadata"]["total_size"]  # headers
    assert json.loads((stage / "config.json").read_text())["note"] == "changed"
    for rel in ("tokenizer.json", "LICENSE", "extra/notes.txt", "generation_config.json"):
        assert (stage / rel).read_bytes() == (tiny_llama / rel).read_bytes()


def test_write_metadata_single_shard_has_no_index(tiny_llama, tmp_path):
    ck = open_checkpoint(tiny_llama)
    write_metadata(tmp_path, dict(ck.config), {k: "model.safetensors" for k in ck.keys}, ck)
    ck.close()
    assert not (tmp_path / INDEX_NAME).exists() and (tmp_path / "config.json").exists()


def test_other_files_skip_weights_index_reports_and_hidden_entries(tmp_path):
    files = ["config.json", INDEX_NAME, "model-00001-of-00002.safetensors", "pytorch_model.bin", "model.gguf",
             CONVERT_REPORT, MERGE_REPORT, ".cache/huggingface/x.lock", ".gitattributes",
             "tokenizer.json", "LICENSE", "chat_template.jinja", "generation_config.json",
             "1_Pooling/config.json", "sub/qtool_report.json", "sub/model.safetensors"]
    for rel in files:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    assert CONVERT_REPORT.startswith("qtool_") and MERGE_REPORT.startswith("qtool_")  # the rule's premise
    assert list(map(str, other_files(tmp_path))) == ["1_Pooling/config.json", "LICENSE", "chat_template.jinja",
                                                     "generation_config.json", "sub/qtool_report.json",
                                                     "tokenizer.json"]


def test_convert_does_not_copy_the_merge_report_of_its_source(tiny_llama, tmp_path):
    """A merged folder carries qtool merge's report about its own shards: converting it must not copy that report
    into the NF4 folder, whose shards it does not describe."""
    from qtool.convert.pipeline import convert

    (tiny_llama / MERGE_REPORT).write_text(json.dumps({"shards": {"model.safetensors": {"sha256": "0" * 64}}}))
    out = convert(tiny_llama, tmp_path / "nf4", target="cpu").out
    assert (out / CONVERT_REPORT).exists() and not (out / MERGE_REPORT).exists()
    assert (out / "tokenizer.json").exists()

"""bench/random_folder.py (the pre-quantised folder Unsloth's profile loads) and bench/gpu_worker.py's hf-prepare
profile, on the CPU with a two-layer model of SmolLM2-135M's width."""
import io
import json
import warnings
from contextlib import redirect_stdout
from dataclasses import replace

import pytest
import torch

from bench import gpu_worker
from bench.random_folder import write_random_nf4_folder
from qtool.arch import known_shape
from qtool.format.safetensors import read_header

TINY = replace(known_shape("smollm2-135m"), n_layers=2, vocab=512)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_random_nf4_folder(TINY, tmp_path_factory.mktemp("bench") / "tiny-nf4")


def folder_tensors(folder) -> dict:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with read_header(path) as f:
            out.update({k: f.tensor(k).clone() for k in f.tensors})
    return out


def test_transformers_loads_the_folder_and_its_tokenizer(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    warnings.filterwarnings("ignore")
    tok = AutoTokenizer.from_pretrained(folder)
    assert len(tok) == TINY.vocab and (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        0, 1, 2, 3)
    assert tok("t4 t511 <s>")["input_ids"] == [4, 511, 1]
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    assert model.is_loaded_in_4bit
    assert type(model.model.layers[1].mlp.down_proj).__name__ == "Linear4bit"
    ids = torch.randint(0, TINY.vocab, (1, 16))
    loss = model(input_ids=ids, labels=ids).loss
    assert abs(float(loss) - torch.log(torch.tensor(float(TINY.vocab)))) < 0.5  # random weights: ~uniform


def test_the_folder_holds_the_nf4_bytes_the_other_profiles_train(folder, monkeypatch):
    """qtool's random_decoder and the hf profiles' build_hf draw the same NF4 weights on the same device."""
    from qtool.train.load import random_decoder

    saved = folder_tensors(folder)
    qtool_linears = {path: holder[name] for path, (holder, name) in random_decoder(TINY, "cpu").linears().items()}
    monkeypatch.setattr(gpu_worker, "DEVICE", "cpu")
    hf_model = gpu_worker.build_hf(TINY)
    for i in (0, 1):
        for name in ("q_proj", "o_proj", "down_proj"):
            key = f"{TINY.module_path(i, name)}.weight"
            ours = qtool_linears[TINY.module_path(i, name)].weight
            assert torch.equal(saved[key], ours.packed)
            assert torch.equal(saved[key], hf_model.get_submodule(TINY.module_path(i, name)).weight.data)
            assert torch.equal(saved[f"{key}.absmax"], ours.absmax)


def test_an_existing_folder_is_reused_and_a_different_one_rebuilt(folder):
    stamp = (folder / "model-00001-of-00003.safetensors").stat().st_mtime_ns
    write_random_nf4_folder(TINY, folder)
    assert (folder / "model-00001-of-00003.safetensors").stat().st_mtime_ns == stamp
    three = write_random_nf4_folder(replace(TINY, n_layers=3), folder.with_name("other"))
    assert len(list(three.glob("*.safetensors"))) == 4 and not list(folder.parent.glob(".*partial*"))


def test_hf_prepare_profile_checkpoints_reentrantly(monkeypatch):
    """The prepare-only loop: prepare_model_for_kbit_training's own checkpointing (reentrant, torch's default), the
    record in the schema of data/memory/README.md with the FLOP count; the hf profile's call makes it non-reentrant."""
    monkeypatch.setattr(gpu_worker, "DEVICE", "cpu")
    warnings.filterwarnings("ignore")
    configs = [{"seq_len": 32, "rank": 4, "targets": "qkvo", "gc": True}]
    records = {}
    for profile in ("hf-prepare", "hf"):
        out = io.StringIO()
        with redirect_stdout(out):
            gpu_worker.run_hf(TINY, configs, steps=4, warmup=2, profile=profile)
        records[profile] = json.loads(out.getvalue())
    prep, hf = records["hf-prepare"], records["hf"]
    assert prep["id"] == "hf-prepare-smollm2-135m-s32-b1-r4-qkvo-gc" and prep["profile"] == "hf-prepare"
    assert prep["settings"]["gc_use_reentrant"] is True and hf["settings"]["gc_use_reentrant"] is False
    m = prep["measured"]
    assert len(m["losses"]) == 4 and all(abs(x - 6.24) < 0.5 for x in m["losses"])  # ln 512
    assert m["flops_per_step"] == hf["measured"]["flops_per_step"] > 0 and m["achieved_tflops"] > 0
    assert prep["trainable_params"] == 2 * 4 * (2 * (576 + 576) + 2 * (576 + 192))  # 2 layers; k, v: 576 -> 192
    with pytest.raises(ValueError, match="hf-prepare"):
        gpu_worker.run_hf(TINY, [{**configs[0], "gc": False}], steps=1, warmup=0, profile="hf-prepare")

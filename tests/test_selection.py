"""Which tensors are quantised. The end-to-end truth (transformers' own quantise-on-load, per architecture) is in
test_convert.py; here: the rules around it — head, tied embeddings, Conv1D, --skip, prefixes, errors."""
from __future__ import annotations

import json

import pytest

from conftest import save_tiny
from qtool.errors import InputError
from qtool.convert.selection import select
from qtool.format.checkpoint import open_checkpoint


def _select(folder, skip=None, keys=None):
    ck = open_checkpoint(folder)
    try:
        return select(ck.config, ck.folder, keys if keys is not None else ck.keys, skip), ck.keys
    finally:
        ck.close()


LLAMA_LINEARS = {f"model.layers.{i}.{m}.weight" for i in range(2) for m in
                 ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


def test_llama_untied_quantises_every_linear_but_the_head(tiny_llama):
    sel, keys = _select(tiny_llama)
    assert set(sel.quantize) == LLAMA_LINEARS and not any(sel.quantize.values())
    assert "lm_head.weight" in keys and sel.kept_linears == ["lm_head"]
    assert sel.skip_modules_config is None and sel.model_class == "LlamaForCausalLM"


def test_tied_embeddings(tmp_path):
    folder = save_tiny(tmp_path / "tied", "llama", tied=True, max_shard_size=None)
    sel, keys = _select(folder)
    assert "lm_head.weight" not in keys  # tied: the checkpoint has the embedding only
    assert set(sel.quantize) == LLAMA_LINEARS


def test_gpt2_conv1d_weights_are_marked_for_transposing(tmp_path):
    folder = save_tiny(tmp_path / "gpt2", "gpt2", max_shard_size=None)
    sel, _ = _select(folder)
    expected = {f"transformer.h.{i}.{m}.weight" for i in range(2)
                for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert set(sel.quantize) == expected and all(sel.quantize.values())


def test_skip_modules(tiny_llama):
    sel, _ = _select(tiny_llama, skip=["model.layers.1.mlp"])
    assert set(sel.quantize) == {k for k in LLAMA_LINEARS if not k.startswith("model.layers.1.mlp.")}
    # a list replaces transformers' default, so it must still name the head
    assert sel.skip_modules_config == ["lm_head", "model.layers.1.mlp"]
    assert set(sel.kept_linears) == {"lm_head", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
                                     "model.layers.1.mlp.down_proj"}
    sel, _ = _select(tiny_llama, skip=["q_proj"])  # transformers also matches by suffix
    assert not any(".q_proj." in k for k in sel.quantize) and len(sel.quantize) == 12


def test_unknown_skip_module_is_refused(tiny_llama):
    with pytest.raises(InputError, match="--skip model.layers.7.mlp: no module of LlamaForCausalLM") as exc:
        _select(tiny_llama, skip=["model.layers.7.mlp"])
    assert "model.layers.0.mlp" in exc.value.hint


def test_checkpoint_saved_without_the_base_prefix(tiny_llama):
    ck = open_checkpoint(tiny_llama)
    keys = [k.removeprefix("model.") for k in ck.keys]
    sel = select(ck.config, ck.folder, keys)
    ck.close()
    assert set(sel.quantize) == {k.removeprefix("model.") for k in LLAMA_LINEARS}


def test_missing_linear_weight_is_named(tiny_llama):
    ck = open_checkpoint(tiny_llama)
    keys = [k for k in ck.keys if k != "model.layers.1.self_attn.v_proj.weight"]
    with pytest.raises(InputError, match="1 Linear weights of LlamaForCausalLM are not in the checkpoint, e.g. "
                                         "'model.layers.1.self_attn.v_proj.weight'"):
        select(ck.config, ck.folder, keys)
    ck.close()


def test_unknown_model_type_is_a_clear_error(tiny_llama):
    cfg = json.loads((tiny_llama / "config.json").read_text())
    cfg["model_type"] = "no-such-model"
    (tiny_llama / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="config.json: transformers .* cannot read it") as exc:
        _select(tiny_llama)
    assert "upgrade transformers" in exc.value.hint


def test_moe_experts_follow_the_installed_transformers(tmp_path):
    """transformers 5 keeps fused MoE experts and routers unquantised (3-D parameters, not nn.Linear); the selection
    follows whatever transformers' own quantise-on-load does (checked against it in test_convert)."""
    import transformers

    folder = save_tiny(tmp_path / "mixtral", "mixtral", max_shard_size=None)
    sel, keys = _select(folder)
    attn = {f"model.layers.{i}.self_attn.{p}.weight" for i in range(2)
            for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert set(sel.quantize) == attn
    else:
        assert attn < set(sel.quantize)


def _in_child(folder, skip=None, fork=True):
    from qtool.convert.selection import SelectionInChild

    ck = open_checkpoint(folder)
    try:
        return SelectionInChild(ck.config, ck.folder, ck.keys, skip, fork=fork).result()
    finally:
        ck.close()


@pytest.mark.parametrize("fork", [True, False])
def test_selection_in_a_child_process_is_the_same(tmp_path, tiny_llama, fork):
    """The converter decides in a forked child (its transformers import and meta model never enter the converting
    process); the answer is the in-process one, for a plain, a skip and a Conv1D checkpoint."""
    gpt2 = save_tiny(tmp_path / "gpt2", "gpt2", max_shard_size=None)
    for folder, skip in ((tiny_llama, None), (tiny_llama, ["model.layers.1.mlp"]), (gpt2, None)):
        assert _in_child(folder, skip, fork) == _select(folder, skip)[0]


def test_selection_errors_cross_from_the_child(tiny_llama):
    with pytest.raises(InputError, match="--skip model.layers.9: no module") as exc:
        _in_child(tiny_llama, ["model.layers.9"])
    assert "module names as in the checkpoint keys" in exc.value.hint


def test_a_crashing_child_is_reported(tiny_llama, monkeypatch):
    import qtool.convert.selection as s

    def boom(*a, **k):
        raise MemoryError("no room for the meta model")

    monkeypatch.setattr(s, "select", boom)  # the child is a fork: it sees the patch
    with pytest.raises(RuntimeError, match="decides which tensors.*MemoryError: no room for the meta model"):
        _in_child(tiny_llama)


def test_the_converting_process_does_not_import_transformers(tiny_llama, tmp_path):
    """`qtool convert` in a fresh process: transformers is imported in the child only."""
    import subprocess
    import sys

    code = ("import sys; from qtool.convert.pipeline import convert; convert(sys.argv[1], sys.argv[2]); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))")
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_llama), str(tmp_path / "out")], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    assert (tmp_path / "out" / "config.json").exists()


def test_an_error_before_the_answer_kills_and_reaps_the_child(tiny_llama, monkeypatch):
    import os
    import time

    import qtool.convert.selection as s

    monkeypatch.setattr(s, "select", lambda *a, **k: time.sleep(60))  # a child that would take a minute
    ck = open_checkpoint(tiny_llama)
    try:
        with pytest.raises(ValueError, match="between fork and result"):
            with s.SelectionInChild(ck.config, ck.folder, ck.keys, fork=True) as selecting:
                pid = selecting.pid
                raise ValueError("between fork and result")
    finally:
        ck.close()
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped already: no such child


# ------------------------------------------------------------------------------------- known layouts (no child)
# each KNOWN architecture -> the tiny model(s) that check it against transformers' own rule: (arch, tied, config edits)
KNOWN_CASES = {
    "LlamaForCausalLM": [("llama", False, {}), ("llama", True, {}),
                         ("llama", False, {"attention_bias": True, "mlp_bias": True})],
    "MistralForCausalLM": [("mistral", None, {})],
    "Qwen2ForCausalLM": [("qwen2", True, {}), ("qwen2", False, {})],
    "Qwen3ForCausalLM": [("qwen3", None, {}), ("qwen3", None, {"attention_bias": True})],
    "Gemma2ForCausalLM": [("gemma2", None, {})],
    "Gemma3ForCausalLM": [("gemma3", None, {})],
    "Phi3ForCausalLM": [("phi3", None, {})],
    "GPT2LMHeadModel": [("gpt2", None, {})],
}


def _save_variant(folder, arch, tied, edits):
    import torch
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    cfg = tiny_config(arch, tied)
    for k, v in edits.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(folder)
    return folder


def test_every_known_layout_is_checked_against_transformers():
    from qtool.convert.selection import KNOWN

    assert set(KNOWN_CASES) == set(KNOWN)


@pytest.mark.parametrize("arch", list(KNOWN_CASES))
def test_known_layout_equals_transformers_rule(tmp_path, arch):
    """The selection read from the keys is transformers' own (select: the meta model and replace_with_bnb_linear's
    rule), for every variant; so the converter may skip the transformers import for these architectures."""
    from qtool.convert.selection import KNOWN_TRANSFORMERS_MAJOR, known_selection

    import transformers

    assert int(transformers.__version__.split(".")[0]) == KNOWN_TRANSFORMERS_MAJOR, \
        "the KNOWN layouts were checked against another transformers: check them again, then update the major"
    for i, (name, tied, edits) in enumerate(KNOWN_CASES[arch]):
        folder = _save_variant(tmp_path / str(i), name, tied, edits)
        ck = open_checkpoint(folder)
        try:
            known = known_selection(ck.config, ck.keys)
            assert known is not None, (name, tied, edits)
            assert known == select(ck.config, ck.folder, ck.keys), (name, tied, edits)
            assert known.model_class == arch and "known layout" in known.method
        finally:
            ck.close()


@pytest.mark.parametrize("change", ["extra key", "missing projection", "layer beyond the config", "no prefix",
                                    "skip", "other transformers", "unknown architecture", "fewer layers in config"])
def test_known_layout_declines_what_it_does_not_account_for(tiny_llama, monkeypatch, change):
    """Anything the layout does not match exactly goes to transformers (None): the answer is never guessed."""
    import qtool.convert.selection as s

    ck = open_checkpoint(tiny_llama)
    ck.close()
    config, keys, skip = dict(ck.config), list(ck.keys), None
    assert s.known_selection(config, keys) is not None
    if change == "extra key":
        keys.append("model.layers.0.mlp.extra_proj.weight")
    elif change == "missing projection":
        keys.remove("model.layers.1.self_attn.v_proj.weight")
    elif change == "layer beyond the config":
        keys.append("model.layers.2.mlp.up_proj.weight")
    elif change == "no prefix":
        keys = [k.removeprefix("model.") for k in keys]
    elif change == "skip":
        skip = ["model.layers.0.mlp"]
    elif change == "other transformers":
        monkeypatch.setattr(s, "_transformers_major", lambda: s.KNOWN_TRANSFORMERS_MAJOR + 1)
    elif change == "unknown architecture":
        config["architectures"] = ["LlamaForSequenceClassification"]
    else:
        config["num_hidden_layers"] = 1
    assert s.known_selection(config, keys, skip) is None


def test_a_known_architecture_is_converted_without_a_child(tmp_path, tiny_llama, monkeypatch):
    import qtool.convert.selection as s
    from qtool.convert.pipeline import convert

    def no_child(*a, **k):
        raise AssertionError("a child was started for a known layout")

    monkeypatch.setattr(s, "SelectionInChild", no_child)
    result = convert(tiny_llama, tmp_path / "out")
    assert "known layout of LlamaForCausalLM" in result.settings["selection"]
    assert len([t for t in result.tensors if t.quantized]) == 14

"""The on-disk contract: bitsandbytes' key names, dtypes, shapes and JSON blob per weight, and quantization_config."""
from __future__ import annotations

import json

import pytest
import torch

from qtool.format import bnb_nf4 as layout

from qtool.nf4 import codec as nf4
from qtool.errors import InputError

bnb = pytest.importorskip("bitsandbytes")
bnbF = bnb.functional

KEY = "model.layers.0.mlp.down_proj.weight"


def _w(shape=(96, 320), dtype=torch.bfloat16, seed=0):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02).to(dtype)


def _bnb_entries(w, blocksize=64, double_quant=True) -> dict[str, torch.Tensor]:
    """What bitsandbytes' Linear4bit._save_to_state_dict writes for weight KEY (QuantState.as_dict(packed=True))."""
    packed, qs = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
    return {KEY: packed, **{f"{KEY}.{k}": v for k, v in qs.as_dict(packed=True).items()}}


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape, blocksize", [((96, 320), 64), ((3, 5), 64), ((257, 64), 64), ((40, 1000), 256)])
def test_entries_equal_bitsandbytes_state_dict(shape, blocksize, dtype, double_quant):
    w = _w(shape, dtype)
    ours = layout.weight_entries(KEY, nf4.quantize(w, blocksize, double_quant, target="cpu"))
    theirs = _bnb_entries(w, blocksize, double_quant)
    assert list(ours) == [k for k in ours if k in theirs] and set(ours) == set(theirs)
    for k, t in theirs.items():
        o = ours[k]
        assert (o.dtype, tuple(o.shape)) == (t.dtype, tuple(t.shape)), k
        assert torch.equal(o.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), k
    blob = json.loads(bytes(ours[f"{KEY}.{layout.BLOB_SUFFIX}"].tolist()))
    assert list(blob)[:4] == ["quant_type", "blocksize", "dtype", "shape"] and blob["shape"] == list(shape)


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
@pytest.mark.parametrize("shape, blocksize", [((96, 320), 64), ((7, 9), 32), ((5000, 3), 4096)])
def test_slots_describe_entries(shape, blocksize, double_quant):
    entries = layout.weight_entries(KEY, nf4.quantize(_w(shape), blocksize, double_quant))
    slots = {s.name: s for s in layout.weight_slots(KEY, shape, blocksize, double_quant)}
    assert set(slots) == set(entries)
    for name, s in slots.items():
        t = entries[name]
        assert s.dtype == t.dtype, name
        if s.tail:
            assert name.endswith(layout.BLOB_SUFFIX) and t.numel() <= layout.MAX_BLOB_BYTES
        else:
            assert s.shape == tuple(t.shape) and s.nbytes == t.nbytes, name


def test_blob_fits_the_reserved_room_for_extreme_shapes():
    qw = nf4.QuantizedWeight(torch.zeros(1, 1, dtype=torch.uint8), torch.zeros(1, dtype=torch.uint8),
                             torch.zeros(1), -1.2345678901234567e-30, (2**40, 2**40 - 1), torch.bfloat16, 4096)
    blob = layout.weight_entries(KEY, qw)[f"{KEY}.{layout.BLOB_SUFFIX}"]
    assert blob.numel() <= layout.MAX_BLOB_BYTES


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
def test_read_weight_round_trip(double_quant):
    w = _w((64, 200), torch.float16)
    qw = nf4.quantize(w, 128, double_quant)
    entries = layout.weight_entries(KEY, qw)
    back = layout.read_weight(KEY, entries.__getitem__, where="x.safetensors")
    assert (back.shape, back.dtype, back.blocksize, back.offset) == (qw.shape, qw.dtype, qw.blocksize, qw.offset)
    assert torch.equal(nf4.dequantize(back), nf4.dequantize(qw))


@pytest.mark.parametrize("damage, match", [
    (lambda e: e.pop(f"{KEY}.absmax"), "lacks 'model.layers.0.mlp.down_proj.weight.absmax'"),
    (lambda e: e.update({f"{KEY}.{layout.BLOB_SUFFIX}": torch.tensor(list(b"{nope"), dtype=torch.uint8)}),
     "not valid JSON"),
    (lambda e: e.update({f"{KEY}.{layout.BLOB_SUFFIX}": torch.tensor(
        list(json.dumps({"quant_type": "fp4", "dtype": "bfloat16"}).encode()), dtype=torch.uint8)}), "'fp4'"),
    (lambda e: e.update({KEY: e[KEY][:-1]}), "packed weight is torch.uint8 x"),
    (lambda e: e.update({f"{KEY}.absmax": e[f"{KEY}.absmax"].float()}), "absmax is torch.float32"),
    (lambda e: e.update({f"{KEY}.nested_absmax": e[f"{KEY}.nested_absmax"][:0]}), "nested_absmax is"),
])
def test_read_weight_names_the_culprit(damage, match):
    entries = dict(layout.weight_entries(KEY, nf4.quantize(_w())))
    damage(entries)
    with pytest.raises(InputError, match=match) as exc:
        layout.read_weight(KEY, entries.__getitem__, where="model-00002-of-00003.safetensors")
    assert "model-00002-of-00003.safetensors" in str(exc.value) and KEY in str(exc.value)


def test_prequantized_linear_matches_bitsandbytes_linear():
    """bitsandbytes rebuilds a Linear4bit from our tensors (as transformers does on load) with outputs identical to
    a Linear4bit it quantised itself."""
    w = _w((128, 192), torch.bfloat16, seed=1)
    x = torch.randn(3, 192, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    ref = bnb.nn.Linear4bit(192, 128, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                            compress_statistics=True)
    ref.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True)
    ref = ref.to("cpu")
    entries = layout.weight_entries("weight", nf4.quantize(w, target="cpu"))
    stats = {k.removeprefix("weight."): v for k, v in entries.items() if k != "weight"}
    ours = bnb.nn.Linear4bit(192, 128, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    ours.weight = bnb.nn.Params4bit.from_prequantized(entries["weight"], stats, device="cpu", module=ours)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("skip", [None, ["lm_head", "model.layers.1.mlp"]])
def test_quantization_config_is_what_transformers_writes(dtype, double_quant, skip):
    from transformers import BitsAndBytesConfig

    theirs = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                                bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=skip).to_dict()
    ours = layout.quantization_config(dtype, double_quant, skip)
    assert json.loads(json.dumps(ours)) == json.loads(json.dumps(theirs))
    # and transformers reads it back to the same settings
    back = BitsAndBytesConfig.from_dict(ours)
    assert back.load_in_4bit and back.bnb_4bit_quant_type == "nf4" and back.bnb_4bit_compute_dtype == dtype
    assert back.bnb_4bit_use_double_quant == double_quant and back.llm_int8_skip_modules == skip


def test_key_helpers():
    entries = layout.weight_entries(KEY, nf4.quantize(_w()))
    keys = list(entries) + ["model.norm.weight", "lm_head.weight"]
    assert layout.quantized_keys(keys) == [KEY]
    assert [k for k in keys if layout.is_aux_key(k)] == [k for k in entries if k != KEY]
    assert not layout.is_aux_key("model.layers.0.absmax_norm.weight")
    assert layout.is_prequantized({"quantization_config": {"quant_method": "gptq"}})
    assert not layout.is_prequantized({"model_type": "llama"})
    assert not layout.is_prequantized({"quantization_config": {}})
    assert layout.dtype_from_str("bfloat16") is torch.bfloat16

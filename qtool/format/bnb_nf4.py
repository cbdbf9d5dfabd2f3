"""The on-disk contract of a pre-quantised bitsandbytes-4bit checkpoint — the only module that knows key names.

Per quantised weight ``P.weight`` (bitsandbytes ``Linear4bit._save_to_state_dict`` / ``QuantState.as_dict(packed=True)``):

=======================================  =====  =======================  ===================================
key                                      dtype  shape                    content
=======================================  =====  =======================  ===================================
``P.weight``                             U8     ``[(n + 1) // 2, 1]``    packed 4-bit codes
``P.weight.absmax``                      U8/F32 ``[n_blocks]``           8-bit codes (double quant) or fp32
``P.weight.quant_map``                   F32    ``[16]``                 the NF4 values
``P.weight.nested_absmax``               F32    ``[ceil(n_blocks/256)]`` double quant only
``P.weight.nested_quant_map``            F32    ``[256]``                double quant only: the 8-bit code
``P.weight.quant_state.bitsandbytes__nf4`` U8   ``[len(json)]``          UTF-8 JSON, ``json.dumps`` defaults
=======================================  =====  =======================  ===================================

The JSON blob holds, in this order: quant_type, blocksize, dtype, shape, then (double quant) nested_blocksize,
nested_dtype, nested_offset. bitsandbytes reads blocksize, double quantisation and storage type from these tensors,
not from config.json.
"""
from __future__ import annotations

import json
import math

import numpy as np
import torch

from qtool.errors import InputError
from qtool.nf4.codec import NESTED_BLOCKSIZE, NF4_CODE, QuantizedWeight, dynamic_map_signed
from qtool.format.safetensors import Slot

FORMAT_VERSION = 1  # of qtool's report and layout choices; bitsandbytes' own format has no version field
BLOB_SUFFIX = "quant_state.bitsandbytes__nf4"
AUX_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", BLOB_SUFFIX)
_DTYPE_STR = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_STR_DTYPE = {v: k for k, v in _DTYPE_STR.items()}
MAX_BLOB_BYTES = 512


def _blob(qw: QuantizedWeight) -> bytes:
    d = {"quant_type": "nf4", "blocksize": qw.blocksize, "dtype": _DTYPE_STR[qw.dtype], "shape": list(qw.shape)}
    if qw.double_quant:
        d.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=qw.offset)
    return json.dumps(d).encode("utf-8")


def weight_slots(key: str, shape: tuple[int, ...], blocksize: int, double_quant: bool) -> list[Slot]:
    """The tensors one quantised weight becomes, with sizes known before quantising (the blob is a tail slot)."""
    n = math.prod(shape)
    n_blocks = -(-n // blocksize)
    slots = [Slot(key, torch.uint8, ((n + 1) // 2, 1)), Slot(f"{key}.quant_map", torch.float32, (16,))]
    if double_quant:
        slots += [Slot(f"{key}.absmax", torch.uint8, (n_blocks,)),
                  Slot(f"{key}.nested_absmax", torch.float32, (-(-n_blocks // NESTED_BLOCKSIZE),)),
                  Slot(f"{key}.nested_quant_map", torch.float32, (256,))]
    else:
        slots.append(Slot(f"{key}.absmax", torch.float32, (n_blocks,)))
    slots.append(Slot(f"{key}.{BLOB_SUFFIX}", torch.uint8, (0,), tail=True))
    return slots


def weight_entries(key: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """``{key: tensor}`` for one quantised weight, each tensor with its own storage (safetensors refuses sharing)."""
    out = {key: qw.packed, f"{key}.absmax": qw.absmax, f"{key}.quant_map": torch.tensor(NF4_CODE, dtype=torch.float32)}
    if qw.double_quant:
        out[f"{key}.nested_absmax"] = qw.nested_absmax
        out[f"{key}.nested_quant_map"] = torch.from_numpy(dynamic_map_signed())
    out[f"{key}.{BLOB_SUFFIX}"] = torch.frombuffer(bytearray(_blob(qw)), dtype=torch.uint8)
    return out


def quantized_keys(keys) -> list[str]:
    """The weight keys (``P.weight``) that carry a bitsandbytes NF4 quant state among ``keys``."""
    suffix = "." + BLOB_SUFFIX
    return [k[: -len(suffix)] for k in keys if k.endswith(suffix)]


def is_aux_key(key: str) -> bool:
    return any(key.endswith("." + s) for s in AUX_SUFFIXES)


def read_weight(key: str, get, where: str = "") -> QuantizedWeight:
    """Rebuild a QuantizedWeight from its tensors; ``get(name)`` returns a tensor or raises KeyError.

    Checks what a loader relies on and raises InputError naming ``where`` (a file) and the key otherwise."""
    def need(name):
        try:
            return get(name)
        except KeyError:
            raise InputError(f"{where}: quantised weight {key!r} lacks {name!r}") from None

    try:
        meta = json.loads(bytes(need(f"{key}.{BLOB_SUFFIX}").numpy().tobytes()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{where}: quant state of {key!r} is not valid JSON ({exc})") from exc
    if meta.get("quant_type") != "nf4" or meta.get("dtype") not in _STR_DTYPE:
        raise InputError(f"{where}: {key!r} is {meta.get('quant_type')!r} {meta.get('dtype')!r}; qtool reads NF4 of "
                         "float16/bfloat16/float32 weights")
    shape, blocksize = tuple(meta["shape"]), int(meta["blocksize"])
    n = math.prod(shape)
    packed, absmax = need(key), need(f"{key}.absmax")
    double_quant = "nested_offset" in meta
    nested = need(f"{key}.nested_absmax") if double_quant else None
    problems = []
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        problems.append(f"packed weight is {packed.dtype} x{packed.numel()}, expected uint8 x{(n + 1) // 2}")
    if absmax.numel() != -(-n // blocksize) or absmax.dtype != (torch.uint8 if double_quant else torch.float32):
        problems.append(f"absmax is {absmax.dtype} x{absmax.numel()}")
    if double_quant and (nested.dtype != torch.float32 or nested.numel() != -(-absmax.numel() // NESTED_BLOCKSIZE)):
        problems.append(f"nested_absmax is {nested.dtype} x{nested.numel()}")
    if double_quant and int(meta.get("nested_blocksize", NESTED_BLOCKSIZE)) != NESTED_BLOCKSIZE:
        problems.append(f"nested_blocksize {meta['nested_blocksize']} (bitsandbytes uses 256)")
    if problems:
        raise InputError(f"{where}: quantised weight {key!r} is inconsistent: " + "; ".join(problems))
    offset = float(np.float32(meta["nested_offset"])) if double_quant else None
    return QuantizedWeight(packed.reshape(-1, 1), absmax.reshape(-1), None if nested is None else nested.reshape(-1),
                           offset, shape, _STR_DTYPE[meta["dtype"]], blocksize)


def quantization_config(compute_dtype: torch.dtype, double_quant: bool = True,
                        skip_modules: list[str] | None = None) -> dict:
    """``quantization_config`` for config.json, as transformers' ``BitsAndBytesConfig.to_dict()`` writes it.

    ``load_in_4bit: true`` is what selects the bitsandbytes-4bit quantizer on load; ``bnb_4bit_quant_type`` must be
    spelled out because it defaults to fp4. ``skip_modules=None`` lets transformers skip the output head by itself;
    a list replaces that default, so it must name every Linear left unquantised (lm_head included).
    """
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": _DTYPE_STR[compute_dtype],
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


def is_prequantized(config: dict) -> bool:
    qc = config.get("quantization_config")
    return isinstance(qc, dict) and bool(qc)


def dtype_from_str(name: str) -> torch.dtype:
    return _STR_DTYPE[name]

"""The two inputs of a merge, matched: the base checkpoint (qtool's NF4 folder or a 16-bit folder) read tensor by
tensor in fp32, and which checkpoint weight each adapted module updates."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from qtool.errors import InputError
from qtool.format import bnb_nf4 as layout
from qtool.format.checkpoint import Checkpoint, open_checkpoint, other_files, resolve, shard_names
from qtool.format.peft_adapter import Adapter, LoraFactors
from qtool.format.safetensors import read_header
from qtool.nf4 import codec as nf4


@dataclass
class Base:
    """A base checkpoint: 16-bit (``qtool.format.checkpoint``) or qtool's NF4 folder. ``layout_t`` holds the quantised keys
    whose NF4 tensor is the transpose of the checkpoint layout (Conv1D: the converter quantises ``Wᵀ``)."""

    ck: Checkpoint
    nf4: dict[str, nf4.QuantizedWeight]
    aux: dict[str, list[str]] = field(default_factory=dict)  # NF4 weight key -> its absmax, quant_map, ... keys
    layout_t: set[str] = field(default_factory=set)

    @property
    def is_nf4(self) -> bool:
        return bool(self.nf4)

    @property
    def keys(self) -> list[str]:
        return [k for k in self.ck.keys if not (self.is_nf4 and layout.is_aux_key(k))]

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self.nf4:
            s = self.nf4[key].shape
            return s[::-1] if key in self.layout_t else s
        return self.ck.info(key).shape

    def dtype(self, key: str) -> torch.dtype:
        return self.nf4[key].dtype if key in self.nf4 else self.ck.info(key).dtype

    def fp32(self, key: str, *, writable: bool = False) -> torch.Tensor:
        """The tensor in the checkpoint layout as fp32 (NF4: ``dequantize(qw, float32)``). An fp32 tensor of a 16-bit
        base is a read-only view of the file unless ``writable`` (then a copy)."""
        if key in self.nf4:
            w = nf4.dequantize(self.nf4[key], torch.float32)
            return w.t().contiguous() if key in self.layout_t else w
        t = self.raw(key)
        return t.clone() if writable and t.dtype == torch.float32 else t.float()

    def raw(self, key: str) -> torch.Tensor:
        return self.ck.key_shard[key].tensor(key)

    def files_keys(self, key: str) -> list[str]:
        """The stored tensors behind ``key``: itself, plus its quant-state companions for an NF4 weight."""
        return [key] + self.aux.get(key, [])

    def touch(self, key: str, release: bool = False) -> None:
        """Prefetch (or, once processed, release) the pages of ``key``'s stored tensors."""
        for n in self.files_keys(key):
            (self.ck.key_shard[n].release if release else self.ck.key_shard[n].prefetch)(n)


def open_base(spec) -> Base:
    """Open a 16-bit checkpoint or a qtool/bitsandbytes NF4 folder (validated headers, no tensor data read)."""
    folder = resolve(spec)
    cfg_path = folder / "config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{cfg_path}: cannot read ({exc})",
                         hint="BASE_DIR must be a Hugging Face model folder") from exc
    if not layout.is_prequantized(config):
        return Base(open_checkpoint(folder), {})
    qc = config["quantization_config"]
    if not (qc.get("load_in_4bit") and qc.get("bnb_4bit_quant_type") == "nf4"):
        raise InputError(f"{cfg_path}: quantization_config is {qc.get('quant_method')!r} "
                         f"{qc.get('bnb_4bit_quant_type', '')!r}; qtool merges onto bitsandbytes NF4 or 16-bit bases",
                         hint="pass the NF4 folder the adapter was trained on, or the original 16-bit folder")
    shards = [read_header(folder / name) for name in shard_names(folder)]
    key_shard = {k: s for s in shards for k in s.tensors}
    ck = Checkpoint(folder, config, shards, key_shard, other_files(folder))
    get = lambda n: key_shard[n].tensor(n)  # noqa: E731
    qws = {k: layout.read_weight(k, get, where=key_shard[k].path.name) for k in layout.quantized_keys(key_shard)}
    aux: dict[str, list[str]] = {}
    for name in key_shard:
        if layout.is_aux_key(name):
            owner = next((name[: -len(s) - 1] for s in layout.AUX_SUFFIXES if name.endswith("." + s)), None)
            aux.setdefault(owner, []).append(name)
    return Base(ck, qws, aux)


# ------------------------------------------------------------------------------------------ adapter -> checkpoint
@dataclass(frozen=True)
class Target:
    module: str
    key: str  # the weight key in the checkpoint
    factors: LoraFactors
    fan_in_fan_out: bool  # Conv1D: the stored weight is (in, out)


def match_targets(base: Base, adapter: Adapter, model) -> tuple[dict[str, Target], dict[str, LoraFactors],
                                                                   list[str]]:
    """Map every adapted module to its checkpoint weight key (and, with lora_bias, bias key -> factors); collect
    every problem before raising. Returns (targets, bias_keys, notes)."""
    import torch.nn as nn

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = ()
    modules = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "") or ""
    keys = set(base.keys)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets, bias_keys, problems, notes = {}, {}, [], []

    def key_of(name):
        for k in (name, name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else None):
            if k in keys:
                return k
        return None

    for name, f in adapter.modules.items():
        mod = modules.get(name)
        if mod is None:
            problems.append(f"{name}: no such module in {type(model).__name__} (trained on another model class?)")
            continue
        conv1d = bool(Conv1D) and isinstance(mod, Conv1D)
        if not (type(mod) is nn.Linear or conv1d):
            problems.append(f"{name}: a {type(mod).__name__}; qtool merges LoRA on Linear/Conv1D weights only")
            continue
        if tied and mod is out_emb:
            problems.append(f"{name}: its weight is tied to the input embeddings (tie_word_embeddings); merging would "
                            "change the embeddings too, which the adapter did not do")
            continue
        wkey = key_of(f"{name}.weight")
        if wkey is None:
            problems.append(f"{name}: no {name}.weight in the checkpoint")
            continue
        out_f, in_f = (mod.weight.shape[1], mod.weight.shape[0]) if conv1d else tuple(mod.weight.shape)
        if (f.out_features, f.in_features) != (out_f, in_f):
            problems.append(f"{name}: A {tuple(f.a.shape)} / B {tuple(f.b.shape)} do not fit a {out_f}x{in_f} weight")
            continue
        if f.bias is not None:
            bkey = key_of(f"{name}.bias")
            if bkey is None:
                problems.append(f"{name}: the adapter has lora_B.bias but the base layer has no bias to merge it into")
                continue
            bias_keys[bkey] = f
        if adapter.fan_in_fan_out != conv1d:
            notes.append(f"{name}: fan_in_fan_out={adapter.fan_in_fan_out} but the layer is "
                         f"{type(mod).__name__}; used the layer's layout (as peft does)")
        targets[wkey] = Target(name, wkey, f, conv1d)
    if problems:
        raise InputError(f"{adapter.path}: cannot merge into {base.ck.folder}:\n  - " + "\n  - ".join(problems[:20]))
    return targets, bias_keys, notes


def layout_transposed(base: Base, model) -> set[str]:
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    prefix = getattr(model, "base_model_prefix", "") or ""
    out = set()
    for key, qw in base.nf4.items():
        shape = params.get(key) or params.get(f"{prefix}.{key}")
        if shape is not None and shape != qw.shape and shape == qw.shape[::-1]:
            out.add(key)
    return out

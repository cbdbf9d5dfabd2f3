"""The two inputs of a merge, matched: the base checkpoint (qtool's NF4 folder or a 16-bit folder) read tensor by
tensor in fp32, and which checkpoint weight each adapted module updates.

Tied embeddings (``tie_word_embeddings``: the checkpoint stores one ``(vocab, hidden)`` matrix for the input embedding
and the head). A shared adapter (peft's ``ensure_weight_tying``: the head's factors are the embedding's transposed)
changes both sides by the same ``s · (B A)ᵀ``, so it is merged once into the shared matrix and the tie stays. Any
other adapter of one side (``embed_tokens`` alone, ``lm_head`` alone, or both with their own factors) makes the two
sides differ: the merge unties them — the output gets its own ``lm_head.weight``, started from the shared matrix
(:attr:`Base.untied`), and ``tie_word_embeddings: false``. (peft's ``merge_and_unload`` adds such a delta to the
shared tensor in place, so it changes the other side too; it warns about it.)"""
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
    untied: dict[str, str] = field(default_factory=dict)  # output key -> the base key it starts from (an untied head)

    @property
    def is_nf4(self) -> bool:
        return bool(self.nf4)

    @property
    def keys(self) -> list[str]:
        """The output's tensors in file order: the checkpoint's (not NF4's companions), each untied head after the
        matrix it starts from."""
        out = []
        for k in self.ck.keys:
            if not (self.is_nf4 and layout.is_aux_key(k)):
                out += [k] + [u for u, src in self.untied.items() if src == k]
        return out

    def shape(self, key: str) -> tuple[int, ...]:
        key = self.untied.get(key, key)
        if key in self.nf4:
            s = self.nf4[key].shape
            return s[::-1] if key in self.layout_t else s
        return self.ck.info(key).shape

    def dtype(self, key: str) -> torch.dtype:
        key = self.untied.get(key, key)
        return self.nf4[key].dtype if key in self.nf4 else self.ck.info(key).dtype

    def fp32(self, key: str, *, writable: bool = False) -> torch.Tensor:
        """The tensor in the checkpoint layout as fp32 (NF4: ``dequantize(qw, float32)``). An fp32 tensor of a 16-bit
        base is a read-only view of the file unless ``writable`` (then a copy)."""
        key = self.untied.get(key, key)
        if key in self.nf4:
            w = nf4.dequantize(self.nf4[key], torch.float32)
            return w.t().contiguous() if key in self.layout_t else w
        t = self.raw(key)
        return t.clone() if writable and t.dtype == torch.float32 else t.float()

    def raw(self, key: str) -> torch.Tensor:
        key = self.untied.get(key, key)
        return self.ck.key_shard[key].tensor(key)

    def files_keys(self, key: str) -> list[str]:
        """The stored tensors behind ``key``: itself, plus its quant-state companions for an NF4 weight."""
        key = self.untied.get(key, key)
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


@dataclass
class Matched:
    """What :func:`match_targets` found: weight key -> :class:`Target` to merge, bias key -> factors (lora_bias),
    notes, and ``bypass``: every adapted module for the logits check (a tied head merged through its embedding
    is in ``bypass`` but not in ``targets``)."""

    targets: dict[str, Target]
    bias_keys: dict[str, LoraFactors]
    notes: list[str]
    bypass: list[Target]
    untie: bool = False  # the output config must say tie_word_embeddings: false


def match_targets(base: Base, adapter: Adapter, model) -> Matched:
    """Map every adapted module to its checkpoint weight key (and, with lora_bias, bias key -> factors); collect
    every problem before raising. On tied embeddings sets ``base.untied`` when the head must be untied (module
    docstring); weights peft saved beside an embedding LoRA must equal the base's."""
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
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    targets, bias_keys, problems, notes, bypass = {}, {}, [], [], []
    shared = False  # a tied head that shares the embedding's adapter

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
        if f.embedding != isinstance(mod, nn.Embedding):
            problems.append(f"{name}: a {type(mod).__name__}, but the adapter holds "
                            + ("embedding factors (lora_embedding_A/B)" if f.embedding else "Linear factors for it"))
            continue
        if not (type(mod) is nn.Linear or conv1d or f.embedding):
            problems.append(f"{name}: a {type(mod).__name__}; qtool merges LoRA on Linear/Conv1D/Embedding weights only")
            continue
        wkey = key_of(f"{name}.weight")
        if tied and mod is out_emb and in_emb is not None:
            if f.tied_to is not None and f.tied_to in adapter.modules:  # shared adapter: merged via the embedding
                bypass.append(Target(name, key_of(f"{_path_of(modules, in_emb)}.weight"), f, False))
                shared = True
                notes.append(f"{name}: shares {f.tied_to}'s adapter (ensure_weight_tying); merged once into the tied "
                             "matrix, which stays tied")
                continue
            wkey = wkey or f"{name}.weight"  # a tied checkpoint stores no head: untied below
        if wkey is None:
            problems.append(f"{name}: no {name}.weight in the checkpoint")
            continue
        # Conv1D stores (in, out); an embedding (vocab, hidden), which PEFT's factors see as (in, out) too
        out_f, in_f = (mod.weight.shape[1], mod.weight.shape[0]) if conv1d or f.embedding else tuple(mod.weight.shape)
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
        targets[wkey] = Target(name, wkey, f, conv1d or f.embedding)  # an embedding's update is (B A)ᵀ
        bypass.append(targets[wkey])
    adapted = {id(modules.get(t.module)) for t in targets.values()}
    untie = (tied and not shared and in_emb is not None and out_emb is not None
             and bool({id(in_emb), id(out_emb)} & adapted))
    if untie:
        head_key = f"{_path_of(modules, out_emb)}.weight"
        if key_of(head_key) is None:
            base.untied[head_key] = key_of(f"{_path_of(modules, in_emb)}.weight")
        notes.append("the adapter changes the tied input embedding and output head differently: the merged "
                     f"checkpoint unties them ({head_key} written on its own, tie_word_embeddings: false)")
    emb_key = key_of(f"{_path_of(modules, in_emb)}.weight") if tied and in_emb is not None else None
    problems += _saved_weight_problems(base, adapter, lambda n: key_of(n) or base.untied.get(n) or emb_key)
    if problems:
        raise InputError(f"{adapter.path}: cannot merge into {base.ck.folder}:\n  - " + "\n  - ".join(problems[:20]))
    return Matched(targets, bias_keys, notes, bypass, untie)


def _path_of(modules: dict, module) -> str:
    return next(n for n, m in modules.items() if m is module)


def _saved_weight_problems(base: Base, adapter: Adapter, key_of) -> list[str]:
    """peft saves the full embedding (and head) weights beside an embedding LoRA; merged here only when they are the
    base's own (they differ when the vocabulary was resized, which a LoRA merge cannot express)."""
    problems = []
    for name, w in adapter.saved_weights.items():
        key = key_of(f"{name}.weight")
        if key is None or tuple(base.shape(key)) != tuple(w.shape) or not torch.equal(
                w.float(), base.fp32(key).to(w.dtype).float()):
            problems.append(f"{name}: the adapter carries its own {name} weight, which differs from the base's "
                            "(resized vocabulary or trained tokens); qtool merges LoRA factors only")
    return problems


def layout_transposed(base: Base, model) -> set[str]:
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    prefix = getattr(model, "base_model_prefix", "") or ""
    out = set()
    for key, qw in base.nf4.items():
        shape = params.get(key) or params.get(f"{prefix}.{key}")
        if shape is not None and shape != qw.shape and shape == qw.shape[::-1]:
            out.add(key)
    return out

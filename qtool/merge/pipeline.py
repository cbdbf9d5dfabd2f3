"""``qtool merge``: fold a LoRA adapter into its base and write a 16-bit Hugging Face checkpoint.

For every adapted module ``W' = W0 + s · B A`` (:func:`merged_weight`, fp32, transposed for GPT-2 ``Conv1D``), then
``W'`` is rounded once to the output dtype. With an NF4 base (qtool's converted folder, the recommended input),
``W0 = dequantize(NF4)`` in fp32 — bit-identical to bitsandbytes' fp32 dequantisation — so the merged model is the
model that was trained, up to that one rounding. With a 16-bit base ``W0`` is the 16-bit weight: if the adapter was
trained on the NF4 conversion of that folder, this adds the quantisation error back (reported, with its size).

The pipeline streams like :mod:`qtool.convert.pipeline`: one tensor at a time from memory-mapped shards into output shards
laid out in advance, the next tensor prefetched and processed pages released; the folder is built under a temporary
name and renamed only when complete and verified. ``requantize=True`` writes NF4 again (a separate, lossy, explicit
step: :func:`requantize`) and reports how much of each update survived.

Verification (default on) compares logits on fixed random tokens: the merged model as plain transformers loads it
(fp32) against the base in fp32 with the adapter applied beside it (forward hooks adding ``s · x Aᵀ Bᵀ``), and
reports the adapter's own effect (the bypass against the bare base) as the yardstick. Its cost is two fp32 copies of the model
in host memory; ``verify=False`` skips it for models that do not fit.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from qtool import __version__

from qtool.format import bnb_nf4 as layout

from qtool.nf4 import codec as nf4
from qtool.format.peft_adapter import Adapter, LoraFactors, load_adapter
from qtool.format.atomic import check_destination, staging_dir, write_text
from qtool.convert.pipeline import peak_rss_bytes
from qtool.errors import InputError
from qtool.format.safetensors import ShardWriter, Slot, read_header
from qtool.format.checkpoint import (DEFAULT_MAX_SHARD, Checkpoint, open_checkpoint, other_files, plan_shards,
                                     resolve, shard_name, shard_names, write_metadata)
from qtool.merge.verify import VERIFY_TOLERANCE, verify_merged  # noqa: F401 (VERIFY_TOLERANCE: public)
from qtool.convert.verify import sha256_file

REPORT_NAME = "qtool_merge_report.json"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ProgressFn = Callable[[int, int, str], None]  # (bytes done, bytes total, tensor name)


# ------------------------------------------------------------------------------------------------------ pure math
def delta_weight(a: torch.Tensor, b: torch.Tensor, scale: float, fan_in_fan_out: bool = False) -> torch.Tensor:
    """``dW = s · B A`` in fp32, shaped like the stored weight: ``(out, in)``, or ``(in, out)`` with
    ``fan_in_fan_out`` (GPT-2 ``Conv1D``). Same operation order as peft 0.21.2 ``Linear.get_delta_weight``."""
    dw = (b.float() @ a.float()) * scale
    return dw.t() if fan_in_fan_out else dw


def merged_weight(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, fan_in_fan_out: bool = False,
                  *, name: str = "weight") -> torch.Tensor:
    """``W' = W0 + s · B A`` as a new fp32 tensor (``w0`` is not modified). Raises InputError naming ``name`` when
    the update or the result holds NaN/Inf, so that no non-finite weight is ever written."""
    return _add_update(w0, delta_weight(a, b, scale, fan_in_fan_out), name)


def _add_update(w0: torch.Tensor, dw: torch.Tensor, name: str) -> torch.Tensor:
    if tuple(dw.shape) != tuple(w0.shape):
        raise InputError(f"module {name!r}: the adapter's update is {tuple(dw.shape)} but the weight is "
                         f"{tuple(w0.shape)}", hint="the adapter was trained on a different model")
    w = w0.float() + dw
    if not torch.isfinite(w).all():
        culprit = "the adapter's update s·B·A" if not torch.isfinite(dw).all() else "W0 + s·B·A"
        raise InputError(f"module {name!r}: {culprit} holds {int((~torch.isfinite(w)).sum())} NaN/Inf values",
                         hint="the adapter is broken (diverged training?) or its scale overflows fp32")
    return w


def update_kept(w_out: torch.Tensor, w_none: torch.Tensor, dw: torch.Tensor) -> dict:
    """How much of an update ``dw`` a stored weight still carries. ``e = w_out - w_none`` is the change the stored
    model sees (``w_out``: the written weight as a loader reads it; ``w_none``: what would be there without the
    adapter). ``kept = <e, dW> / |dW|²`` (1: all of dW is there, 0: none), ``rel_error = |e - dW| / |dW|``."""
    e = w_out.float() - w_none.float()
    dw = dw.float()
    d2 = float((dw * dw).sum())
    if d2 == 0:
        return {"kept": None, "rel_error": None}
    return {"kept": float((e * dw).sum()) / d2, "rel_error": math.sqrt(float(((e - dw) ** 2).sum()) / d2)}


def requantize(w: torch.Tensor, *, blocksize: int = 64, double_quant: bool = True, target: str = "cuda",
               name: str = "weight") -> nf4.QuantizedWeight:
    """Quantise a merged weight to NF4 again: lossy by design (an update much smaller than a block's absmax mostly
    rounds away). ``w`` is quantised in its dtype, as ``qtool convert`` of the merged 16-bit model would."""
    return nf4.quantize(w, blocksize, double_quant, target, name=name)


# ------------------------------------------------------------------------------------------------------- the base
@dataclass
class _Base:
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

    def fp32(self, key: str) -> torch.Tensor:
        """The tensor in the checkpoint layout as fp32 (NF4: ``dequantize(qw, float32)``); may be a read-only view."""
        if key in self.nf4:
            w = nf4.dequantize(self.nf4[key], torch.float32)
            return w.t().contiguous() if key in self.layout_t else w
        return self.ck.key_shard[key].tensor(key).float()

    def raw(self, key: str) -> torch.Tensor:
        return self.ck.key_shard[key].tensor(key)

    def files_keys(self, key: str) -> list[str]:
        """The stored tensors behind ``key``: itself, plus its quant-state companions for an NF4 weight."""
        return [key] + self.aux.get(key, [])

    def touch(self, key: str, release: bool = False) -> None:
        """Prefetch (or, once processed, release) the pages of ``key``'s stored tensors."""
        for n in self.files_keys(key):
            (self.ck.key_shard[n].release if release else self.ck.key_shard[n].prefetch)(n)


def open_base(spec) -> _Base:
    """Open a 16-bit checkpoint or a qtool/bitsandbytes NF4 folder (validated headers, no tensor data read)."""
    folder = resolve(spec)
    cfg_path = folder / "config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{cfg_path}: cannot read ({exc})",
                         hint="BASE_DIR must be a Hugging Face model folder") from exc
    if not layout.is_prequantized(config):
        return _Base(open_checkpoint(folder), {})
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
    return _Base(ck, qws, aux)


# ------------------------------------------------------------------------------------------ adapter -> checkpoint
@dataclass(frozen=True)
class _Target:
    module: str
    key: str  # the weight key in the checkpoint
    factors: LoraFactors
    fan_in_fan_out: bool  # Conv1D: the stored weight is (in, out)


def _match_targets(base: _Base, adapter: Adapter, model) -> tuple[dict[str, _Target], dict[str, LoraFactors],
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
        targets[wkey] = _Target(name, wkey, f, conv1d)
    if problems:
        raise InputError(f"{adapter.path}: cannot merge into {base.ck.folder}:\n  - " + "\n  - ".join(problems[:20]))
    return targets, bias_keys, notes


def _layout_transposed(base: _Base, model) -> set[str]:
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    prefix = getattr(model, "base_model_prefix", "") or ""
    out = set()
    for key, qw in base.nf4.items():
        shape = params.get(key) or params.get(f"{prefix}.{key}")
        if shape is not None and shape != qw.shape and shape == qw.shape[::-1]:
            out.add(key)
    return out


# -------------------------------------------------------------------------------------------------- the pipeline
@dataclass
class MergeResult:
    out: Path
    base_kind: str  # "nf4" or "16-bit"
    modules: list[dict]  # per adapted module: norms, max |dW|, how much of dW the output keeps
    verification: dict | None
    shards: dict[str, dict]  # file name -> {"bytes", "sha256"}
    seconds: float
    output_bytes: int
    peak_rss_bytes: int
    settings: dict
    notes: list[str] = field(default_factory=list)
    quantisation_error: dict | None = None  # 16-bit base: what using W instead of dequant(NF4(W)) adds back

    def to_json(self) -> dict:
        return {"qtool_version": __version__, "output": str(self.out), "base_kind": self.base_kind,
                "settings": self.settings, "seconds": round(self.seconds, 3), "output_bytes": self.output_bytes,
                "peak_rss_bytes": self.peak_rss_bytes, "shards": self.shards, "notes": self.notes,
                "quantisation_error": self.quantisation_error, "verification": self.verification,
                "modules": self.modules}


def _out_dtype(base: _Base, dtype) -> torch.dtype:
    if dtype is not None:
        if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
            return dtype
        if dtype in DTYPES:
            return DTYPES[dtype]
        raise InputError(f"--dtype {dtype!r}: not one of {', '.join(DTYPES)}")
    name = base.ck.config.get("dtype") or base.ck.config.get("torch_dtype")
    if name in ("float16", "bfloat16", "float32"):
        return layout.dtype_from_str(name)
    floats = {base.dtype(k) for k in base.keys} & {torch.float16, torch.bfloat16}
    return floats.pop() if len(floats) == 1 else torch.bfloat16


def merge(base, adapter, out, *, dtype: str | torch.dtype | None = None, requantize_nf4: bool = False,
          max_shard_bytes: int = DEFAULT_MAX_SHARD, overwrite: bool = False, verify: bool = True,
          target: str = "cuda", progress: ProgressFn | None = None) -> MergeResult:
    """Merge ``adapter`` (folder or :class:`Adapter`) into ``base`` (qtool NF4 folder or 16-bit folder) and write the
    checkpoint ``out`` (see the module docstring). ``dtype``: 'bf16' | 'fp16' | 'fp32' (default: the config's).
    ``requantize_nf4``: write NF4 again (``target`` picks whose bytes, as in ``qtool convert``). Raises
    InputError/OutputError/VerificationError; on any error ``out`` is left as it was."""
    from qtool.convert.selection import meta_model, select

    t0 = time.perf_counter()
    ad = adapter if isinstance(adapter, Adapter) else load_adapter(adapter)
    b = open_base(base)
    try:
        check_destination(Path(out), overwrite, (b.ck.folder, ad.path))  # fail before any work; checked again below
        model = meta_model(b.ck.config, b.ck.folder)
        b.layout_t = _layout_transposed(b, model)
        targets, bias_keys, notes = _match_targets(b, ad, model)
        out_dtype = _out_dtype(b, dtype)
        # which weights NF4 covers: the base's own, or (16-bit base) the ones `qtool convert` would quantise
        sel = None if b.is_nf4 else select(b.ck.config, b.ck.folder, b.keys)
        nf4_keys = {k: k in b.layout_t for k in b.nf4} if b.is_nf4 else dict(sel.quantize)
        requant = nf4_keys if requantize_nf4 else {}
        settings = {"base": str(b.ck.folder), "adapter": str(ad.path), "dtype": str(out_dtype).removeprefix("torch."),
                    "requantize": requantize_nf4, "target": target, "verify": verify,
                    "max_shard_bytes": max_shard_bytes, "n_modules": len(targets)}
        plan = _plan(b, requant, out_dtype, max_shard_bytes)
        total = sum(b.ck.info(k).nbytes for k in b.ck.keys)
        qstats = {"sq_err": 0.0, "sq_w": 0.0, "n": 0} if not b.is_nf4 else None
        kept_nf4: dict[str, nf4.QuantizedWeight] = {}  # 16-bit base + verify: NF4(W0), to rebuild the trained model
        with staging_dir(Path(out), overwrite, inputs=(b.ck.folder, ad.path)) as stage:
            rows, weight_map, done = [], {}, 0
            order = [k for shard in plan for k, _ in shard]
            following = dict(zip(order, order[1:]))
            for i, groups in enumerate(plan):
                name = shard_name(i, len(plan))
                writer = ShardWriter(stage / name, [s for _, slots in groups for s in slots],
                                     max_tail_bytes=layout.MAX_BLOB_BYTES)
                try:
                    for key, slots in groups:
                        if key in following:
                            b.touch(following[key])
                        entries, row = _merge_one(b, key, targets, bias_keys, out_dtype, requant, nf4_keys, target,
                                                  qstats, kept_nf4 if verify else None)
                        for n, t in entries.items():
                            writer.write(n, t)
                            weight_map[n] = name
                        if row:
                            rows.append(row)
                        b.touch(key, release=True)
                        done += sum(b.ck.info(n).nbytes for n in b.files_keys(key))
                        if progress:
                            progress(done, total, key)
                    writer.close()
                except BaseException:
                    writer.abort()
                    raise
            shards = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                      for p in sorted(stage.glob("*.safetensors"))}
            write_metadata(stage, _config(b, out_dtype, requantize_nf4, sel), weight_map, b.ck)
            qerr = _quantisation_note(qstats, rows, notes, requantize_nf4) if qstats else None
            result = MergeResult(Path(out), "nf4" if b.is_nf4 else "16-bit", rows, None, shards, 0.0,
                                 sum(s["bytes"] for s in shards.values()), 0, settings, notes, qerr)
            if verify:
                result.verification = verify_merged(stage, b, targets, out_dtype, requantize_nf4, kept_nf4, nf4_keys)
            result.seconds = time.perf_counter() - t0
            result.peak_rss_bytes = peak_rss_bytes()
            write_text(stage / REPORT_NAME, json.dumps(result.to_json(), indent=1))
        return result
    finally:
        b.ck.close()


def _plan(b: _Base, requant: dict[str, bool], out_dtype, max_shard_bytes: int) -> list[list[tuple[str, list[Slot]]]]:
    """Output slots per base key, in file order, cut into shards of at most ``max_shard_bytes`` (as convert does)."""
    groups = []
    for key in b.keys:
        if key in requant:
            qw = b.nf4.get(key)
            shape = qw.shape if qw else (b.shape(key)[::-1] if requant[key] else b.shape(key))
            slots = layout.weight_slots(key, tuple(shape), qw.blocksize if qw else 64, qw.double_quant if qw else True)
            nbytes = sum(s.nbytes for s in slots) + layout.MAX_BLOB_BYTES
        else:
            dt = b.dtype(key)
            slots = [Slot(key, out_dtype if dt.is_floating_point else dt, tuple(b.shape(key)))]
            nbytes = slots[0].nbytes
        groups.append(((key, slots), nbytes))
    return plan_shards(groups, max_shard_bytes)


def _finite_or_raise(t: torch.Tensor, what: str, dtype) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise InputError(f"{what}: {int((~torch.isfinite(t)).sum())} NaN/Inf values after rounding to {dtype}",
                         hint="the values overflow this dtype; use --dtype bf16 or fp32")


def _merge_one(b: _Base, key: str, targets: dict, bias_keys: dict, out_dtype, requant: dict, nf4_keys: dict,
               target: str, qstats: dict | None, kept_nf4: dict | None) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The output tensors for one base key, and (adapted modules) the report row."""
    t = targets.get(key)
    raw_dtype = b.dtype(key)
    if not raw_dtype.is_floating_point:
        return {key: b.raw(key)}, None
    if b.is_nf4 and key in requant and t is None:
        return layout.weight_entries(key, b.nf4[key]), None  # untouched NF4 weight: copied byte for byte
    w0 = b.fp32(key)
    transposed = nf4_keys.get(key, False)  # Conv1D: NF4 holds Wᵀ
    qw0 = None
    if qstats is not None and key in nf4_keys:  # 16-bit base: the NF4 weights the adapter was (likely) trained on
        w_src = b.raw(key)
        qw0 = nf4.quantize(w_src.t().contiguous() if transposed else w_src, target=target, name=key)
        err = nf4.reconstruction_error(w_src.t() if transposed else w_src, qw0)["rel_error"]
        sq_w = float((w0 * w0).sum())
        qstats["sq_err"] += err * err * sq_w
        qstats["sq_w"] += sq_w
        qstats["n"] += 1
        if kept_nf4 is not None:
            kept_nf4[key] = qw0
    row = None
    if t is not None:
        f = t.factors
        dw = delta_weight(f.a, f.b, f.scale, t.fan_in_fan_out)
        w = _add_update(w0, dw, t.module)  # = merged_weight(w0, a, b, s), keeping dW for the report
        row = {"module": t.module, "key": key, "rank": f.rank, "alpha": f.alpha, "scale": f.scale,
               "w0_norm": float(w0.norm()), "dw_norm": float(dw.norm()), "dw_max_abs": float(dw.abs().max())}
        row["dw_rel"] = row["dw_norm"] / row["w0_norm"] if row["w0_norm"] else None
        if qw0 is not None:
            qerr = nf4.dequantize(qw0, torch.float32)
            qerr = (qerr.t() if transposed else qerr) - w0
            row["quant_error_over_dw"] = float(qerr.norm()) / row["dw_norm"] if row["dw_norm"] else None
    elif key in bias_keys:
        f = bias_keys[key]
        w = w0 + f.bias.float() * f.scale  # peft: lora_B(lora_A(x)) * s, and lora_B carries the bias
    else:
        w = w0
    if key not in requant:
        out = w.to(out_dtype)
        if out_dtype == torch.float16 and (t is not None or key in bias_keys or raw_dtype != torch.float16):
            _finite_or_raise(out, f"tensor {key!r}" if t is None else f"module {t.module!r}", out_dtype)
        if row is not None:
            row.update({f"dw_{k}": v for k, v in update_kept(out, w0.to(out_dtype), dw).items()})
        return {key: out}, row
    # --requantize: the merged weight rounded to the output dtype, quantised as `qtool convert` would
    w_q = (w.t() if transposed else w).to(out_dtype).contiguous()
    _finite_or_raise(w_q, f"module {t.module!r}" if t else f"tensor {key!r}", out_dtype)
    q = b.nf4.get(key)
    qw = requantize(w_q, blocksize=q.blocksize if q else 64, double_quant=q.double_quant if q else True,
                    target=target, name=key)
    if row is not None:
        ref = nf4.dequantize(q if q else qw0, torch.float32)  # the NF4 model without the adapter
        back = nf4.dequantize(qw, torch.float32)
        row.update({f"dw_{k}": v for k, v in update_kept(back, ref, dw.t() if transposed else dw).items()})
    return layout.weight_entries(key, qw), row


def _config(b: _Base, out_dtype, requantized: bool, sel) -> dict:
    """The base's config for the output: the output dtype, and a quantization_config only when writing NF4."""
    config = dict(b.ck.config)
    qc = config.pop("quantization_config", None)
    name = str(out_dtype).removeprefix("torch.")
    config["dtype"] = name
    if "torch_dtype" in config:
        config["torch_dtype"] = name
    if requantized:
        config["quantization_config"] = qc if qc else layout.quantization_config(out_dtype, True,
                                                                                  sel.skip_modules_config)
    return config


def _quantisation_note(qstats: dict, rows: list[dict], notes: list[str], requantized: bool) -> dict:
    rel = math.sqrt(qstats["sq_err"] / qstats["sq_w"]) if qstats["sq_w"] else 0.0
    ratios = [r["quant_error_over_dw"] for r in rows if r.get("quant_error_over_dw") is not None]
    median = sorted(ratios)[len(ratios) // 2] if ratios else None
    out = {"rel_error": rel, "n_weights": qstats["n"], "median_quant_error_over_dw": median}
    if not requantized:
        notes.insert(0, f"the base is 16-bit: if the adapter was trained on its NF4 conversion (QLoRA), the merged "
                        f"model uses W where training saw dequant(NF4(W)), which adds the quantisation error back: "
                        f"|W - dequant(NF4(W))| / |W| = {100 * rel:.2f}% over {qstats['n']} weights"
                        + (f", {median:.1f}x the adapter's update |dW| (median over adapted modules)"
                           if median is not None else "")
                        + "; merge onto the NF4 folder the adapter was trained on to get the trained model")
    return out

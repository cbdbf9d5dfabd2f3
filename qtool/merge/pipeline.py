"""``qtool merge``: fold a LoRA adapter into its base and write a 16-bit Hugging Face checkpoint.

For every adapted module ``W' = W0 + s · B A`` (:mod:`qtool.merge.math`, fp32, transposed for GPT-2 ``Conv1D``),
then ``W'`` is rounded once to the output dtype. With an NF4 base (qtool's converted folder, the recommended input),
``W0 = dequantize(NF4)`` in fp32 — bit-identical to bitsandbytes' fp32 dequantisation — so the merged model is the
model that was trained, up to that one rounding. With a 16-bit base ``W0`` is the 16-bit weight: if the adapter was
trained on the NF4 conversion of that folder, this adds the quantisation error back (reported, with its size).

The pipeline streams like :mod:`qtool.convert.pipeline`: one tensor at a time from memory-mapped shards into output
shards laid out in advance (:mod:`qtool.format.checkpoint`), the next tensor prefetched and processed pages released;
each finished shard is hashed in the background; the folder is built under a temporary name and renamed only when
complete and verified. ``requantize=True`` writes NF4 again (a separate, lossy, explicit step:
:func:`qtool.merge.math.requantize`) and reports how much of each update survived.

Verification (default on, :mod:`qtool.merge.verify`) compares logits on fixed random tokens: the merged model as plain
transformers loads it (fp32) against the base in fp32 with the adapter applied beside it, and reports the adapter's
own effect as the yardstick. The base's fp32 weights are kept from the merge pass (dequantised once), so it costs
one fp32 copy of the model in host memory during the pass and the check; ``verify=False`` skips it for models that
do not fit.
"""
from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from qtool import __version__
from qtool.convert.pipeline import peak_rss_bytes
from qtool.format.report import sha256_file
from qtool.errors import InputError
from qtool.format import bnb_nf4 as layout
from qtool.format.atomic import check_destination, staging_dir, write_text
from qtool.format.checkpoint import DEFAULT_MAX_SHARD, plan_shards, shard_name, write_metadata
from qtool.format.peft_adapter import Adapter, load_adapter
from qtool.format.safetensors import ShardWriter, Slot
from qtool.merge.base import Base, layout_transposed, match_targets, open_base
from qtool.merge.math import add_update, delta_weight, merge_rounded, requantize, update_kept
from qtool.merge.refusal import refuse_unmergeable
from qtool.merge.verify import VERIFY_TOLERANCE, verify_merged  # noqa: F401 (VERIFY_TOLERANCE: public)
from qtool.nf4 import codec as nf4

REPORT_NAME = "qtool_merge_report.json"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Unit roundoff of each output dtype (half a unit in the last place, relative): 2^-(mantissa bits + 1).
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}
# The rounding warning fires when the median module's 'dW error' (|stored change - dW| / |dW|) reaches this: the
# rounding noise is at least half the update (1.0 means as far from dW as dropping the update).
ROUNDING_WARNING_ERROR = 0.5
ProgressFn = Callable[[int, int, str], None]  # (bytes done, bytes total, tensor name)


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
    warnings: list[str] = field(default_factory=list)  # things the user should act on (printed on stderr)
    phase_seconds: dict[str, float] = field(default_factory=dict)  # wall time of each phase, in order

    def to_json(self) -> dict:
        return {"qtool_version": __version__, "output": str(self.out), "base_kind": self.base_kind,
                "settings": self.settings, "seconds": round(self.seconds, 3),
                "phase_seconds": {k: round(v, 3) for k, v in self.phase_seconds.items()},
                "output_bytes": self.output_bytes, "peak_rss_bytes": self.peak_rss_bytes, "shards": self.shards,
                "warnings": self.warnings, "notes": self.notes, "quantisation_error": self.quantisation_error,
                "verification": self.verification, "modules": self.modules}


def _out_dtype(base: Base, dtype) -> torch.dtype:
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


def check_base_matches(adapter_dir: Path, base_dir: Path, base_is_nf4: bool) -> None:
    """An adapter qtool trained records the base it was trained on (``qtool_adapter.json``): merging it onto another
    NF4 base is refused, naming the expected one. Onto a 16-bit folder: allowed for the ``zero``/``symmetric`` inits
    (the original weights; the report says what that costs), refused for ``pissa``/``loftq``, whose base is the
    residual the converter wrote. Adapters from elsewhere (no record) are not checked."""
    from qtool.adapters.spec import CONVERTER_INITS
    from qtool.format.adapter_meta import base_fingerprint, read_qtool_meta

    meta = read_qtool_meta(adapter_dir)
    if meta is None or "base" not in meta:
        return
    init = meta["spec"].get("init", "zero")
    if not base_is_nf4:
        if init in CONVERTER_INITS:
            raise InputError(f"{adapter_dir} was trained with --init {init}: its base is the NF4 residual that "
                             f"`qtool convert --lora-init {init}` wrote, not the 16-bit model {base_dir}",
                             hint="merge it onto the converted folder it was trained on")
        return
    expected = meta["base"].get("shards_sha256", {})
    found = base_fingerprint(base_dir).get("shards_sha256", {})
    if expected != found:
        want = ", ".join(f"{n} {h[:12]}" for n, h in sorted(expected.items()))
        raise InputError(f"{adapter_dir} was trained on another base than {base_dir}: it expects the shards "
                         f"{want} (sha256)", hint="merge onto the NF4 folder the adapter was trained on (its "
                         f"adapter_config.json names it: base_model_name_or_path), or onto the 16-bit original")


def merge(base, adapter, out, *, dtype: str | torch.dtype | None = None, requantize_nf4: bool = False,
          max_shard_bytes: int = DEFAULT_MAX_SHARD, overwrite: bool = False, verify: bool = True,
          target: str = "cuda", progress: ProgressFn | None = None) -> MergeResult:
    """Merge ``adapter`` (folder or :class:`Adapter`) into ``base`` (qtool NF4 folder or 16-bit folder) and write the
    checkpoint ``out`` (see the module docstring). ``dtype``: 'bf16' | 'fp16' | 'fp32' (default: the config's).
    ``requantize_nf4``: write NF4 again (``target`` picks whose bytes, as in ``qtool convert``). Raises
    InputError/OutputError/VerificationError; on any error ``out`` is left as it was."""
    from qtool.convert.selection import meta_model, select

    t0 = lap = time.perf_counter()
    phases: dict[str, float] = {}

    def phase(name: str) -> None:
        nonlocal lap
        now = time.perf_counter()
        phases[name] = now - lap
        lap = now

    if not isinstance(adapter, Adapter):
        refuse_unmergeable(adapter)  # Houlsby adapters and prefixes: the reason, before anything is read
    ad = adapter if isinstance(adapter, Adapter) else load_adapter(adapter)
    b = open_base(base)
    try:
        check_destination(Path(out), overwrite, (b.ck.folder, ad.path))  # fail before any work; checked again below
        check_base_matches(ad.path, b.ck.folder, b.is_nf4)
        model = meta_model(b.ck.config, b.ck.folder)  # the model class on the meta device (imports transformers)
        b.layout_t = layout_transposed(b, model)
        matched = match_targets(b, ad, model)
        targets, bias_keys, notes = matched.targets, matched.bias_keys, matched.notes
        out_dtype = _out_dtype(b, dtype)
        # which weights NF4 covers: the base's own, or (16-bit base) the ones `qtool convert` would quantise
        sel = None if b.is_nf4 else select(b.ck.config, b.ck.folder, b.keys)
        nf4_keys = {k: k in b.layout_t for k in b.nf4} if b.is_nf4 else dict(sel.quantize)
        requant = nf4_keys if requantize_nf4 else {}
        settings = {"base": str(b.ck.folder), "adapter": str(ad.path), "dtype": str(out_dtype).removeprefix("torch."),
                    "requantize": requantize_nf4, "target": target, "verify": verify,
                    "max_shard_bytes": max_shard_bytes, "n_modules": len(targets)}
        plan = _plan(b, requant, out_dtype, max_shard_bytes)
        total = sum(b.ck.info(k).nbytes for k in b.ck.keys) + sum(b.ck.info(k).nbytes for k in b.untied.values())
        qstats = {"sq_err": 0.0, "sq_w": 0.0, "n": 0} if not b.is_nf4 else None
        kept_nf4: dict[str, nf4.QuantizedWeight] = {}  # 16-bit base + verify: NF4(W0), to rebuild the trained model
        base_fp32: dict[str, torch.Tensor] | None = {} if verify else None  # W0 as computed here, for the check
        phase("open")
        with staging_dir(Path(out), overwrite, inputs=(b.ck.folder, ad.path)) as stage, \
                ThreadPoolExecutor(1, thread_name_prefix="qtool-hash") as hasher:
            rows, weight_map, hashes, done = [], {}, {}, 0
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
                                                  qstats, kept_nf4 if verify else None, base_fp32)
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
                hashes[name] = hasher.submit(sha256_file, stage / name)  # beside the next shard and the check
            phase("merge")
            write_metadata(stage, _config(b, out_dtype, requantize_nf4, sel, matched.untie), weight_map, b.ck)
            qerr = _quantisation_note(qstats, rows, notes, requantize_nf4) if qstats else None
            warning = None if requantize_nf4 else _rounding_warning(rows, out_dtype)
            result = MergeResult(Path(out), "nf4" if b.is_nf4 else "16-bit", rows, None, {}, 0.0, 0, 0, settings,
                                 notes, qerr, [warning] if warning else [])
            phase("metadata")
            if verify:
                result.verification = verify_merged(stage, b, base_fp32, matched.bypass, out_dtype, requantize_nf4,
                                                    kept_nf4, nf4_keys)
                phase("verify")
            result.shards = {n: {"bytes": (stage / n).stat().st_size, "sha256": f.result()}
                             for n, f in sorted(hashes.items())}
            result.output_bytes = sum(s["bytes"] for s in result.shards.values())
            phase("hash (wait)")
            result.phase_seconds = phases
            result.seconds = time.perf_counter() - t0
            result.peak_rss_bytes = peak_rss_bytes()
            write_text(stage / REPORT_NAME, json.dumps(result.to_json(), indent=1))
        return result
    finally:
        b.ck.close()


def _plan(b: Base, requant: dict[str, bool], out_dtype, max_shard_bytes: int) -> list[list[tuple[str, list[Slot]]]]:
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


def _merge_one(b: Base, key: str, targets: dict, bias_keys: dict, out_dtype, requant: dict, nf4_keys: dict,
               target: str, qstats: dict | None, kept_nf4: dict | None, base_fp32: dict | None
               ) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The output tensors for one base key, and (adapted modules) the report row. ``base_fp32`` (when verifying)
    receives the fp32 W0 this computed, so that the check does not dequantise again."""
    t = targets.get(key)
    raw_dtype = b.dtype(key)
    if not raw_dtype.is_floating_point:
        return {key: b.raw(key)}, None
    if b.is_nf4 and key in requant and t is None:
        return layout.weight_entries(key, b.nf4[key]), None  # untouched NF4 weight: copied byte for byte
    if t is None and key not in bias_keys and key not in b.nf4 and key not in requant \
            and (qstats is None or key not in nf4_keys):  # untouched 16-bit tensor: one rounding, no fp32 copy
        raw = b.raw(key)
        out = raw if raw_dtype == out_dtype else raw.to(out_dtype)  # via fp32 or not: the same single rounding
        if out_dtype == torch.float16 and raw_dtype != torch.float16:
            _finite_or_raise(out, f"tensor {key!r}", out_dtype)
        return {key: out}, None
    w0 = b.fp32(key, writable=base_fp32 is not None)
    if base_fp32 is not None:
        base_fp32[key] = w0  # not modified below
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
    row = dw = None
    if t is not None:
        f = t.factors
        dw = delta_weight(f.a, f.b, f.scale, t.fan_in_fan_out)
        row = {"module": t.module, "key": key, "rank": f.rank, "alpha": f.alpha, "scale": f.scale}
    if key not in requant:
        if t is not None:  # W' = W0 + dW rounded once, with the report's numbers (merge_rounded = merged_weight)
            out, stats = merge_rounded(w0, dw, out_dtype, t.module)
            row.update(stats)
        elif key in bias_keys:
            f = bias_keys[key]
            out = (w0 + f.bias.float() * f.scale).to(out_dtype)  # peft: lora_B(lora_A(x)) * s; lora_B has the bias
        else:
            out = w0.to(out_dtype)
        if out_dtype == torch.float16 and (t is not None or key in bias_keys or raw_dtype != torch.float16):
            _finite_or_raise(out, f"tensor {key!r}" if t is None else f"module {t.module!r}", out_dtype)
        if qw0 is not None and row is not None:
            _quant_error_over_dw(row, qw0, w0, transposed)
        return {key: out}, row
    # --requantize: the merged weight rounded to the output dtype, quantised as `qtool convert` would
    if t is not None:
        w = add_update(w0, dw, t.module)
        row.update(_norms(w0, dw))
    elif key in bias_keys:
        w = w0 + bias_keys[key].bias.float() * bias_keys[key].scale
    else:
        w = w0
    if qw0 is not None and row is not None:
        _quant_error_over_dw(row, qw0, w0, transposed)
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


def _norms(w0: torch.Tensor, dw: torch.Tensor) -> dict:
    w0_norm, dw_norm = float(w0.norm()), float(dw.norm())
    return {"w0_norm": w0_norm, "dw_norm": dw_norm, "dw_max_abs": float(dw.abs().max()),
            "dw_rel": dw_norm / w0_norm if w0_norm else None}


def _quant_error_over_dw(row: dict, qw0: nf4.QuantizedWeight, w0: torch.Tensor, transposed: bool) -> None:
    """16-bit base: |dequant(NF4(W0)) - W0| / |dW|, how the error that training saw compares with the update."""
    qerr = nf4.dequantize(qw0, torch.float32)
    qerr = (qerr.t() if transposed else qerr) - w0
    row["quant_error_over_dw"] = float(qerr.norm()) / row["dw_norm"] if row["dw_norm"] else None


def _config(b: Base, out_dtype, requantized: bool, sel, untie: bool = False) -> dict:
    """The base's config for the output: the output dtype, a quantization_config only when writing NF4, and
    ``tie_word_embeddings: false`` when the merge untied the embeddings (:mod:`qtool.merge.base`)."""
    config = dict(b.ck.config)
    if untie:
        config["tie_word_embeddings"] = False
    qc = config.pop("quantization_config", None)
    name = str(out_dtype).removeprefix("torch.")
    config["dtype"] = name
    if "torch_dtype" in config:
        config["torch_dtype"] = name
    if requantized:
        config["quantization_config"] = qc if qc else layout.quantization_config(out_dtype, True,
                                                                                  sel.skip_modules_config)
    return config


def _rounding_warning(rows: list[dict], out_dtype: torch.dtype) -> str | None:
    """A warning when rounding to ``out_dtype`` leaves the median module with 'dW error' >= ROUNDING_WARNING_ERROR."""
    errors = sorted(r["dw_rel_error"] for r in rows if r.get("dw_rel_error") is not None)
    if not errors or errors[len(errors) // 2] < ROUNDING_WARNING_ERROR:
        return None
    rels = sorted(r["dw_rel"] for r in rows if r.get("dw_rel") is not None)
    name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[out_dtype]
    n_bad = sum(e >= ROUNDING_WARNING_ERROR for e in errors)
    remedy = "merge with --dtype fp32 to keep it" + (" (or --dtype fp16, 8x finer than bf16, if the model runs in "
                                                      "fp16)" if out_dtype == torch.bfloat16 else "")
    return (f"{name} rounding erases most of the adapter's update: 'dW error' (|stored change - dW| / |dW|; 1.0 = as "
            f"if dW were dropped) is {errors[len(errors) // 2]:.2f} in the median module and >= "
            f"{ROUNDING_WARNING_ERROR} in {n_bad} of {len(errors)}, because the updates are small next to the "
            f"weights (|dW|/|W0| median {rels[len(rels) // 2]:.1e}) and {name} rounds each weight by up to "
            f"{UNIT_ROUNDOFF[out_dtype]:.1e} of its size; the update survives only on average ('dW kept'); "
            + remedy)


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

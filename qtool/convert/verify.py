"""Checking NF4 outputs: per-tensor reconstruction error, flags, and ``qtool verify`` of a converted folder.

Two flags, because two different things can go wrong:

* ``nf4-misfit`` — NF4 itself fits the tensor badly: its error with exact block constants is more than
  ``MISFIT_FACTOR`` times what NF4 makes on Gaussian weights at the same block size (NF4 is built for normally
  distributed weights; outliers and heavy tails cost precision). Informative: the tensor is still exactly what
  bitsandbytes would produce.
* ``constants`` — a stored block constant is further from its block's exact absmax than double quantisation can
  move it (one gap of the 8-bit code times the group's nested absmax): the block constants are damaged. (Comparing
  errors instead would flag correct outputs: on outlier columns double quantisation costs ~10% of the error.)
"""
from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch

from qtool.format import bnb_nf4 as layout

from qtool.nf4 import codec as nf4
from qtool.format.report import REPORT_NAME, sha256_file  # noqa: F401 (REPORT_NAME: public)
from qtool.format.adapter_meta import INIT_ADAPTER_DIR
from qtool.errors import InputError, VerificationError
from qtool.format.safetensors import read_header

MISFIT_FACTOR = 1.5


@lru_cache(maxsize=None)
def gaussian_rel_error(blocksize: int) -> float:
    """Relative Frobenius error of NF4 (exact block constants) on 2**20 standard-normal values (fixed seed)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2**20, generator=g)
    return nf4.reconstruction_error(w, nf4.quantize(w, blocksize, double_quant=False))["ideal_rel_error"]


@dataclass
class TensorCheck:
    """One tensor of an output. A quantised one's error against its source (``rel_error`` .. ``nonfinite``) is None
    where it was not measured (``qtool verify`` without ``--source``); ``snr_db`` is inf for an exact reconstruction
    (null in JSON, like not measured: ``measured`` tells them apart). A copied tensor is exact: errors 0."""

    name: str
    shape: list[int]
    dtype: str
    quantized: bool
    rel_error: float | None = 0.0
    ideal_rel_error: float | None = 0.0
    max_abs_error: float | None = 0.0
    snr_db: float | None = math.inf
    nonfinite: int | None = 0
    flag: str = ""

    @classmethod
    def copied(cls, name: str, shape, dtype: torch.dtype) -> "TensorCheck":
        return cls(name, list(shape), str(dtype).removeprefix("torch."), False)

    @classmethod
    def unmeasured(cls, name: str, qw: nf4.QuantizedWeight) -> "TensorCheck":
        return cls(name, list(qw.shape), str(qw.dtype).removeprefix("torch."), True, None, None, None, None, None)

    @property
    def measured(self) -> bool:
        return self.rel_error is not None

    def to_json(self) -> dict:
        d = asdict(self)
        d["measured"] = self.measured
        d["snr_db"] = None if self.snr_db is None or math.isinf(self.snr_db) else round(self.snr_db, 3)
        return d


def check_tensor(name: str, w: torch.Tensor, qw: nf4.QuantizedWeight, error: dict | None = None) -> TensorCheck:
    """The check of one quantised tensor against its source ``w``; ``error`` is ``nf4.reconstruction_error(w, qw)``
    when the caller has it already (``nf4.quantize_with_error`` measures it while quantising)."""
    e = error if error is not None else nf4.reconstruction_error(w, qw)
    flag = ""
    if e["nonfinite"]:
        flag = "nonfinite"
    elif e["bad_constants"]:
        flag = "constants"
    elif e["ideal_rel_error"] > MISFIT_FACTOR * gaussian_rel_error(qw.blocksize):
        flag = "nf4-misfit"
    return TensorCheck(name, list(qw.shape), str(qw.dtype).removeprefix("torch."), True, e["rel_error"],
                       e["ideal_rel_error"], e["max_abs_error"], e["snr_db"], e["nonfinite"], flag)


@dataclass
class VerifyResult:
    """``hashes_checked``: shards whose sha256 was compared with the report, ``hashes_differ`` of them differed.
    ``requantized``: quantised weights whose bytes were compared with a re-quantisation of ``source`` (with the
    report's settings); ``requantize_note`` says why others were not."""

    folder: Path
    problems: list[str]
    tensors: list[TensorCheck]
    n_quantized: int
    hashes_checked: int
    hashes_differ: int = 0
    source: str | None = None
    requantized: int = 0
    requantize_note: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {"folder": str(self.folder), "ok": self.ok, "problems": self.problems, "n_quantized": self.n_quantized,
                "hashes_checked": self.hashes_checked, "hashes_differ": self.hashes_differ, "source": self.source,
                "errors_measured": self.source is not None, "requantized": self.requantized,
                "requantize_note": self.requantize_note, "tensors": [t.to_json() for t in self.tensors]}


def verify_folder(folder, source=None, max_rel_error: float | None = None) -> VerifyResult:
    """Re-check a converted folder: config and index against the shards, every quantised weight's tensors, the
    sha256 of each shard against the report, and — with ``source`` — every tensor against the original: quantised
    ones by their bytes (a re-quantisation of the source with the report's settings must give the same bytes) and by
    reconstruction error, the others byte for byte. Problems are collected, not raised one by one; a folder that is
    not a converted checkpoint at all (no 4-bit quantization_config, no report) is an InputError."""
    from qtool.format.checkpoint import INDEX_NAME, open_checkpoint

    folder = Path(folder)
    problems: list[str] = []
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise InputError(f"{folder}: no config.json; not a converted model folder")
    config = _read_json(cfg_path)
    qc = config.get("quantization_config") or {}
    report_path = folder / REPORT_NAME
    if not (qc.get("load_in_4bit") and qc.get("bnb_4bit_quant_type") == "nf4"):
        if not report_path.exists():
            raise InputError(f"{folder}: not an NF4 checkpoint (config.json declares no bitsandbytes 4-bit NF4 "
                             f"quantization and there is no {REPORT_NAME})",
                             hint=f"verify checks what `qtool convert` wrote; convert it first: qtool convert {folder} OUT")
        problems.append("config.json: quantization_config does not declare bitsandbytes 4-bit NF4")
    shard_paths = sorted(folder.glob("*.safetensors"))
    if not shard_paths:
        raise InputError(f"{folder}: no safetensors shards")
    shards = {p.name: read_header(p) for p in shard_paths}
    key_shard = {k: s for s in shards.values() for k in s.tensors}
    index = folder / INDEX_NAME
    if index.exists():
        wm = _read_json(index).get("weight_map", {})
        for k, f in wm.items():
            if key_shard.get(k) is None or key_shard[k].path.name != f:
                problems.append(f"{INDEX_NAME}: {k!r} is not in {f}")
        problems += [f"{INDEX_NAME}: {k!r} is missing from the weight map" for k in key_shard if k not in wm]
    elif len(shards) > 1:
        problems.append(f"{len(shards)} shards but no {INDEX_NAME}")
    report = _read_json(report_path) if report_path.exists() else None
    hashes_checked = hashes_differ = 0
    if report is not None:
        for name, meta in report.get("shards", {}).items():
            if name not in shards:
                problems.append(f"{REPORT_NAME}: shard {name} is missing")
                continue
            hashes_checked += 1
            if sha256_file(folder / name) != meta["sha256"]:
                hashes_differ += 1
                problems.append(f"{name}: sha256 differs from the report (the file changed after conversion)")
    else:
        problems.append(f"no {REPORT_NAME}; shard hashes cannot be checked")
    qkeys = layout.quantized_keys(key_shard)
    src = open_checkpoint(source) if source is not None else None
    init = _initial_adapter(folder, report) if src is not None else {}
    try:
        checks, requantized, note = _check_tensors(qkeys, key_shard, src, (report or {}).get("settings"), problems,
                                                   init)
    finally:
        if src is not None:
            src.close()
        for s in shards.values():
            s.close()
    recorded = {t["name"]: t["init_rel_error"] for t in (report or {}).get("lora_init", {}).get("tensors", [])}
    for c in checks:
        if c.name in init and c.name in recorded and abs(c.rel_error - recorded[c.name]) > 0.01 * recorded[c.name]:
            problems.append(f"{c.name}: the initial model (NF4 base + {INIT_ADAPTER_DIR}) reconstructs the source with "
                            f"relative error {c.rel_error:.4f}, the conversion measured {recorded[c.name]:.4f}: the "
                            "base or the initial adapter changed")
        if c.flag in ("constants", "nonfinite"):
            problems.append(f"{c.name}: {c.flag} (relative error {c.rel_error:.4f}, NF4 alone {c.ideal_rel_error:.4f})")
        if max_rel_error is not None and c.measured and c.rel_error > max_rel_error:
            problems.append(f"{c.name}: relative error {c.rel_error:.4f} > --max-rel-error {max_rel_error}")
    return VerifyResult(folder, problems, checks, len(qkeys), hashes_checked, hashes_differ,
                        None if source is None else str(source), requantized, note)


def _initial_adapter(folder: Path, report: dict | None) -> dict:
    """For a ``--lora-init`` folder: weight key -> ``s·B·A`` (fp32) of the initial adapter beside it, else {}."""
    if not report or "lora_init" not in report:
        return {}
    from qtool.format.peft_adapter import load_adapter

    adapter = load_adapter(folder / INIT_ADAPTER_DIR)
    return {f"{m}.weight": f.scale * (f.b.float() @ f.a.float()) for m, f in adapter.modules.items()}


def _check_tensors(qkeys, key_shard, src, settings: dict | None, problems: list[str], init: dict | None = None):
    """Per-tensor checks, appending to ``problems``: (checks, number of weights re-quantised, note or None). A
    weight in ``init`` (key -> s·B·A) holds the NF4 residual of a PiSSA/LoftQ init: it is checked as the initial
    model, NF4 base + s·B·A, against the source (its bytes are not re-derived: the SVD is not bit-reproducible
    across machines)."""
    get = lambda name: key_shard[name].tensor(name)  # noqa: E731
    init = init or {}
    requantize, note = _requantize_settings(settings) if src is not None else (None, None)
    if init:
        note = (f"{len(init)} weights hold the NF4 residual of a PiSSA/LoftQ initialisation: checked as NF4 base + "
                "initial adapter against the source" + (f"; {note}" if note else ""))
    checks: list[TensorCheck] = []
    requantized = 0
    for key in qkeys:
        try:
            qw = layout.read_weight(key, get, where=str(key_shard[key].path.name))
        except InputError as exc:
            problems.append(exc.message)
            continue
        if src is None:
            checks.append(TensorCheck.unmeasured(key, qw))
            continue
        if key not in src.key_shard:
            problems.append(f"{key!r} is not in the source checkpoint")
            continue
        w = src.key_shard[key].tensor(key)
        if tuple(w.shape) != qw.shape:
            w = w.t().contiguous()  # Conv1D weights are stored transposed in the source
        error = None
        if key in init:
            checks.append(_initial_model_check(key, w, qw, init[key]))
            continue
        if requantize is not None and tuple(w.shape) == qw.shape and w.dtype == qw.dtype:
            differ, error = _compare_with_requantized(w, qw, key, requantize)
            requantized += 1
            if differ:
                problems.append(f"{key}: {differ} (re-quantising the source with the report's settings gives "
                                f"other bytes: the weight changed after conversion)")
                error = None
        checks.append(check_tensor(key, w, qw, error))
    if src is not None:
        plain = [k for k in key_shard if k not in set(qkeys) and not layout.is_aux_key(k)]
        for key in plain:
            if key not in src.key_shard:
                problems.append(f"{key!r} is not in the source checkpoint")
            elif not torch.equal(get(key).view(-1).view(torch.uint8),
                                 src.key_shard[key].tensor(key).view(-1).view(torch.uint8)):
                problems.append(f"{key!r} differs from the source (it should be copied unchanged)")
        missing = [k for k in src.keys if k not in key_shard]
        problems += [f"source tensor {k!r} is missing from the output" for k in missing[:5]]
    return checks, requantized, note


def _initial_model_check(key: str, w: torch.Tensor, qw: nf4.QuantizedWeight, delta: torch.Tensor) -> TensorCheck:
    """The error of ``deq(qw) + delta`` against ``w`` as a TensorCheck (no NF4-misfit flag: the residual is not what
    NF4's Gaussian reference describes)."""
    w32 = w.float()
    err = w32 - nf4.dequantize(qw, torch.float32) - delta
    rel = float(err.norm() / w32.norm().clamp(min=1e-30))
    snr = -20 * math.log10(rel) if rel > 0 else math.inf
    n_bad = int((~torch.isfinite(err)).sum())
    return TensorCheck(key, list(qw.shape), str(qw.dtype).removeprefix("torch."), True, rel, rel,
                       float(err.abs().max()), snr, n_bad, "nonfinite" if n_bad else "")


def _requantize_settings(settings: dict | None) -> tuple[dict | None, str | None]:
    """How to re-quantise the source as the conversion did (from the report), or (None, why not)."""
    if not settings or not {"blocksize", "double_quant", "target"} <= settings.keys():
        return None, f"no settings in {REPORT_NAME}: quantised bytes not re-derived (errors measured only)"
    device = settings.get("device", "cpu")
    if device.startswith("cuda") and settings["target"] == "cuda":
        if not torch.cuda.is_available():
            return None, ("converted with --device cuda (the GPU's own bytes) and no GPU is here: quantised bytes "
                          "not re-derived (errors measured only)")
    else:
        device = "cpu"  # every other setting gives the same bytes on the CPU
    return {"blocksize": settings["blocksize"], "double_quant": settings["double_quant"],
            "target": settings["target"], "device": device, "torch_threads": settings.get("torch_threads")}, None


def _compare_with_requantized(w: torch.Tensor, qw: nf4.QuantizedWeight, key: str, how: dict):
    """Re-quantise ``w`` as ``how`` says and compare with the stored ``qw``: (what differs or "", the measured error
    when nothing differs — then it is the stored weight's error too)."""
    threads = torch.get_num_threads()
    try:
        if how["torch_threads"]:  # the offset is torch.mean, whose last bit depends on the thread count
            torch.set_num_threads(int(how["torch_threads"]))
        if how["device"] == "cpu":
            ref, error = nf4.quantize_with_error(w, how["blocksize"], how["double_quant"], how["target"], name=key)
        else:
            ref, error = nf4.quantize(w.to(how["device"]), how["blocksize"], how["double_quant"], how["target"],
                                      name=key).to("cpu"), None
    finally:
        torch.set_num_threads(threads)
    differ = []
    for part, ours, theirs in (("packed bytes", qw.packed, ref.packed), ("absmax values", qw.absmax, ref.absmax),
                               ("nested_absmax values", qw.nested_absmax, ref.nested_absmax)):
        if ours is None or theirs is None:
            continue
        bits = {1: torch.uint8, 4: torch.int32}[ours.element_size()]  # compare bit patterns, element by element
        a, b = ours.reshape(-1).view(bits), theirs.reshape(-1).to(ours.dtype).view(bits)
        if a.shape != b.shape:
            differ.append(f"{a.numel()} {part}, expected {b.numel()}")
        elif n := int((a != b).sum()):
            differ.append(f"{n} of {a.numel()} {part} differ")
    if qw.offset != ref.offset:
        differ.append(f"offset {qw.offset!r} != {ref.offset!r}")
    return "; ".join(differ), error


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})",
                         hint="the file was edited or damaged after conversion; convert again") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path}: not a JSON object", hint="convert again")
    return data


def raise_if_failed(result: VerifyResult) -> None:
    if not result.ok:
        raise VerificationError(f"{result.folder}: {len(result.problems)} problem(s):\n  " + "\n  ".join(result.problems))

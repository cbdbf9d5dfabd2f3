"""PEFT's AdaLoRA adapter format, written and read without peft, and its exact conversion to a plain LoRA adapter.

``adapter_config.json`` holds ``peft_type: "ADALORA"``, every LoraConfig key (:data:`LORA_CONFIG_DEFAULTS`) and
AdaLoRA's own: ``init_r``, ``target_r``, ``tinit``, ``tfinal``, ``deltaT``, ``beta1``, ``beta2``,
``orth_reg_weight``, ``total_step`` and ``rank_pattern`` — ``{"M.lora_E": [bool] * init_r}``, the triplets each module
keeps, keyed by the module path without the ``base_model.model.`` prefix. ``adapter_model.safetensors`` holds per
module ``M`` (peft 0.21.2 ``AdaLoraModel._get_adapter_state_dict``, ``resize_state_dict_by_rank_pattern``):

===============================================  ==============  ======================================
tensor key (no ``.weight``: ParameterDict)       shape           meaning
===============================================  ==============  ======================================
``base_model.model.M.lora_A``                    ``(r_M, in)``   Q, the kept right singular vectors
``base_model.model.M.lora_E``                    ``(r_M, 1)``    λ, the kept singular values
``base_model.model.M.lora_B``                    ``(out, r_M)``  P, the kept left singular vectors
===============================================  ==============  ======================================

physically sliced to the ``r_M = sum(rank_pattern[M])`` kept triplets (0-size tensors for a module pruned to rank 0).
PEFT rebuilds each module at ``r_M`` and keeps ``ranknum = init_r``, so the bypass is
``s · P diag(λ) Q`` with ``s = lora_alpha / (init_r + 1e-5)`` (:func:`qtool.adapters.spec.adalora_scale`).

The plain LoRA with the same function (:func:`export_lora`): ``lora_A = Q``, ``lora_B = s · P diag(λ)``, rank
``r_M`` and alpha ``r_M`` per module (scale 1) through ``rank_pattern``/``alpha_pattern`` keyed by the full module
path, ``target_modules`` the full paths of the modules with ``r_M > 0`` (the others are dropped) — the way PEFT's EVA
writes adaptive ranks. ``qtool merge``, PEFT and other LoRA loaders read it.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from qtool.adapters.spec import AdaLoRASchedule, adalora_scale
from qtool.errors import InputError, VerificationError
from qtool.format.adapter_meta import QTOOL_META_NAME, base_fingerprint, read_qtool_meta
from qtool.format.atomic import staging_dir, write_text
from qtool.format.peft_adapter import LORA_CONFIG_DEFAULTS, PEFT_PREFIX, save_adapter
from qtool.format.peft_config import CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME, read_adalora_config
from qtool.format.safetensors import read_header, write_tensors

# AdaLoraConfig's own keys on top of LoraConfig's (peft 0.21.2 tuners/adalora/config.py), with its defaults;
# `r` stays LoraConfig's 8: AdaLoRA ignores it (and warns when it is not 8). tests/test_adalora.py compares the key
# set with the installed peft's.
ADALORA_CONFIG_DEFAULTS: dict = {
    **LORA_CONFIG_DEFAULTS, "peft_type": "ADALORA", "target_r": 8, "init_r": 12, "tinit": 0, "tfinal": 0,
    "deltaT": 1, "beta1": 0.85, "beta2": 0.85, "orth_reg_weight": 0.5, "total_step": None, "rank_pattern": None,
}
# Keys that do not change what the saved tensors mean; any other key set to something other than null/false/empty
# is refused on read (a variant or a setting the conversion would silently drop).
_HARMLESS_KEYS = {"alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "ensure_weight_tying",
                  "exclude_modules", "inference_mode", "init_lora_weights", "layers_pattern", "layers_to_transform",
                  "loftq_config", "lora_alpha", "lora_dropout", "megatron_core", "peft_type", "peft_version",
                  "qalora_group_size", "r", "rank_pattern", "revision", "runtime_config", "target_modules",
                  "task_type", "target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2",
                  "orth_reg_weight", "total_step", "fan_in_fan_out", "use_rslora", "eva_config", "corda_config",
                  "lora_ga_config"}
_KEY_RE = re.compile(r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_E)(?:\.(?P<adapter>[^.]+))?$")


@dataclass(frozen=True)
class AdaLoRAFactors:
    """One module as stored: ``a`` = Q ``(r, in)``, ``e`` = λ ``(r, 1)``, ``b`` = P ``(out, r)`` (the kept triplets,
    CPU, stored dtype) and ``mask`` over the ``init_r`` initial triplets."""

    a: torch.Tensor
    e: torch.Tensor
    b: torch.Tensor
    mask: list[bool]

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True)
class AdaLoRAAdapter:
    path: Path
    modules: dict[str, AdaLoRAFactors]
    init_rank: int
    alpha: float
    scale: float  # s = alpha / (init_r + 1e-5), as PEFT computes it
    config: dict


# ------------------------------------------------------------------------------------------------------------ write
def save_adalora(out_dir, modules: dict, spec, *, base_dir, overwrite: bool = False,
                 extra_files: dict[str, str | bytes] | None = None) -> Path:
    """Write trained :class:`qtool.adapters.adalora.AdaLoRALinear` modules (module path -> module) in PEFT's AdaLoRA
    format, pruned to their masks, with ``qtool_adapter.json`` (``spec``, the base folder's fingerprint) and
    ``extra_files`` (name -> text or bytes). Atomic, and read back with :func:`load_adalora` before it appears."""
    schedule: AdaLoRASchedule = spec.adalora or AdaLoRASchedule()
    pruned = {path: m.pruned_factors() for path, m in modules.items()}
    config = dict(ADALORA_CONFIG_DEFAULTS)
    config.update(init_r=spec.rank, target_r=schedule.target_rank, tinit=schedule.tinit, tfinal=schedule.tfinal,
                  deltaT=schedule.delta_t, beta1=schedule.beta1, beta2=schedule.beta2,
                  orth_reg_weight=schedule.orth_reg, total_step=schedule.total_steps, lora_alpha=spec.alpha,
                  lora_dropout=float(spec.dropout), target_modules=sorted({p.rsplit(".", 1)[-1] for p in modules}),
                  rank_pattern={f"{path}.lora_E": mask for path, (_, _, _, mask) in pruned.items()},
                  base_model_name_or_path=str(base_dir))
    tensors = {}
    for path, (a, e, b, _) in pruned.items():
        for kind, t in (("lora_A", a), ("lora_B", b), ("lora_E", e)):
            if not torch.isfinite(t).all():
                raise InputError(f"cannot save the adapter: {path}.{kind} holds NaN/Inf values")
            tensors[f"{PEFT_PREFIX}{path}.{kind}"] = t
    meta = {"spec": spec.to_json(), "base": base_fingerprint(base_dir),
            "peft_export": "AdaLoRA, pruned to rank_pattern as PEFT saves it (qtool adapter export-lora makes a "
                           "plain LoRA of it)"}
    files = {QTOOL_META_NAME: json.dumps(meta, indent=1), **(extra_files or {})}
    out_dir = Path(out_dir)
    with staging_dir(out_dir, overwrite) as stage:
        write_tensors(stage / WEIGHTS_NAME, tensors)
        write_text(stage / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True))
        for name, content in files.items():
            if isinstance(content, bytes):
                (stage / name).write_bytes(content)  # inside the staging folder: it appears only complete
            else:
                write_text(stage / name, content)
        back = load_adalora(stage)
        for path, (a, e, b, mask) in pruned.items():
            got = back.modules[path]
            if not (torch.equal(got.a, a) and torch.equal(got.e, e) and torch.equal(got.b, b) and got.mask == mask):
                raise VerificationError(f"{out_dir}: module {path!r} did not read back identically; nothing written")
    return out_dir


# ------------------------------------------------------------------------------------------------------------- read
def load_adalora(path) -> AdaLoRAAdapter:
    """Read an AdaLoRA adapter folder written by qtool or by PEFT (``save_pretrained`` of an AdaLoRA model). Checks
    the config, every key, each module's shapes against its ``rank_pattern`` mask, and finiteness; InputError naming
    the file and the reason otherwise (an adapter of another type says what it is)."""
    folder, config = read_adalora_config(path)
    cfg_path = folder / CONFIG_NAME
    problems = []
    init_r, alpha = config.get("init_r"), config.get("lora_alpha")
    if not isinstance(init_r, int) or isinstance(init_r, bool) or init_r < 1:
        problems.append(f"init_r={init_r!r}: must be a positive int")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        problems.append(f"lora_alpha={alpha!r}: must be a positive number (PEFT scales by the rank instead when it is "
                        "not, which changes with pruning)")
    for key, value in config.items():
        if key not in _HARMLESS_KEYS and value not in (None, False, {}, [], "", 0):
            problems.append(f"{key}={json.dumps(value)[:60]}: a setting the conversion to plain LoRA would drop or "
                            "that changes the meaning of the factors")
    if config.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out=true (GPT-2 Conv1D weights): not supported")
    if problems:
        raise InputError(f"{cfg_path}: cannot use this AdaLoRA adapter:\n  - " + "\n  - ".join(problems))
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        if (folder / PICKLE_NAME).is_file():
            raise InputError(f"{folder / PICKLE_NAME}: a pickle file; qtool never unpickles (a pickle can run code)",
                             hint=f"re-save the adapter with safetensors (peft's default) to get {WEIGHTS_NAME}")
        raise InputError(f"{folder}: no {WEIGHTS_NAME}")
    with read_header(weights) as st:
        tensors = {k: st.tensor(k).clone() for k in st.tensors}
    modules = _parse(weights, config, tensors)
    return AdaLoRAAdapter(folder, modules, init_r, float(alpha), adalora_scale(alpha, init_r), config)


def _parse(where: Path, config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, AdaLoRAFactors]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    problems = []
    for key, t in tensors.items():
        bare = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        m = _KEY_RE.match(bare)
        if m is None:
            problems.append(f"{key}: not an AdaLoRA tensor (lora_A, lora_E, lora_B)")
        elif t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            problems.append(f"{key}: dtype {t.dtype}; expected float32, bfloat16 or float16")
        else:
            parts.setdefault(m["module"], {})[m["kind"]] = t
    patterns = {re.sub(r"\.lora_E(\.[^.]+)?$", "", k): v for k, v in (config.get("rank_pattern") or {}).items()}
    init_r = config["init_r"]
    modules = {}
    for module in sorted(parts):
        got = parts[module]
        missing = [k for k in ("lora_A", "lora_E", "lora_B") if k not in got]
        if missing:
            problems.append(f"{module}: {', '.join(missing)} missing")
            continue
        a, e, b = got["lora_A"], got["lora_E"], got["lora_B"]
        mask = patterns.get(module, [True] * init_r)
        if not isinstance(mask, list) or len(mask) != init_r or not all(isinstance(x, bool) for x in mask):
            problems.append(f"{module}: rank_pattern entry is not a list of {init_r} booleans")
            continue
        r = sum(mask)
        if a.dim() != 2 or e.shape != (r, 1) or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            problems.append(f"{module}: lora_A {tuple(a.shape)} / lora_E {tuple(e.shape)} / lora_B {tuple(b.shape)} do "
                            f"not match the {r} triplets its rank_pattern keeps (of init_r {init_r})")
            continue
        if not all(torch.isfinite(t).all() for t in (a, e, b)):
            problems.append(f"{module}: tensors hold NaN/Inf values")
        modules[module] = AdaLoRAFactors(a, e, b, list(mask))
    unknown = sorted(set(patterns) - set(parts))
    if unknown:
        problems.append(f"rank_pattern names modules without tensors: {', '.join(unknown[:3])}")
    if not parts and not problems:
        problems.append("no AdaLoRA tensors")
    if problems:
        raise InputError(f"{where}: cannot use this AdaLoRA adapter:\n  - " + "\n  - ".join(problems[:20])
                         + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))
    return modules


# ----------------------------------------------------------------------------------------------------------- export
def lora_factors(adapter: AdaLoRAAdapter) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module path -> ``(A, B)`` of the plain LoRA at scale 1 with the same bypass: ``A = Q``, ``B = s · P diag(λ)``
    (fp32), for every module that keeps at least one triplet."""
    out = {}
    for module, f in adapter.modules.items():
        if f.rank:
            out[module] = (f.a.float().contiguous(), (f.b.float() * (adapter.scale * f.e.float().view(1, -1))))
    return out


def export_lora(src, out_dir, *, overwrite: bool = False) -> dict:
    """Convert the AdaLoRA adapter ``src`` to a plain PEFT LoRA adapter ``out_dir`` (see the module docstring):
    per-module ranks in ``rank_pattern``, alpha = rank (scale 1) in ``alpha_pattern``, modules at rank 0 dropped.
    Returns ``{"adapter", "ranks", "dropped", "r", "scale"}``. InputError if ``src`` is not AdaLoRA or every module
    was pruned to rank 0."""
    adapter = load_adalora(src)
    factors = lora_factors(adapter)
    dropped = sorted(set(adapter.modules) - set(factors))
    if not factors:
        raise InputError(f"{adapter.path}: every module was pruned to rank 0; the adapter is the base model, there "
                         "is nothing to export")
    ranks = {m: a.shape[0] for m, (a, _) in factors.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {m: k for m, k in ranks.items() if k != r}
    extra = {}
    meta = read_qtool_meta(adapter.path)
    if meta is not None:
        meta = dict(meta, peft_export=f"plain LoRA from the AdaLoRA adapter {adapter.path}: A = Q, "
                                      f"B = (alpha/init_r)·P·diag(λ), alpha = rank per module; "
                                      f"{len(dropped)} module(s) at rank 0 dropped")
        extra[QTOOL_META_NAME] = json.dumps(meta, indent=1)
    path = save_adapter(out_dir, factors, rank=r, alpha=r, target_modules=sorted(factors), rank_pattern=pattern,
                        alpha_pattern=dict(pattern), dropout=float(adapter.config.get("lora_dropout") or 0.0),
                        base_model_name_or_path=adapter.config.get("base_model_name_or_path"), overwrite=overwrite,
                        extra_files=extra)
    return {"adapter": str(path), "source": str(adapter.path), "ranks": ranks, "dropped": dropped, "r": r,
            "scale": adapter.scale, "init_rank": adapter.init_rank}

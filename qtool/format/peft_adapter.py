"""PEFT's LoRA adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``, written and read without peft.

One adapted module ``M`` (a path in the transformers model, e.g. ``model.layers.0.self_attn.q_proj``) holds

===============================================  ============  ================================================
tensor key                                       shape         meaning
===============================================  ============  ================================================
``base_model.model.M.lora_A.weight``             ``(r, in)``   down-projection A
``base_model.model.M.lora_B.weight``             ``(out, r)``  up-projection B
``base_model.model.M.lora_B.bias``               ``(out,)``    only with ``lora_bias: true``
``base_model.model.E.lora_embedding_A``          ``(r, vocab)``  an embedding ``E``'s A, looked up per token
``base_model.model.E.lora_embedding_B``          ``(hidden, r)`` its B; ``E' = E + s · (B A)ᵀ``
===============================================  ============  ================================================

and computes ``y = x W0ᵀ + s · (x Aᵀ Bᵀ + bias)`` with ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
``use_rslora``), ``r`` and ``lora_alpha`` taken per module from ``rank_pattern`` / ``alpha_pattern`` when a pattern
matches (peft 0.21.2 ``tuners/lora/layer.py::LoraLayer.update_layer``, ``tuners/lora/model.py::_create_and_replace``).
The prefix ``base_model.model.`` is PeftModel's; peft writes keys without the adapter name
(``utils/save_and_load.py::get_peft_model_state_dict``). We also read keys without the prefix (transformers'
``save_pretrained`` of an injected adapter) and with an adapter name (``M.lora_A.default.weight``), which peft's
loader matches for the adapter called ``default``.

Tied embeddings (``ensure_weight_tying: true``, peft ``LoraModel._add_targets_to_tie``): the output head's LoRA is the
embedding's, transposed (head A = embedding Bᵀ, head B = embedding Aᵀ); peft saves both, and drops the head from
``target_modules``. We write the same, and on read mark such a head ``tied_to`` its embedding (its factors must be
the embedding's, transposed). peft also saves the embedding and head weights of a targeted embedding
(``save_embedding_layers="auto"``: ``E.base_layer.weight``); they are read into :attr:`Adapter.saved_weights`, for the
caller to check against its base (they differ only when the vocabulary was resized).

Only what can be folded into W0 exactly is accepted: plain LoRA on Linear (or GPT-2 Conv1D) weights and on
embeddings, with ``rank_pattern``/``alpha_pattern``, rsLoRA, ``fan_in_fan_out`` and ``lora_bias``. Refused, with the
reason: other peft types (AdaLoRA, IA3, prompt methods), DoRA, ``modules_to_save`` and other full tensors, initialisations that changed W0 (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA), LoRA variants whose forward is
not ``x W0ᵀ + s x Aᵀ Bᵀ``, and pickle files (``adapter_model.bin``: never unpickled).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qtool.format.adapter_meta import INIT_ADAPTER_DIR, QTOOL_META_NAME, base_fingerprint  # noqa: F401 (public)
from qtool.format.atomic import staging_dir, write_text
from qtool.format.peft_config import CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME, read_adapter_config  # noqa: F401
from qtool.format.peft_config import rank_and_alpha, selects  # noqa: F401 (public here too)
from qtool.errors import InputError, VerificationError
from qtool.format.safetensors import read_header, write_tensors

PEFT_PREFIX = "base_model.model."
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Every key peft 0.21.2 writes for a LoRA adapter (LoraConfig.to_dict(), minus `runtime_config` which it drops and
# `peft_version` which it stamps with its own version), with the values we write. tests/test_adapter.py compares this
# key set with the installed peft's.
LORA_CONFIG_DEFAULTS: dict = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
    "base_model_name_or_path": None, "bias": "none", "corda_config": None, "ensure_weight_tying": False,
    "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
    "init_lora_weights": True, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
    "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 8, "lora_bias": False, "lora_dropout": 0.0,
    "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
    "monteclora_config": None, "peft_type": "LORA", "qalora_group_size": 16, "r": 8, "rank_pattern": {},
    "revision": None, "target_modules": None, "target_parameters": None, "task_type": "CAUSAL_LM",
    "trainable_token_indices": None, "use_bdlora": None, "use_dora": False, "use_qalora": False,
    "use_rslora": False, "velora_config": None,
}
# Keys whose value does not change what the saved factors mean (used on read: any other key with a value that is not
# null/false/empty is refused, so that a newer peft's variant is never merged as plain LoRA).
_HARMLESS_KEYS = {"alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "ensure_weight_tying",
                  "exclude_modules", "fan_in_fan_out", "inference_mode", "init_lora_weights", "layers_pattern",
                  "layers_to_transform", "loftq_config", "lora_alpha", "lora_bias", "lora_dropout", "megatron_core",
                  "peft_type", "peft_version", "qalora_group_size", "r", "rank_pattern", "revision", "runtime_config",
                  "target_modules", "task_type", "use_rslora", "eva_config", "corda_config", "lora_ga_config"}
# Initialisations that leave W0 untouched; the others (pissa*, olora, corda, loftq, lora_ga, mica) changed W0 during
# training or select a LoRA variant, so the factors do not apply to the original base.
_W0_PRESERVING_INITS = (True, False, "gaussian", "orthogonal", "eva")
_KEY_RE = re.compile(r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)$")
_EMBEDDING_KEY_RE = re.compile(r"^(?P<module>.+?)\.(?P<kind>lora_embedding_[AB])(?:\.(?P<adapter>[^.]+))?$")
_SAVED_WEIGHT_RE = re.compile(r"^(?P<module>.+?)\.base_layer\.weight$")


@dataclass(frozen=True)
class LoraFactors:
    """One adapted module. ``a``: ``(rank, in_features)``, ``b``: ``(out_features, rank)``, ``bias``: ``(out,)`` or
    None, all CPU float tensors in the dtype they were stored in; ``scale`` = alpha/rank (alpha/sqrt(rank) with
    rsLoRA). The update of the weight, in its ``(out, in)`` layout, is ``scale · b @ a``. ``embedding``: PEFT's
    embedding LoRA, ``a`` ``(rank, vocab)`` and ``b`` ``(hidden, rank)``, the update of the ``(vocab, hidden)``
    table ``scale · (b @ a)ᵀ``. ``tied_to``: the embedding module whose factors these are, transposed (a tied
    head, module docstring)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    rank: int
    alpha: float
    bias: torch.Tensor | None = None
    embedding: bool = False
    tied_to: str | None = None

    @property
    def in_features(self) -> int:
        return self.a.shape[1]

    @property
    def out_features(self) -> int:
        return self.b.shape[0]


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter read by :func:`load_adapter`: module path -> factors, and the config as stored."""

    path: Path
    modules: dict[str, LoraFactors]
    fan_in_fan_out: bool
    config: dict
    saved_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> its full weight peft saved


def lora_scale(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA (Kalajdzievski 2023; peft ``update_layer``)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


# ------------------------------------------------------------------------------------------------------------ write
def save_adapter(out_dir, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], *, rank: int, alpha: float,
                 target_modules: list[str], rank_pattern: dict[str, int] | None = None,
                 alpha_pattern: dict[str, float] | None = None, use_rslora: bool = False, dropout: float = 0.0,
                 base_model_name_or_path: str | None = None, overwrite: bool = False,
                 extra_files: dict[str, str] | None = None, embeddings=(), tied: dict[str, str] | None = None) -> Path:
    """Write ``factors`` (module path -> ``(A (r, in), B (out, r))``) as a PEFT LoRA adapter folder ``out_dir`` that
    ``PeftModel.from_pretrained(model, out_dir)`` loads. Modules in ``embeddings`` are embedding LoRA (A
    ``(r, vocab)``, B ``(hidden, r)``, keys ``lora_embedding_A/B``); ``tied`` (head path -> embedding path) marks a
    head that shares its embedding's adapter (its factors must be the embedding's, transposed): written as peft
    writes it, with ``ensure_weight_tying: true``. Tensors keep their dtype (fp32/bf16/fp16). ``extra_files``
    (name -> text) are written beside the adapter. The folder appears complete or not at all (staging + rename) and
    is read back with :func:`load_adapter` before it is renamed into place. Raises InputError (naming the module)
    on inconsistent or non-finite factors, OutputError if ``out_dir`` exists and not ``overwrite``."""
    config = dict(LORA_CONFIG_DEFAULTS)
    config.update(r=rank, lora_alpha=alpha, target_modules=sorted(target_modules),
                  rank_pattern=dict(rank_pattern or {}), alpha_pattern=dict(alpha_pattern or {}), use_rslora=bool(use_rslora), lora_dropout=float(dropout),
                  base_model_name_or_path=base_model_name_or_path, ensure_weight_tying=bool(tied))
    tensors = _check_save_inputs(config, factors, extra_files or {}, set(embeddings), dict(tied or {}))
    out_dir = Path(out_dir)
    with staging_dir(out_dir, overwrite) as stage:
        write_tensors(stage / WEIGHTS_NAME, tensors)
        write_text(stage / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True))
        for name, text in (extra_files or {}).items():
            write_text(stage / name, text)
        back = load_adapter(stage)
        for module, (a, b) in factors.items():
            got = back.modules[module]
            if not (torch.equal(got.a, a.detach().cpu()) and torch.equal(got.b, b.detach().cpu())):
                raise VerificationError(f"{out_dir}: module {module!r} did not read back identically; nothing written")
    return out_dir


def _check_save_inputs(config: dict, factors: dict, extra_files: dict, embeddings: set[str],
                       tied: dict[str, str]) -> dict[str, torch.Tensor]:
    """Validate everything before writing; collect the problems and raise them together. Returns key -> tensor."""
    problems: list[str] = []
    rank, alpha = config["r"], config["lora_alpha"]
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        problems.append(f"rank={rank!r}: must be a positive int")
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha == 0:
        problems.append(f"alpha={alpha!r}: must be a finite non-zero number")
    if not 0.0 <= config["lora_dropout"] < 1.0:
        problems.append(f"dropout={config['lora_dropout']}: must be in [0, 1)")
    if not config["target_modules"] or not all(isinstance(t, str) and t for t in config["target_modules"]):
        problems.append("target_modules: must be a non-empty list of module names")
    for name, pattern in (("rank_pattern", config["rank_pattern"]), ("alpha_pattern", config["alpha_pattern"])):
        for key, value in pattern.items():
            try:
                re.compile(key)
            except re.error as exc:
                problems.append(f"{name} key {key!r} is not a valid regular expression ({exc})")
            bad = (not isinstance(value, int) or isinstance(value, bool) or value <= 0) if name == "rank_pattern" \
                else (not isinstance(value, (int, float)) or not math.isfinite(value) or value == 0)
            if bad:
                problems.append(f"{name}[{key!r}] = {value!r} is not a valid {name.split('_')[0]}")
    if not factors:
        problems.append("factors: empty; an adapter needs at least one module")
    for name in extra_files:
        if "/" in name or "\\" in name or name in ("", ".", "..", CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME):
            problems.append(f"extra_files name {name!r}: must be a plain file name other than the adapter's own files")
    if problems:
        raise InputError("cannot save the adapter:\n  - " + "\n  - ".join(problems))
    tensors: dict[str, torch.Tensor] = {}
    for module in sorted(factors):
        a, b = factors[module]
        a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
        r, _ = rank_and_alpha(config, module)
        if module.startswith(PEFT_PREFIX) or ".lora_" in module:
            problems.append(f"{module}: give the module path as in the transformers model (no {PEFT_PREFIX!r} "
                            "prefix, no lora_A/lora_B suffix)")
        elif not selects(config, module) and module not in tied:
            problems.append(f"{module}: not selected by target_modules {config['target_modules']}; peft would not "
                            "load its factors")
        if a.dtype not in FLOAT_DTYPES or b.dtype not in FLOAT_DTYPES:
            problems.append(f"{module}: A is {a.dtype}, B is {b.dtype}; expected float32, bfloat16 or float16")
        elif a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            problems.append(f"{module}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit rank {r} "
                            "(A must be (rank, in_features), B (out_features, rank))")
        elif not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            problems.append(f"{module}: A or B holds NaN/Inf values")
        if module in tied and (tied[module] not in factors or not (
                torch.equal(a, factors[tied[module]][1].detach().cpu().t())
                and torch.equal(b, factors[tied[module]][0].detach().cpu().t()))):
            problems.append(f"{module}: marked tied to {tied[module]} but its factors are not that embedding's "
                            "transposed (A = B_embᵀ, B = A_embᵀ)")
        kinds = ("lora_embedding_A", "lora_embedding_B") if module in embeddings else ("lora_A.weight", "lora_B.weight")
        tensors[f"{PEFT_PREFIX}{module}.{kinds[0]}"] = a
        tensors[f"{PEFT_PREFIX}{module}.{kinds[1]}"] = b
    if problems:
        raise InputError("cannot save the adapter:\n  - " + "\n  - ".join(problems),
                         hint="A is (rank, in_features) and B is (out_features, rank); the rank of a module is "
                              "rank_pattern's first matching key, else rank")
    return tensors


def save_trained(out_dir, modules: dict, spec, *, base_dir, overwrite: bool = False,
                 extra_files: dict[str, str] | None = None) -> Path:
    """Write trained :class:`qtool.adapters.lora.LoRALinear` modules (module path -> module) as a PEFT LoRA adapter,
    with ``qtool_adapter.json`` recording ``spec`` and the fingerprint of the base folder it was trained on (what
    ``qtool merge`` checks). Per-module ranks and alphas go to ``rank_pattern``/``alpha_pattern`` keyed by module
    name (q_proj, ..., embed_tokens, lm_head); the symmetric init is written as PEFT's rank-2r equivalent (see
    ``peft_factors``); embedding and head LoRA (:mod:`qtool.adapters.vocab`) as peft writes them."""
    from qtool.adapters.vocab import LoRAEmbedding, LoRAHead

    factors, ranks, alphas, embeddings, tied = {}, {}, {}, set(), {}
    paths = {id(m): path for path, m in modules.items()}
    for path, m in modules.items():
        a, b, rank, alpha = m.peft_factors()
        if isinstance(m, LoRAEmbedding):
            embeddings.add(path)
        if isinstance(m, LoRAHead) and m.tied_to is not None:
            tied[path] = paths[id(m.tied_to)]
        factors[path] = (a, b)
        name = path.rsplit(".", 1)[-1]
        ranks.setdefault(name, rank)
        alphas.setdefault(name, alpha)
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    meta = {"spec": spec.to_json(), "base": base_fingerprint(base_dir),
            "peft_export": "rank-2r [B | -B0] @ [A ; A0]" if spec.init == "symmetric" else "factors as trained"}
    return save_adapter(out_dir, factors, rank=rank, alpha=alpha, target_modules=sorted(ranks),
                        rank_pattern={n: r for n, r in ranks.items() if r != rank},
                        alpha_pattern={n: a for n, a in alphas.items() if a != alpha}, use_rslora=spec.use_rslora,
                        dropout=spec.dropout, base_model_name_or_path=str(base_dir), overwrite=overwrite,
                        extra_files={QTOOL_META_NAME: json.dumps(meta, indent=1), **(extra_files or {})},
                        embeddings=embeddings, tied=tied)


# ------------------------------------------------------------------------------------------------------------- read
def _config_problems(config: dict) -> list[str]:
    """Every reason the adapter cannot be merged as plain LoRA (empty if it can)."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        why = {"ADALORA": "AdaLoRA adapters (P·diag(E)·Q with pruned ranks) must first be converted to plain LoRA "
                          "(A = Q, B = (alpha/init_r)·P·diag(E), one rank_pattern entry per module): "
                          "qtool adapter export-lora ADALORA_DIR OUT"}
        return [f"peft_type is {peft_type!r}; qtool merges LoRA adapters only"
                + (f" — {why[peft_type]}" if peft_type in why else
                   " (IA3, prefix/prompt tuning and the other methods are not a weight delta B·A)")]
    problems = []
    init = config.get("init_lora_weights", True)
    if init not in _W0_PRESERVING_INITS:
        problems.append(f"init_lora_weights={init!r}: this initialisation changed W0 (or selects a LoRA variant), "
                        "so the factors do not apply to the original base; re-save the adapter converted to plain "
                        "LoRA (peft: save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    reasons = {"use_dora": "DoRA rescales each column by a learned magnitude; W0 + s·B·A does not express it",
               "modules_to_save": "the adapter carries full trained modules; qtool merges LoRA factors only",
               "trainable_token_indices": "trainable tokens replace embedding rows; not supported",
               "target_parameters": "LoRA on raw parameters (e.g. MoE experts) is not supported",
               "layer_replication": "the adapter was trained on a model with replicated layers",
               "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens; not a weight delta",
               "use_qalora": "QA-LoRA pools the input; not supported",
               "megatron_config": "Megatron parallel layers are not a Hugging Face checkpoint"}
    for key, value in config.items():
        if key in _HARMLESS_KEYS or value in (None, False, {}, [], "", 0):
            continue
        problems.append(f"{key}={json.dumps(value)[:60]}: " + reasons.get(
            key, "a LoRA variant or setting qtool does not know; it may change the meaning of the factors"))
    if not isinstance(config.get("r", 8), int) or config.get("r", 8) <= 0:
        problems.append(f"r={config.get('r')!r}: must be a positive int")
    return problems


def load_adapter(path) -> Adapter:
    """Read a qtool- or peft-written LoRA adapter folder (or a subfolder peft made for a named adapter). Checks the
    config, every tensor key, each module's shapes against its rank, and finiteness; raises InputError naming the
    file and the reason for anything that cannot be merged exactly. See the module docstring."""
    folder, config = read_adapter_config(path)
    cfg_path = folder / CONFIG_NAME
    problems = _config_problems(config)
    if problems:
        raise InputError(f"{cfg_path}: cannot merge this adapter exactly:\n  - " + "\n  - ".join(problems))
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        if (folder / PICKLE_NAME).is_file():
            raise InputError(f"{folder / PICKLE_NAME}: a pickle file; qtool never unpickles (a pickle can run code)",
                             hint=f"re-save the adapter with safetensors (peft's default) to get {WEIGHTS_NAME}")
        raise InputError(f"{folder}: no {WEIGHTS_NAME}")
    with read_header(weights) as st:
        tensors = {k: st.tensor(k).clone() for k in st.tensors}
    saved = {m["module"].removeprefix(PEFT_PREFIX): tensors.pop(k) for k in list(tensors)
             if (m := _SAVED_WEIGHT_RE.match(k)) and not ".lora_" in k}
    modules = _parse_tensors(weights, config, tensors)
    unknown = sorted(set(saved) - set(modules) - _vocab_partners(modules))
    if unknown:
        raise InputError(f"{weights}: full weights of {', '.join(unknown)} (modules_to_save or trained layers); "
                         "qtool merges LoRA factors only")
    return Adapter(folder, modules, bool(config.get("fan_in_fan_out", False)), config, saved)


def _vocab_partners(modules: dict[str, LoraFactors]) -> set[str]:
    """The output head beside an adapted embedding: peft saves its weight too (``save_embedding_layers``)."""
    return {"lm_head"} if any(f.embedding for f in modules.values()) else set()


def _parse_tensors(where: Path, config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, LoraFactors]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    names: set[str] = set()
    embedding: set[str] = set()
    problems: list[str] = []
    for key, t in tensors.items():
        bare = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        m = _KEY_RE.match(bare)
        if "lora_magnitude_vector" in key:
            problems.append(f"{key}: a DoRA magnitude vector; DoRA cannot be merged as W0 + s·B·A")
        elif (e := _EMBEDDING_KEY_RE.match(bare)) is not None and t.dtype in FLOAT_DTYPES:
            names.add(e["adapter"] or "")
            parts.setdefault(e["module"], {})["lora_" + e["kind"][-1]] = t
            embedding.add(e["module"])
        elif m is None or (m["kind"] == "lora_A" and m["param"] == "bias"):
            problems.append(f"{key}: not a LoRA factor (modules_to_save, trained biases or a variant's tensor); "
                            "qtool merges lora_A/lora_B only")
        elif t.dtype not in FLOAT_DTYPES:
            problems.append(f"{key}: dtype {t.dtype}; expected float32, bfloat16 or float16")
        else:
            names.add(m["adapter"] or "")
            slot = "bias" if m["param"] == "bias" else m["kind"]
            parts.setdefault(m["module"], {})[slot] = t
    if len(names) > 1:
        problems.append(f"keys carry several adapter names ({', '.join(sorted(repr(n) for n in names))}); "
                        "qtool reads one adapter per file")
    if not parts and not problems:
        problems.append("no LoRA tensors")
    use_rslora = bool(config.get("use_rslora", False))
    modules: dict[str, LoraFactors] = {}
    for module in sorted(parts):
        got = parts[module]
        rank, alpha = rank_and_alpha(config, module)
        a, b, bias = got.get("lora_A"), got.get("lora_B"), got.get("bias")
        if a is None or b is None:
            problems.append(f"{module}: " + (f"lora_embedding_{'A' if a is None else 'B'}" if module in embedding
                                              else f"lora_{'A' if a is None else 'B'}.weight") + " is missing")
            continue
        tied_to = _tied_embedding(config, module, a, b, parts, embedding)
        if not selects(config, module) and tied_to is None:
            problems.append(f"{module}: has factors but target_modules {config.get('target_modules')!r} does not "
                            "select it (peft would ignore them)")
        if not isinstance(rank, int) or rank <= 0:
            problems.append(f"{module}: rank {rank!r} from the config is not a positive int")
            continue
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            problems.append(f"{module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not match rank {rank} "
                            "from the config (r / rank_pattern)")
            continue
        if config.get("lora_bias") and bias is None:
            problems.append(f"{module}: lora_bias is set but lora_B.bias is missing")
        if bias is not None and (not config.get("lora_bias") or tuple(bias.shape) != (b.shape[0],)):
            problems.append(f"{module}: unexpected lora_B.bias {tuple(bias.shape)} "
                            f"(lora_bias={config.get('lora_bias')})")
        if not all(torch.isfinite(t).all() for t in (a, b) + ((bias,) if bias is not None else ())):
            problems.append(f"{module}: factors hold NaN/Inf values")
        if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            problems.append(f"{module}: lora_alpha {alpha!r} is not a finite number")
            continue
        modules[module] = LoraFactors(a, b, lora_scale(rank, alpha, use_rslora), rank, float(alpha), bias,
                                      module in embedding, tied_to)
    if problems:
        raise InputError(f"{where}: cannot use this adapter:\n  - " + "\n  - ".join(problems[:20])
                         + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))
    return modules


def _tied_embedding(config: dict, module: str, a, b, parts: dict, embedding: set[str]) -> str | None:
    """With ``ensure_weight_tying``: the embedding whose factors, transposed, are ``module``'s (a tied head)."""
    if not config.get("ensure_weight_tying") or module in embedding:
        return None
    for emb in embedding:
        ea, eb = parts[emb].get("lora_A"), parts[emb].get("lora_B")
        if ea is not None and eb is not None and a.shape == eb.t().shape and b.shape == ea.t().shape \
                and torch.equal(a, eb.t()) and torch.equal(b, ea.t()):
            return emb
    return None

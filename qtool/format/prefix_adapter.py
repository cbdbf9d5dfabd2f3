"""PEFT's prefix-tuning format (``PREFIX_TUNING``), written and read without peft: what ``qtool train --method prefix``
saves, and what ``PeftModel.from_pretrained`` loads onto the transformers model of the same converted folder.

``adapter_config.json``: PEFT's ``PrefixTuningConfig`` (keys in ``PREFIX_CONFIG_DEFAULTS``; ``token_dim`` =
``n_kv_heads·head_dim`` and ``num_attention_heads`` = ``n_kv_heads``, PEFT's grouped-query rule in
``utils/other.py::_prepare_prompt_learning_config``). ``adapter_model.safetensors``: one tensor,

=======================  ====================  ===============================================================
key                      shape                 meaning
=======================  ====================  ===============================================================
``prompt_embeddings``    ``(l, 2·L·kv)``       row j: virtual token j; columns [key 0 | value 0 | key 1 | ...],
                                               each ``kv`` wide in (head, head_dim) order; keys without RoPE
=======================  ====================  ===============================================================

PEFT saves the key/value vectors themselves even when they were trained through its reparameterisation MLP
(``get_prompt_embedding_to_save``), and loads them into a plain embedding in inference mode; we do the same and record
``prefix_projection`` / ``encoder_hidden_size`` as trained. ``qtool_adapter.json`` beside it records the qtool spec
and the base's fingerprint (:mod:`qtool.format.adapter_meta`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from qtool.errors import InputError, VerificationError
from qtool.format.adapter_meta import QTOOL_META_NAME, base_fingerprint
from qtool.format.atomic import staging_dir, write_text
from qtool.format.peft_adapter import CONFIG_NAME, FLOAT_DTYPES, WEIGHTS_NAME
from qtool.format.safetensors import read_header, write_tensors

KEY = "prompt_embeddings"
# Every key peft 0.21.2 writes for a prefix-tuning adapter (PrefixTuningConfig.to_dict(), minus `peft_version`, which
# it stamps with its own version), with our defaults. tests/test_methods.py compares the key set with the installed
# peft's.
PREFIX_CONFIG_DEFAULTS: dict = {
    "auto_mapping": None, "base_model_name_or_path": None, "encoder_hidden_size": None, "inference_mode": True,
    "init_weights": None, "modules_to_save": None, "num_attention_heads": None, "num_layers": None,
    "num_transformer_submodules": 1, "num_virtual_tokens": None, "peft_type": "PREFIX_TUNING",
    "prefix_projection": False, "revision": None, "task_type": "CAUSAL_LM", "token_dim": None,
}


@dataclass(frozen=True)
class PrefixAdapter:
    """A prefix read by :func:`load_prefix`: ``embeddings`` ``(l, 2·L·kv)`` as stored (CPU, float), the config."""

    path: Path
    embeddings: torch.Tensor
    config: dict

    @property
    def length(self) -> int:
        return self.embeddings.shape[0]


def is_prefix_folder(folder) -> bool:
    """Whether ``folder`` holds a PEFT adapter config of type PREFIX_TUNING (read errors say no; the readers that
    follow report them)."""
    try:
        return json.loads((Path(folder) / CONFIG_NAME).read_text()).get("peft_type") == "PREFIX_TUNING"
    except (OSError, ValueError, AttributeError):
        return False


def save_prefix(out_dir, embeddings: torch.Tensor, shape, spec, *, base_dir, overwrite: bool = False,
                extra_files: dict[str, str] | None = None) -> Path:
    """Write ``embeddings`` ``(l, 2·L·kv)`` (see the module docstring) as a PEFT prefix-tuning adapter for a model of
    ``shape``, trained as ``spec`` (an :class:`qtool.adapters.spec.AdapterSpec` with method ``prefix``) on
    ``base_dir``. Atomic (staging + rename) and read back before the rename."""
    emb = embeddings.detach().float().cpu().contiguous()
    want = (spec.prefix_len, 2 * shape.n_layers * shape.kv_dim)
    if tuple(emb.shape) != want or not torch.isfinite(emb).all():
        raise InputError(f"cannot save the prefix: its vectors are {tuple(emb.shape)}"
                         + ("" if tuple(emb.shape) != want else " with NaN/Inf values") + f", expected {want} finite")
    config = dict(PREFIX_CONFIG_DEFAULTS)
    config.update(num_virtual_tokens=spec.prefix_len, token_dim=shape.kv_dim, num_attention_heads=shape.n_kv_heads,
                  num_layers=shape.n_layers, encoder_hidden_size=spec.prefix_projection or shape.kv_dim,
                  prefix_projection=bool(spec.prefix_projection), base_model_name_or_path=str(base_dir))
    meta = {"spec": spec.to_json(), "base": base_fingerprint(base_dir),
            "peft_export": "prompt_embeddings = the key/value vectors"
                           + (" (output of the reparameterisation MLP)" if spec.prefix_projection else "")}
    out_dir = Path(out_dir)
    with staging_dir(out_dir, overwrite) as stage:
        write_tensors(stage / WEIGHTS_NAME, {KEY: emb})
        write_text(stage / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True))
        write_text(stage / QTOOL_META_NAME, json.dumps(meta, indent=1))
        for name, text in (extra_files or {}).items():
            write_text(stage / name, text)
        if not torch.equal(load_prefix(stage, shape).embeddings, emb):
            raise VerificationError(f"{out_dir}: the prefix did not read back identically; nothing written")
    return out_dir


def load_prefix(folder, shape=None) -> PrefixAdapter:
    """Read a PEFT prefix-tuning adapter (qtool's or PEFT's) and check it: a causal-LM prefix for one attention
    stack, its tensor ``(l, 2·L·token_dim)`` float and finite, and — with ``shape`` — the layer count, key/value
    heads and width of that model. Raises InputError naming the file and the reason."""
    folder = Path(folder)
    cfg_path = folder / CONFIG_NAME
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{cfg_path}: not a readable JSON file ({exc})") from exc
    problems = []
    if config.get("peft_type") != "PREFIX_TUNING":
        raise InputError(f"{cfg_path}: peft_type is {config.get('peft_type')!r}, not PREFIX_TUNING")
    if config.get("num_transformer_submodules", 1) != 1:
        problems.append("num_transformer_submodules is not 1: an encoder-decoder prefix, not a decoder's")
    n_layers, token_dim, heads = (config.get(k) for k in ("num_layers", "token_dim", "num_attention_heads"))
    if not all(isinstance(v, int) and v > 0 for v in (n_layers, token_dim, heads)):
        problems.append(f"num_layers, token_dim, num_attention_heads must be positive ints (got {n_layers}, "
                        f"{token_dim}, {heads})")
    elif shape is not None and (n_layers, token_dim, heads) != (shape.n_layers, shape.kv_dim, shape.n_kv_heads):
        problems.append(f"made for {n_layers} layers of {heads} key/value heads, {token_dim} wide; the model has "
                        f"{shape.n_layers} layers of {shape.n_kv_heads} heads, {shape.kv_dim} wide")
    if problems:
        raise InputError(f"{cfg_path}: cannot use this prefix:\n  - " + "\n  - ".join(problems))
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise InputError(f"{folder}: no {WEIGHTS_NAME}", hint="qtool reads safetensors only (never pickles)")
    with read_header(weights) as st:
        keys = list(st.tensors)
        if keys != [KEY]:
            raise InputError(f"{weights}: expected the one tensor {KEY!r}, found {keys[:5]}")
        emb = st.tensor(KEY).clone()
    want = (config.get("num_virtual_tokens"), 2 * n_layers * token_dim)
    if emb.dtype not in FLOAT_DTYPES or tuple(emb.shape) != want or not torch.isfinite(emb).all():
        raise InputError(f"{weights}: {KEY} is {emb.dtype} {tuple(emb.shape)}; expected a finite float tensor of "
                         f"shape {want} (num_virtual_tokens, 2 x num_layers x token_dim)")
    return PrefixAdapter(folder, emb, config)

"""qtool's format for Houlsby adapters (PEFT has no such method): what ``qtool train --method adapter`` saves and
:func:`qtool.adapters.attach.load_adapter_into` loads. A folder of

* ``qtool_adapter.json`` — ``{"spec": AdapterSpec.to_json() (method "adapter", adapter_size, adapter_activation),
  "base": the fingerprint of the base folder, "format": "qtool-houlsby-1"}`` (:mod:`qtool.format.adapter_meta`);
* ``houlsby_adapter.safetensors`` — for every layer ``i`` and block ``B`` in (``attn``, ``mlp``), fp32:

=============================================  ============  =========================================
key                                            shape         meaning
=============================================  ============  =========================================
``model.layers.{i}.{B}_adapter.down.weight``   ``(m, h)``    W_down
``model.layers.{i}.{B}_adapter.down.bias``     ``(m,)``      b_down
``model.layers.{i}.{B}_adapter.up.weight``     ``(h, m)``    W_up
``model.layers.{i}.{B}_adapter.up.bias``       ``(h,)``      b_up
=============================================  ============  =========================================

computing ``y + W_up·f(W_down·y + b_down) + b_up`` on the output ``y`` of the block's last projection (o_proj,
down_proj) before the residual add, ``f`` the ``adapter_activation`` (GELU, erf form). Weights are ``(out, in)``
as in ``torch.nn.Linear``. No file is named like PEFT's, so PEFT never mistakes the folder for one of its own.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from qtool.adapters.spec import ADAPTER_ACTIVATION, AdapterSpec
from qtool.errors import InputError, VerificationError
from qtool.format.adapter_meta import QTOOL_META_NAME, base_fingerprint, read_qtool_meta
from qtool.format.atomic import staging_dir, write_text
from qtool.format.safetensors import read_header, write_tensors

WEIGHTS_NAME = "houlsby_adapter.safetensors"
FORMAT = "qtool-houlsby-1"
BLOCKS = ("attn", "mlp")
PARTS = ("down.weight", "down.bias", "up.weight", "up.bias")


def expected_shapes(shape, size: int) -> dict[str, tuple[int, ...]]:
    """Every key of the file and its shape, for a model of ``shape`` and adapters of width ``size``."""
    h = shape.hidden
    dims = {"down.weight": (size, h), "down.bias": (size,), "up.weight": (h, size), "up.bias": (h,)}
    return {f"model.layers.{i}.{b}_adapter.{part}": dims[part]
            for i in range(shape.n_layers) for b in BLOCKS for part in PARTS}


def activation_of(spec: AdapterSpec | dict) -> str:
    d = spec.to_json() if isinstance(spec, AdapterSpec) else spec
    return d.get("adapter_activation", ADAPTER_ACTIVATION)


def save_houlsby(out_dir, modules: dict, spec: AdapterSpec, shape, *, base_dir, overwrite: bool = False,
                 extra_files: dict[str, str] | None = None) -> Path:
    """Write ``modules`` (path ``model.layers.{i}.{attn|mlp}_adapter`` -> a
    :class:`qtool.adapters.houlsby.HoulsbyAdapter`) of a model of ``shape`` to ``out_dir`` in the format above.
    Atomic (staging + rename) and read back before the rename."""
    tensors = {f"{path}.{part}": t.detach().float().cpu().contiguous()
               for path, m in modules.items() for part, t in m.tensors().items()}
    want = expected_shapes(shape, spec.adapter_size)
    problems = _problems(tensors, want)
    if problems:
        raise InputError("cannot save the adapters:\n  - " + "\n  - ".join(problems[:10]))
    meta = {"spec": spec.to_json(), "base": base_fingerprint(base_dir), "format": FORMAT}
    out_dir = Path(out_dir)
    with staging_dir(out_dir, overwrite) as stage:
        write_tensors(stage / WEIGHTS_NAME, {k: tensors[k] for k in want})
        write_text(stage / QTOOL_META_NAME, json.dumps(meta, indent=1))
        for name, text in (extra_files or {}).items():
            write_text(stage / name, text)
        _, back = load_houlsby(stage, shape)
        if any(not torch.equal(back[path][part], tensors[k]) for k in want for path, part in [_split(k)]):
            raise VerificationError(f"{out_dir}: the adapters did not read back identically; nothing written")
    return out_dir


def load_houlsby(folder, shape) -> tuple[AdapterSpec, dict[str, dict[str, torch.Tensor]]]:
    """``(spec, {module path: {part: tensor}})`` of a folder in the format above, checked against a model of
    ``shape``: every key present, none extra, shapes, float dtype, finite values. Raises InputError naming the file."""
    folder = Path(folder)
    meta = read_qtool_meta(folder)
    if meta is None or meta["spec"].get("method") != "adapter":
        raise InputError(f"{folder}: not a qtool Houlsby adapter folder (no {QTOOL_META_NAME} with method 'adapter')")
    spec = AdapterSpec.from_json(meta["spec"])
    if activation_of(meta["spec"]) != ADAPTER_ACTIVATION:
        raise InputError(f"{folder / QTOOL_META_NAME}: adapter_activation {activation_of(meta['spec'])!r} is not "
                         f"one qtool computes ({ADAPTER_ACTIVATION})")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise InputError(f"{folder}: no {WEIGHTS_NAME}")
    with read_header(weights) as st:
        tensors = {k: st.tensor(k).clone() for k in st.tensors}
    problems = _problems(tensors, expected_shapes(shape, spec.adapter_size))
    if problems:
        raise InputError(f"{weights}: cannot use these adapters on this {shape.model_type} model:\n  - "
                         + "\n  - ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more"
                                                            if len(problems) > 10 else ""),
                         hint="load them onto the model they were trained on")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        path, part = _split(key)
        modules.setdefault(path, {})[part] = t
    return spec, modules


def _split(key: str) -> tuple[str, str]:
    """``model.layers.3.attn_adapter.down.weight`` -> (``model.layers.3.attn_adapter``, ``down.weight``)."""
    head, _, part = key.rpartition("_adapter.")
    return head + "_adapter", part


def _problems(tensors: dict[str, torch.Tensor], want: dict[str, tuple[int, ...]]) -> list[str]:
    p = [f"{k}: missing" for k in want if k not in tensors]
    p += [f"{k}: not a tensor of this format" for k in tensors if k not in want]
    for k, t in tensors.items():
        if k in want and (not t.is_floating_point() or tuple(t.shape) != want[k]):
            p.append(f"{k}: {t.dtype} {tuple(t.shape)}, expected a float tensor of shape {want[k]}")
        elif k in want and not torch.isfinite(t).all():
            p.append(f"{k}: NaN/Inf values")
    return p

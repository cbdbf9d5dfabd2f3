"""Which adapters no merge can fold into the base weights, and why — one sentence per method. Torch-free: it reads
``qtool_adapter.json`` (:mod:`qtool.format.adapter_meta`) or PEFT's ``adapter_config.json``.

A merge writes ``W' = W0 + ΔW``: only an adapter whose effect on every input is a fixed linear map added to a weight
can be merged (LoRA: ``ΔW = s·B·A``). A Houlsby adapter applies ``W_up f(W_down y)`` with a non-linear ``f`` between
its products; a prefix changes which positions every softmax normalises over.
"""
from __future__ import annotations

import json
from pathlib import Path

from qtool.errors import InputError
from qtool.format.adapter_meta import read_qtool_meta

REASONS = {
    "adapter": "the adapter's non-linearity sits between its two products, so no matrix added to W reproduces it",
    "prefix": "the prefix adds keys/values to attention ({l} extra positions in every softmax), which no change to W "
              "can express",
}
_NAMES = {"adapter": "a Houlsby adapter", "prefix": "a prefix-tuning adapter"}


def unmergeable_method(folder) -> tuple[str, int | None] | None:
    """``(method, prefix length or None)`` when ``folder`` holds an adapter of a method that cannot be merged:
    qtool's record says so, or PEFT's config is PREFIX_TUNING. None otherwise (a LoRA, or not an adapter folder:
    the LoRA reader then says what is wrong)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    meta = read_qtool_meta(folder)
    if meta is not None and meta["spec"].get("method") in REASONS:
        method = meta["spec"]["method"]
        return method, meta["spec"].get("prefix_len") if method == "prefix" else None
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None
    if isinstance(config, dict) and config.get("peft_type") == "PREFIX_TUNING":
        return "prefix", config.get("num_virtual_tokens")
    return None


def refuse_unmergeable(folder) -> None:
    """Raise InputError with the reason when ``folder`` holds an adapter that cannot be merged."""
    found = unmergeable_method(folder)
    if found is None:
        return
    method, l = found
    reason = REASONS[method].format(l=l if l is not None else "l")
    raise InputError(f"{folder}: {_NAMES[method]} cannot be merged: {reason}",
                     hint="use it unmerged (qtool.adapters.attach.load_adapter_into, or PeftModel.from_pretrained for "
                          "a prefix); only LoRA (qtool train --method lora) merges into the weights")

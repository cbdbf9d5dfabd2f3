"""Where a PEFT adapter's ``adapter_config.json`` is and what it says, torch-free: the one reader of that file, so
that the CLI can refuse an adapter of the wrong type before anything heavy is imported. The tensors and what each
adapter type means are :mod:`qtool.format.peft_adapter` (LoRA) and :mod:`qtool.format.peft_adalora` (AdaLoRA)."""
from __future__ import annotations

import json
from pathlib import Path

from qtool.errors import InputError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"  # peft's legacy WEIGHTS_NAME; refused, never unpickled


def find_folder(path) -> Path:
    """The adapter folder of ``path`` (the folder itself, or its config/weights file); InputError naming the path,
    and the subfolders peft made for named adapters when there are some."""
    path = Path(path)
    if path.is_file() and path.name in (CONFIG_NAME, WEIGHTS_NAME):
        return path.parent
    if not path.is_dir():
        raise InputError(f"{path}: no such adapter folder")
    if (path / CONFIG_NAME).is_file():
        return path
    subs = sorted(p.parent.name for p in path.glob(f"*/{CONFIG_NAME}"))
    hint = (f"peft saves a non-default adapter in a subfolder; pass one of: {', '.join(str(path / s) for s in subs)}"
            if subs else "pass the folder written by qtool train or PeftModel.save_pretrained")
    raise InputError(f"{path}: no {CONFIG_NAME}", hint=hint)


def read_adapter_config(path) -> tuple[Path, dict]:
    """``(folder, config)`` of the adapter at ``path``; InputError naming the file if it is not a JSON object."""
    folder = find_folder(path)
    cfg_path = folder / CONFIG_NAME
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{cfg_path}: not a readable JSON file ({exc})") from exc
    if not isinstance(config, dict):
        raise InputError(f"{cfg_path}: expected a JSON object")
    return folder, config


def read_adalora_config(path) -> tuple[Path, dict]:
    """:func:`read_adapter_config` of an AdaLoRA adapter (``peft_type: "ADALORA"``); InputError saying what the
    adapter is otherwise, and what to do with it."""
    folder, config = read_adapter_config(path)
    peft_type = config.get("peft_type")
    if peft_type != "ADALORA":
        raise InputError(f"{folder} is not an AdaLoRA adapter (peft_type {peft_type!r} in {CONFIG_NAME})",
                         hint="a LORA adapter loads in qtool merge and PEFT as it is" if peft_type == "LORA" else
                         "AdaLoRA adapters are written by qtool train --method adalora or PEFT's AdaLoraConfig")
    return folder, config

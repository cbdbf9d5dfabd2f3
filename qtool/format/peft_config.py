"""Where a PEFT adapter's ``adapter_config.json`` is and what it says, torch-free: the one reader of that file, so
that the CLI can refuse an adapter of the wrong type before anything heavy is imported. The tensors and what each
adapter type means are :mod:`qtool.format.peft_adapter` (LoRA) and :mod:`qtool.format.peft_adalora` (AdaLoRA).
Which modules a config selects and at which rank and alpha (PEFT's pattern rules) are here too: they read only the
config."""
from __future__ import annotations

import json
import re
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


def _pattern_key(patterns, name: str) -> str:
    """The first key of ``patterns`` that, as a regex, matches the end of ``name`` at a module boundary; ``name``
    itself when none does (peft 0.21.2 ``utils/other.py::get_pattern_key``, same semantics, same order)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return name


def rank_and_alpha(config: dict, module: str) -> tuple[int, float]:
    """The rank and alpha peft gives ``module`` under ``config`` (``rank_pattern``/``alpha_pattern`` first)."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rank = rank_pattern.get(_pattern_key(rank_pattern, module), config.get("r", 8))
    alpha = alpha_pattern.get(_pattern_key(alpha_pattern, module), config.get("lora_alpha", 8))
    return rank, alpha


def selects(config: dict, module: str) -> bool:
    """Whether peft would put a LoRA layer on ``module`` under ``config`` (``target_modules``: exact name, suffix
    after a dot, or a fullmatch regex; minus ``exclude_modules``; ``layers_to_transform``), following peft 0.21.2
    ``tuners/tuners_utils.py::check_target_module_exists``. ``"all-linear"`` selects any module here (the caller
    checks the module type)."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str) and re.fullmatch(exclude, module):
            return False
        if not isinstance(exclude, str) and (module in exclude or any(module.endswith("." + e) for e in exclude)):
            return False
    targets = config.get("target_modules")
    if targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    if not targets:
        return False
    if module in targets:
        return True
    if not any(module.endswith("." + t) for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    pattern = config.get("layers_pattern")
    match = None
    if not pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module)
            if match:
                break
    if match is None:
        return False
    idx = int(match.group("idx"))
    return idx == layers if isinstance(layers, int) else idx in layers

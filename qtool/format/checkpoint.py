"""Resolve and validate a Hugging Face checkpoint folder (local, or a hub id in the local cache) before any work.

Nothing here unpickles: ``.bin``/``.pt`` checkpoints are refused, and only safetensors headers are parsed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch

from qtool.errors import InputError
from qtool.format.bnb_nf4 import is_prequantized, quantized_keys
from qtool.format.safetensors import SafetensorsFile, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".h5", ".msgpack", ".onnx", ".pb") + PICKLE_SUFFIXES
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class Checkpoint:
    """A validated checkpoint: its config, shards (validated headers, in file order) and the other files."""

    folder: Path
    config: dict
    shards: list[SafetensorsFile]
    key_shard: dict[str, SafetensorsFile] = field(default_factory=dict)
    other_files: list[Path] = field(default_factory=list)  # relative to folder: tokenizer, licence, ...

    @property
    def keys(self) -> list[str]:
        """All tensor names in file order (shard by shard, offset by offset): the order that reads sequentially."""
        return [k for s in self.shards for k in s.tensors]

    def info(self, key: str):
        return self.key_shard[key].tensors[key]

    def close(self) -> None:
        for s in self.shards:
            s.close()


def resolve(spec: str | os.PathLike) -> Path:
    """A local folder, or a hub id (``org/name``) found in huggingface_hub's cache. Never downloads."""
    path = Path(spec)
    if path.is_dir():
        return path
    if path.exists():
        raise InputError(f"{path} is a file; qtool expects a model folder (config.json + safetensors shards)")
    text = str(spec)
    if text.count("/") == 1 and not text.startswith((".", "/")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(text, local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError) as exc:
            offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
            raise InputError(
                f"{text}: not a local folder and not in the Hugging Face cache"
                f"{' (HF_HUB_OFFLINE is set)' if offline else ''}",
                hint=f"download it first (`huggingface-cli download {text}`) or pass the path of a local copy") from exc
    raise InputError(f"{spec}: no such folder", hint="pass a Hugging Face model folder or a cached hub id (org/name)")


def shard_names(folder: Path) -> list[str]:
    index = folder / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InputError(f"{index}: not a valid safetensors index ({exc})") from exc
        names = list(dict.fromkeys(weight_map.values()))
        for name in names:
            p = PurePosixPath(name)
            if p.is_absolute() or ".." in p.parts or "\\" in name:
                raise InputError(f"{index}: shard name {name!r} points outside the model folder",
                                 hint="the index is malicious or corrupt; qtool only reads files inside the folder")
            if not (folder / name).is_file():
                raise InputError(f"{index}: names shard {name!r}, which is missing from {folder}",
                                 hint="the download is incomplete; fetch the missing shard")
        return names
    if (folder / SINGLE_NAME).is_file():
        return [SINGLE_NAME]
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    if others:
        return others
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise InputError(f"{folder}: only pickle checkpoints found ({', '.join(pickles[:3])}); qtool never unpickles "
                         "files (a pickle can run arbitrary code)",
                         hint="convert them to safetensors with a tool you trust, in a sandbox, then run qtool again")
    raise InputError(f"{folder}: no safetensors weights found (model.safetensors or {INDEX_NAME})")


def open_checkpoint(spec: str | os.PathLike) -> Checkpoint:
    """Resolve ``spec`` and validate everything that can be checked before reading tensor data."""
    folder = resolve(spec)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise InputError(f"{folder}: no config.json", hint="qtool needs the Hugging Face config next to the weights")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{cfg_path}: invalid JSON ({exc})") from exc
    if is_prequantized(config):
        method = config["quantization_config"].get("quant_method", "?")
        raise InputError(f"{folder} is already quantised ({method}: config.json has a quantization_config)",
                         hint="convert the original 16/32-bit checkpoint instead")
    shards = [read_header(folder / name) for name in shard_names(folder)]
    key_shard: dict[str, SafetensorsFile] = {}
    for shard in shards:
        for key, info in shard.tensors.items():
            if key in key_shard:
                raise InputError(f"tensor {key!r} appears in both {key_shard[key].path.name} and {shard.path.name}")
            key_shard[key] = shard
    index = folder / INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        missing = [k for k, f in weight_map.items() if k not in key_shard or key_shard[k].path.name != f]
        if missing:
            raise InputError(f"{index}: {len(missing)} tensors are not where the index says, e.g. {missing[0]!r}",
                             hint="the shards and the index come from different downloads; fetch them again")
    prequant = quantized_keys(key_shard)
    if prequant:
        raise InputError(f"{folder} holds bitsandbytes 4-bit tensors (e.g. {prequant[0]!r}); it is already quantised",
                         hint="convert the original 16/32-bit checkpoint instead")
    others = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_dir() or rel.parts[0].startswith(".") or p.name == "config.json" or p.name == INDEX_NAME:
            continue
        if p.suffix in WEIGHT_SUFFIXES:
            continue
        others.append(rel)
    return Checkpoint(folder, config, shards, key_shard, others)

"""Hugging Face checkpoint folders, read and written: the one place that knows their layout.

Reading: resolve and validate a folder (local, or a hub id in the local cache) before any work. Nothing here
unpickles: ``.bin``/``.pt`` checkpoints are refused, and only safetensors headers are parsed.

Writing (``qtool convert`` and ``qtool merge``): tensors are cut into shards in file order under a size limit
(:func:`plan_shards`, named by :func:`shard_name`), and :func:`write_metadata` writes ``config.json``, the index
``model.safetensors.index.json`` when there is more than one shard, and copies :func:`other_files` (tokenizer,
generation config, licence, chat template...) from the source folder. The rules follow transformers 5
``save_pretrained`` (huggingface_hub ``split_torch_state_dict_into_shards``) so that outputs look like its own.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, TypeVar

import torch

from qtool.arch import read_config
from qtool.format.adapter_meta import INIT_ADAPTER_DIR
from qtool.errors import InputError, OutputError
from qtool.format.atomic import write_text
from qtool.format.bnb_nf4 import is_prequantized, quantized_keys
from qtool.format.safetensors import SafetensorsFile, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_MAX_SHARD = 50 * 10**9  # transformers 5 `save_pretrained` default ("50GB")
# qtool's reports about a folder (`qtool convert`: qtool_report.json, `qtool merge`: qtool_merge_report.json) are
# named qtool_*.json: they describe that folder's shards, so they are never copied into another one.
REPORT_PREFIX, REPORT_SUFFIX = "qtool_", ".json"
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
    config = read_config(folder, hint="qtool needs the Hugging Face config next to the weights")
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
    return Checkpoint(folder, config, shards, key_shard, other_files(folder))


# ------------------------------------------------------------------------------------------------------- writing
def other_files(folder: Path) -> list[Path]:
    """The files of ``folder`` (relative paths, sorted, subfolders included) that a derived checkpoint copies: all
    but the weights (any of WEIGHT_SUFFIXES, anywhere), hidden top-level entries (``.git``, ``.cache``...) and, at
    the top level, ``config.json`` and the index (written anew for the new weights) and qtool's reports
    (``qtool_*.json``: they describe the source's shards), and the initial adapter of a ``--lora-init`` folder (it
    fits that folder's residual weights only). A subfolder's ``config.json`` (e.g. a sentence-transformers module's)
    is copied."""
    folder = Path(folder)
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_dir() or rel.parts[0].startswith(".") or p.suffix in WEIGHT_SUFFIXES:
            continue
        if len(rel.parts) == 1 and (p.name in ("config.json", INDEX_NAME)
                                    or (p.name.startswith(REPORT_PREFIX) and p.name.endswith(REPORT_SUFFIX))):
            continue
        if len(rel.parts) > 1 and rel.parts[0] == INIT_ADAPTER_DIR:  # belongs to that base's residual weights
            continue
        out.append(rel)
    return out


T = TypeVar("T")


def plan_shards(groups: Iterable[tuple[T, int]], max_shard_bytes: int) -> list[list[T]]:
    """Cut ``(group, nbytes)`` pairs, in order, into shards: a new shard opens when the next group would take the
    current one past ``max_shard_bytes``, so a group larger than the limit gets a shard of its own (as huggingface_hub
    ``split_torch_state_dict_into_shards`` does, except that shards keep file order). A group is what must share a
    file: one tensor, or an NF4 weight with its quantisation-state companions. Always at least one shard."""
    shards: list[list[T]] = [[]]
    size = 0
    for group, nbytes in groups:
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(group)
        size += nbytes
    return shards


def shard_name(i: int, n: int) -> str:
    """The name of shard ``i`` (from 0) of ``n``, as transformers names them."""
    return SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_metadata(stage: Path, config: dict, weight_map: dict[str, str], source: Checkpoint) -> None:
    """Complete a checkpoint folder whose shards are written: ``config.json`` (``config``, keys sorted), the index
    when ``weight_map`` (tensor name -> shard file) names more than one shard, and ``source``'s
    :attr:`Checkpoint.other_files`, byte for byte. The index's ``total_size`` is the sum of the tensors' bytes as
    the shards' headers give them (file headers excluded), which is what transformers writes."""
    stage = Path(stage)
    write_text(stage / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    files = sorted(set(weight_map.values()))
    if len(files) > 1:
        total_size = 0
        for name in files:
            with read_header(stage / name) as shard:
                total_size += sum(info.nbytes for info in shard.tensors.values())
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        write_text(stage / INDEX_NAME, json.dumps(index, indent=2) + "\n")
    for rel in source.other_files:
        dest = stage / rel
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source.folder / rel, dest)
        except OSError as exc:
            raise OutputError(f"cannot copy {rel} to {stage}: {exc.strerror}",
                              hint="free disk space and run again" if exc.errno == errno.ENOSPC else None) from exc

"""The checks of ``convert``'s and ``verify``'s arguments that need no import and no reading of tensors, so that a
wrong flag or path is reported at once: the CLI runs them before it loads torch (``import torch`` alone takes 1-4 s),
and :func:`qtool.convert.pipeline.convert` runs them first too. Standard library only.
"""
from __future__ import annotations

from pathlib import Path

from qtool.errors import InputError
from qtool.format.atomic import check_destination, interrupted_replacements

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts (= qtool.nf4.codec.BLOCKSIZES)
TARGETS = ("cuda", "cpu")


def check_settings(blocksize: int, target: str, device: str, max_rel_error: float | None = None) -> None:
    """The flags of ``convert``: raises InputError naming the first wrong one."""
    if blocksize not in BLOCKSIZES:
        raise InputError(f"--block-size {blocksize} is not one bitsandbytes supports", hint=f"use one of {BLOCKSIZES}")
    if target not in TARGETS:
        raise InputError(f"--target {target!r} is not one of {', '.join(TARGETS)}")
    if not (device in ("cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise InputError(f"--device {device!r} is not cpu, cuda or cuda:N")
    if max_rel_error is not None and not max_rel_error > 0:
        raise InputError(f"--max-rel-error {max_rel_error} must be a positive number")


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` reads as ``org/name`` (looked up in the Hugging Face cache) rather than a path."""
    text = str(spec)
    return text.count("/") == 1 and not text.startswith((".", "/"))


def check_source_path(spec) -> Path | None:
    """The local folder ``spec`` names, None for a hub id (resolved later, from the cache); InputError for a file
    or a path that does not exist (the same messages as :func:`qtool.format.checkpoint.resolve`)."""
    path = Path(spec)
    if path.is_dir():
        return path
    if path.exists():
        raise InputError(f"{path} is a file; qtool expects a model folder (config.json + safetensors shards)")
    if is_hub_id(spec):
        return None
    raise InputError(f"{spec}: no such folder", hint="pass a Hugging Face model folder or a cached hub id (org/name)")


def check_convert_paths(source, out, overwrite: bool) -> None:
    """``convert``'s paths: the source exists (a folder or a hub id) and the output can be created (not existing
    unless ``overwrite``, not overlapping a local source). Raises InputError / OutputError."""
    folder = check_source_path(source)
    check_destination(Path(out), overwrite, inputs=(folder,) if folder is not None else ())


def check_verify_paths(folder, source=None) -> None:
    """``verify``'s paths: the folder exists and has a config.json; ``source``, if given, exists."""
    folder = Path(folder)
    if not folder.is_dir():
        left = interrupted_replacements(folder)
        if left:
            raise InputError(f"{folder}: no such folder; {left[-1]} holds its previous contents, left by a run that "
                             "was killed while replacing it",
                             hint=f"the next `qtool convert` into {folder} moves them back first; or mv them back")
        raise InputError(f"{folder}: no such folder")
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder}: no config.json; not a converted model folder",
                         hint="pass the folder that `qtool convert` wrote")
    if source is not None:
        check_source_path(source)

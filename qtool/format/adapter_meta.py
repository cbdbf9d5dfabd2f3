"""qtool's own record beside a PEFT adapter (``qtool_adapter.json``): the adapter spec it was trained with and the
fingerprint of the base checkpoint it fits, which ``qtool merge`` checks. Torch-free, so the CLI can check an
adapter or a converted folder before importing anything heavy.

``qtool_adapter.json``::

    {"spec": AdapterSpec.to_json(), "base": {"shards_sha256": {shard file name: hex sha256}}, "peft_export": "..."}
"""
from __future__ import annotations

import json
from pathlib import Path

from qtool.errors import InputError

QTOOL_META_NAME = "qtool_adapter.json"
INIT_ADAPTER_DIR = "qtool_lora_init"  # in a converted folder: the initial adapter of --lora-init pissa/loftq


def base_fingerprint(folder) -> dict:
    """What identifies a base checkpoint's weights: the sha256 of each of its safetensors shards, from the
    ``qtool_report.json`` that ``qtool convert`` wrote when it still matches the shards, else hashed now."""
    from qtool.format.report import reported_shard_hashes, sha256_file

    folder = Path(folder)
    hashes = reported_shard_hashes(folder)
    if hashes is None:
        hashes = {p.name: sha256_file(p) for p in sorted(folder.glob("*.safetensors"))}
    return {"shards_sha256": hashes}


def read_qtool_meta(folder) -> dict | None:
    """``qtool_adapter.json`` of an adapter folder, or None when the adapter was not written by qtool."""
    path = Path(folder) / QTOOL_META_NAME
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable JSON file ({exc})") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("spec"), dict):
        raise InputError(f"{path}: not a qtool adapter record (no 'spec')")
    return meta

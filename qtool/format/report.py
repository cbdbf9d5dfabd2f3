"""``qtool_report.json``, what ``qtool convert`` writes beside the shards it made (settings, per-tensor errors, each
shard's size and sha256), and the hashing behind it. Standard library only: adapters and the CLI read it too."""
from __future__ import annotations

import hashlib
import json
import mmap
import os
from pathlib import Path

REPORT_NAME = "qtool_report.json"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file. Hashes a memory map of it, which spares copying the file through read buffers (1.79 vs
    1.52 GB/s for 2.8 GB in the page cache here: sha256 itself runs at ~1.8 GB/s); each chunk is unmapped again once
    hashed (the page cache keeps it), or the whole file would count as this process's resident memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return h.hexdigest()  # an empty file cannot be mapped
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            with memoryview(mm) as view:
                for offset in range(0, len(view), chunk):
                    h.update(view[offset:offset + chunk])
                    if hasattr(mm, "madvise"):
                        mm.madvise(mmap.MADV_DONTNEED, offset, min(chunk, len(view) - offset))
    return h.hexdigest()


def reported_shard_hashes(folder) -> dict[str, str] | None:
    """``{shard file: sha256}`` from ``folder``'s report when the report lists exactly the shards there with their
    current sizes, else None (no report, or the folder changed since)."""
    folder = Path(folder)
    sizes = {p.name: p.stat().st_size for p in folder.glob("*.safetensors")}
    try:
        shards = json.loads((folder / REPORT_NAME).read_text())["shards"]
        if {n: m["bytes"] for n, m in shards.items()} == sizes:
            return {n: shards[n]["sha256"] for n in sorted(sizes)}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None

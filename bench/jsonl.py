"""One bench result: a JSON line on stdout and, when ``out`` is given, appended to that file (several runs of a
script can share one file)."""
from __future__ import annotations

import json
from pathlib import Path


def emit(rec: dict, out: Path | None) -> None:
    line = json.dumps(rec)
    print(line, flush=True)
    if out:
        with Path(out).open("a") as f:
            f.write(line + "\n")

"""Byte counts for people. The only place that converts units; everything else carries ints named ``*_bytes``.

GB is 10**9 bytes and GiB is 2**30 bytes (likewise kB/KiB, MB/MiB, TB/TiB); every rendered figure says which one it
is, and a parsed size means what its suffix says: '24GB' is 24 * 10**9 bytes, '24GiB' and '24Gi' 24 * 2**30.
"""
from __future__ import annotations

import re

GB = 10**9
GiB = 2**30
MB = 10**6
MiB = 2**20

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_FACTORS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "ki": 2**10, "kib": 2**10, "m": MB, "mb": MB, "mi": MiB,
            "mib": MiB, "g": GB, "gb": GB, "gi": GiB, "gib": GiB, "t": 10**12, "tb": 10**12, "ti": 2**40,
            "tib": 2**40}


def fmt_bytes(n_bytes: int | float, unit: str = "GB", digits: int = 2) -> str:
    """``fmt_bytes(130e9) == '130.00 GB'``; ``unit`` is one of B, MB, MiB, GB, GiB."""
    factor = {"B": 1, "MB": MB, "MiB": MiB, "GB": GB, "GiB": GiB}[unit]
    if unit == "B":
        return f"{int(n_bytes):,} B"
    return f"{n_bytes / factor:.{digits}f} {unit}"


def fmt_both(n_bytes: int | float, digits: int = 2) -> str:
    """``fmt_both(24 * 2**30) == '25.77 GB = 24.00 GiB'``: a size compared with GPU memory, in both units."""
    return f"{fmt_bytes(n_bytes, 'GB', digits)} = {fmt_bytes(n_bytes, 'GiB', digits)}"


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000, '24GiB' or '24Gi' -> 25769803776, '512MB', 1e9, '100' (bytes). Raises ValueError."""
    if isinstance(text, (int, float)):
        return int(text)
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 5GB, 24GiB, 512MB)")
    number, suffix = m.groups()
    return int(float(number) * _FACTORS[(suffix or "").lower()])

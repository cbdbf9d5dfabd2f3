"""How the NF4 CPU kernels (``_cpu.c``) are compiled: at ``pip install`` (``setup.py`` runs this file), or — where
qtool runs from a source checkout that was never installed, or the installed build is stale — once, on first use,
into a per-user cache (``$QTOOL_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/qtool``, else ``~/.cache/qtool``).

The kernels use no Python API, so any C compiler builds them without Python headers: ``$CC``, else the compiler
Python was built with, else ``cc``. Every build embeds the sha256 of the source it was built from, so that a build
of an older source is never loaded. Importable without torch or numpy (``setup.py`` loads it with ``runpy``).
"""
from __future__ import annotations

import hashlib
import os
import platform
import shlex
import subprocess
import sysconfig
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("_cpu.c")
LIB_STEM = "_cpu_kernels"  # the installed build: qtool/nf4/_cpu_kernels<EXT_SUFFIX>
# -ffp-contract=off: never fuse a multiply and an add into one FMA (GCC does by default in GNU C mode), so that every
# operation is rounded as IEEE says, whatever the vector width: bit-exactness with bitsandbytes depends on it.
# Never -ffast-math, for the same reason.
CFLAGS = ["-std=c11", "-O3", "-ffp-contract=off", "-pthread"]
NO_CLONES = "QTOOL_NO_CLONES"  # a compiler that rejects target_clones builds one generic copy (slower, same results)


def source_sha256(path: Path = SOURCE) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sha_macro(sha: str) -> tuple[str, str]:
    return "QTOOL_SOURCE_SHA256", f'"{sha}"'


def installed_path() -> Path:
    return SOURCE.with_name(LIB_STEM + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))


def cache_dir() -> Path:
    if os.environ.get("QTOOL_KERNEL_CACHE"):
        return Path(os.environ["QTOOL_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qtool"


def cached_path(sha: str) -> Path:
    return cache_dir() / f"nf4-kernels-{sha[:16]}-{platform.system().lower()}-{platform.machine()}.so"


def compiler() -> list[str]:
    cc = os.environ.get("CC") or (sysconfig.get_config_var("CC") or "").strip() or "cc"
    return shlex.split(cc)


def build(out: Path, sha: str) -> None:
    """Compile SOURCE into the shared library ``out`` (through a temporary name in the same folder, then renamed, so
    that concurrent first runs never load a half-written file). Raises RuntimeError with the compiler's message."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    name, value = sha_macro(sha)
    base = [*compiler(), *CFLAGS, "-fPIC", "-shared", f"-D{name}={value}", str(SOURCE), "-o", tmp, "-lm"]
    try:
        errors = []
        for extra in ([], [f"-D{NO_CLONES}"]):
            try:
                proc = subprocess.run(base[:1] + extra + base[1:], capture_output=True, text=True)
            except OSError as exc:  # no compiler at all
                raise RuntimeError(_no_build_message(f"{base[0]}: {exc.strerror}")) from exc
            if proc.returncode == 0:
                os.chmod(tmp, 0o755)
                os.replace(tmp, out)
                return
            errors.append(proc.stderr.strip()[-2000:])
        raise RuntimeError(_no_build_message(errors[-1]))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _no_build_message(detail: str) -> str:
    return (f"qtool's NF4 CPU kernels ({SOURCE.name}) are not built and cannot be compiled here: {detail}\n"
            f"  -> reinstall qtool with a C compiler present (`pip install qtool` builds them), or set CC to a C "
            f"compiler; they are compiled once and cached in {cache_dir()}")

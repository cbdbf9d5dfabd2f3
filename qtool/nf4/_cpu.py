"""The NF4 CPU kernels (``_cpu.c``, compiled ahead of time) bound through ctypes. Callers go through
:mod:`qtool.nf4.codec`.

Why C rather than a JIT: the kernels used to be numba functions, whose first run compiled them for ~50 s (measured:
bench/convert_speed.py --first-run); a C library is compiled at ``pip install`` in a few seconds, or once on first
use where qtool runs from an uninstalled checkout (:mod:`._build`), and loads in a millisecond. ctypes releases the
GIL during each call, so several Python threads can run kernels at once; each call also splits its own work over
:func:`threads` threads (pthreads, inside the library).

Inputs are raw bit patterns: ``uint16`` for fp16/bf16, ``uint32`` for fp32 (``kind`` says which). Every array must
be C-contiguous and of the dtype named in the docstring; the wrappers check it (a wrong one would be memory
corruption, not an exception).
"""
from __future__ import annotations

import ctypes
import os
import threading

import numpy as np

from qtool.nf4 import _build

KIND_F16, KIND_BF16, KIND_F32 = 0, 1, 2
GROUP_BLOCKS = 256  # blocks per parallel work item (as in _cpu.c)
N_SUMS, N_COUNTS = 4, 2  # per group: (sum x^2, sum err^2, sum ideal err^2, max |err|), (non-finite x_hat, bad constants)
ABI_VERSION = 1  # _cpu.c's ABI_VERSION

_lock = threading.Lock()
_lib = None
_local = threading.local()
_p, _i, _i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
_SIGNATURES = {  # name -> (restype, argtypes), as declared in _cpu.c
    "qtool_abi_version": (_i, []),
    "qtool_source_sha256": (ctypes.c_char_p, []),
    "qtool_block_absmax": (_i64, [_p, _i, _i64, _i, _p, _p, _i]),
    "qtool_quantize_blocks": (None, [_p, _i, _i64, _i, _p, _i, _p, _p, _i, _p, _p, _p, _i64, _p, _p, _i]),
    "qtool_reconstruction_stats": (None, [_p, _i, _p, _p, _p, _i, _i64, _p, _i64, _p, _p, _i]),
    "qtool_total_stats": (None, [_p, _p, _i64, _p, _p]),
    "qtool_nested_codes_lut": (None, [_p, _i64, _i, _p, _p, _p]),
    "qtool_nested_codes_search": (None, [_p, _i64, _i, _p, _p, _p, _p]),
    "qtool_dequantize_blocks": (None, [_p, _p, _p, _i, _i64, _p, _i]),
    "qtool_absmax_fp32": (None, [_p, _p, _p, ctypes.c_float, _i, _i64, _p]),
}


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def threads() -> int:
    """Threads each kernel call from this thread splits its work over (default: the cores this process may use)."""
    return getattr(_local, "n_threads", None) or available_cores()


def set_threads(n: int | None) -> None:
    """Set :func:`threads` for kernel calls made from the calling thread (None: back to the default)."""
    _local.n_threads = max(1, int(n)) if n else None


def library() -> ctypes.CDLL:
    """The loaded kernels: the build installed beside this file if it was built from the current source, else the
    per-user cached build, compiled now if missing (once per source version and machine: a few seconds)."""
    global _lib
    if _lib is None:
        with _lock:
            if _lib is None:
                _lib = _load()
    return _lib


def _load() -> ctypes.CDLL:
    sha = _build.source_sha256() if _build.SOURCE.exists() else None
    installed = _build.installed_path()
    if installed.exists():
        lib = _open(installed)
        if lib is not None and (sha is None or lib.qtool_source_sha256().decode() == sha):
            return lib
    if sha is None:
        raise RuntimeError(f"qtool's NF4 CPU kernels are missing ({installed} and its source {_build.SOURCE.name})"
                           "\n  -> reinstall qtool")
    cached = _build.cached_path(sha)
    lib = _open(cached) if cached.exists() else None
    if lib is None or lib.qtool_source_sha256().decode() != sha:
        _build.build(cached, sha)
        lib = _open(cached)
        if lib is None:
            raise RuntimeError(f"{cached}: built, but it does not load as qtool's NF4 kernels (ABI {ABI_VERSION})")
    return lib


def _open(path) -> ctypes.CDLL | None:
    """The library at ``path`` with its signatures declared, or None if it does not load or has another ABI."""
    try:
        lib = ctypes.CDLL(str(path))
        lib.qtool_abi_version.restype = ctypes.c_int
        if lib.qtool_abi_version() != ABI_VERSION:
            return None
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
    except (OSError, AttributeError):
        return None
    return lib


def _ptr(a: np.ndarray | None, dtype) -> int | None:
    """The address of ``a``'s data after checking its dtype and layout (None passes as a NULL pointer)."""
    if a is None:
        return None
    if a.dtype != dtype or not a.flags.c_contiguous:
        raise TypeError(f"kernel argument: expected a contiguous {np.dtype(dtype)} array, got {a.dtype} "
                        f"(contiguous: {a.flags.c_contiguous})")
    return a.ctypes.data


def _src(bits: np.ndarray, kind: int) -> int:
    return _ptr(bits, np.uint32 if kind == KIND_F32 else np.uint16)


def n_groups(n: int, blocksize: int) -> int:
    """Work groups (of GROUP_BLOCKS blocks) of a tensor of ``n`` elements: the rows of the measuring kernels' output."""
    n_blocks = -(-n // blocksize)
    return -(-n_blocks // GROUP_BLOCKS)


# ------------------------------------------------------------------------------------------------------ kernels
def block_absmax(src: np.ndarray, kind: int, n: int, blocksize: int, absmax: np.ndarray) -> int:
    """``absmax[b] = max |x|`` (fp32) over block b of the ``n`` elements of ``src`` (the last block may be partial).
    Returns the number of blocks holding Inf/NaN (their absmax is then meaningless)."""
    assert absmax.size >= -(-n // blocksize)
    bad = np.empty(n_groups(n, blocksize), np.int64)
    return int(library().qtool_block_absmax(_src(src, kind), kind, n, blocksize, _ptr(absmax, np.float32),
                                            _ptr(bad, np.int64), threads()))


def quantize_blocks(src, kind, n, blocksize, th, zero_block_code, exact, packed, measure=False, stored=None,
                    code=None, tol=None, tol_blocks=1, sums=None, counts=None) -> None:
    """Quantise the full blocks of ``src`` given each block's exact absmax ``exact`` (fp32): writes the 4-bit codes
    of those blocks into ``packed`` (uint8), the first element of a pair in the high nibble. ``th``: the 15 fp32
    thresholds. An all-zero block gets ``zero_block_code`` for every element (7 on bitsandbytes' CPU path, 0 on its
    CUDA path). The partial last block, if any, is the caller's (bitsandbytes treats it differently).

    With ``measure``, also compares every block (the partial last one included: its codes must already be in
    ``packed``) with its source: per group g of GROUP_BLOCKS blocks, ``sums[g] = (sum x^2, sum (x - x_hat)^2,
    sum (x - x_ideal)^2, max |x - x_hat|)`` (fp64 ``[n_groups, 4]``) and ``counts[g] = (non-finite x_hat, constants
    off)`` (int64 ``[n_groups, 2]``), where ``x_hat = code[q] * stored[b]`` (fp32, as the loaders compute it),
    ``x_ideal = code[q] * exact[b]``, and a constant is off when further from ``exact[b]`` than ``tol[b //
    tol_blocks]`` (fp64) allows. Same numbers as :func:`reconstruction_stats`."""
    assert packed.size >= n // blocksize * blocksize // 2 and exact.size >= n // blocksize
    if measure:
        assert sums.shape == (n_groups(n, blocksize), N_SUMS) and counts.shape == (sums.shape[0], N_COUNTS)
        assert stored.size >= -(-n // blocksize) and tol.size >= -(-stored.size // tol_blocks)
    library().qtool_quantize_blocks(
        _src(src, kind), kind, n, blocksize, _ptr(th, np.float32), zero_block_code, _ptr(exact, np.float32),
        _ptr(packed, np.uint8), int(measure), _ptr(stored if measure else None, np.float32),
        _ptr(code if measure else None, np.float32), _ptr(tol if measure else None, np.float64), tol_blocks,
        _ptr(sums if measure else None, np.float64), _ptr(counts if measure else None, np.int64), threads())


def reconstruction_stats(src, kind, packed, stored, code, blocksize, n, tol, tol_blocks, sums, counts) -> None:
    """:func:`quantize_blocks`' measurement on its own, for a tensor quantised elsewhere (``qtool verify --source``,
    a GPU conversion): each block's exact absmax is found here from ``src``. Fills ``sums`` and ``counts`` alike."""
    assert packed.size >= (n + 1) // 2 and stored.size >= -(-n // blocksize)
    assert sums.shape == (n_groups(n, blocksize), N_SUMS) and counts.shape == (sums.shape[0], N_COUNTS)
    library().qtool_reconstruction_stats(
        _src(src, kind), kind, _ptr(packed, np.uint8), _ptr(stored, np.float32), _ptr(code, np.float32), blocksize,
        n, _ptr(tol, np.float64), tol_blocks, _ptr(sums, np.float64), _ptr(counts, np.int64), threads())


def total_stats(sums: np.ndarray, counts: np.ndarray) -> tuple[float, float, float, float, int, int]:
    """The per-group results, summed over the tensor in group order: (sum x^2, sum err^2, sum ideal err^2,
    max |err|, non-finite x_hat, constants off)."""
    out, out_counts = np.empty(4), np.empty(2, np.int64)
    library().qtool_total_stats(_ptr(sums, np.float64), _ptr(counts, np.int64), sums.shape[0], _ptr(out, np.float64),
                                _ptr(out_counts, np.int64))
    return (*map(float, out), *map(int, out_counts))


def nested_codes_lut(y: np.ndarray, blocksize: int, lut: np.ndarray, codes: np.ndarray, nested: np.ndarray) -> None:
    """bitsandbytes 0.50 CPU ``quantize_blockwise``: 8-bit codes of ``y`` (fp32) through the 65,536-bin look-up
    table ``lut`` (uint8), blocks of ``blocksize``; writes ``codes`` (uint8) and ``nested`` (fp32 per block)."""
    assert codes.size == y.size and nested.size == -(-y.size // blocksize) and lut.size == 65536
    library().qtool_nested_codes_lut(_ptr(y, np.float32), y.size, blocksize, _ptr(lut, np.uint8),
                                     _ptr(codes, np.uint8), _ptr(nested, np.float32))


def nested_codes_search(y: np.ndarray, blocksize: int, code: np.ndarray, lut: np.ndarray, codes: np.ndarray,
                        nested: np.ndarray) -> None:
    """bitsandbytes CUDA ``kQuantizeBlockwise`` + ``dQuantize<0>``: 8-bit codes of ``y`` (fp32) by its binary search
    over the 256 fp32 values ``code`` (IEEE reciprocal of each block's absmax), found through ``lut`` (the CPU's
    look-up table of ``code``, see :func:`nested_codes_lut`) and exact comparisons; writes ``codes`` and ``nested``."""
    assert codes.size == y.size and nested.size == -(-y.size // blocksize) and code.size == 256 and lut.size == 65536
    library().qtool_nested_codes_search(_ptr(y, np.float32), y.size, blocksize, _ptr(code, np.float32),
                                        _ptr(lut, np.uint8), _ptr(codes, np.uint8), _ptr(nested, np.float32))


def absmax_fp32(codes: np.ndarray, nested: np.ndarray, code8: np.ndarray, offset: float, nested_blocksize: int,
                out: np.ndarray) -> None:
    """``out[b] = code8[codes[b]] * nested[b // nested_blocksize] + offset`` (fp32 multiply, then fp32 add): the
    double-quantised block constants as the loaders dequantise them."""
    assert out.size == codes.size and nested.size == -(-codes.size // nested_blocksize) and code8.size == 256
    library().qtool_absmax_fp32(_ptr(codes, np.uint8), _ptr(nested, np.float32), _ptr(code8, np.float32),
                                offset, nested_blocksize, codes.size, _ptr(out, np.float32))


def dequantize_blocks(packed: np.ndarray, absmax: np.ndarray, code: np.ndarray, blocksize: int, n: int,
                      out: np.ndarray) -> None:
    """``out[i] = code[nibble i] * absmax[i // blocksize]`` in fp32, for the ``n`` elements."""
    assert packed.size >= (n + 1) // 2 and absmax.size >= -(-n // blocksize) and out.size == n and code.size == 16
    library().qtool_dequantize_blocks(_ptr(packed, np.uint8), _ptr(absmax, np.float32), _ptr(code, np.float32),
                                      blocksize, n, _ptr(out, np.float32), threads())

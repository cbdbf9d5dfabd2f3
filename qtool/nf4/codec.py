"""NF4 with double-quantised block constants (QLoRA), bit-identical to bitsandbytes 0.50.2 ``quantize_4bit``.

No file I/O here. The on-disk key names live in :mod:`qtool.format.bnb_nf4`.

Format of one quantised tensor of ``n`` elements, blocksize ``B`` (default 64):

* the tensor is flattened row-major; blocks are runs of ``B`` consecutive elements (a block may span two rows);
* ``absmax[b] = max |x|`` over block ``b`` (fp32, an input value, so exact);
* each element becomes the NF4 code nearest to ``x * fp32(1 / absmax[b])`` (a value exactly on the midpoint of two
  codes takes the lower one); two codes per byte, the first element in the high nibble (see :func:`pack_nibbles`);
* double quantisation: ``offset = mean(absmax)`` (fp32), then ``absmax - offset`` is quantised to 8 bits blockwise
  (256 per block) with bitsandbytes' signed dynamic code, keeping an fp32 ``nested_absmax`` per 256 blocks.

bitsandbytes' CPU and CUDA paths produce different bytes in three places; ``target`` picks which one to reproduce:

=================  =========================================  =========================================
                   ``target="cuda"`` (default: what           ``target="cpu"`` (bitsandbytes on the CPU,
                   transformers + bnb build on a GPU)         the oracle our tests run)
=================  =========================================  =========================================
8-bit absmax code  exact nearest (binary search + midpoint)   65,536-bin look-up table (differs on ~0.2%)
all-zero block     4-bit code 0 (0 * inf = NaN on CUDA)       4-bit code 7
last partial block ``x * (1/absmax)``, all-zero: absmax 0     ``x / absmax``, all-zero: absmax stored 1e-38
=================  =========================================  =========================================

Both dequantise to the same values up to those absmax codes; transformers loads either.

Where the work runs matters for ``target="cuda"`` only. On the CPU (the default), the reciprocal of each block's
absmax is the IEEE one and the double-quant offset is ``torch.mean`` on the CPU: deterministic, the same on every
machine with the same torch thread count, and equal to bitsandbytes' GPU bytes except where its fast-math
reciprocal lands on the other side of a threshold or its GPU mean differs in the last bit (issue 13, a random
1.7B Llama on an H200: packed bytes equal everywhere, 7 of 168 weights with some other 8-bit absmax codes, 44 of
168 with another offset). On a CUDA tensor, :mod:`qtool.nf4.gpu_bytes` reproduces the GPU's arithmetic (``rcp.approx.ftz``,
flush-to-zero, the mean on the device): the bytes bitsandbytes writes on that GPU, exactly. ``target="cpu"`` gives
bitsandbytes' CPU bytes on either device (its offset, ``torch.mean`` on the CPU, depends on torch's thread count).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from qtool.errors import InputError

# The 16 NF4 values, as bitsandbytes 0.50.2 `functional.get_4bit_type("nf4")` (= `backends/utils._NF4_QUANT_TABLE`).
# Provenance (bitsandbytes' comment): `create_normal_map(offset=0.9677083, use_extra_value=True)` — 8 positive
# quantiles Phi^-1(linspace(offset, 0.5, 9)[:-1]), 7 negative ones of linspace(offset, 0.5, 8)[:-1], and 0,
# normalised by the largest. tests/test_nf4.py regenerates them from the normal quantile function.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
NF4_OFFSET = 0.9677083  # the quantile offset the table was generated with (bitsandbytes)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts
NESTED_BLOCKSIZE = 256  # bitsandbytes hard-codes it for the absmax of double quantisation
TARGETS = ("cuda", "cpu")
_KIND = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
_BITS_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def nf4_code() -> np.ndarray:
    return np.array(NF4_CODE, dtype=np.float32)


def nf4_thresholds() -> np.ndarray:
    """The 15 fp32 midpoints between neighbouring codes (fp32 arithmetic, as bitsandbytes computes them)."""
    c = nf4_code()
    return ((c[:-1] + c[1:]) / np.float32(2)).astype(np.float32)


def dynamic_map_signed() -> np.ndarray:
    """bitsandbytes ``create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)``: 256 sorted fp32 values.

    For exponent group i = 0..6 the 2**i midpoints of ``linspace(0.1, 1, 2**i + 1)`` scaled by ``10**(i-6)``,
    with both signs; then 0 and 1.0. Every step is an fp32 torch op, as in bnb (the fp32 rounding is part of the map).
    """
    values: list[float] = []
    for i in range(7):
        b = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (b[:-1] + b[1:]) / 2.0
        values += (means * 10.0 ** (i - 6)).tolist() + (means * -(10.0 ** (i - 6))).tolist()
    values += [0.0, 1.0]
    return np.sort(np.array(values, dtype=np.float32))


def _nested_lut(code: np.ndarray) -> np.ndarray:
    """bitsandbytes 0.50 CPU: bin i of 65,536 holds the number of fp32 code midpoints below -1 + 2i/65535."""
    mid = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
    grid = (np.float32(-1.0) + (np.float32(2.0) * np.arange(65536, dtype=np.float32)) / np.float32(65535)).astype(np.float32)
    return np.searchsorted(mid, grid, side="left").astype(np.uint8)


_DYNAMIC = dynamic_map_signed()
_LUT = _nested_lut(_DYNAMIC)
_CODE, _THRESHOLDS = nf4_code(), nf4_thresholds()
# Double quantisation moves a block constant by at most one gap of the 8-bit code (exact nearest: half a gap; the
# CPU look-up table may take the neighbour) times its group's nested absmax; the widest gap is 0.9/64 near +-1.
_DYNAMIC_MAX_GAP = float(np.diff(_DYNAMIC).max())


@dataclass(frozen=True)
class QuantizedWeight:
    """One NF4 tensor as bitsandbytes stores it (all tensors on the same device, contiguous).

    packed:         uint8 ``[(n + 1) // 2, 1]`` — two 4-bit codes per byte, element 2i in the high nibble.
    absmax:         uint8 ``[n_blocks]`` (8-bit codes of ``absmax - offset``) with double quantisation,
                    else fp32 ``[n_blocks]``; ``n_blocks = ceil(n / blocksize)``.
    nested_absmax:  fp32 ``[ceil(n_blocks / 256)]`` with double quantisation, else None.
    offset:         the fp32 mean of the block absmax (a Python float holding that fp32 value), or None.
    shape:          the original shape, e.g. ``(out_features, in_features)``.
    dtype:          the dtype that was quantised and that dequantisation returns (fp16, bf16 or fp32).
    blocksize:      elements per block.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    nested_absmax: torch.Tensor | None
    offset: float | None
    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int = 64

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def nbytes(self) -> int:
        """Resident bytes of the tensors (code tables excluded; see qtool.format.bnb_nf4 for the on-disk extras)."""
        extra = self.nested_absmax.nbytes if self.nested_absmax is not None else 0
        return self.packed.nbytes + self.absmax.nbytes + extra

    def to(self, device) -> "QuantizedWeight":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return QuantizedWeight(move(self.packed), move(self.absmax), move(self.nested_absmax), self.offset,
                               self.shape, self.dtype, self.blocksize)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """``[a, b, c, d, e] -> [ab, cd, e0]`` (uint8 codes 0..15; first element in the high nibble; odd tail padded
    with code 0 here — the quantiser pads with the code of 0.0 itself). Inverse: :func:`unpack_nibbles`."""
    codes = codes.reshape(-1).to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    return (codes[0::2] << 4) | codes[1::2]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """``[ab, cd, e0] -> [a, b, c, d, e]`` for ``n`` elements (uint8)."""
    packed = packed.reshape(-1)
    out = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)
    return out[:n]


@contextlib.contextmanager
def kernel_threads(share: int = 1):
    """Within the block, each CPU kernel called from this thread splits its work over ``1/share`` of the cores (at
    least one thread), so that ``share`` threads can quantise at once without oversubscribing the CPU."""
    from qtool.nf4 import _cpu as k

    before = getattr(k._local, "n_threads", None)
    k.set_threads(max(1, k.available_cores() // share))
    try:
        yield
    finally:
        k.set_threads(before)


def _check_input(w: torch.Tensor, blocksize: int, target: str, name: str) -> None:
    if w.dtype not in _KIND:
        raise InputError(f"tensor {name!r} has dtype {w.dtype}; NF4 quantises float16, bfloat16 or float32 only")
    if blocksize not in BLOCKSIZES:
        raise InputError(f"--block-size {blocksize} is not one bitsandbytes supports", hint=f"use one of {BLOCKSIZES}")
    if target not in TARGETS:
        raise InputError(f"unknown target {target!r}", hint="use 'cuda' or 'cpu'")
    if w.numel() == 0:
        raise InputError(f"tensor {name!r} is empty; nothing to quantise")


def quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True, target: str = "cuda",
             name: str = "tensor") -> QuantizedWeight:
    """Quantise ``w`` to NF4 exactly as bitsandbytes ``quantize_4bit(w, blocksize, quant_type="nf4",
    compress_statistics=double_quant)`` does on ``target``'s backend. Works on CPU tensors (C kernels) and CUDA
    tensors (torch kernels); with ``target="cuda"``, a CUDA tensor gets the GPU's own bytes (see the module
    docstring), a CPU tensor the deterministic ones. Raises InputError on Inf/NaN (naming ``name``)."""
    _check_input(w, blocksize, target, name)
    if w.is_cuda and target == "cuda":
        return _quantize_gpu_bytes(w, blocksize, double_quant, name)
    if w.is_cuda:
        packed, absmax_f32, n_bad = _quantize_4bit_torch(w, blocksize, target)
        _refuse_nonfinite(n_bad, name)
        return _with_constants(packed, absmax_f32, w, blocksize, double_quant, target)
    qw, _, n_bad = _quantize_cpu(w, blocksize, double_quant, target, measure=False)
    _refuse_nonfinite(n_bad, name)
    return qw


def quantize_with_error(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True, target: str = "cuda",
                        name: str = "tensor") -> tuple[QuantizedWeight, dict]:
    """``quantize(w, ...)`` and ``reconstruction_error(w, result)``, with the same results to the last bit. On a CPU
    tensor the error is measured in the pass that writes the 4-bit codes, from the codes as written and the block
    constants as stored, so the source is read and converted once instead of twice."""
    _check_input(w, blocksize, target, name)
    if w.is_cuda:
        qw = quantize(w, blocksize, double_quant, target, name)
        return qw, reconstruction_error(w, qw)
    qw, error, n_bad = _quantize_cpu(w, blocksize, double_quant, target, measure=True)
    _refuse_nonfinite(n_bad, name)
    return qw, error


def _quantize_gpu_bytes(w: torch.Tensor, blocksize: int, double_quant: bool, name: str) -> QuantizedWeight:
    """``target="cuda"`` on a CUDA tensor: bitsandbytes' CUDA arithmetic on the GPU (:mod:`qtool.nf4.gpu_bytes`)."""
    from qtool.nf4 import gpu_bytes

    th = torch.from_numpy(_THRESHOLDS).to(w.device)
    packed, absmax, n_bad = gpu_bytes.quantize_4bit(w, blocksize, th)
    _refuse_nonfinite(n_bad, name)
    if not double_quant:
        return QuantizedWeight(packed, absmax, None, None, tuple(w.shape), w.dtype, blocksize)
    codes, nested, offset = gpu_bytes.quantize_absmax(absmax, torch.from_numpy(_DYNAMIC).to(w.device),
                                                      NESTED_BLOCKSIZE)
    return QuantizedWeight(packed, codes, nested, offset, tuple(w.shape), w.dtype, blocksize)


def _refuse_nonfinite(n_bad: int, name: str) -> None:
    if n_bad:
        raise InputError(f"tensor {name!r} holds {n_bad} NaN/Inf values; NF4 cannot represent them",
                         hint="fix the source checkpoint (the weights are corrupt) and convert again")


def _with_constants(packed: torch.Tensor, absmax_f32: torch.Tensor, w: torch.Tensor, blocksize: int,
                    double_quant: bool, target: str) -> QuantizedWeight:
    """The QuantizedWeight of ``packed`` codes and fp32 block constants, double-quantising them if asked."""
    if not double_quant:
        return QuantizedWeight(packed, absmax_f32, None, None, tuple(w.shape), w.dtype, blocksize)
    codes, nested, offset = quantize_absmax(absmax_f32.cpu(), target)
    dev = packed.device
    return QuantizedWeight(packed, codes.to(dev), nested.to(dev), offset, tuple(w.shape), w.dtype, blocksize)


def _input_bits(w: torch.Tensor) -> tuple[np.ndarray, int]:
    """The raw bits of a CPU tensor, flattened row-major (uint16 for fp16/bf16, uint32 for fp32; no copy when it is
    contiguous), and the kernels' ``kind``."""
    flat = w.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    bits = flat.view(_BITS_VIEW[w.dtype]).numpy()
    return bits.view(np.uint16 if bits.itemsize == 2 else np.uint32), _KIND[w.dtype]


def _quantize_cpu(w: torch.Tensor, blocksize: int, double_quant: bool, target: str, measure: bool):
    """The C kernels' path, two passes over ``w``: (1) each block's exact absmax; then the last partial block (if any) and
    double quantisation here, which need all of them; (2) the 4-bit codes and, with ``measure``, the reconstruction
    error against the stored constants. Returns (QuantizedWeight or None, error dict or None, number of NaN/Inf);
    with NaN/Inf in ``w`` the work stops after pass 1 (None) when it would double-quantise NaN constants."""
    from qtool.nf4 import _cpu as k

    bits, kind = _input_bits(w)
    n = w.numel()
    n_full, n_blocks = n // blocksize, -(-n // blocksize)
    exact = np.empty(n_blocks, np.float32)
    n_bad = k.block_absmax(bits, kind, n, blocksize, exact)
    if n_bad:  # an error path: count the values, for the message
        n_bad = int((~torch.isfinite(w)).sum())
        if double_quant:
            return None, None, n_bad
    packed = np.empty((n + 1) // 2, np.uint8)
    absmax = exact
    if n % blocksize:
        codes, am = _tail_codes(w.detach().reshape(-1)[n_full * blocksize:].float().numpy(), target)
        packed[n_full * blocksize // 2:] = pack_nibbles(torch.from_numpy(codes)).numpy()
        absmax = exact.copy()  # ``exact`` stays max |x| for the measurement; the stored constant may be clamped
        absmax[-1] = am
    qw = _with_constants(torch.from_numpy(packed).view(-1, 1), torch.from_numpy(absmax), w, blocksize, double_quant,
                         target)
    zero_code = 7 if target == "cpu" else 0
    if not measure:
        k.quantize_blocks(bits, kind, n, blocksize, _THRESHOLDS, zero_code, exact, packed)
        return qw, None, n_bad
    stored, tol, sums, counts = _measure_inputs(qw)
    k.quantize_blocks(bits, kind, n, blocksize, _THRESHOLDS, zero_code, exact, packed, True, stored, _CODE, tol,
                      NESTED_BLOCKSIZE, sums, counts)
    return qw, _error_dict(*k.total_stats(sums, counts)), n_bad


def _quantize_4bit_cpu(w: torch.Tensor, blocksize: int, target: str):
    """(packed, fp32 absmax, number of NaN/Inf) from the C kernels' path: the counterpart of :func:`_quantize_4bit_torch`
    that the tests compare it with."""
    qw, _, n_bad = _quantize_cpu(w, blocksize, False, target, measure=False)
    return qw.packed, qw.absmax, n_bad


def _tail_codes(tail: np.ndarray, target: str) -> tuple[np.ndarray, np.float32]:
    """The last, partial block (``len(tail) < blocksize``), padded to an even count with the code of 0.0.

    bitsandbytes' CPU op divides here (``x / absmax``) and stores the clamped absmax; its CUDA kernel multiplies by
    the reciprocal like every other block and turns an all-zero block into code 0 (NaN)."""
    with np.errstate(all="ignore"):  # a NaN/Inf tail is counted by the caller, which refuses the tensor
        am = np.float32(np.abs(tail).max())
        th = nf4_thresholds()
        if target == "cpu":
            am = max(am, np.float32(1e-38))
            scaled = np.clip(tail / am, -1, 1).astype(np.float32)
            codes = (scaled[:, None] > th[None, :]).sum(1).astype(np.uint8)
            pad = 7
        elif am == 0:
            codes, pad = np.zeros(tail.size, np.uint8), 0
        else:
            scaled = (tail * (np.float32(1.0) / am)).astype(np.float32)
            codes = (scaled[:, None] > th[None, :]).sum(1).astype(np.uint8)
            pad = 7
    if codes.size % 2:
        codes = np.append(codes, np.uint8(pad))
    return codes, am


def _quantize_4bit_torch(w: torch.Tensor, blocksize: int, target: str, chunk_blocks: int = 1 << 18):
    """The same arithmetic in torch ops (used for CUDA tensors), chunked to bound temporaries."""
    n = w.numel()
    flat = w.detach().reshape(-1)
    n_full = n // blocksize
    th = torch.from_numpy(nf4_thresholds()).to(w.device)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=w.device)
    n_bad = torch.zeros((), dtype=torch.int64, device=w.device)
    for b0 in range(0, n_full, chunk_blocks):
        b1 = min(b0 + chunk_blocks, n_full)
        x = flat[b0 * blocksize:b1 * blocksize].float().view(-1, blocksize)
        n_bad += (~torch.isfinite(x)).sum()
        am = x.abs().amax(dim=1)
        absmax[b0:b1] = am
        scaled = x * (1.0 / am.clamp(min=1e-38)).unsqueeze(1)
        codes = torch.searchsorted(th, scaled.reshape(-1), right=False).to(torch.uint8).view(-1, blocksize)
        if target == "cuda":
            codes[am == 0] = 0
        packed[b0 * blocksize // 2:b1 * blocksize // 2] = pack_nibbles(codes)
    n_bad = int(n_bad)
    if n % blocksize:
        tail = flat[n_full * blocksize:].float().cpu().numpy()
        n_bad += int((~np.isfinite(tail)).sum())
        codes, am = _tail_codes(tail, target)
        absmax[-1] = float(am)  # a numpy scalar cannot be assigned to a torch tensor; fp32 -> float is exact
        packed[n_full * blocksize // 2:] = pack_nibbles(torch.from_numpy(codes)).to(w.device)
    return packed.view(-1, 1), absmax, n_bad


def quantize_absmax(absmax: torch.Tensor, target: str = "cuda") -> tuple[torch.Tensor, torch.Tensor, float]:
    """Double quantisation of a CPU fp32 absmax vector: returns (uint8 codes, fp32 nested absmax, offset)."""
    from qtool.nf4 import _cpu as k

    offset = absmax.mean()  # fp32 torch.mean, as bitsandbytes (its last bit follows torch's reduction order)
    y = absmax.numpy() - offset.numpy()  # fp32 - fp32: bitsandbytes' `absmax - offset`, without a torch operation
    codes = np.empty(y.size, np.uint8)
    nested = np.empty(-(-y.size // NESTED_BLOCKSIZE), np.float32)
    if target == "cpu":
        k.nested_codes_lut(y, NESTED_BLOCKSIZE, _LUT, codes, nested)
    else:
        k.nested_codes_search(y, NESTED_BLOCKSIZE, _DYNAMIC, _LUT, codes, nested)
    return torch.from_numpy(codes), torch.from_numpy(nested), float(offset.item())


def absmax_fp32(qw: QuantizedWeight) -> torch.Tensor:
    """The per-block fp32 absmax the loaders use: ``code8[q] * nested_absmax[i // 256] + offset`` (two fp32 ops)."""
    if not qw.double_quant:
        return qw.absmax
    if not qw.absmax.is_cuda:
        from qtool.nf4 import _cpu as k

        out = np.empty(qw.absmax.numel(), np.float32)
        k.absmax_fp32(_borrow(qw.absmax.reshape(-1).contiguous()), _borrow(qw.nested_absmax.contiguous()), _DYNAMIC,
                      qw.offset, NESTED_BLOCKSIZE, out)
        return torch.from_numpy(out)
    code = torch.from_numpy(_DYNAMIC).to(qw.absmax.device)
    scale = qw.nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[: qw.absmax.numel()]
    out = code[qw.absmax.long()] * scale
    return out + torch.tensor(qw.offset, dtype=torch.float32, device=out.device)


class _Borrowed:
    """Exposes a contiguous CPU tensor's memory to numpy (``__array_interface__``) and keeps the tensor alive as the
    array's ``base``."""

    _TYPESTR = {torch.uint8: "|u1", torch.float32: "<f4"}

    def __init__(self, t: torch.Tensor):
        assert t.is_contiguous() and t.device.type == "cpu" and t.dtype in self._TYPESTR, (t.dtype, t.device)
        self.tensor = t
        self.__array_interface__ = {"data": (t.data_ptr(), True), "shape": (t.numel(),),
                                    "typestr": self._TYPESTR[t.dtype], "version": 3}


def _borrow(t: torch.Tensor) -> np.ndarray:
    """A read-only flat numpy view of a contiguous CPU tensor, for a kernel's input. Not ``t.numpy()``: that marks the
    tensor's storage non-resizable for good (``t.untyped_storage().resizable()`` is False afterwards), and FSDP2 frees
    an all-gathered parameter by resizing its storage to 0 (torch/distributed/fsdp/_fully_shard/_fsdp_param.py,
    ``free_storage``): a sharded NF4 layer dequantised through ``.numpy()`` fails at the end of its first forward
    with "Trying to resize storage that is not resizable" (qtool.train.sharded)."""
    return np.asarray(_Borrowed(t))


def dequantize(qw: QuantizedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight as bitsandbytes ``dequantize_4bit`` returns it: fp32 ``NF4[q] * absmax`` rounded to ``dtype``
    (default: the dtype that was quantised), shaped like the original, on the device of ``qw``."""
    absmax = absmax_fp32(qw)
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=qw.packed.device)
    n = qw.numel
    if qw.packed.is_cuda:
        q = unpack_nibbles(qw.packed, n).long()
        blocks = torch.arange(n, device=q.device) // qw.blocksize
        out = code[q] * absmax[blocks]
    else:
        from qtool.nf4 import _cpu as k

        out_np = np.empty(n, np.float32)
        k.dequantize_blocks(_borrow(qw.packed.reshape(-1).contiguous()), _borrow(absmax.contiguous()), code.numpy(),
                            qw.blocksize, n, out_np)
        out = torch.from_numpy(out_np)
    return out.view(qw.shape).to(dtype or qw.dtype)


def reconstruction_error(w: torch.Tensor, qw: QuantizedWeight) -> dict:
    """How far ``dequantize(qw)`` is from ``w`` (fp32 products, as the loaders compute them before rounding to the
    model dtype): ``rel_error`` (relative Frobenius), ``max_abs_error``, ``snr_db``, ``nonfinite``,
    ``ideal_rel_error`` — the error of the same codes with each block's exact absmax, i.e. what NF4 itself costs on
    this tensor — and ``bad_constants``: the number of blocks whose stored constant is further from the block's exact
    absmax than double quantisation can move it (one gap of the 8-bit code; without double quantisation: any
    difference beyond the 1e-38 floor). Non-zero means the block constants are damaged.

    Reads ``qw`` as stored, independently of how it was made; :func:`quantize_with_error` gives the same numbers while
    quantising."""
    from qtool.nf4 import _cpu as k

    bits, kind = _input_bits(w.cpu())
    stored, tol, sums, counts = _measure_inputs(qw)
    k.reconstruction_stats(bits, kind, qw.packed.reshape(-1).cpu().numpy(), stored, _CODE, qw.blocksize,
                           qw.numel, tol, NESTED_BLOCKSIZE, sums, counts)
    return _error_dict(*k.total_stats(sums, counts))


def _measure_inputs(qw: QuantizedWeight):
    """The block constants as the loaders see them (fp32, per block), the tolerance of each group of 256 blocks for
    the damaged-constant test (fp64: one gap of the 8-bit code times the group's nested absmax; 0 without double
    quantisation), and the per-group result buffers of the measuring kernels."""
    from qtool.nf4 import _cpu as k

    stored = absmax_fp32(qw).cpu().contiguous().numpy()
    if qw.double_quant:
        tol = qw.nested_absmax.cpu().numpy().astype(np.float64) * _DYNAMIC_MAX_GAP
    else:
        tol = np.zeros(-(-stored.size // NESTED_BLOCKSIZE))
    n_groups = k.n_groups(qw.numel, qw.blocksize)
    return stored, tol, np.empty((n_groups, k.N_SUMS)), np.empty((n_groups, k.N_COUNTS), np.int64)


def _error_dict(sxx: float, see: float, sii: float, emax: float, n_nonfinite: int, n_off: int) -> dict:
    rel = lambda e: math.sqrt(e / sxx) if sxx > 0 else (0.0 if e == 0 else math.inf)  # noqa: E731
    snr = 10 * math.log10(sxx / see) if see > 0 and sxx > 0 else math.inf
    return {"rel_error": rel(see), "ideal_rel_error": rel(sii), "max_abs_error": float(emax), "snr_db": snr,
            "nonfinite": int(n_nonfinite), "bad_constants": int(n_off)}

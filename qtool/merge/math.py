"""The arithmetic of a LoRA merge, as pure functions of tensors: ``W' = W0 + s · B A``, its rounding to the output
dtype, and how much of the update ``dW = s · B A`` the stored weight still carries.

Definitions (used by the report, ``qtool merge``'s table and its warning):

* ``e = W'_stored - W0_stored``: the change the stored model sees (both read back in fp32; ``W0_stored`` is what the
  same output would hold without the adapter, e.g. ``W0`` rounded to bf16);
* ``kept = <e, dW> / |dW|²``: the share of ``dW`` along its own direction (1: all of it, 0: none);
* ``rel_error = |e - dW| / |dW|``: how far the stored change is from ``dW``, relative to ``dW`` (0: exact; 1: as far as
  dropping the update altogether). Rounding ``W0 + dW`` to bf16 moves each element by up to half a unit in the last
  place of ``|W0|`` (2⁻⁹ ≈ 2e-3 relative), so an update with ``|dW| / |W0|`` near 1e-3 has ``rel_error`` near 1 while
  ``kept`` stays near 1: it survives on average, not element by element.
"""
from __future__ import annotations

import math

import torch

from qtool.errors import InputError
from qtool.nf4 import codec as nf4


def delta_weight(a: torch.Tensor, b: torch.Tensor, scale: float, fan_in_fan_out: bool = False) -> torch.Tensor:
    """``dW = s · B A`` in fp32, shaped like the stored weight: ``(out, in)``, or ``(in, out)`` with
    ``fan_in_fan_out`` (GPT-2 ``Conv1D``). Same operation order as peft 0.21.2 ``Linear.get_delta_weight``."""
    dw = (b.float() @ a.float()).mul_(scale)  # in place on the fresh product: one pass less, the same values
    return dw.t() if fan_in_fan_out else dw


def merged_weight(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, fan_in_fan_out: bool = False,
                  *, name: str = "weight") -> torch.Tensor:
    """``W' = W0 + s · B A`` as a new fp32 tensor (``w0`` is not modified). Raises InputError naming ``name`` when
    the update or the result holds NaN/Inf, so that no non-finite weight is ever written."""
    return add_update(w0, delta_weight(a, b, scale, fan_in_fan_out), name)


def add_update(w0: torch.Tensor, dw: torch.Tensor, name: str) -> torch.Tensor:
    """``w0 + dw`` in fp32 as a new tensor, after checking shapes; raises InputError naming module ``name`` if the
    result holds NaN/Inf (and says whether the update itself does)."""
    if tuple(dw.shape) != tuple(w0.shape):
        raise InputError(f"module {name!r}: the adapter's update is {tuple(dw.shape)} but the weight is "
                         f"{tuple(w0.shape)}", hint="the adapter was trained on a different model")
    w = w0.float() + dw
    # One reduction instead of isfinite + all: a sum is finite only if every term is (inf + finite = inf,
    # inf - inf = nan, nan + x = nan). Finite terms can still overflow fp32's sum; the exact test below then decides.
    if not math.isfinite(float(w.sum())) and not torch.isfinite(w).all():
        culprit = "the adapter's update s·B·A" if not torch.isfinite(dw).all() else "W0 + s·B·A"
        raise InputError(f"module {name!r}: {culprit} holds {int((~torch.isfinite(w)).sum())} NaN/Inf values",
                         hint="the adapter is broken (diverged training?) or its scale overflows fp32")
    return w


def update_kept(w_out: torch.Tensor, w_none: torch.Tensor, dw: torch.Tensor) -> dict:
    """How much of an update ``dw`` a stored weight still carries (module docstring): ``w_out`` is the written
    weight as a loader reads it, ``w_none`` what would be there without the adapter. Returns ``kept`` and
    ``rel_error`` (None for a zero update)."""
    e = w_out.float() - w_none.float()
    dw = dw.float()
    d2 = float((dw * dw).sum())
    if d2 == 0:
        return {"kept": None, "rel_error": None}
    return {"kept": float((e * dw).sum()) / d2, "rel_error": math.sqrt(float(((e - dw) ** 2).sum()) / d2)}


def merge_rounded(w0: torch.Tensor, dw: torch.Tensor, out_dtype: torch.dtype, name: str
                  ) -> tuple[torch.Tensor, dict]:
    """``W' = W0 + dW`` in fp32, rounded once to ``out_dtype``, and the report's numbers for it: ``w0_norm``,
    ``dw_norm``, ``dw_max_abs``, ``dw_rel`` (|dW|/|W0|), ``dw_kept`` and ``dw_rel_error`` (:func:`update_kept` with
    ``w_none = W0`` rounded to ``out_dtype``). The same numbers as those functions, in about half the passes over
    the weight (this runs once per adapted module of the model). ``w0`` (fp32) and ``dw`` are not modified."""
    w = add_update(w0, dw, name)
    out = w.to(out_dtype)
    del w
    # Sums of products by BLAS dot (one pass each, blocked accumulation: ~1e-7 relative on 28M elements, where
    # torch.linalg.vector_norm in fp32 is off by ~1e-3).
    flat0, flat_dw = w0.reshape(-1), dw.reshape(-1)
    w0_norm = math.sqrt(float(torch.dot(flat0, flat0)))
    d2 = float(torch.dot(flat_dw, flat_dw))
    row = {"w0_norm": w0_norm, "dw_norm": math.sqrt(d2), "dw_max_abs": float(torch.linalg.vector_norm(dw, math.inf)),
           "dw_rel": math.sqrt(d2) / w0_norm if w0_norm else None, "dw_kept": None, "dw_rel_error": None}
    if d2 > 0:
        e = out.to(torch.float32, copy=True).reshape(-1)  # a new tensor even for fp32 output: changed below
        e.sub_(flat0 if out_dtype == torch.float32 else flat0.to(out_dtype))  # e = stored W' - stored W0
        row["dw_kept"] = float(torch.dot(e, flat_dw)) / d2
        e.sub_(flat_dw)
        row["dw_rel_error"] = math.sqrt(float(torch.dot(e, e)) / d2)
    return out, row


def requantize(w: torch.Tensor, *, blocksize: int = 64, double_quant: bool = True, target: str = "cuda",
               name: str = "weight") -> nf4.QuantizedWeight:
    """Quantise a merged weight to NF4 again: lossy by design (an update much smaller than a block's absmax mostly
    rounds away). ``w`` is quantised in its dtype, as ``qtool convert`` of the merged 16-bit model would."""
    return nf4.quantize(w, blocksize, double_quant, target, name=name)

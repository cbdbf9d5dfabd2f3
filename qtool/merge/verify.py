"""The built-in check of ``qtool merge``: logits of the merged model against base + adapter bypass.

The reference runs in fp32: the base (NF4 dequantised, or the 16-bit original) with ``s·x·Aᵀ·Bᵀ`` added beside
each adapted layer by forward hooks, as PEFT's unmerged forward computes it. The merged model is loaded the way
users load it (plain transformers), in fp32 as well. The accepted difference is what rounding to the output dtype
explains.

Why fp32 on both sides, whatever the output dtype: the reference must be the trained model without any rounding,
and the merged weights read back exactly (bf16 and fp16 widen to fp32 without loss), so the only difference left
is the rounding of ``W0 + dW`` that the merge did. Running the merged model in its own dtype would add the rounding
of every activation (not something the merge controls), and on CPUs without bf16 instructions a bf16 matmul is
many times slower than fp32.
"""
from __future__ import annotations

from pathlib import Path

import torch

from qtool.errors import VerificationError
from qtool.merge.base import open_base
from qtool.nf4 import codec as nf4

# Largest relative logits difference (Frobenius, merged vs base + bypass) accepted per output dtype. Measured on
# SmolLM2-135M (30 layers; a peft-trained adapter on all 7 Linear kinds, adapter effect 0.35): bf16 7.7e-3,
# fp16 1.3e-3, fp32 1.7e-6, i.e. 2.6x, 4x and 6x headroom.
VERIFY_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-5}
# Deeper models accumulate more rounding: the limit grows to this many times the measured rounding floor (the same
# comparison with only the base weights rounded; SmolLM2 NF4 base: merged/floor = 1.2 in bf16, 0.9 in fp16).
ROUNDING_SLACK = 3.0


def _fp32_model(folder: Path, tensors: dict[str, torch.Tensor]):
    """The architecture of ``folder`` in fp32 holding ``tensors`` (checkpoint layout, fp32, writable: the model takes
    them as its parameters, without a copy); tied weights stay tied."""
    import contextlib

    import transformers

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - transformers 4.x
        no_init_weights = contextlib.nullcontext
    cfg = transformers.AutoConfig.from_pretrained(folder)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    arch = (getattr(cfg, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with no_init_weights():  # every tensor is loaded below; random init would only cost time
        model = (cls._from_config(cfg, dtype=torch.float32) if cls is not None
                 else transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32))
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()  # after assign: the tied parameters are the assigned tensors again
    state = model.state_dict()
    loaded = {t.data_ptr() for k, t in state.items() if k not in missing}
    missing = [k for k in missing if state[k].data_ptr() not in loaded]  # tied copies are fine
    if missing or unexpected:
        raise VerificationError(f"{folder}: cannot rebuild {type(model).__name__} for the logits check "
                                f"(missing {missing[:3]}, unexpected {unexpected[:3]})",
                                hint="merge with --no-verify, then check the output with your own evaluation")
    return model.eval()


def _own(b, key: str) -> torch.Tensor:
    """Base tensor ``key`` as a tensor of its own (no view of the file), fp32 if it is a float tensor."""
    return b.fp32(key, writable=True) if b.dtype(key).is_floating_point else b.raw(key).clone()


def _bypass(model, targets) -> list:
    """Forward hooks that add ``s · (x Aᵀ Bᵀ + bias)`` to each adapted layer's output (an embedding's: ``s ·
    Aᵀ[ids] Bᵀ``), peft's unmerged forward; ``targets``: :class:`qtool.merge.base.Target` s."""
    import torch.nn.functional as F

    handles = []
    for t in targets:
        f = t.factors
        a, b = f.a.float(), f.b.float()
        bias = None if f.bias is None else f.bias.float()

        def hook(module, args, out, a=a, b=b, bias=bias, s=f.scale, embedding=f.embedding):
            y = (F.embedding(args[0], a.t()) if embedding else args[0].float() @ a.t()) @ b.t()
            return out + (y if bias is None else y + bias) * s

        handles.append(model.get_submodule(t.module).register_forward_hook(hook))
    return handles


def _diff(x: torch.Tensor, ref: torch.Tensor) -> dict:
    return {"max_abs": float((x - ref).abs().max()), "rel": float((x - ref).norm() / ref.norm())}


def verify_merged(stage: Path, b, base_fp32: dict[str, torch.Tensor], targets: list, out_dtype, requantized: bool,
                  kept_nf4: dict, nf4_keys: dict, n_seq: int = 2, seq_len: int = 32, seed: int = 0) -> dict:
    """Logits of the merged model vs base + bypass on ``n_seq x seq_len`` random token ids (fixed seed). Raises
    VerificationError when the relative difference passes VERIFY_TOLERANCE (not for --requantize: lossy by design).
    ``base_fp32``: fp32 base tensors already at hand (the merge pass's W0); it is emptied, its tensors become the
    reference model's parameters and are changed in place. ``b`` supplies the others."""
    import transformers

    vocab = b.ck.config.get("vocab_size") or (b.ck.config.get("text_config") or {}).get("vocab_size")
    tokens = torch.randint(0, int(vocab), (n_seq, seq_len), generator=torch.Generator().manual_seed(seed))
    tensors = {k: base_fp32.pop(k) if k in base_fp32 else _own(b, k) for k in b.keys}
    base_fp32.clear()
    ref = _fp32_model(b.ck.folder, tensors)
    del tensors  # the model holds them now
    with torch.no_grad():
        base_logits = ref(tokens).logits
        handles = _bypass(ref, targets)
        bypass_logits = ref(tokens).logits
        trained_logits = None
        if not b.is_nf4:  # the model the adapter was trained on: NF4(W) dequantised, plus the bypass
            state = ref.state_dict()
            for key, qw in kept_nf4.items():
                w = nf4.dequantize(qw, torch.float32)
                state[key].copy_(w.t() if nf4_keys.get(key) else w)
            del state  # references to the parameters: `del ref` below must free them
            trained_logits = ref(tokens).logits
        floor_logits = None
        if not requantized:  # what rounding alone costs: base weights rounded to the output dtype, bypass in fp32
            if out_dtype == torch.float32:
                floor_logits = bypass_logits  # nothing to round: the same forward would give the same logits
            else:
                if not b.is_nf4:
                    ref.load_state_dict({k: b.fp32(k) for k in b.keys}, strict=False)
                for p in ref.parameters():
                    p.copy_(p.to(out_dtype).float())
                del p
                floor_logits = ref(tokens).logits
        for h in handles:
            h.remove()
    del ref
    transformers.utils.logging.disable_progress_bar()
    try:
        if requantized:  # what the NF4 output holds, dequantised in fp32 (no bitsandbytes kernels involved)
            out = open_base(stage)
            try:
                merged = _fp32_model(stage, {k: _own(out, k) for k in out.keys})
            finally:
                out.ck.close()
            loaded_by = "qtool dequantize of the NF4 output, fp32"
        else:
            arch = (b.ck.config.get("architectures") or [None])[0]
            cls = getattr(transformers, arch, None) or transformers.AutoModelForCausalLM
            merged, info = cls.from_pretrained(stage, dtype=torch.float32, output_loading_info=True)
            bad = {k: v for k, v in info.items() if v}
            if bad:
                raise VerificationError(f"transformers loads the merged model with problems: {bad}")
            loaded_by = f"transformers {cls.__name__}.from_pretrained, fp32"
    finally:
        transformers.utils.logging.enable_progress_bar()
    with torch.no_grad():
        merged_logits = merged.eval()(tokens).logits
    del merged
    floor = None if floor_logits is None else _diff(floor_logits, bypass_logits)
    tol = None if requantized else max(VERIFY_TOLERANCE[out_dtype], ROUNDING_SLACK * floor["rel"])
    report = {"tokens": [n_seq, seq_len], "seed": seed, "merged_loaded_by": loaded_by,
              "merged_vs_bypass": _diff(merged_logits, bypass_logits), "rounding_floor": floor,
              "adapter_effect": _diff(bypass_logits, base_logits), "merged_vs_base": _diff(merged_logits, base_logits),
              "tolerance_rel": tol,
              "meaning": "rel = |logits - reference| / |reference| (Frobenius over all positions and the vocabulary); "
                         "bypass = the base in fp32 (NF4 dequantised) with s·x·Aᵀ·Bᵀ added beside each adapted "
                         "layer, i.e. the trained model; adapter_effect = bypass vs the base alone (the size of what "
                         "the merge must preserve); rounding_floor = bypass with the base weights rounded to the output "
                         "dtype vs bypass (what that rounding alone costs); tolerance_rel = max(the dtype's limit, "
                         f"{ROUNDING_SLACK} x rounding_floor)"}
    if trained_logits is not None:
        report["merged_vs_trained_nf4"] = _diff(merged_logits, trained_logits)
    report["passed"] = tol is None or report["merged_vs_bypass"]["rel"] <= tol
    if not report["passed"]:
        d = report["merged_vs_bypass"]
        raise VerificationError(f"merged logits differ from base + adapter by {d['rel']:.3g} (relative; max "
                                f"{d['max_abs']:.3g}), more than the {tol:g} that {out_dtype} rounding explains "
                                f"(the adapter itself moves them by {report['adapter_effect']['rel']:.3g})",
                                hint="nothing was written; please report this with the adapter's config")
    return report

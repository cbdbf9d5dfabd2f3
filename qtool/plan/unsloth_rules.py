"""What ``--profile unsloth`` refuses (:mod:`qtool.plan.unsloth` plans the rest). Apart from the step model so that
:mod:`qtool.plan.settings` can check it without importing the planner's byte counts (which import the settings)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qtool.arch import Shape

VERSION = "2026.10.9"
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


def problems(shape: Shape, st) -> list[str]:
    """What --profile unsloth cannot plan: settings the records did not run and the model does not cover. ``st``: a
    :class:`qtool.plan.settings.Settings` (not imported: settings imports this module)."""
    out = []
    if shape.model_type != "llama":
        out.append(f"--profile unsloth is modelled on Llama decoders (FastLlamaModel); {shape.name} is "
                   f"{shape.model_type}")
    if st.method != "lora":
        out.append(f"--profile unsloth plans LoRA (FastLanguageModel.get_peft_model); --method {st.method} is not "
                   "modelled")
    elif set(st.module_ranks(shape)) != set(QKVO) or st.spec.vocab_ranks(shape):
        out.append("--profile unsloth plans LoRA on q, k, v, o (--targets qkvo: Unsloth's fused LoRA_QKV and LoRA_W "
                   "kernels); an adapted MLP runs its LoRA_MLP kernel, which is not modelled")
    if st.gpus > 1:
        out.append(f"--gpus {st.gpus} with --profile unsloth: its multi-GPU paths are not modelled; plan --gpus 1")
    if st.device != "cuda":
        out.append("--profile unsloth runs on CUDA GPUs only (Triton kernels); --device cpu is not planned")
    if not st.grad_checkpointing:
        out.append("--profile unsloth plans use_gradient_checkpointing=\"unsloth\"; --no-grad-checkpointing is not "
                   "modelled")
    if st.grad_accum > 1:
        out.append("--grad-accum > 1 with --profile unsloth is not modelled (the records run one micro-batch a step)")
    for flag, value, want in (("--compute-dtype", st.compute_dtype, "bfloat16"),
                              ("--adapter-dtype", st.adapter_dtype, "float32"), ("--attention", st.attention, "sdpa"),
                              ("--init", st.init, "zero")):
        if value != want:
            out.append(f"{flag} {value} with --profile unsloth: only {want} is modelled (what Unsloth ran on the "
                       "H200 records: bf16 compute, fp32 LoRA factors, SDPA without flash-attn, PEFT's init)")
    if st.loss not in (None, "chunked"):
        out.append("--loss full: Unsloth always takes its fused, chunked cross-entropy; drop --loss")
    return out

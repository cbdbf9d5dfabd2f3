"""The notes under a plan: what the profile runs, which limit a setting reaches, which kernel runs and what it keeps.
Pure Python, like the rest of the planner."""
from __future__ import annotations

from typing import TYPE_CHECKING

from qtool.plan import offload
from qtool.plan import resident as items
from qtool.plan import transient as acts
from qtool.plan.settings import RECIPES

if TYPE_CHECKING:
    from qtool.arch import Shape
    from qtool.plan.settings import Settings


def plan_notes(shape: Shape, st: Settings) -> list[str]:
    """The notes a plan prints under its table: what the profile runs, limits the settings touch, kernels chosen."""
    notes = [shape.note] if shape.note else []
    if st.profile == "unsloth":
        notes.append(f"profile unsloth: {RECIPES['unsloth']}; each decoder layer also runs torch.compile'd, whose "
                     "partitioner may save less than the eager tensors planned")
    if st.is_hf:
        notes.append(f"profile {st.profile}: {RECIPES[st.profile]}"
                     + ("; without checkpointing (gradient_checkpointing_disable()) it is the hf step"
                        if st.profile != "hf" and not st.grad_checkpointing else ""))
    if st.seq_len > shape.max_positions:
        notes.append(f"--seq-len {st.seq_len} exceeds {shape.name}'s max_position_embeddings ({shape.max_positions})")
    if st.method == "prefix" and st.prefix_len + st.seq_len >= shape.max_positions:
        notes.append(f"--prefix-len {st.prefix_len} + --seq-len {st.seq_len} leave no position of {shape.name}'s "
                     f"{shape.max_positions} (max_position_embeddings) to generate into: the prefix takes positions "
                     "before the sequence, and qtool train refuses this")
    from qtool.train.settings import SUPPORTED  # torch-free: the model types qtool train builds

    if st.profile == "qtool" and shape.model_type not in SUPPORTED:
        notes.append(f"the qtool trainer builds {', '.join(SUPPORTED)} decoders; {shape.model_type} is planned with "
                     "the Llama activation formulas (use --profile hf for transformers)")
    if st.profile == "qtool" and shape.model_type in acts.GEMMA_TYPES and shape.attn_logit_softcapping:
        notes.append(f"{shape.name} soft-caps its attention scores, which SDPA cannot: qtool runs an explicit "
                     "attention that keeps the (batch, heads, seq, seq) scores three times per layer (tanh output "
                     "and probabilities in the compute dtype, probabilities in fp32)")
    elif st.profile == "qtool" and acts.gemma_mask_bytes(shape, st):
        notes.append(f"at --seq-len >= {shape.local_window} (the sliding window) {shape.name}'s sliding layers pass "
                     "SDPA a (seq, seq) mask, which each keeps converted to the compute dtype, and k, v repeated")
    if st.profile == "qtool" and st.loss == "full":
        notes.append("qtool train always uses its chunked loss; --loss full plans a full fp32-logits loss instead")
    if acts.attention_kernel(shape, st) in ("math", "eager") and not (st.profile == "qtool"
                                                                     and shape.attn_logit_softcapping):
        notes.append(f"attention runs the {acts.attention_kernel(shape, st)} kernel: its probabilities "
                     "(4 bytes x heads x seq^2 per layer) dominate at long sequences")
    if acts.sdpa_mask_bytes(shape, st):
        notes.append(f"at --seq-len >= {shape.sliding_window} (the sliding window) transformers builds a mask, "
                     "repeats k and v, and SDPA runs its memory-efficient kernel: no seq^2 probabilities, unlike "
                     "shorter GQA runs")
    if acts.window_mask_bytes(shape, st):
        notes.append(f"{shape.name} attends within a {shape.sliding_window}-token window: beyond it the qtool trainer "
                     "builds one (seq x seq) boolean mask, repeats k and v to the query heads and runs SDPA's "
                     "memory-efficient kernel, which keeps a 16-bit copy of the mask per layer")
    if st.method == "adalora":
        notes.append(f"AdaLoRA is planned at --init-rank {st.rank}, its peak: pruning masks singular values in place "
                     "and frees nothing" + ("; the importance update and masking run between the CUDA-graph "
                                            "replays of forward+backward, which stay on" if items.graphed(st) else ""))
    if st.offload_activations:
        notes.append("--offload-activations: each step copies every layer's input to the host and back "
                     f"(2 x {shape.n_layers} x {offload.layer_input_bytes(shape, st) / 2**20:,.1f} MiB over PCIe or "
                     "NVLink-C2C), overlapped with the layers' compute")
    if st.optimizer.startswith("paged_"):
        notes.append("paged optimizer buffers (>= 1e5 elements) live in CUDA managed memory: NVML sees them, "
                     "torch.cuda.max_memory_allocated does not")
    return notes

"""``--profile unsloth``: one training step of Unsloth 2026.10.9 (unsloth_zoo 2026.10.9) as bench/gpu_worker.py
runs it: ``FastLanguageModel.from_pretrained(load_in_4bit=True)`` on a pre-quantised NF4 folder, ``get_peft_model``
with LoRA on q, k, v, o and ``use_gradient_checkpointing="unsloth"``, bitsandbytes' PagedAdamW32bit and a plain loop
(``loss = model(input_ids=ids, labels=ids).loss``, backward, step, ``zero_grad``). Pure Python.

What the step is made of, read from the wheels' code (torch 2.11, bitsandbytes 0.50.2, H200, no flash-attn, no
xformers):

* Checkpointing (unsloth_zoo/gradient_checkpointing.py ``UnslothCheckpointFunction``): reentrant; each layer's input
  (bf16, ``2h`` per token) is copied to a pinned host slot when it is over 2 MiB, except the last layer's from the
  second step on (``LAST_GC_INDEX``), which is saved on the GPU. Two device staging buffers (A and B: double
  buffering switches on when more than 512 MiB are free) are grown to one layer input each and kept; the backward
  copies each input back into one and reruns the layer from there, output included.
* The layer (unsloth/models/llama.py ``LlamaDecoderLayer_fast_forward``; kernels/fast_lora.py, rms_layernorm.py,
  rope_embedding.py; utils/attention_dispatch.py): the Triton RMSNorm keeps its bf16 input and an fp32 rstd per
  token; ``LoRA_QKV`` keeps the normed input (the ``x A^T`` products are not saved); RoPE rotates in place and
  keeps nothing; SDPA (flash) keeps q, k, v, out and the fp32 logsumexp, ``out`` doubling as ``LoRA_W``'s (o_proj)
  input; the MLP (no LoRA on it) is transformers' ``down(act(gate(x)) * up(x))`` on NF4 Linear4bit, keeping gate,
  ``act(gate)`` and up. Its backward dequantises each NF4 weight again into a fresh bf16 tensor; the forward's
  LoRA products dequantise into one scratch buffer (kernels/utils.py ``_scratch``) kept for the process.
* The loss (unsloth_zoo/fused_losses/fused_linear.py ``_ce_impl``): the gradient is taken in the forward, chunk by
  chunk, into one fp32 logits buffer of ``R x V`` (``fused_linear_rows``: a power of two rows, at least 512 for
  these vocabularies, at most 4096 and 2 GiB, at most the labelled positions), beside the bf16 gradient of the hidden
  states (kept for backward) and per chunk its rows' copy, their fp32 gradient and its bf16 cast.
* LoRA factors stay fp32 (the record's parameter dtype); each is under 1e5 elements, so bitsandbytes keeps their
  Adam state as ordinary device tensors, not paged.

The planned peak is the largest of the loss, the backward of the last layer (its input on the GPU) and of the first
(every other layer's LoRA gradients alive). Unsloth also compiles each decoder layer with torch.compile
(unsloth/models/_block_compile.py, torch >= 2.11); the saved tensors planned are those of the eager code, which
Inductor's partitioner may trim: not modelled.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from qtool.plan import resident as items
from qtool.plan.rows import Row
from qtool.plan.settings import layer_linears
from qtool.units import MiB

if TYPE_CHECKING:
    from qtool.arch import Shape
    from qtool.plan.settings import Settings

from qtool.plan.unsloth_rules import QKVO, VERSION, problems  # noqa: F401 (the refusals live apart: settings uses them)
# unsloth_zoo/gradient_checkpointing.py: inputs of at most 2 MiB are not offloaded; 200 pinned host slots of
# 128 Ki bf16 elements are made up front, and a slot grows to the input it holds.
GC_MIN_OFFLOAD_BYTES = 2 * MiB
GC_HOST_SLOTS, GC_HOST_SLOT_BYTES = 200, 128 * 1024 * 2
# unsloth_zoo/fused_losses/fused_linear.py: fused_linear_rows' bounds and its 2 GiB budget (_CHUNK_GB).
CE_MIN_LOGITS, CE_MAX_ROWS, CE_BUDGET_BYTES = 512 * 151936, 4096, 2 * 2**30
# Fitted on unsloth-llama-2-7b-s2048 (the other two check it: planned 50 vs 52, 111 vs 136 MiB): the caching
# allocator's cached segments beyond the live tensors at the peak, as a fraction of the peak phase's transient bytes
# (kept and working: 101.5 of 448.3 MiB there; 52.4 of 223.1 and 136.3 of 490.7 MiB in the other two).
# No allocator replay of this stack (Inductor's and Unsloth's buffers are not traced): an estimate.
RESERVED_SLACK_FRACTION = 0.226


def _tokens(st: Settings) -> int:
    return st.batch_size * st.seq_len


def layer_input_bytes(shape: Shape, st: Settings) -> int:
    """One layer's checkpointed input: bf16 hidden states."""
    return items.alloc(2 * shape.hidden * _tokens(st))


def offloaded(shape: Shape, st: Settings) -> bool:
    """Unsloth offloads a layer input only above 2 MiB; smaller ones all stay on the GPU (plain checkpointing)."""
    return 2 * shape.hidden * _tokens(st) > GC_MIN_OFFLOAD_BYTES


def gc_device_bytes(shape: Shape, st: Settings) -> int:
    """The two staging buffers (GPU_BUFFERS, GPU_BUFFERS_B), each grown to one layer input."""
    return 2 * layer_input_bytes(shape, st) if offloaded(shape, st) else 0


def gc_host_bytes(shape: Shape, st: Settings) -> int:
    """Pinned host slots: 200 of 256 KiB, one per offloaded input grown to it (the first step offloads every layer,
    the last too, so all of them grow)."""
    if not offloaded(shape, st):
        return 0
    grown = shape.n_layers * max(2 * shape.hidden * _tokens(st), GC_HOST_SLOT_BYTES)
    return grown + (GC_HOST_SLOTS - shape.n_layers) * GC_HOST_SLOT_BYTES


def scratch_bytes(shape: Shape, st: Settings) -> int:
    """The dequantisation scratch of the forward's LoRA products: the largest adapted weight in bf16."""
    ranks = st.module_ranks(shape)
    return max((items.alloc(2 * lin.n_in * lin.n_out) for lin in layer_linears(shape) if lin.name in ranks),
               default=0)


def ce_rows(shape: Shape, st: Settings) -> int:
    """Rows of the fused cross-entropy's logits buffer (fused_linear_rows with fp32 logits)."""
    n = st.batch_size * (st.seq_len - 1)  # the last position of each sequence has no label
    h, v = shape.hidden, shape.vocab
    rows = 1 << max(math.ceil(math.log2(max(n * h / v, 1))), 0)
    rows = rows // 2 if rows > n * h / v else rows
    least = 1 << max(math.ceil(math.log2(max(CE_MIN_LOGITS / v, 1))), 0)
    least = least // 2 if least > CE_MIN_LOGITS / v else least
    rows = min(max(rows, min(max(least, 512), CE_MAX_ROWS)), CE_MAX_ROWS, max(CE_BUDGET_BYTES // (4 * v), 2))
    return max(min(rows, n), 1)


def loss_rows(shape: Shape, st: Settings) -> list[Row]:
    """The fused cross-entropy at its chunk: fp32 logits (vocabulary padded to 8), the chunk's rows, their fp32
    gradient and its bf16 cast; the whole bf16 gradient of the hidden states; the final norm's output."""
    r, h, v = ce_rows(shape, st), shape.hidden, shape.vocab
    hidden = items.alloc(2 * h * _tokens(st))
    return [Row("final norm output (the loss's input)", hidden),
            Row("bf16 gradient of the hidden states (taken in the forward, kept for backward)", hidden),
            Row(f"fp32 logits of one chunk ({r:,} rows x {v:,})", items.alloc(4 * r * -(-v // 8) * 8)),
            Row("the chunk's rows, their fp32 gradient and its bf16 cast", items.alloc(2 * r * h)
                + items.alloc(4 * r * h) + items.alloc(2 * r * h))]


def saved_bytes(shape: Shape, st: Settings) -> int:
    """What the recomputed layer keeps for its backward, its input aside: both norms' fp32 rstd, the normed input
    (LoRA_QKV), SDPA's q, k, v, out and logsumexp, the residual sum (the second norm's input), gate, act(gate), up."""
    h, f, q, kv, nh = shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim, shape.n_heads
    return _tokens(st) * (2 * 4 + 2 * h + 2 * (2 * q + 2 * kv) + 4 * nh + 2 * h + 3 * 2 * f)


def mlp_backward_bytes(shape: Shape, st: Settings) -> int:
    """The MLP's largest backward moment: down_proj's dequantised bf16 weight and the gradient of its input, or
    SwiGLU's three gradients, whichever is larger."""
    down = next(lin for lin in layer_linears(shape) if lin.name == "down_proj")
    f, T = shape.intermediate, _tokens(st)
    return max(items.alloc(2 * down.n_in * down.n_out) + items.alloc(2 * f * T), 3 * items.alloc(2 * f * T))


def phases(shape: Shape, st: Settings, numels: list[int]) -> dict[str, tuple[list[Row], list[Row]]]:
    """(kept, working) rows of each candidate moment; the grads of one layer are its share of ``numels``."""
    x = layer_input_bytes(shape, st)
    n = shape.n_layers
    grads = items.tensors_alloc(numels, items.DTYPE_BYTES[st.adapter_dtype])
    layer = [Row("recomputed layer's saved tensors", saved_bytes(shape, st)),
             Row("recomputed layer's output (reentrant checkpointing)", x)]
    work = [Row("gradient of the layer output", x), Row("MLP backward (dequantised down_proj, its input gradient)",
                                                        mlp_backward_bytes(shape, st))]
    inputs = (Row("last layer's input, saved on the GPU (not offloaded)", x) if offloaded(shape, st)
              else Row(f"checkpointed inputs of {n} layers (under 2 MiB: not offloaded)", n * x))
    return {
        "fused cross-entropy (gradient in the forward)":
            ([inputs, Row("final norm's saved input (the last layer's output)", x)], loss_rows(shape, st)),
        "backward of the last decoder layer": ([inputs, *layer], work + [Row("its LoRA gradients", grads // n)]),
        "backward of the first decoder layer":
            ([*layer] + ([] if offloaded(shape, st) else [Row("its checkpointed input", x)]),
             work + [Row(f"LoRA gradients of the other {n - 1} layers", grads - grads // n)]),
        "optimizer step": ([], [Row("LoRA gradients", grads)]),
    }


def persistent_rows(shape: Shape, st: Settings, numels: list[int]) -> list[Row]:
    """Everything the step keeps between steps, loaded model included."""
    _, _, quant = items.quantised_weights(shape, st)
    emb, head = items.embedding_bytes(shape, st)
    lora = items.tensors_alloc(numels, items.DTYPE_BYTES[st.adapter_dtype])
    opt_device, opt_paged = items.optimizer_state_bytes(numels, st.optimizer)
    rows = [Row("NF4 weights and quantisation constants (bitsandbytes QuantState)", quant),
            Row("embeddings (bf16)", emb), *([Row("lm_head (bf16)", head)] if head else []),
            Row("norms (bf16)", items.norm_and_bias_bytes(shape, st)),
            Row(f"LoRA adapters ({sum(numels):,} params, fp32)", lora),
            Row(f"optimizer state ({st.optimizer}) on device", opt_device),
            *([Row("optimizer state, paged (managed memory)", opt_paged, "paged", "nvml")] if opt_paged else []),
            Row("Unsloth checkpoint staging buffers (A and B, one layer input each)", gc_device_bytes(shape, st)),
            Row("Unsloth checkpoint: pinned host slots", gc_host_bytes(shape, st), "host", "none"),
            Row("Unsloth dequantisation scratch (largest adapted weight, bf16)", scratch_bytes(shape, st)),
            # After-load is 32 MiB above the loaded tensors in every record: planned as the forward thread's cuBLAS
            # workspace, made by a matmul while loading (inferred, not traced); autograd's thread makes the second.
            Row(f"cuBLAS workspaces (2 x {items.CUBLAS_WORKSPACE_BYTES // MiB} MiB: forward and autograd threads)",
                2 * items.CUBLAS_WORKSPACE_BYTES)]
    return [row for row in rows if row.bytes]


def after_load_bytes(rows: list[Row]) -> int:
    """Allocated after loading: the model, the adapters and one cuBLAS workspace."""
    keep = ("NF4", "embeddings", "lm_head", "norms", "LoRA adapters")
    return sum(r.bytes for r in rows if r.name.startswith(keep)) + items.CUBLAS_WORKSPACE_BYTES


def overhead_rows(transient: int) -> list[Row]:
    """Reserved beyond allocated (a fitted fraction of the peak's ``transient`` bytes) and the CUDA context."""
    return [Row("allocator: cached segments beyond the live tensors (fitted fraction of the peak phase)",
                round(RESERVED_SLACK_FRACTION * transient), counter="reserved"),
            Row("CUDA context, kernels and driver reservation (Unsloth: Triton and Inductor kernels)",
                items.CUDA_CONTEXT_BYTES["unsloth"], counter="nvml")]

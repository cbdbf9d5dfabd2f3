"""The resident line items of a QLoRA training step — weights, adapters, optimizer state, cuBLAS workspaces, the
caching allocator's rounding — one small function each, and every measured constant of the planner. Pure Python.

Symbols used in the formulas: ``T = batch * seq`` tokens, ``s`` sequence length, ``h`` hidden, ``f`` intermediate,
``q``/``kv`` the query/key-value widths (heads * head_dim), ``nh`` query heads, ``V`` vocabulary, ``r`` LoRA rank.
Dtype widths: ``rb`` the hidden states between layers, ``cb`` the compute dtype of the base matmuls, ``ab`` the
adapters (their parameters, gradients and, in PEFT, their inputs), ``lb`` the dtype the LoRA product runs in.
The transient items (activations, logits, gradient transients) are in :mod:`qtool.plan.transient`.
"""
from __future__ import annotations

import bisect
import functools
from collections import Counter
from typing import TYPE_CHECKING

from qtool.plan.settings import layer_linears
from qtool.units import MiB

if TYPE_CHECKING:
    from qtool.arch import Shape
    from qtool.plan.settings import Settings

# --- Measured constants ------------------------------------------------------------------------------------------
# Numbers that cannot be derived from code, each read off data/memory/h200-2026-11-29.json (NVIDIA H200, torch 2.11 +
# CUDA 13.0, bitsandbytes 0.50.2, transformers 5.17, PEFT 0.21); data/memory/README.md says how.

# One cuBLAS workspace per (cuBLAS handle, stream) pair, allocated through PyTorch's caching allocator (so counted as
# allocated) on the first matmul of the pair and kept for the life of the process: 32 MiB on sm90 (torch
# CublasHandlePool.cpp, 4096 KiB x 8). Handles are per thread, so the forward (main thread) and the backward
# (autograd's device thread) each need one per stream. Records: the qtool runs after the first in a process start
# with exactly 5 x 32 MiB (then 7, 9 x 32 MiB) more allocated than the plan's after-load bytes (the workspaces of
# the earlier runs' streams), and the first runs' peaks leave exactly 4 x 32 MiB unexplained without them.
CUBLAS_WORKSPACE_BYTES = 32 * MiB
# CUDA context, loaded kernels and the driver's own reservation on the device: everything NVML counts that the
# caching allocator does not reserve, paged optimizer state aside (NVML "used" is device-wide). Record: nvml_used -
# peak_reserved of the runs without paged state, the same in first and later runs of a process (qtool 9 records:
# 1474-1488 MiB, 7 of them 1476 +- 2; hf 9 records: 1366-1368 MiB). Before any kernel has run (after-load) NVML
# exceeds the replayed reserved bytes by 1234 MiB in every first run: the kernels a step loads add 132 MiB (hf:
# cuBLAS, bitsandbytes) and 242 MiB (qtool: also its Triton kernels and the instantiated CUDA graph).
# These dicts are keyed by Settings.stack: hf-prepare runs the hf stack (the same kernels, another recipe).
# unsloth (bench/results/unsloth_h200_2026-12-04.json, its three records): 1451.9 MiB each, Triton and Inductor kernels.
CUDA_CONTEXT_BYTES = {"qtool": 1476 * MiB, "hf": 1366 * MiB, "unsloth": 1452 * MiB}
# What NVML shows beyond the paged buffers themselves once a process has any (bitsandbytes' cudaMallocManaged
# state, this run's or an earlier run's): unexplained, 0-112 MiB, not in proportion to the paged bytes or buffers.
# Record: the median over the fitted records with paged state (qtool 30, 66, 82 MiB; hf 0, 62, 62 MiB; the held-out
# llama-3-8b, mistral-7b and llama-1-65b s1024 runs show 44-112).
PAGED_OVERHEAD_BYTES = 64 * MiB
# Residency granularity of bitsandbytes' paged (cudaMallocManaged) optimizer buffers on the GPU: the UVM driver backs
# them with 64 KiB pages. Record: the hf llama-1-65b s512 run (1280 paged buffers of 512 KiB) shows the same
# nvml - reserved - paged as the runs without paged state; the other paged runs show 30-112 MiB more, not in
# proportion to their buffer count (PAGED_OVERHEAD_BYTES).
PAGED_GRANULARITY_BYTES = 64 * 2**10
# torch's memory-efficient SDPA kernel refuses grouped-query inputs (sdp_utils.cpp check_batch_size_and_num_heads_dense
# <false>), so fp32 GQA attention without a mask (the hf profile: transformers passes enable_gqa) falls back to the
# math kernel with its s^2 fp32 probabilities. Records: the hf GQA runs without checkpointing carry one
# 4 x heads x seq^2 tensor per layer (smollm2 s2048, qwen2.5-0.5b s4096) and the checkpointed long ones four at the
# attention backward (llama-3-8b s8192, smollm2 s8192); Mistral, whose sliding-window mask makes transformers repeat
# k and v instead, carries none (mistral-7b s4096).
SDPA_EFFICIENT_SUPPORTS_GQA = False

# --- Facts from source code (not tunable) ----------------------------------------------------------------------------
ALLOC_ROUND_BYTES = 512          # c10 CUDACachingAllocator rounds every block up to 512 bytes (kMinBlockSize)
SMALL_ALLOC_BYTES = 1 * MiB      # ... blocks up to kSmallSize come from 2 MiB segments and are split exactly;
MIN_LARGE_ALLOC_BYTES = 10 * MiB  # larger ones below kMinLargeAlloc share 20 MiB segments (kLargeBuffer),
LARGE_BUFFER_BYTES = 20 * MiB
ROUND_LARGE_BYTES = 2 * MiB      # the rest get their own segment rounded up to 2 MiB (kRoundLarge); a large block is
                                 # split only if more than kSmallSize would remain, else the whole block is booked
NF4_CODE_BYTES = 16 * 4          # bitsandbytes QuantState.code: the 16 NF4 values, fp32, one per tensor
NESTED_CODE_BYTES = 256 * 4      # state2.code: the 8-bit dynamic map, fp32, one per tensor (double quant only)
NESTED_BLOCK = 256               # bitsandbytes quantises the absmax in blocks of 256 (hard-coded)
OFFSET_BYTES = 4                 # QuantState.offset: a 0-dim fp32 tensor (double quant only)
PAGED_MIN_NUMEL = 100_000        # bnb optim/optimizer.py get_state_buffer: `p.numel() < 1e5` -> ordinary tensor
MIN_8BIT_NUMEL = 4096            # bnb Optimizer2State(min_8bit_size=4096): smaller tensors keep fp32 state
OPTIM_8BIT_BLOCK = 256           # bnb Optimizer2State.init_state: absmax1/absmax2 per 256 elements, fp32
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def alloc(n_bytes: int) -> int:
    """What the caching allocator books for one tensor of ``n_bytes`` (rounded up to 512)."""
    return -(-n_bytes // ALLOC_ROUND_BYTES) * ALLOC_ROUND_BYTES


def tensors_alloc(numels: list[int], element_bytes: int) -> int:
    """What the caching allocator books for one tensor of each of ``numels`` elements (sizes repeat per layer)."""
    return sum(count * alloc(n * element_bytes) for n, count in Counter(numels).items())


def booked(sizes: list[int]) -> int:
    """``memory_allocated`` after allocating tensors of ``sizes`` in order, none freed, from an empty cache: the
    caching allocator's segment and split rules (the constants above) with its best-fit search. A tensor of 21.5 MiB,
    say, gets a 22 MiB segment that is not split, and books all 22 MiB."""
    free: list[int] = []  # free large-pool blocks (remainders of split segments), sorted
    total = 0
    for size in (alloc(n) for n in sizes if n):
        block = size  # the small pool splits its 2 MiB segments exactly
        if size > SMALL_ALLOC_BYTES:
            i = bisect.bisect_left(free, size)  # best fit: the smallest free block that holds it
            if i < len(free):
                block = free.pop(i)
            elif size < MIN_LARGE_ALLOC_BYTES:
                block = LARGE_BUFFER_BYTES
            else:
                block = -(-size // ROUND_LARGE_BYTES) * ROUND_LARGE_BYTES
            if block - size > SMALL_ALLOC_BYTES:
                bisect.insort(free, block - size)
                block = size
        total += block
    return total


def fused(st: Settings) -> bool:
    """qtool on a GPU: Triton RMSNorm, RoPE, SwiGLU and dequantisation, bf16 flash SDPA (and, on one GPU, a CUDA graph
    per step: :func:`graphed`)."""
    return st.profile == "qtool" and st.device == "cuda"


def graphed(st: Settings) -> bool:
    """qtool on one GPU: each micro-batch's forward+backward is one CUDA graph replay. Under FSDP (``gpus > 1``) the
    trainer runs eager: FSDP's hooks all-gather and reduce-scatter between the layers, outside any graph."""
    return fused(st) and st.gpus == 1


# --- weights -----------------------------------------------------------------------------------------------------

def nf4_tensor_bytes(n: int, block_size: int, double_quant: bool) -> tuple[int, int]:
    """(packed, metadata) bytes of one NF4 tensor of ``n`` elements, as bitsandbytes ``quantize_4bit`` stores it.

    Packed: two 4-bit codes per uint8. Metadata with double quantisation: uint8 absmax per block, fp32 absmax per 256
    blocks, the 16-entry fp32 NF4 code, the 256-entry fp32 nested code and the fp32 offset (QLoRA paper §3:
    8/64 + 32/(64*256) = 0.127 bits/param); without: fp32 absmax per block (0.5 bits/param) and the NF4 code.
    """
    n_blocks = -(-n // block_size)
    if double_quant:
        meta = n_blocks + 4 * -(-n_blocks // NESTED_BLOCK) + NF4_CODE_BYTES + NESTED_CODE_BYTES + OFFSET_BYTES
    else:
        meta = 4 * n_blocks + NF4_CODE_BYTES
    return -(-n // 2), meta


def nf4_tensor_parts(n: int, block_size: int, double_quant: bool, code_tables: bool = True) -> list[int]:
    """Bytes of each tensor of one resident 4-bit weight, in the order they are allocated. bitsandbytes' Linear4bit
    (``code_tables``) keeps every tensor of its QuantState, codes and offset included; qtool's NF4Weight keeps packed,
    absmax and nested absmax, the offset as a float, and shares one code table per device (qtool/lora.py,
    qtool/kernels.py)."""
    n_blocks = -(-n // block_size)
    parts = [-(-n // 2)]
    if double_quant:
        parts += [n_blocks, 4 * -(-n_blocks // NESTED_BLOCK)]
        parts += [NF4_CODE_BYTES, NESTED_CODE_BYTES, OFFSET_BYTES] if code_tables else []
    else:
        parts += [4 * n_blocks] + ([NF4_CODE_BYTES] if code_tables else [])
    return parts


def nf4_tensor_alloc(n: int, block_size: int, double_quant: bool, code_tables: bool = True) -> int:
    """Allocated bytes of one resident 4-bit weight, each of its tensors rounded by the allocator."""
    return sum(alloc(p) for p in nf4_tensor_parts(n, block_size, double_quant, code_tables))


def quantised_weights(shape: Shape, st: Settings) -> tuple[int, int, int]:
    """(packed, metadata, allocated) bytes of every decoder-layer Linear weight, quantised as the converter does:
    packed and metadata as stored on disk (bitsandbytes' layout), allocated as the profile keeps them on the GPU."""
    packed = meta = allocated = 0
    for lin in layer_linears(shape):
        p, m = nf4_tensor_bytes(lin.n_in * lin.n_out, st.block_size, st.double_quant)
        packed += p * shape.n_layers
        meta += m * shape.n_layers
        allocated += shape.n_layers * nf4_tensor_alloc(lin.n_in * lin.n_out, st.block_size, st.double_quant,
                                                       code_tables=st.is_hf or st.profile == "unsloth")
    return packed, meta, allocated


def frozen_bytes_per_param(st: Settings) -> int:
    """Embeddings, head and norms: the compute dtype in qtool; fp32 in hf (PEFT ``prepare_model_for_kbit_training``
    casts every non-Params4bit fp16/bf16 parameter to fp32, peft/utils/other.py)."""
    return 4 if st.is_hf else DTYPE_BYTES[st.compute_dtype]


def embedding_bytes(shape: Shape, st: Settings) -> tuple[int, int]:
    """(input embeddings, untied output head) bytes; a tied head is the embedding matrix itself."""
    one = alloc(shape.vocab * shape.hidden * frozen_bytes_per_param(st))
    return one, 0 if shape.tied_embeddings else one


def norm_parts(shape: Shape, nb: int) -> tuple[list[int], list[int]]:
    """(per layer, once) bytes of the norm weights of ``nb`` bytes each (LayerNorm: weight and bias)."""
    per_norm = [shape.hidden * nb] * (2 if shape.norm == "layer" else 1)
    qk = [shape.head_dim * nb] * 2 if shape.qk_norm else []
    return per_norm * shape.n_norms_per_layer + qk, per_norm


def norm_and_bias_bytes(shape: Shape, st: Settings) -> int:
    """Norm weights (one tensor per norm), Linear biases and the rotary inverse frequencies (fp32, head_dim / 2;
    transformers keeps a second, original copy). bnb ``Linear4bit.forward`` casts a bias to the compute dtype on
    first use (nn/modules.py), so biases end in the compute dtype in both profiles."""
    per_layer, final = norm_parts(shape, frozen_bytes_per_param(st))
    biases = [lin.n_out * DTYPE_BYTES[st.compute_dtype] for lin in layer_linears(shape) if lin.bias]
    return (shape.n_layers * sum(alloc(b) for b in per_layer + biases) + sum(alloc(b) for b in final)
            + buffer_bytes(shape, st))


def buffer_bytes(shape: Shape, st: Settings) -> int:
    """The model's frozen buffers that are no parameter (FSDP does not shard them): the rotary inverse frequencies
    (fp32, head_dim / 2; transformers keeps a second, original copy) and Gemma's embedding scale."""
    tables = 2 if shape.rope_local else 1  # gemma3: the sliding layers' own RoPE
    rotary = (2 if st.is_hf else 1) * tables * alloc(4 * shape.head_dim // 2)
    embed_scale = alloc(4) if shape.model_type in ("gemma2", "gemma3_text") else 0  # sqrt(hidden), a 0-dim tensor
    return rotary + embed_scale


def resident_rounding_bytes(shape: Shape, st: Settings) -> int:
    """What the caching allocator books for the resident tensors beyond their 512-rounded sizes: large blocks whose
    segment is not split (see :func:`booked`). Tensors in load order: per layer each Linear's NF4 tensors and bias,
    then the layer's norms; embeddings, head and final norm; then the LoRA factors, A before B (qtool/train/load.py
    build_decoder and qtool/adapters/attach.py; PEFT's update_layer). 48 MiB for Llama-2-7B (3 x 32 packed MLP weights of 21.5 MiB
    in 22 MiB segments). None on the CPU, nor with expandable segments (qtool.plan.allocator: every block is split
    down to its 512-rounded size)."""
    if st.device != "cuda" or st.expandable:
        return 0
    flat = flat_buffers(st)  # the factors loaded one by one were freed when they moved into the flat buffer
    return _rounding(shape, st.is_hf, st.block_size, st.double_quant, DTYPE_BYTES[st.compute_dtype],
                     DTYPE_BYTES[st.adapter_dtype], frozen_bytes_per_param(st),
                     () if flat else tuple(st.module_ranks(shape).items()),
                     tuple(st.spec.vocab_tensors(shape)) if st.method == "lora" and not flat else ())


@functools.lru_cache(maxsize=64)  # a fit search plans one shape many times; this is its slowest item
def _rounding(shape: Shape, code_tables: bool, block_size: int, double_quant: bool, cb: int, ab: int, fb: int,
              ranks: tuple[tuple[str, int], ...], vocab: tuple[int, ...] = ()) -> int:
    rank_of = dict(ranks)
    per_layer, final = norm_parts(shape, fb)
    layer: list[int] = []
    for lin in layer_linears(shape):
        layer += nf4_tensor_parts(lin.n_in * lin.n_out, block_size, double_quant, code_tables=code_tables)
        layer += [lin.n_out * cb] if lin.bias else []
    embeddings = [shape.vocab * shape.hidden * fb] * (1 if shape.tied_embeddings else 2)
    lora = [n for lin in layer_linears(shape) if lin.name in rank_of
            for n in (rank_of[lin.name] * lin.n_in * ab, lin.n_out * rank_of[lin.name] * ab)]
    sizes = (layer + per_layer) * shape.n_layers + embeddings + final + lora * shape.n_layers + [n * ab for n in vocab]
    return booked(sizes) - sum(alloc(n) for n in sizes)


def cublas_workspaces(st: Settings, trainer: str | None = None) -> int:
    """cuBLAS workspaces the step creates: one per (thread, stream) that runs a matmul (see CUBLAS_WORKSPACE_BYTES).
    hf: the default stream, in the forward and in autograd's thread. qtool's CUDA-graph trainer (``trainer``, a
    :data:`qtool.plan.process.TRAINERS` revision; None: the current one): the side stream of the eager warm-up in
    both threads, which the capture reuses since 2026-12-04b; before, the capture's own stream added two more, and the held-out pass's
    default-stream workspace (from 2026-12-04 on, given back before training since 2026-12-04b) a fifth. Eager qtool
    under FSDP: the default stream in both threads (FSDP's own streams only copy and communicate). None on the CPU."""
    if st.device != "cuda":
        return 0
    if st.stack != "qtool" or not graphed(st):
        return 2
    return {"2026-11-29": 4, "2026-12-04": 5}.get(trainer, 2)


# --- LoRA, gradients, optimizer ----------------------------------------------------------------------------------

def lora_tensors(shape: Shape, st: Settings) -> list[int]:
    """Element counts of every LoRA tensor: A (r x in) and B (out x r) per targeted Linear per layer (AdaLoRA: Q, λ
    (r x 1) and P at the initial rank, in that order: qtool/adapters/adalora.py); then the embedding's and the
    head's factors (:meth:`qtool.adapters.spec.AdapterSpec.vocab_tensors`).
    Their sum equals PEFT's trainable-parameter count for the same LoraConfig (AdaLoraConfig) (tests/test_plan.py,
    tests/test_adalora.py)."""
    ranks = st.module_ranks(shape)
    adalora = st.method == "adalora"
    one_layer = [n for lin in layer_linears(shape) if lin.name in ranks
                 for n in ((ranks[lin.name] * lin.n_in,) + ((ranks[lin.name],) if adalora else ())
                           + (lin.n_out * ranks[lin.name],))]
    return one_layer * shape.n_layers + (st.spec.vocab_tensors(shape) if not adalora else [])


def adalora_ema_bytes(numels: list[int]) -> int:
    """AdaLoRA's smoothed sensitivity and uncertainty: two fp32 tensors per trainable tensor, kept from the first
    step to the final mask (qtool/adapters/adalora.py RankAllocator); the importance update makes one more fp32 tensor
    per trainable tensor for the moment (:func:`adalora_update_bytes`)."""
    return 2 * tensors_alloc(numels, 4)


def adalora_update_bytes(numels: list[int]) -> int:
    """The importance update between backward and the optimizer step: ``|w · ∂L/∂w|`` of every trainable tensor at
    once (one fp32 per element; torch._foreach_mul), alive while the EMAs are updated in place."""
    return tensors_alloc(numels, 4)


def optimizer_state_bytes(numels: list[int], optimizer: str, param_bytes: int = 4) -> tuple[int, int]:
    """(device allocated, paged) bytes of optimizer state for tensors of the given sizes (bnb optim/optimizer.py).

    AdamW keeps two states. bitsandbytes 32-bit: fp32 each. 8-bit: uint8 each plus fp32 absmax per 256 elements,
    except tensors under 4096 elements, which keep fp32 states. Paged variants put a state buffer of >= 1e5
    elements in CUDA managed memory, which PyTorch's allocator never sees; smaller buffers and all absmax are
    ordinary device tensors. adamw_torch (torch.optim.AdamW): two states in the parameter dtype. SGD
    (torch.optim.SGD without momentum, as qtool train builds it) keeps nothing.
    """
    if optimizer == "sgd":
        return 0, 0
    if optimizer == "adamw_torch":
        return 2 * tensors_alloc(numels, param_bytes), 0
    paged_ok = optimizer.startswith("paged_")
    device = paged = 0
    for n, count in Counter(numels).items():  # every layer repeats the same few sizes
        eight_bit = optimizer.endswith("8bit") and n >= MIN_8BIT_NUMEL
        buffer = n if eight_bit else 4 * n
        if paged_ok and n >= PAGED_MIN_NUMEL:
            paged += count * 2 * -(-buffer // PAGED_GRANULARITY_BYTES) * PAGED_GRANULARITY_BYTES
        else:
            device += count * 2 * alloc(buffer)
        if eight_bit:
            device += count * 2 * alloc(4 * -(-n // OPTIM_8BIT_BLOCK))
    if optimizer.endswith("8bit"):
        device += 2 * alloc(256 * 4)  # the signed and unsigned dynamic maps (name2qmap), once per device
    return device, paged


def optimizer_step_bytes(numels: list[int], optimizer: str, param_bytes: int = 4) -> int:
    """Temporaries of one optimizer step: torch's foreach AdamW makes ``sqrt(exp_avg_sq)`` for every tensor
    (torch/optim/adamw.py _multi_tensor_adamw); bitsandbytes' fused kernels and plain SGD make none."""
    return tensors_alloc(numels, param_bytes) if optimizer == "adamw_torch" else 0


def flat_buffers(st: Settings) -> bool:
    """qtool's CUDA-graph trainer keeps the trainable parameters and their gradients in one buffer each
    (qtool/train/flat.py); the optimizer updates the buffer. Not under FSDP, which shards each parameter itself."""
    return graphed(st) and st.flat_params


def gradients_persist(st: Settings) -> bool:
    """LoRA gradients stay allocated between steps: accumulated over micro-batches, or written in place by a CUDA
    graph replay (qtool/train.py pre-allocates them before capture and zeroes them with set_to_none=False)."""
    return st.grad_accum > 1 or graphed(st)


def fp16_bytes(n_params: int) -> int:
    """The 16-bit checkpoint the 4-bit plan replaces: 2 bytes per parameter."""
    return 2 * n_params

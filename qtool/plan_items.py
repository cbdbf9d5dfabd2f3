"""The memory line items of a QLoRA training step, one small function each. Pure Python (no torch).

Symbols used in the formulas: ``T = batch * seq`` tokens, ``s`` sequence length, ``h`` hidden, ``f`` intermediate,
``q``/``kv`` the query/key-value widths (heads * head_dim), ``nh`` query heads, ``V`` vocabulary, ``r`` LoRA rank.
Dtype widths: ``rb`` the hidden states between layers, ``cb`` the compute dtype of the base matmuls, ``ab`` the
adapters (their parameters, gradients and, in PEFT, their inputs), ``lb`` the dtype the LoRA product runs in.

The activation formulas list the tensors autograd keeps for backward, read from the code that runs:
transformers 5.24 ``models/llama/modeling_llama.py`` (RMSNorm up-casts to fp32; SwiGLU ``down(act(gate(x)) * up(x))``),
``integrations/sdpa_attention.py``, ``loss/loss_utils.py`` (``logits.float()`` then ``cross_entropy``), PEFT 0.21
``tuners/lora/bnb.py`` (``Linear4bit.forward`` casts x to the adapter dtype, clones the base result), bitsandbytes
0.50.2 ``autograd/_functions.py`` (``MatMul4Bit`` saves only the packed weight and dequantises it again in backward)
and ``nn/modules.py`` (``Linear4bit`` returns its output in the input's dtype), and for the qtool profile
qtool/model.py and qtool/lora.py. Both are checked against allocation traces of the real code on the CPU
(tests/test_plan.py).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from qtool.units import MiB

if TYPE_CHECKING:
    from qtool.arch import Linear, Shape
    from qtool.plan import Settings

# --- Measured constants ------------------------------------------------------------------------------------------
# Everything here is a number that cannot be derived from code. Each is fitted to the measurement records in
# data/memory/ (schema and fitting procedure: data/memory/README.md). Values below are PRE-CALIBRATION estimates
# until data/memory/h200-2026-11-29.json exists; update the value and the record reference together.

# CUDA context + loaded kernels (torch, cuBLAS, bitsandbytes), seen only by NVML. Estimate for an H200 with
# torch 2.11 + CUDA 13: 500-600 MiB. Record: data/memory/h200-2026-11-29.json, nvml_used - peak_reserved - paged.
CUDA_CONTEXT_BYTES = 560 * MiB
# cuBLAS/cuBLASLt workspaces, allocated through PyTorch's caching allocator (so counted as allocated): 32 MiB per
# (handle, stream) on sm90, one handle for the forward thread and one for the autograd thread.
# Record: data/memory/h200-2026-11-29.json, after the first step minus after_load_allocated.
CUBLAS_WORKSPACE_BYTES = 2 * 32 * MiB
# Caching-allocator slack, reserved - allocated at the peak: a fixed part plus a fraction of the transient
# (activations, logits, dequantised weights) that churns through the cache each step.
# Record: data/memory/h200-2026-11-29.json, peak_reserved - peak_allocated against the planned transient.
RESERVED_SLACK_BYTES = 64 * MiB
RESERVED_SLACK_FRACTION = 0.05
# Residency granularity of bitsandbytes' paged (cudaMallocManaged) optimizer buffers on the GPU: the UVM driver backs
# them with 64 KiB pages split from shared 2 MiB chunks (an estimate; 2 MiB per buffer is the pessimistic bound).
# Record: data/memory/h200-2026-11-29.json, twins paged_adamw_32bit vs adamw_32bit: NVML difference per buffer.
PAGED_GRANULARITY_BYTES = 64 * 2**10
# torch's memory-efficient SDPA kernel refuses grouped-query inputs (sdp_utils.cpp: check_batch_size_and_num_heads
# _dense<false>), so fp32 GQA attention (the hf profile) falls back to the math kernel with its s^2 probabilities.
# Record: data/memory/h200-2026-11-29.json, hf runs of GQA models; set True if they show no s^2 term.
SDPA_EFFICIENT_SUPPORTS_GQA = False

# --- Facts from source code (not tunable) ----------------------------------------------------------------------------
ALLOC_ROUND_BYTES = 512          # c10 CUDACachingAllocator rounds every block up to 512 bytes (kMinBlockSize)
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


def nf4_tensor_alloc(n: int, block_size: int, double_quant: bool, code_tables: bool = True) -> int:
    """Allocated bytes of one resident 4-bit weight, each of its tensors rounded by the allocator.
    bitsandbytes' Linear4bit (``code_tables``) keeps every tensor of its QuantState, codes and offset included;
    qtool's NF4Weight keeps packed, absmax and nested absmax, the offset as a float, and shares one code table per
    device (qtool/lora.py, qtool/kernels.py)."""
    n_blocks = -(-n // block_size)
    parts = [-(-n // 2)]
    if double_quant:
        parts += [n_blocks, 4 * -(-n_blocks // NESTED_BLOCK)]
        parts += [NF4_CODE_BYTES, NESTED_CODE_BYTES, OFFSET_BYTES] if code_tables else []
    else:
        parts += [4 * n_blocks] + ([NF4_CODE_BYTES] if code_tables else [])
    return sum(alloc(p) for p in parts)


def quantised_weights(shape: Shape, st: Settings) -> tuple[int, int, int]:
    """(packed, metadata, allocated) bytes of every decoder-layer Linear weight, quantised as the converter does:
    packed and metadata as stored on disk (bitsandbytes' layout), allocated as the profile keeps them on the GPU."""
    packed = meta = allocated = 0
    for lin in shape.linears():
        p, m = nf4_tensor_bytes(lin.n_in * lin.n_out, st.block_size, st.double_quant)
        packed += p * shape.n_layers
        meta += m * shape.n_layers
        allocated += shape.n_layers * nf4_tensor_alloc(lin.n_in * lin.n_out, st.block_size, st.double_quant,
                                                       code_tables=st.profile == "hf")
    return packed, meta, allocated


def frozen_bytes_per_param(st: Settings) -> int:
    """Embeddings, head and norms: the compute dtype in qtool; fp32 in hf (PEFT ``prepare_model_for_kbit_training``
    casts every non-Params4bit fp16/bf16 parameter to fp32, peft/utils/other.py)."""
    return 4 if st.profile == "hf" else DTYPE_BYTES[st.compute_dtype]


def embedding_bytes(shape: Shape, st: Settings) -> tuple[int, int]:
    """(input embeddings, untied output head) bytes; a tied head is the embedding matrix itself."""
    one = alloc(shape.vocab * shape.hidden * frozen_bytes_per_param(st))
    return one, 0 if shape.tied_embeddings else one


def norm_and_bias_bytes(shape: Shape, st: Settings) -> int:
    """Norm weights (one tensor per norm), Linear biases and the rotary inverse frequencies (fp32, head_dim / 2;
    transformers keeps a second, original copy). bnb ``Linear4bit.forward`` casts a bias to the compute dtype on
    first use (nn/modules.py), so biases end in the compute dtype in both profiles."""
    nb = frozen_bytes_per_param(st)
    per_norm = (2 if shape.norm == "layer" else 1) * alloc(shape.hidden * nb)  # LayerNorm: weight and bias
    qk = 2 * alloc(shape.head_dim * nb) if shape.qk_norm else 0
    norm = shape.n_layers * (shape.n_norms_per_layer * per_norm + qk) + per_norm
    biases = shape.n_layers * sum(alloc(lin.n_out * DTYPE_BYTES[st.compute_dtype])
                                  for lin in shape.linears() if lin.bias)
    rotary = (2 if st.profile == "hf" else 1) * alloc(4 * shape.head_dim // 2)
    return norm + biases + rotary


# --- LoRA, gradients, optimizer ----------------------------------------------------------------------------------

def lora_tensors(shape: Shape, st: Settings) -> list[int]:
    """Element counts of every LoRA tensor: A (r x in) and B (out x r) per targeted Linear per layer.
    Their sum equals PEFT's trainable-parameter count for the same LoraConfig (tests/test_plan.py)."""
    ranks = st.module_ranks(shape)
    one_layer = [n for lin in shape.linears() if lin.name in ranks
                 for n in (ranks[lin.name] * lin.n_in, lin.n_out * ranks[lin.name])]
    return one_layer * shape.n_layers


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
        return sum(2 * alloc(n * param_bytes) for n in numels), 0
    paged_ok = optimizer.startswith("paged_")
    device = paged = 0
    for n in numels:
        eight_bit = optimizer.endswith("8bit") and n >= MIN_8BIT_NUMEL
        buffer = n if eight_bit else 4 * n
        if paged_ok and n >= PAGED_MIN_NUMEL:
            paged += 2 * -(-buffer // PAGED_GRANULARITY_BYTES) * PAGED_GRANULARITY_BYTES
        else:
            device += 2 * alloc(buffer)
        if eight_bit:
            device += 2 * alloc(4 * -(-n // OPTIM_8BIT_BLOCK))
    if optimizer.endswith("8bit"):
        device += 2 * alloc(256 * 4)  # the signed and unsigned dynamic maps (name2qmap), once per device
    return device, paged


def optimizer_step_bytes(numels: list[int], optimizer: str, param_bytes: int = 4) -> int:
    """Temporaries of one optimizer step: torch's foreach AdamW makes ``sqrt(exp_avg_sq)`` for every tensor
    (torch/optim/adamw.py _multi_tensor_adamw); bitsandbytes' fused kernels and plain SGD make none."""
    return sum(alloc(n * param_bytes) for n in numels) if optimizer == "adamw_torch" else 0


# --- activations -------------------------------------------------------------------------------------------------

def widths(st: Settings) -> tuple[int, int, int, int]:
    """(rb, cb, ab, lb). hf: hidden states are fp32 because the fp32 embeddings and norms feed them and Linear4bit
    returns its input's dtype; PEFT runs LoRA in the adapter dtype. qtool: everything in the compute dtype, LoRA
    weights cast to it inside the forward."""
    cb, ab = DTYPE_BYTES[st.compute_dtype], DTYPE_BYTES[st.adapter_dtype]
    if st.profile == "hf":
        return 4, cb, ab, ab
    return cb, cb, ab, cb


def attention_kernel(shape: Shape, st: Settings) -> str:
    """Which attention runs: "flash" (also memory-efficient SDPA: no s^2 tensor), "math" (SDPA fallback) or "eager".
    SDPA's flash kernel needs 16-bit inputs; the efficient one takes fp32 but (see SDPA_EFFICIENT_SUPPORTS_GQA) not
    grouped-query heads; transformers passes ``enable_gqa`` instead of repeating k/v (integrations/sdpa_attention.py).
    ``--attention flash`` is transformers' flash_attention_2, which casts fp32 q, k, v to the compute dtype."""
    if st.attention in ("eager", "flash"):
        return st.attention
    rb = widths(st)[0]
    gqa = shape.n_kv_heads != shape.n_heads
    return "flash" if rb == 2 or not gqa or SDPA_EFFICIENT_SUPPORTS_GQA else "math"


def lora_input_bytes(shape: Shape, st: Settings, names: list[str], n_in: int, kept: bool) -> int:
    """Per-token bytes LoRA adds by saving the input of the targeted modules among ``names`` (they share that input).
    PEFT casts x to the adapter dtype per module when the dtypes differ, each cast a separate saved copy; qtool
    and PEFT with matching dtypes save the shared input once, unless something else (``kept``) already saves it."""
    rb, _, ab, _ = widths(st)
    hit = [n for n in names if n in st.module_ranks(shape)]
    if not hit:
        return 0
    if st.profile == "hf" and ab != rb:
        return len(hit) * ab * n_in
    return 0 if kept else rb * n_in


def layer_saved_bytes(shape: Shape, st: Settings, first: bool = False) -> int:
    """Bytes one decoder layer keeps for backward (the Llama graph; gemma2/3 extra norms, qk-norm and plain MLPs
    included). ``first``: the first layer without checkpointing. In qtool its input (the embedding output) does not
    require grad, so its first norm saves nothing; in hf ``prepare_model_for_kbit_training`` enables input grads
    (``enable_input_require_grads``) and they stay on when checkpointing is switched off.

    Per token: each RMSNorm its fp32 input and fp32 rsqrt (4h + 4); flash/efficient SDPA q, k, v, out and the fp32
    logsumexp (rb(2q + 2kv) + 4nh) — out is o_proj's input; SwiGLU gate, act(gate), up (3 rb f); per LoRA'd module
    its input (see lora_input_bytes) and x A^T (lb r). Math/eager attention add the fp32 probabilities (4 nh s per
    token) and keep repeated k/v. qtool also keeps the bf16 copies of A and B (not per token).
    """
    h, f, q, kv, nh = shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim, shape.n_heads
    T, s = st.batch_size * st.seq_len, st.seq_len
    rb, cb, _, lb = widths(st)
    ranks = st.module_ranks(shape)
    names = [lin.name for lin in shape.linears()]
    attn_in, attn_out, mlp_in, mlp_out = _io_names(shape)
    per_norm = 4 * h + 4
    norms = shape.n_norms_per_layer * per_norm - (per_norm if first and st.profile == "qtool" else 0)
    if shape.qk_norm:
        norms += 4 * (q + kv) + 4 * (nh + shape.n_kv_heads)
    kernel = attention_kernel(shape, st)
    fa2_casts = st.attention == "flash" and rb != cb  # flash_attention_2 keeps 16-bit copies; out returns in rb
    if kernel == "flash":
        attn = (cb if fa2_casts else rb) * (2 * q + 2 * kv) + 4 * nh
    else:
        kv_kept = q if (kernel == "math" or shape.n_kv_heads != nh) else kv
        attn = rb * (q + 2 * kv_kept) + 4 * nh * s + (2 * nh * s if kernel == "eager" and rb == 2 else 0)
    mlp = 3 * rb * f if shape.mlp == "gated" else rb * f
    lora = (lora_input_bytes(shape, st, attn_in, h, kept=False)
            + lora_input_bytes(shape, st, attn_out, q, kept=kernel == "flash" and not fa2_casts)
            + lora_input_bytes(shape, st, mlp_in, h, kept=False)
            + lora_input_bytes(shape, st, mlp_out, f, kept=False)
            + sum(lb * r for name, r in ranks.items() if name in names))
    weight_copies = 0
    if st.profile == "qtool":  # A.to(bf16) and B.to(bf16) are saved by the matmuls that use them
        weight_copies = sum(lb * ranks[lin.name] * (lin.n_in + lin.n_out) for lin in shape.linears()
                            if lin.name in ranks)
    return T * (norms + attn + mlp + lora) + weight_copies


def _io_names(shape: Shape) -> tuple[list[str], list[str], list[str], list[str]]:
    """Module names grouped by the input they share: attention input, attention output, MLP input, MLP output."""
    attn = [lin.name for lin in shape.linears() if lin.group == "attn"]
    mlp = [lin.name for lin in shape.linears() if lin.group == "mlp"]
    return attn[:-1], attn[-1:], mlp[:-1], mlp[-1:]


def head_saved_bytes(shape: Shape, st: Settings) -> int:
    """The final norm's fp32 input and rsqrt; the lm_head is frozen, so hf keeps nothing more. qtool's chunked
    cross-entropy saves the normed hidden states and the fp32 log-sum-exp of the b (s - 1) predicting positions
    (qtool/model.py _ChunkedCrossEntropy)."""
    chunked = _loss_tokens(st) * (widths(st)[0] * shape.hidden + 4) if st.loss == "chunked" else 0
    return final_norm_saved_bytes(shape, st) + chunked


def final_norm_saved_bytes(shape: Shape, st: Settings) -> int:
    return st.batch_size * st.seq_len * (4 * shape.hidden + 4)


def norm_backward_bytes(shape: Shape, st: Settings) -> int:
    """Temporaries of an RMSNorm's backward: the fp32 grad of x * rsqrt, its product with x for the rsqrt grad,
    the expanded grad of the mean and the grad through pow(2) — four fp32 [T, h] tensors at once (allocation
    trace of transformers' and qtool's rms_norm, tests/test_plan.py)."""
    return 4 * 4 * shape.hidden * st.batch_size * st.seq_len


def position_bytes(shape: Shape, st: Settings) -> int:
    """cos and sin of the rotary embedding ([1, s, head_dim] each, hidden-state dtype) and int64 position ids;
    shared by all layers and alive for the whole step."""
    return st.seq_len * (2 * widths(st)[0] * shape.head_dim + 8)


def loss_chunk_tokens(vocab: int) -> int:
    """Tokens per chunk of qtool's cross-entropy: the largest power of two whose fp32 logits fit 256 MiB, at least
    64 (= qtool.model.loss_chunk_tokens; a test keeps them equal)."""
    return max(64, 2 ** int(math.log2(2**26 / vocab)))


def _loss_tokens(st: Settings) -> int:
    """Positions the loss sees: qtool's loss drops each sequence's last position; transformers pads the labels."""
    return st.batch_size * (st.seq_len - 1) if st.loss == "chunked" else st.batch_size * st.seq_len


def loss_bytes(shape: Shape, st: Settings) -> int:
    """Transient of the loss at its backward, the largest moment of the head: the saved fp32 log-softmax, the fp32
    gradient from nll_loss and the fp32 gradient of log_softmax coexist: 12 bytes per token per vocabulary entry
    (transformers loss_utils.py ForCausalLMLoss; the logits are gone by then), plus the int64 shifted labels.
    Chunked (qtool/model.py): a chunk's bf16 logits, their fp32 copy and the fp32 softmax (10 bytes per token per
    entry), plus the previous chunk's softmax while the next is computed (12 with more than one chunk), and the
    gradient of the hidden states, allocated whole."""
    n = _loss_tokens(st)
    if st.loss == "chunked":
        chunk = loss_chunk_tokens(shape.vocab)
        per_entry = 12 if n > chunk else 10
        return per_entry * min(n, chunk) * shape.vocab + alloc(n * widths(st)[0] * shape.hidden)
    return 12 * n * shape.vocab + 8 * n


def dequantised_weight_bytes(lin: Linear, st: Settings) -> int:
    """The transient dequantised weight of one product (out x in, compute dtype); bitsandbytes' dequantize_4bit
    first rebuilds the fp32 absmax of a double-quantised weight, qtool's kernel fuses it. Lives for one matmul."""
    n = lin.n_in * lin.n_out
    absmax = 4 * -(-n // st.block_size) if st.double_quant and st.profile == "hf" else 0
    return alloc(n * DTYPE_BYTES[st.compute_dtype]) + alloc(absmax)


def layer_backward_bytes(shape: Shape, st: Settings) -> tuple[int, str]:
    """(bytes, moment) of the largest transient while one layer runs backward, on top of its saved tensors.

    The incoming gradient of the layer output (rb h per token) lives throughout. Then the largest of:
    * MLP product backward: grads of act(gate)*up, of act(gate) and of up (3 rb f); down's LoRA input is freed;
    * down_proj LoRA backward: the base branch's input grad and the LoRA branch's (2 rb f) while down's input is kept;
    * down_proj base backward: its dequantised weight, the output grad cast to the compute dtype and the result;
    * attention backward: after the MLP tensors are freed, the grads of out, q, k, v (flash) or two s^2 fp32
      tensors (grad of the probabilities and of the scores) for math/eager attention;
    * the post-attention RMSNorm's backward (norm_backward_bytes), the MLP freed but the norm's own input kept.
    Checked against allocation traces of both profiles on the CPU (tests/test_plan.py).
    """
    h, f, q, kv, nh = shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim, shape.n_heads
    T, s = st.batch_size * st.seq_len, st.seq_len
    rb, cb, _, _ = widths(st)
    _, _, mlp_in, mlp_out = _io_names(shape)
    down = next(lin for lin in shape.linears() if lin.name == mlp_out[0])
    m_saved = lora_input_bytes(shape, st, mlp_out, f, kept=False) * T
    mlp_saved = ((3 if shape.mlp == "gated" else 1) * rb * f + 4 * h + 4) * T + m_saved \
        + lora_input_bytes(shape, st, mlp_in, h, kept=False) * T
    kernel = attention_kernel(shape, st)
    moments = {
        "MLP product backward": (3 if shape.mlp == "gated" else 2) * rb * f * T - m_saved,
        "down_proj LoRA backward": 2 * rb * f * T if down.name in st.module_ranks(shape) else 0,
        "down_proj backward (dequantised weight)": dequantised_weight_bytes(down, st)
        + cb * (f + (h if rb != cb else 0)) * T,
        "attention backward": (rb * (2 * q + 2 * kv) * T if kernel == "flash" else 2 * 4 * nh * s * T) - mlp_saved,
        "post-attention RMSNorm backward": norm_backward_bytes(shape, st) - mlp_saved + 4 * h * T + 4 * T,
    }
    moment = max(moments, key=moments.get)
    return rb * h * T + moments[moment], moment


def layer_grad_bytes(shape: Shape, st: Settings) -> int:
    """LoRA gradients that exist at the layer's largest backward moment: those of its MLP modules (the MLP is
    back-propagated first; the attention adapters' grads come after that moment)."""
    ranks = st.module_ranks(shape)
    return sum(alloc(ranks[lin.name] * (lin.n_in + lin.n_out) * DTYPE_BYTES[st.adapter_dtype])
               for lin in shape.linears() if lin.group == "mlp" and lin.name in ranks)


def checkpoint_bytes(shape: Shape, st: Settings) -> int:
    """Gradient checkpointing keeps each decoder layer's input hidden state (rb h per token per layer)."""
    return shape.n_layers * st.batch_size * st.seq_len * widths(st)[0] * shape.hidden


def recompute_bytes(shape: Shape, st: Settings) -> int:
    """Under checkpointing, the layer being back-propagated is recomputed and its saved tensors live again, less the
    fp32 norm input when that is the checkpointed input itself (rb = 4). Both profiles checkpoint non-reentrantly
    (qtool/model.py passes use_reentrant=False; transformers' gradient_checkpointing_enable() defaults to it), which
    stops recomputing once the last saved tensor is back, so the layer output is not rebuilt."""
    shared = 4 * shape.hidden * st.batch_size * st.seq_len if widths(st)[0] == 4 else 0
    return layer_saved_bytes(shape, st) - shared


def eager_mask_bytes(shape: Shape, st: Settings) -> int:
    """Eager attention's additive causal mask [b, 1, s, s] in the hidden-state dtype (transformers masking_utils),
    held for backward by the checkpointed calls."""
    if st.attention != "eager":
        return 0
    return st.batch_size * st.seq_len ** 2 * widths(st)[0]


def fp16_bytes(n_params: int) -> int:
    """The 16-bit checkpoint the 4-bit plan replaces: 2 bytes per parameter."""
    return 2 * n_params

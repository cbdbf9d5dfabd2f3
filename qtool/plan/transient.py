"""The transient line items of a QLoRA training step: what autograd saves for backward and the working tensors of
each moment (logits, gradient transients, dequantised weights), one small function each. Pure Python (no torch).

Symbols as in :mod:`qtool.plan.resident`. The formulas list the tensors autograd keeps, read from the code that runs:
transformers 5.x ``models/llama/modeling_llama.py`` (RMSNorm up-casts to fp32; SwiGLU ``down(act(gate(x)) * up(x))``),
``integrations/sdpa_attention.py``, ``masking_utils.py``, ``loss/loss_utils.py`` (``logits.float()`` then
``cross_entropy``), PEFT 0.21 ``tuners/lora/bnb.py`` (``Linear4bit.forward`` casts x to the adapter dtype, clones the
base result), bitsandbytes 0.50.2 ``autograd/_functions.py`` (``MatMul4Bit`` saves only the packed weight and
dequantises it again in backward), and for the qtool profile qtool/train/model.py and qtool/adapters/{nf4_linear,lora}.py with, on a GPU
(:func:`qtool.plan_items.fused`), the Triton kernels of qtool/fused.py and the bf16 flash SDPA; ``device="cpu"``
plans the torch reference paths the same modules take on the CPU. The CPU paths are checked against allocation
traces of the real code (tests/test_plan.py), the GPU paths against the H200 records in data/memory/.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from qtool.plan import methods
from qtool.plan.resident import DTYPE_BYTES, SDPA_EFFICIENT_SUPPORTS_GQA, alloc, fused
from qtool.plan.settings import layer_linears

if TYPE_CHECKING:
    from qtool.arch import Linear, Shape
    from qtool.plan.settings import Settings


def widths(st: Settings) -> tuple[int, int, int, int]:
    """(rb, cb, ab, lb). hf: hidden states are fp32 because the fp32 embeddings and norms feed them and Linear4bit
    returns its input's dtype; PEFT runs LoRA in the adapter dtype. qtool: everything in the compute dtype, LoRA
    weights cast to it inside the forward."""
    cb, ab = DTYPE_BYTES[st.compute_dtype], DTYPE_BYTES[st.adapter_dtype]
    if st.is_hf:
        return 4, cb, ab, ab
    return cb, cb, ab, cb


def sdpa_mask_bytes(shape: Shape, st: Settings) -> int:
    """The boolean [b, 1, s, s] mask transformers materialises for sdpa: only where it cannot rely on ``is_causal``
    — a sliding window no longer than the sequence (masking_utils _ignore_causal_mask_sdpa: ``kv_length >=
    local_attention_size``). Kept by every checkpointed layer call. qtool's trainer always runs ``is_causal``."""
    window = shape.sliding_window
    if not st.is_hf or st.attention != "sdpa" or window is None or st.seq_len < window:
        return 0
    return st.batch_size * st.seq_len ** 2


def window_mask_bytes(shape: Shape, st: Settings) -> int:
    """qtool: the ``(s, s)`` boolean mask the trainer builds once per forward when the sequence is longer than the
    sliding window (qtool/train/model.py ``window_mask``; shared by batch rows, heads and layers). Never with a
    prefix: qtool train refuses a prefix and sequence beyond the window."""
    window = shape.sliding_window
    if st.profile != "qtool" or window is None or st.seq_len <= window or st.method == "prefix":
        return 0
    return st.seq_len ** 2


def _masked(shape: Shape, st: Settings) -> bool:
    """Attention runs with an explicit mask (transformers' or qtool's sliding window): no flash, k and v repeated."""
    return sdpa_mask_bytes(shape, st) > 0 or window_mask_bytes(shape, st) > 0


GEMMA_TYPES = ("gemma2", "gemma3_text")  # qtool/train/gemma.py: torch norms and MLP on every device


def _gemma(shape: Shape, st: Settings) -> bool:
    return st.profile == "qtool" and shape.model_type in GEMMA_TYPES


def gemma_masked(shape: Shape, st: Settings, layer: int) -> bool:
    """qtool's Gemma layer ``layer`` passes SDPA a boolean mask (k, v repeated to the query heads) where transformers
    does: a window no longer than the sequence (qtool/train/gemma.py GemmaDecoder.attention_mask)."""
    window = shape.window(layer)
    return window is not None and st.seq_len >= window


def attention_kernel(shape: Shape, st: Settings, layer: int | None = None) -> str:
    """Which attention runs: "flash" (16-bit q, k, v: flash or cuDNN SDPA), "efficient" (memory-efficient SDPA:
    fp32, or with a mask), "math" (the SDPA fallback) or "eager". transformers passes ``enable_gqa`` when it has no
    mask and repeats k and v itself when it has one (integrations/sdpa_attention.py use_gqa_in_sdpa); the efficient
    kernel takes fp32 and masks but not grouped-query heads (SDPA_EFFICIENT_SUPPORTS_GQA). ``--attention flash``
    is transformers' flash_attention_2, which casts fp32 q, k, v to the compute dtype."""
    if _gemma(shape, st) and shape.attn_logit_softcapping:
        return "eager"  # Gemma 2's soft-capped scores: an explicit attention (qtool/train/gemma.py)
    if st.attention in ("eager", "flash"):
        return st.attention
    masked = _masked(shape, st) or (_gemma(shape, st) and layer is not None and gemma_masked(shape, st, layer))
    if widths(st)[0] == 2 and not masked:
        return "flash"
    gqa = shape.n_kv_heads != shape.n_heads and not masked
    return "math" if gqa and not SDPA_EFFICIENT_SUPPORTS_GQA else "efficient"


def _kv_saved(shape: Shape, st: Settings, kernel: str, layer: int | None = None) -> int:
    """Width of the k and v attention keeps: repeated to q's heads by transformers (eager, or sdpa with a mask) and
    by the math kernel (enable_gqa repeat_interleave); flash and efficient keep them as they are."""
    masked = _masked(shape, st) or (_gemma(shape, st) and layer is not None
                                                and gemma_masked(shape, st, layer))
    repeated = kernel in ("math", "eager") or (kernel == "efficient" and masked)
    return shape.q_dim if repeated else shape.kv_dim


def lora_input_bytes(shape: Shape, st: Settings, names: list[str], n_in: int, kept: bool) -> int:
    """Per-token bytes LoRA adds by saving the input of the targeted modules among ``names`` (they share that input).
    PEFT casts x to the adapter dtype per module when the dtypes differ, each cast a separate saved copy; qtool
    and PEFT with matching dtypes save the shared input once, unless something else (``kept``) already saves it."""
    rb, _, ab, _ = widths(st)
    hit = [n for n in names if n in st.module_ranks(shape)]
    if not hit:
        return 0
    if st.is_hf and ab != rb:
        return len(hit) * ab * n_in
    return 0 if kept else rb * n_in


def _lora_copies(shape: Shape, st: Settings) -> int:
    """qtool: ``A.to(bf16)`` and ``(B * scale).to(bf16)`` of every adapted module, saved by the products using them."""
    ranks, lb = st.module_ranks(shape), widths(st)[3]
    return sum(alloc(lb * ranks[lin.name] * lin.n_in) + alloc(lb * lin.n_out * ranks[lin.name])
               for lin in layer_linears(shape) if lin.name in ranks)


def layers_saved_bytes(shape: Shape, st: Settings) -> int:
    """What all decoder layers keep for backward without checkpointing (layer 0 as ``first``); qtool's Gemma layers
    differ by layer (sliding or global), the others are alike."""
    if _gemma(shape, st):
        return sum(layer_saved_bytes(shape, st, first=i == 0, layer=i) for i in range(shape.n_layers))
    return (shape.n_layers - 1) * layer_saved_bytes(shape, st) + layer_saved_bytes(shape, st, first=True)


def layer_saved_bytes(shape: Shape, st: Settings, first: bool = False, layer: int | None = None) -> int:
    """Bytes one decoder layer keeps for backward (the Llama graph; gemma2/3 extra norms, qk-norm and plain MLPs
    included). ``first``: the first layer without checkpointing. In qtool its input (the embedding output) does not
    require grad, so its first norm saves nothing; in hf ``prepare_model_for_kbit_training`` enables input grads
    (``enable_input_require_grads``) and they stay on when checkpointing is switched off.

    Per token: each RMSNorm its fp32 input and fp32 rsqrt (4h + 4); flash/efficient SDPA q, k, v, out and the fp32
    logsumexp (rb(2q + 2kv) + 4nh) — out is o_proj's input — and an efficient kernel's fp32 copy of a mask (4s);
    SwiGLU gate, act(gate), up (3 rb f); per LoRA'd module its input (see lora_input_bytes) and x A^T (lb r).
    Math/eager attention add the fp32 probabilities (4 nh s per token) and keep repeated k/v. qtool also keeps the
    bf16 copies of A and B (not per token). On the GPU qtool keeps less: :func:`_fused_layer_saved`.
    qtool's Gemma layers (``layer``: which one; torch norms and GELU on every device): a boolean-masked SDPA on
    sliding layers at least a window long (k, v repeated); Gemma 2's explicit soft-capped attention keeps the
    ``(b, heads, s, s)`` scores three times: the tanh output (rb), the fp32 probabilities and their rb copy.
    """
    if fused(st) and not _gemma(shape, st):
        return _fused_layer_saved(shape, st, first)
    h, f, q, nh = shape.hidden, shape.intermediate, shape.q_dim, shape.n_heads
    T, s = st.batch_size * st.seq_len, st.seq_len
    rb, cb, _, lb = widths(st)
    ranks = st.module_ranks(shape)
    names = [lin.name for lin in layer_linears(shape)]
    attn_in, attn_out, mlp_in, mlp_out = _io_names(shape)
    per_norm = 4 * h + 4
    norms = shape.n_norms_per_layer * per_norm - (per_norm if first and st.profile == "qtool" else 0)
    if shape.qk_norm:
        norms += 4 * (q + shape.kv_dim) + 4 * (nh + shape.n_kv_heads)
    kernel = attention_kernel(shape, st, layer)
    kv = _kv_saved(shape, st, kernel, layer)
    fa2_casts = st.attention == "flash" and rb != cb  # flash_attention_2 keeps 16-bit copies; out returns in rb
    layer_mask = 0
    if kernel in ("flash", "efficient"):
        mask = 4 * s if sdpa_mask_bytes(shape, st) else 0  # convert_boolean_attn_mask, per call, [b, 1, s, s] fp32
        attn = (cb if fa2_casts else rb) * (2 * q + 2 * kv) + 4 * nh + mask
        # qtool's window: SDPA's float copy of the shared (s, s) bool mask, per layer call, in the compute dtype
        layer_mask = cb * window_mask_bytes(shape, st)
    else:
        attn = rb * (q + 2 * kv) + 4 * nh * s + (2 * nh * s if kernel == "eager" and rb == 2 else 0)
        attn += rb * nh * s if _gemma(shape, st) and shape.attn_logit_softcapping else 0  # tanh(scores / cap)
    if first and methods.first_attention_frozen(st):
        attn = 0
    mlp = 3 * rb * f if shape.mlp == "gated" else rb * f
    lora = (lora_input_bytes(shape, st, attn_in, h, kept=False)
            + lora_input_bytes(shape, st, attn_out, q, kept=kernel in ("flash", "efficient") and not fa2_casts)
            + lora_input_bytes(shape, st, mlp_in, h, kept=False)
            + lora_input_bytes(shape, st, mlp_out, f, kept=False)
            + sum(lb * r for name, r in ranks.items() if name in names))
    # a Gemma sliding layer's SDPA keeps its boolean mask converted to the compute dtype, (s, s) per call
    converted = rb * s * s if _gemma(shape, st) and layer is not None and kernel in ("flash", "efficient") \
        and gemma_masked(shape, st, layer) else 0
    return (T * (norms + attn + mlp + lora) + layer_mask + (_lora_copies(shape, st) if st.profile == "qtool" else 0)
            + methods.layer_saved_extra(shape, st) + converted)


def _fused_layer_saved(shape: Shape, st: Settings, first: bool) -> int:
    """qtool on the GPU (qtool/train/fused.py, qtool/adapters/lora.py, qtool/train/model.py DecoderLayer), per token: each RMSNorm its
    bf16 input and fp32 rstd (2h + 4; the first norm's input is the layer input, not saved in layer 0, whose input
    needs no gradient); RoPE nothing (it keeps only cos and sin); flash SDPA q, k, v as they are (GQA not expanded),
    out and the fp32 logsumexp (2(2q + 2kv) + 4nh), out doubling as o_proj's input; SwiGLU gate and up (2 x 2f).
    Each group of adapted modules its shared input (attention input 2h, MLP input 2h, down_proj input 2f) and each
    adapted module x A^T (2r); the NF4 products keep nothing. Plus the bf16 copies of A and B (not per token).
    Qwen3's q/k norms keep their inputs and rstd per head; beyond a sliding window the memory-efficient kernel runs
    instead of flash, with k and v repeated to q's heads and a bf16 copy of the (s, s) mask per layer (the GPU
    window terms follow torch's SDPA code; no H200 record covers them yet)."""
    h, f, q, kv, nh = shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim, shape.n_heads
    ranks = st.module_ranks(shape)
    attn_in, _, mlp_in, mlp_out = _io_names(shape)
    shared = sum(width for names, width in ((attn_in, h), (mlp_in, h), (mlp_out, f))
                 if any(n in ranks for n in names))
    window = window_mask_bytes(shape, st)
    if window:  # the memory-efficient kernel: k and v repeated to q's heads, and its bf16 copy of the mask
        kv = q
    # qwen3's q/k norms: the Triton RMSNorm of each head keeps its bf16 input and an fp32 rstd (RoPE keeps nothing)
    qk_norms = 2 * (q + shape.kv_dim) + 4 * (nh + shape.n_kv_heads) if shape.qk_norm else 0
    per_token = ((0 if first else 2 * h) + 4 + 2 * (2 * q + 2 * kv) + 4 * nh + 2 * h + 4 + 2 * 2 * f
                 + 2 * shared + sum(2 * r for r in ranks.values()) + qk_norms)
    layer_mask = 0
    if first and methods.first_attention_frozen(st):
        per_token -= 4 + 2 * (2 * q + 2 * kv) + 4 * nh + qk_norms
    elif window:  # convert_boolean_attn_mask then padded to a multiple of 16 columns (aten preprocess_mask)
        layer_mask = alloc(2 * st.seq_len * -(-st.seq_len // 16) * 16)
    return (st.batch_size * st.seq_len * per_token + layer_mask + _lora_copies(shape, st)
            + methods.layer_saved_extra(shape, st))


def _fused_gate_up(shape: Shape) -> bool:
    """Phi-3's one gate_up_proj: the backward of its chunk into gate and up concatenates their two gradients into a
    new [T, 2f] tensor while both still exist (allocation trace, tests/test_plan.py)."""
    return any(lin.name == "gate_up_proj" for lin in layer_linears(shape))


def _io_names(shape: Shape) -> tuple[list[str], list[str], list[str], list[str]]:
    """Module names grouped by the input they share: attention input, attention output, MLP input, MLP output."""
    attn = [lin.name for lin in layer_linears(shape) if lin.group == "attn"]
    mlp = [lin.name for lin in layer_linears(shape) if lin.group == "mlp"]
    return attn[:-1], attn[-1:], mlp[:-1], mlp[-1:]


def head_saved_bytes(shape: Shape, st: Settings) -> int:
    """The final norm's saved tensors; the lm_head is frozen, so hf keeps nothing more. qtool's chunked
    cross-entropy saves the normed hidden states and the fp32 log-sum-exp of the b (s - 1) predicting positions
    (qtool/train/loss.py _ChunkedCrossEntropy); on the GPU the normed states are the norm's own output for batch 1 (a
    view) and a copy of its first s - 1 positions otherwise."""
    n = loss_tokens(st)
    if st.loss != "chunked":
        return final_norm_saved_bytes(shape, st)
    if fused(st):  # (Gemma too: its torch norm also returns a fresh bf16 tensor)
        kept = st.batch_size * st.seq_len if st.batch_size == 1 else n
        return final_norm_saved_bytes(shape, st) + alloc(2 * shape.hidden * kept) + alloc(4 * n)
    return final_norm_saved_bytes(shape, st) + n * (widths(st)[0] * shape.hidden + 4)


def final_norm_saved_bytes(shape: Shape, st: Settings) -> int:
    """fp32 input and rsqrt per token (the torch norms); on the GPU qtool's fused norm keeps the bf16 input (not
    Gemma's (1 + w) norm, which stays on the torch path)."""
    return st.batch_size * st.seq_len * ((2 if _fused_norms(shape, st) else 4) * shape.hidden + 4)


def _fused_norms(shape: Shape, st: Settings) -> bool:
    return fused(st) and not _gemma(shape, st)


def norm_backward_bytes(shape: Shape, st: Settings) -> int:
    """Temporaries of an RMSNorm's backward: the fp32 grad of x * rsqrt, its product with x for the rsqrt grad,
    the expanded grad of the mean and the grad through pow(2) — four fp32 [T, h] tensors at once (allocation
    trace of transformers' and qtool's rms_norm, tests/test_plan.py). The fused kernel writes only dx (bf16). Gemma's
    (1 + w) norm in qtool makes one more: the incoming gradient cast to fp32 before the weight's product."""
    per_token = 2 if _fused_norms(shape, st) else 4 * 4 + (2 if _gemma(shape, st) else 0)
    return per_token * shape.hidden * st.batch_size * st.seq_len


def position_bytes(shape: Shape, st: Settings) -> int:
    """cos and sin of the rotary embedding ([1, s, rotary_dim] each, hidden-state dtype) and int64 position ids;
    shared by all layers and alive for the whole step. qtool on the GPU keeps no position ids. Gemma 3 in qtool:
    a second cos/sin pair for the sliding layers' RoPE."""
    tables = 2 if _gemma(shape, st) and shape.rope_local else 1
    return st.seq_len * (2 * widths(st)[0] * shape.rotary_dim * tables + (0 if fused(st) else 8))


def loss_chunk_tokens(vocab: int, mib: int = 64) -> int:
    """Tokens per chunk of qtool's cross-entropy: the largest power of two whose fp32 logits fit ``mib`` MiB, at
    least 64 (= qtool.train.loss.loss_chunk_tokens; a test keeps them equal)."""
    return max(64, 2 ** int(math.log2(mib * 2**18 / vocab)))


def loss_tokens(st: Settings) -> int:
    """Positions the loss sees: qtool's loss drops each sequence's last position; transformers pads the labels."""
    return st.batch_size * (st.seq_len - 1) if st.loss == "chunked" else st.batch_size * st.seq_len


def loss_bytes(shape: Shape, st: Settings) -> int:
    """Transient of the loss at its backward, the largest moment of the head: the saved fp32 log-softmax, the fp32
    gradient from nll_loss and the fp32 gradient of log_softmax coexist: 12 bytes per token per vocabulary entry
    (transformers loss_utils.py ForCausalLMLoss; the logits are gone by then), plus the int64 shifted labels.
    Chunked (qtool/train/loss.py): a chunk's bf16 logits, their fp32 copy and the fp32 softmax (10 bytes per token per
    entry), plus the previous chunk's softmax while the next is computed (12 with more than one chunk), and the
    gradient of the hidden states, allocated whole."""
    n = loss_tokens(st)
    if st.loss == "chunked":
        chunk = loss_chunk_tokens(shape.vocab, st.loss_chunk_mib)
        per_entry = 12 if n > chunk else 10
        return per_entry * min(n, chunk) * shape.vocab + alloc(n * widths(st)[0] * shape.hidden)
    return 12 * n * shape.vocab + 8 * n


def dequantised_weight_bytes(lin: Linear, st: Settings) -> int:
    """The transient dequantised weight of one product (out x in, compute dtype); bitsandbytes' dequantize_4bit
    first rebuilds the fp32 absmax of a double-quantised weight, qtool's kernel fuses it. Lives for one matmul."""
    n = lin.n_in * lin.n_out
    absmax = 4 * -(-n // st.block_size) if st.double_quant and st.is_hf else 0
    return alloc(n * DTYPE_BYTES[st.compute_dtype]) + alloc(absmax)


def layer_backward_bytes(shape: Shape, st: Settings) -> tuple[int, str]:
    """(bytes, moment) of the largest transient while one layer runs backward, on top of its saved tensors.

    The incoming gradient of the layer output (rb h per token) lives throughout. Then the largest of:
    * MLP product backward: grads of act(gate)*up, of act(gate) and of up (3 rb f); down's LoRA input is freed;
    * down_proj LoRA backward: the base branch's input grad and the LoRA branch's (2 rb f) while down's input is kept;
    * down_proj base backward: its dequantised weight, the output grad cast to the compute dtype and the result;
    * attention backward: after the MLP tensors are freed, the grads of out, q, k, v (flash/efficient) or, for
      math/eager attention, s^2 fp32 tensors: the grad of the probabilities and of the scores, and on CUDA a third,
      ``grad * probs``, which aten's softmax backward materialises first (SoftMax.cu softmax_backward_cuda_out);
    * the post-attention RMSNorm's backward (norm_backward_bytes), the MLP freed but the norm's own input kept.
    Reentrant checkpointing (hf-prepare) adds, from the attention backward on, a second gradient of the hidden state
    (:func:`reentrant_residual_grad_bytes`).
    Checked against allocation traces of both profiles on the CPU (tests/test_plan.py); :func:`_fused_layer_backward`
    for qtool on the GPU.
    """
    if fused(st) and not (_gemma(shape, st) and shape.attn_logit_softcapping):  # Gemma 2: torch ops on the GPU too
        return _fused_layer_backward(shape, st)
    h, f, q, nh = shape.hidden, shape.intermediate, shape.q_dim, shape.n_heads
    T, s = st.batch_size * st.seq_len, st.seq_len
    rb, cb, _, _ = widths(st)
    _, _, mlp_in, mlp_out = _io_names(shape)
    down = next(lin for lin in layer_linears(shape) if lin.name == mlp_out[0])
    m_saved = lora_input_bytes(shape, st, mlp_out, f, kept=False) * T
    mlp_saved = ((3 if shape.mlp == "gated" else 1) * rb * f + 4 * h + 4) * T + m_saved \
        + lora_input_bytes(shape, st, mlp_in, h, kept=False) * T
    kernel = attention_kernel(shape, st)
    probs_grads = 3 if st.device == "cuda" else 2
    attention = (rb * (2 * q + 2 * _kv_saved(shape, st, kernel)) * T if kernel in ("flash", "efficient")
                 else probs_grads * 4 * nh * s * T)
    if _gemma(shape, st) and shape.attn_logit_softcapping:
        # Gemma 2's explicit attention (qtool/train/gemma.py) at its softmax backward, the largest moment: the fp32
        # gradient of the probabilities and the result (on CUDA also grad * probs), beside the saved tanh output and
        # fp32 probabilities; the compute-dtype probabilities were freed with probs @ v's backward (allocation trace
        # at seq 1024, where the scores dominate: 7.6 score-sized bf16 units on the CPU)
        attention = probs_grads * 4 * nh * s * T - rb * nh * s * T
    moments = {
        "MLP product backward": (3 if shape.mlp == "gated" else 2) * rb * f * T - m_saved
        + (2 * rb * f * T if _fused_gate_up(shape) else 0),
        "down_proj LoRA backward": 2 * rb * f * T if down.name in st.module_ranks(shape) else 0,
        "down_proj backward (dequantised weight)": dequantised_weight_bytes(down, st)
        + cb * (f + (h if rb != cb else 0)) * T,
        # Gemma: its post-attention and pre-feedforward norms' fp32 inputs are freed by then too (four norms a layer)
        "attention backward": attention + methods.attention_backward_extra(shape, st) - mlp_saved
        - (2 * (4 * h + 4) * T if _gemma(shape, st) else 0) + reentrant_residual_grad_bytes(shape, st),
        "post-attention RMSNorm backward": norm_backward_bytes(shape, st) - mlp_saved + 4 * h * T + 4 * T,
    }
    if _gemma(shape, st):
        # its layer output comes from the post-feedforward norm, back-propagated first; the norm's input gradient
        # then lives beside the residual's, and down_proj's LoRA input gradient beside its base product (traced)
        moments["post-feedforward RMSNorm backward"] = norm_backward_bytes(shape, st)
        moments["down_proj backward (dequantised weight)"] += rb * h * T + (
            rb * f * T if down.name in st.module_ranks(shape) else 0)
    moment = max(moments, key=moments.get)
    return rb * h * T + moments[moment], moment


def _fused_layer_backward(shape: Shape, st: Settings) -> tuple[int, str]:
    """qtool on the GPU: the incoming gradient of the layer output (2h per token) and the largest of
    * down_proj backward: the LoRA branch's input grad (2f, when down_proj is adapted), its dequantised weight
      (2hf) and the base branch's input grad (2f), added in place; down's saved input and x A^T are freed by then;
    * SwiGLU backward: the grad of its output and of gate and up (3 x 2f) beside the saved gate and up (Phi-3:
      and their concatenation into the gate_up_proj output's grad, 2 x 2f);
    * flash attention backward, the MLP's tensors freed: the grad of out (2q), of q, k, v (2q + 4kv), FA2's fp32 dq
      accumulator (4q) and softmax_d (4nh), and for GQA k and v grads expanded to q's heads before the sum (4q).
    The gate/up products come after SwiGLU with less (their weight replaces the freed gate and up)."""
    h, f, q, kv, nh = shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim, shape.n_heads
    T = st.batch_size * st.seq_len
    ranks = st.module_ranks(shape)
    _, _, mlp_in, mlp_out = _io_names(shape)
    down = next(lin for lin in layer_linears(shape) if lin.name == mlp_out[0])
    r_down = ranks.get(down.name, 0)
    down_saved = (2 * f + 2 * r_down) * T if r_down else 0
    mlp_saved = (2 * h + 4 + 4 * f + (2 * h if any(n in ranks for n in mlp_in) else 0)
                 + sum(2 * ranks.get(n, 0) for n in mlp_in)) * T + down_saved
    gqa = 4 * q if shape.n_kv_heads != nh else 0
    moments = {
        "down_proj backward (dequantised weight)": (4 * f if r_down else 2 * f) * T
        + dequantised_weight_bytes(down, st) - down_saved,
        "SwiGLU backward": 6 * f * T - down_saved + (4 * f * T if _fused_gate_up(shape) else 0),
        "attention backward": (2 * q + 2 * q + 4 * kv + 4 * q + 4 * nh + gqa) * T - mlp_saved
        + methods.attention_backward_extra(shape, st),
    }
    moment = max(moments, key=moments.get)
    return 2 * h * T + moments[moment], moment


def layer_grad_bytes(shape: Shape, st: Settings) -> int:
    """LoRA gradients that exist at the layer's largest backward moment: those of its MLP modules (the MLP is
    back-propagated first; the attention adapters' grads come after that moment)."""
    ranks = st.module_ranks(shape)
    return sum(alloc(ranks[lin.name] * (lin.n_in + lin.n_out) * DTYPE_BYTES[st.adapter_dtype])
               for lin in layer_linears(shape) if lin.group == "mlp" and lin.name in ranks)


def checkpoint_bytes(shape: Shape, st: Settings) -> int:
    """Gradient checkpointing keeps each decoder layer's input hidden state (rb h per token per layer)."""
    return shape.n_layers * st.batch_size * st.seq_len * widths(st)[0] * shape.hidden


def recompute_bytes(shape: Shape, st: Settings) -> int:
    """Under checkpointing, the layer being back-propagated is recomputed and its saved tensors live again, less the
    norm input when that is the checkpointed input itself (hf: the fp32 input; qtool's fused norm: the bf16 input).
    qtool and hf checkpoint non-reentrantly (qtool/train/model.py passes use_reentrant=False; transformers'
    gradient_checkpointing_enable() without kwargs does), which stops recomputing once the last saved tensor is back,
    so the layer output is not rebuilt; hf-prepare rebuilds it too (:func:`reentrant_output_bytes`)."""
    rb, T = widths(st)[0], st.batch_size * st.seq_len
    shared = rb * shape.hidden * T if rb == 4 or _fused_norms(shape, st) else 0
    if _gemma(shape, st):  # the largest of its layers (sliding and global ones differ)
        return max(layer_saved_bytes(shape, st, layer=i) for i in range(shape.n_layers)) - shared
    return layer_saved_bytes(shape, st) - shared


def reentrant_output_bytes(shape: Shape, st: Settings) -> int:
    """hf-prepare checkpoints reentrantly: prepare_model_for_kbit_training passes gradient_checkpointing_kwargs={},
    which transformers forwards as is, and torch's checkpoint without use_reentrant takes the reentrant
    CheckpointFunction. Its backward reruns the whole layer under enable_grad, output included, and holds that output
    (rb h per token) through the layer's inner backward (torch/utils/checkpoint.py CheckpointFunction.backward:
    ``outputs`` lives until it returns). Its forward keeps the same layer inputs as the non-reentrant one and nothing
    else, so this is the only difference between the two recipes (allocation traces of both, tests/test_plan.py)."""
    return widths(st)[0] * shape.hidden * st.batch_size * st.seq_len if st.reentrant_checkpointing else 0


def reentrant_residual_grad_bytes(shape: Shape, st: Settings) -> int:
    """hf-prepare: the gradient of the attention block's output (rb h per token) is a new tensor beside the layer's
    incoming gradient. The residual add hands that incoming gradient on as it is, and autograd adds the post-attention
    norm's gradient to it in place when nothing else holds it (non-reentrant: the engine's buffer alone). Under
    reentrant checkpointing CheckpointFunction.backward still holds it (its ``args``, passed to the inner backward), so
    the sum is made out of place and both live through the attention backward (allocation trace: +2 hidden states
    against hf at that moment, +1 at the MLP's)."""
    return reentrant_output_bytes(shape, st)


def mask_bytes(shape: Shape, st: Settings) -> int:
    """The attention mask the model builds once per forward and every checkpointed layer call keeps: eager
    attention's additive causal mask [b, 1, s, s] in the hidden-state dtype, or sdpa's boolean sliding-window mask
    (transformers masking_utils; :func:`sdpa_mask_bytes`)."""
    if _gemma(shape, st):
        return gemma_mask_bytes(shape, st)
    if st.attention == "eager":
        return st.batch_size * st.seq_len ** 2 * widths(st)[0]
    return sdpa_mask_bytes(shape, st) + window_mask_bytes(shape, st)


def gemma_mask_bytes(shape: Shape, st: Settings) -> int:
    """qtool's Gemma masks, (s, s) and shared by the batch (qtool/train/gemma.py GemmaDecoder.attention_mask): Gemma
    2's explicit attention adds one per distinct window (sliding and global: two) in the compute dtype; Gemma 3's
    SDPA gets a boolean one for its sliding layers when the sequence is at least a window long."""
    s = st.seq_len
    if shape.attn_logit_softcapping:
        return len({shape.window(i) for i in range(shape.n_layers)}) * s * s * widths(st)[0]
    return s * s if any(gemma_masked(shape, st, i) for i in range(shape.n_layers)) else 0

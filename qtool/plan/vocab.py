"""The bytes LoRA on ``embed_tokens`` and ``lm_head`` adds to a training step, beyond its factors, gradients and
optimizer state (those are counted with the other LoRA tensors: :meth:`qtool.adapters.spec.AdapterSpec.vocab_tensors`).
Pure Python. Symbols: T = b·s tokens, n = the positions the loss sees, V vocab, h hidden, r the rank, cb/ab the
compute/adapter dtype bytes.

Read from the code that runs:

* qtool (qtool/adapters/vocab.py, qtool/train/loss.py). Embedding: the fp32 token rows of A, ``(T, r)``, saved by
  the product with B. Head: ``u = s·h Aᵀ`` ``(n, r)`` and B in the compute dtype, saved by the chunked loss, and the
  scaled A ``(r, h)`` saved by its product (h itself is the loss's own saved input). The chunked loss adds the head's
  update inside each chunk's logits buffer (``addmm``), so no logits-sized tensor is added; its backward holds B's fp32
  gradient accumulator ``(V, r)``, one chunk's ``gᵀ u`` ``(V, r)`` and u's gradient ``(n, r)``.
* hf (peft 0.21 ``tuners/lora/layer.py`` ``Linear.forward`` / ``Embedding.forward``; the head and embeddings fp32
  after ``prepare_model_for_kbit_training``). Head: ``result + lora_B(lora_A(x)) * scaling`` makes two more fp32
  logits-sized tensors, ``lora_B``'s output and its scaled copy, while the base logits exist: 12 T V bytes at that
  moment of the forward (the add's output replaces lora_B's); saved: lora_A's input (fp32 hidden states, which the
  frozen head alone does not keep) and lora_B's ``(T, r)``. Embedding: the token rows of A ``(T, r)`` saved.
  ``prepare_model_for_kbit_training``'s ``enable_input_require_grads`` makes the base rows ``(T, h)`` fp32 a tensor
  that requires grad: the autograd graph holds it to the end of the backward (traced on the CPU).
* Both: the embedding's backward runs last and makes the dense gradient of A ``(V, r)`` fp32 and, through the fp32
  sum, the fp32 gradient of the rows ``(T, h)`` twice (the add's and the scaled product's), beside every other
  adapter gradient.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from qtool.plan.resident import DTYPE_BYTES, alloc

if TYPE_CHECKING:
    from qtool.arch import Shape
    from qtool.plan.settings import Settings


def _ranks(shape: Shape, st: Settings) -> dict[str, int]:
    return st.spec.vocab_ranks(shape) if st.method == "lora" else {}


def embed_saved_bytes(shape: Shape, st: Settings) -> int:
    """The embedding LoRA's token rows of A, fp32 in qtool (summed in fp32) and the adapter dtype in hf; hf also
    keeps the base rows (module docstring)."""
    r = _ranks(shape, st).get("embed_tokens")
    if not r:
        return 0
    T = st.batch_size * st.seq_len
    if st.profile == "qtool":
        return alloc(4 * r * T)
    # hf: enable_input_require_grads makes the base rows a leaf that requires grad; the sum's AccumulateGrad node
    # holds them (fp32, T x h) until the backward is done
    return alloc(DTYPE_BYTES[st.adapter_dtype] * r * T) + alloc(4 * shape.hidden * T)


def head_saved_bytes(shape: Shape, st: Settings, n_loss: int) -> int:
    """What the head LoRA keeps for backward (module docstring); ``n_loss``: the positions the loss sees."""
    r = _ranks(shape, st).get("lm_head")
    if not r:
        return 0
    cb, ab, T = DTYPE_BYTES[st.compute_dtype], DTYPE_BYTES[st.adapter_dtype], st.batch_size * st.seq_len
    if st.is_hf:
        return alloc(4 * shape.hidden * T) + alloc(ab * r * T)
    b_copy = alloc(cb * shape.vocab * r) if cb != ab else 0  # B.to(compute dtype): a view when equal
    return alloc(cb * r * n_loss) + b_copy + alloc(cb * r * shape.hidden)


def head_loss_bytes(shape: Shape, st: Settings, n_loss: int) -> int:
    """qtool's chunked loss backward with a head LoRA: B's fp32 gradient accumulator, one chunk's ``gᵀ u`` and u's
    gradient (hf's head backward needs less than its cross-entropy backward: nothing is added there)."""
    r = _ranks(shape, st).get("lm_head")
    if not r or st.is_hf:
        return 0
    cb = DTYPE_BYTES[st.compute_dtype]
    return alloc(4 * shape.vocab * r) + alloc(cb * shape.vocab * r) + alloc(cb * r * n_loss)


def head_forward_bytes(shape: Shape, st: Settings) -> int:
    """hf: the logits-sized moment of the head LoRA's forward, 12 T V bytes (module docstring); 0 in qtool."""
    if not _ranks(shape, st).get("lm_head") or not st.is_hf:
        return 0
    return 3 * alloc(4 * st.batch_size * st.seq_len * shape.vocab)


def embed_backward_bytes(shape: Shape, st: Settings) -> int:
    """The embedding LoRA's backward, the last of the step: the incoming gradient of the rows (hidden-state dtype),
    two fp32 ``(T, h)`` gradients, the rows' gradient ``(T, r)``, B's ``(h, r)`` and A's dense ``(V, r)``."""
    r = _ranks(shape, st).get("embed_tokens")
    if not r:
        return 0
    T, h = st.batch_size * st.seq_len, shape.hidden
    rb = 4 if st.is_hf else DTYPE_BYTES[st.compute_dtype]
    return alloc(rb * T * h) + 2 * alloc(4 * T * h) + alloc(4 * T * r) + alloc(4 * h * r) + alloc(4 * shape.vocab * r)


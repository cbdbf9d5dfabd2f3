"""Model FLOPs of one LoRA training step, and the achieved TFLOP/s of a bench row: one count for every profile.

Convention (a multiply-add is 2 FLOPs; T = batch x seq tokens; a "forward pass" is the forward, plus one more for
the recomputed forward when every decoder layer is checkpointed, so the count includes the recompute):

* frozen NF4 Linears of the decoder layers, N = ``Shape.n_linear_params()``: 2·N·T per forward pass, and 2·N·T in
  the backward (the input gradient; a frozen weight has no weight gradient).
* the output head, V x h (tied or not): 2·V·h·T forward and 2·V·h·T input gradient. It lies outside the
  checkpointed layers, so it is never recomputed.
* LoRA on each targeted Linear (n_in -> n_out, rank r): 2·r·(n_in + n_out)·T per forward pass (x·Aᵀ, then ·Bᵀ), and
  twice that in the backward (the input gradient, and the gradients of A and B).
* attention, Q·Kᵀ and P·V: 4·b·s²·(n_heads·head_dim) per layer per forward pass when every query sees every key;
  causal masking halves it (s²/2 query-key pairs, the half flash kernels compute), a window w of a sliding layer
  leaves s·w - w²/2 pairs. The backward counts twice the forward (dQ, dK from dS; dV, dP); a kernel's own
  recomputation of the scores in its backward is not counted.
* not counted: norms, RoPE, SwiGLU, softmax, the loss, the optimizer, NF4 dequantisation (elementwise work).

This is MFU's model FLOPs with the recompute included (what the GPU is made to multiply, not what the result needs).
"""
from __future__ import annotations

# The dense bf16 peak each row is compared with, TFLOP/s, by the name torch.cuda.get_device_name() gives. H200: the
# ~790 that issue 11 states (NVIDIA's datasheet gives 989 for the SXM part, 835 for NVL); one place to change it.
PEAK_BF16_TFLOPS = {"NVIDIA H200": 790.0}

# Target sets by the names bench configurations use (other values: comma-separated module names).
TARGETS = {"qkvo": ("q_proj", "k_proj", "v_proj", "o_proj"),
           "all-linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}


def target_names(targets) -> tuple[str, ...]:
    if isinstance(targets, str):
        return TARGETS.get(targets, tuple(t.strip() for t in targets.split(",") if t.strip()))
    return tuple(targets)


def attended_pairs(seq_len: int, window: int | None) -> float:
    """Query-key pairs one causal attention head computes over a sequence: s²/2 (the convention above, not
    s(s+1)/2), or s·w - w²/2 within a window of w < s keys."""
    s, w = seq_len, window
    return s * s / 2 if w is None or w >= s else s * w - w * w / 2


def step_flops(shape, seq_len: int, batch_size: int = 1, rank: int = 16, targets="qkvo",
               grad_checkpointing: bool = True) -> dict[str, float]:
    """FLOPs of one optimizer step (one micro-batch) by term: ``linear``, ``head``, ``lora``, ``attention`` and
    ``total`` (the module docstring's convention). ``shape`` is a :class:`qtool.arch.Shape`."""
    b, s, T, r = batch_size, seq_len, batch_size * seq_len, rank
    n_passes = 2 if grad_checkpointing else 1  # forward passes: the forward, and the recompute under checkpointing
    names = set(target_names(targets))
    adapted = [lin for lin in shape.linears() if lin.name in names]
    unknown = names - {lin.name for lin in shape.linears()}
    if unknown:
        raise ValueError(f"targets {sorted(unknown)} are not Linears of a {shape.model_type} layer")
    lora_per_token = shape.n_layers * sum(2 * r * (lin.n_in + lin.n_out) for lin in adapted)
    attn_forward = sum(4 * b * attended_pairs(s, shape.window(i)) * shape.q_dim for i in range(shape.n_layers))
    terms = {"linear": 2 * shape.n_linear_params() * T * (n_passes + 1),
             "head": 2 * shape.vocab * shape.hidden * T * 2,
             "lora": lora_per_token * T * (n_passes + 2),
             "attention": attn_forward * (n_passes + 2)}
    terms["total"] = sum(terms.values())
    return terms


def achieved_tflops(flops: float, step_seconds: float) -> float:
    return flops / step_seconds / 1e12


def peak_tflops(gpu_name: str) -> float | None:
    return PEAK_BF16_TFLOPS.get(gpu_name)

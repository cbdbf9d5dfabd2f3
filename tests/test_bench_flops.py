"""bench/flops.py: the model FLOPs every bench row divides by its step time, against counts made by hand."""
import pytest

from bench.flops import achieved_tflops, attended_pairs, step_flops
from qtool.arch import Shape, known_shape

# One layer: hidden 8, MLP 16, 2 heads of 4, vocab 10, untied. Per layer q, k, v, o are 8x8 (64 each) and gate, up,
# down 8x16 (128 each): N = 4*64 + 3*128 = 640 linear weights.
TOY = Shape(name="toy", model_type="llama", hidden=8, intermediate=16, n_layers=1, n_heads=2, n_kv_heads=2,
            head_dim=4, vocab=10, tied_embeddings=False)


def test_toy_step_counted_by_hand():
    # seq 4, batch 1 (T = 4), LoRA rank 2 on q, k, v, o, checkpointing on: two forward passes.
    f = step_flops(TOY, seq_len=4, batch_size=1, rank=2, targets="qkvo", grad_checkpointing=True)
    assert f["linear"] == 3 * 2 * 640 * 4             # forward + recompute + input gradient, 2 FLOPs per MAC
    assert f["head"] == 2 * 2 * 10 * 8 * 4            # forward + input gradient of the 10x8 head
    # each adapted 8->8 module: x·Aᵀ (8x2) then ·Bᵀ (2x8) = 32 MACs per token; 4 modules, 4 tokens
    lora_pass = 2 * 4 * 32 * 4
    assert f["lora"] == 2 * lora_pass + 2 * lora_pass  # two forward passes; backward = input grad + A, B grads
    # Q·Kᵀ and P·V over 4x4 scores halved by the causal mask, 8 = 2 heads x 4 dims: 2 * (2 * 8 * 16 / 2) FLOPs
    attn_pass = 4 * 16 / 2 * 8
    assert f["attention"] == 2 * attn_pass + 2 * attn_pass  # forward + recompute; backward twice a forward
    assert f["total"] == 15360 + 1280 + 4096 + 1024 == 21760


def test_without_checkpointing_there_is_no_recompute():
    on = step_flops(TOY, 4, rank=2, grad_checkpointing=True)
    off = step_flops(TOY, 4, rank=2, grad_checkpointing=False)
    assert off["linear"] == on["linear"] * 2 / 3
    assert off["head"] == on["head"]
    assert off["lora"] == on["lora"] * 3 / 4
    assert off["attention"] == on["attention"] * 3 / 4


def test_llama_2_7b_at_2048():
    """The issue's main row: 6.48e9 frozen linear weights x 2048 tokens x 6, plus head, LoRA, attention."""
    shape = known_shape("llama-2-7b")
    f = step_flops(shape, 2048, 1, 16, "qkvo", True)
    n = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert f["linear"] == 6 * n * 2048
    assert f["head"] == 4 * 32000 * 4096 * 2048
    assert f["lora"] == 4 * 32 * 4 * 2 * 16 * (4096 + 4096) * 2048
    assert f["attention"] == 4 * 32 * 2 * 2048 ** 2 * 4096
    assert f["total"] == f["linear"] + f["head"] + f["lora"] + f["attention"] == pytest.approx(8.532e13, rel=1e-4)
    # qtool's 0.168 s per step at this shape (bench/results/train_7b_h200_2026-12-03.jsonl): ~508 TFLOP/s
    assert achieved_tflops(f["total"], 0.168) == pytest.approx(507.9, rel=1e-3)


def test_sliding_window_and_target_names():
    assert attended_pairs(8, None) == attended_pairs(8, 8) == 32
    assert attended_pairs(8, 2) == 14  # s·w - w²/2 (a query sees min(i + 1, w) keys: 15 exactly)
    # mistral-7b and llama-3-8b differ only in the vocabulary and Mistral's window of 4096
    mistral = step_flops(known_shape("mistral-7b"), 8192, targets="q_proj,v_proj")
    llama = step_flops(known_shape("llama-3-8b"), 8192, targets="q_proj,v_proj")
    assert mistral["attention"] / llama["attention"] == (8192 * 4096 - 4096 ** 2 / 2) / (8192 ** 2 / 2)
    assert mistral["lora"] == llama["lora"] and mistral["linear"] == llama["linear"]
    with pytest.raises(ValueError, match="gatex"):
        step_flops(TOY, 4, targets="q_proj,gatex")

"""What merging buys at inference: per-token decode latency and prefill throughput of the base model, the merged
model (same structure as the base, weights W0 + dW) and the unmerged bypass (peft LoRA beside each layer).

    python bench/merge_latency.py --out bench/results/merge_latency_h200.json     # H200: Llama-2-7B shapes, bf16
    python bench/merge_latency.py --smoke --out /tmp/merge_latency_smoke.json    # CPU: tiny model, seconds

Model: Llama-2-7B's shapes (hidden 4096, 32 layers, FFN 11008, 32 heads, vocab 32000) with random weights in bf16
(latency does not depend on the values). Bypass: peft LoRA r=16, alpha 32, on q, k, v, o_proj, random non-zero A and
B, dropout 0, not merged. Merged: the same adapter folded in by peft ``merge_and_unload`` (plain nn.Linear again).
The three models live on the GPU together and are measured in interleaved rounds, so clock or thermal drift hits
all three alike.

* decode: batch 1, a 512-token prompt, then 128 greedy steps with the KV cache; each step is timed with CUDA events
  (the next token is picked on the GPU, nothing synchronises inside the loop, so the time between events includes
  any launch gaps, i.e. it is the latency a user sees); we report the median over all steps of all rounds.
* prefill: batch 1, 2048 tokens, no cache; tokens/s of the median round.

Rounds rotate the order of the three models; the per-round medians are in the JSON, so the spread of base against
merged shows what "equal within noise" means on that machine.

Needs torch, transformers and peft only (no bitsandbytes). Prints a short table last; writes JSON to ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def model_config(smoke: bool):
    from transformers import LlamaConfig

    if smoke:
        return LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)


class Timer:
    """CUDA events on a GPU (stream time, no host sync inside the measured loop); perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


@torch.inference_mode()
def decode_ms(model, prompt: torch.Tensor, n_new: int) -> list[float]:
    """Milliseconds of each of ``n_new`` decode steps after prefilling ``prompt`` (batch 1, KV cache, greedy)."""
    out = model(prompt, use_cache=True)
    cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    timer = Timer(prompt.device)
    timer.mark()
    for _ in range(n_new):
        out = model(tok, past_key_values=cache, use_cache=True)
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        timer.mark()
    return timer.intervals_ms()


@torch.inference_mode()
def prefill_ms(model, ids: torch.Tensor) -> float:
    timer = Timer(ids.device)
    timer.mark()
    model(ids, use_cache=False)
    timer.mark()
    return timer.intervals_ms()[0]


def build(args, device: torch.device):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with device:
        base = LlamaForCausalLM(model_config(args.smoke)).to(torch.bfloat16).eval()
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      lora_dropout=0.0, init_lora_weights=False)  # False: random A and B, a non-trivial update
    bypass = get_peft_model(copy.deepcopy(base), lora).eval()
    with torch.no_grad():  # a QLoRA-sized update (|dW|/|W0| ~ 1%) instead of init's large random B
        for name, p in bypass.named_parameters():
            if "lora_B" in name:
                p.mul_(args.b_scale)
    merged = copy.deepcopy(bypass).merge_and_unload().eval()
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    return {"base": base, "merged": merged, "bypass": bypass}


def summary(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=10) if len(values) >= 2 else [values[0]] * 9
    return {"median": statistics.median(values), "p10": q[0], "p90": q[-1], "n": len(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU (checks the script, not the figures)")
    ap.add_argument("--out", required=True, type=Path, help="where to write the JSON results")
    ap.add_argument("--prompt", type=int, default=None, help="decode prompt length [512; smoke 32]")
    ap.add_argument("--new-tokens", type=int, default=None, help="decode steps per round [128; smoke 8]")
    ap.add_argument("--prefill", type=int, default=None, help="prefill length [2048; smoke 64]")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved measurement rounds [6; smoke 3]")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--b-scale", type=float, default=0.01, help="multiplier on peft's random lora_B init")
    args = ap.parse_args()
    prompt_len = args.prompt or (32 if args.smoke else 512)
    n_new = args.new_tokens or (8 if args.smoke else 128)
    prefill_len = args.prefill or (64 if args.smoke else 2048)
    rounds = args.rounds or (3 if args.smoke else 6)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if not args.smoke and device.type != "cuda":
        raise SystemExit("no CUDA device: run with --smoke on the CPU")
    t0 = time.perf_counter()
    models = build(args, device)
    print(f"built 3 models in {time.perf_counter() - t0:.1f} s", flush=True)
    vocab = models["base"].config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=g).to(device)
    long = torch.randint(0, vocab, (1, prefill_len), generator=g).to(device)
    # sanity: the merged weights carry the update (bf16 rounding of W0 + dW keeps most of a 1% update)
    layer = models["bypass"].base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        w0 = layer.base_layer.weight.float()
        dw = layer.get_delta_weight("default").float()
        e = models["merged"].model.layers[0].self_attn.q_proj.weight.float() - w0
    kept = float((e * dw).sum() / (dw * dw).sum())
    dw_rel = float(dw.norm() / w0.norm())
    for m in models.values():  # warm-up over the full lengths: kernels, allocator, cuBLAS heuristics per shape
        decode_ms(m, prompt, n_new)
        prefill_ms(m, long)
    names = list(models)
    dec = {k: [] for k in models}
    pre = {k: [] for k in models}
    rounds_ms = {k: [] for k in models}  # median decode step of each round: the spread says what noise is
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate, so no model always follows another
        for name in order:
            steps = decode_ms(models[name], prompt, n_new)
            dec[name] += steps
            rounds_ms[name].append(statistics.median(steps))
            pre[name].append(prefill_ms(models[name], long))
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {rounds_ms[k][-1]:.2f} ms/token" for k in names),
              flush=True)
    results = {k: {"decode_ms_per_token": summary(dec[k]), "decode_round_medians_ms": rounds_ms[k],
                   "prefill_tokens_per_s": prefill_len / (statistics.median(pre[k]) / 1e3),
                   "prefill_ms": summary(pre[k])} for k in models}
    base_dec = results["base"]["decode_ms_per_token"]["median"]
    base_pre = results["base"]["prefill_tokens_per_s"]
    for k in models:
        results[k]["decode_vs_base_pct"] = 100 * (results[k]["decode_ms_per_token"]["median"] / base_dec - 1)
        results[k]["prefill_vs_base_pct"] = 100 * (results[k]["prefill_tokens_per_s"] / base_pre - 1)
    import peft
    import transformers

    record = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "model": "tiny llama (smoke)" if args.smoke else "Llama-2-7B shapes, random weights", "dtype": "bfloat16",
        "settings": {"prompt": prompt_len, "new_tokens": n_new, "prefill": prefill_len, "rounds": rounds,
                     "lora_rank": args.rank, "lora_targets": "q,k,v,o_proj", "lora_b_scale": args.b_scale,
                     "batch": 1},
        "layer0_q_proj": {"dw_rel": dw_rel, "dw_kept_in_merged_bf16": kept},
        "results": results, "seconds": time.perf_counter() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\n{record['model']} on {record['device']}, batch 1; decode after a {prompt_len}-token prompt, "
          f"prefill of {prefill_len} tokens; layer-0 q_proj: |dW|/|W0| = {dw_rel:.1e}, share of dW in the merged "
          f"bf16 weight {kept:.3f}")
    print(f"{'model':<8} {'decode ms/token':>16} {'vs base':>8} {'prefill tok/s':>14} {'vs base':>8}")
    for k, v in results.items():
        print(f"{k:<8} {v['decode_ms_per_token']['median']:>16.2f} {v['decode_vs_base_pct']:>+7.1f}% "
              f"{v['prefill_tokens_per_s']:>14,.0f} {v['prefill_vs_base_pct']:>+7.1f}%")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

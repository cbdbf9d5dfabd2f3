"""LoRA vs Houlsby adapters vs prefix tuning at equal trainable parameters: quality on the CPU, speed and memory on a
GPU. Two parts, each writing JSON and printing a short table last.

    python bench/methods_compare.py cpu --out bench/results/methods_compare_cpu.json      # (a) ~1-2 h, 2 cores
    python bench/methods_compare.py cpu --steps 60 --seq-len 128 --eval-every 15 --eval-blocks 8 --warmup-steps 5 \
        --no-checkpointing                     # (a) short: ~12 min on the shared 2-core machine (the committed result)
    python bench/methods_compare.py gpu --out-dir data/methods                           # (b) one H200, < 4 min
    python bench/methods_compare.py gpu --smoke --out-dir /tmp/methods_smoke              # (b)'s code on the CPU
    bash bench/device/methods_h200.sh                                                     # (b) as one device call

The budget: LoRA rank ``--rank`` on q,k,v,o, and the adapter size and prefix length whose trainable counts are
nearest to it (``qtool.plan.methods.matched_specs``, what ``qtool plan --compare-methods`` prints).

(a) ``cpu``: the SmolLM2-135M fixture converted to NF4 by ``qtool convert``, Shakespeare packed into ``--seq-len``
blocks, each run through ``qtool.train.recipe.run`` (what ``qtool train --method ...`` does: the prefix starts from
the keys/values of the text's first tokens) with the same seed, data order, steps, batch, warm-up, optimizer (torch
AdamW) and held-out blocks; the held-out loss every ``--eval-every`` steps. ``--runs`` lists ``method@lr`` pairs
(one learning rate for all by default: no per-method tuning). Writes the JSON, a PNG of the held-out curves and
the training loss (running mean of 10 steps) beside it.

(b) ``gpu``: each of ``--models`` (default: a Llama-2-7B-shaped model and SmolLM2-135M's shape) with random weights;
one JSON per model, ``OUT_DIR/<model>.json``.
  * training: qtool's trainer (random NF4 weights made on the GPU, paged AdamW 32-bit, checkpointing, CUDA graph),
    ``--train-steps`` steps of ``--train-seq`` tokens per method: tokens/s (median step after the graph capture),
    peak allocated/reserved, and ``qtool plan``'s peak allocated for the same settings (its error in %);
  * inference: transformers' LlamaForCausalLM in bf16 (random weights; latency does not depend on them), batch 1:
    ``base``; ``lora-merged`` (PEFT merge_and_unload); ``lora-unmerged`` (PEFT LoRA beside q,k,v,o); ``adapter``
    (qtool's HoulsbyAdapter after o_proj and down_proj of every layer, bf16, random non-zero up-projection);
    ``prefix`` (``l`` key/value vectors per layer in the KV cache before the prompt, as PEFT's PREFIX_TUNING runs:
    a DynamicCache, transformers' mask and positions). Decode: per-token latency after a 512-token prompt, 128
    greedy steps timed with CUDA events, median over interleaved rounds; prefill: tokens/s of 2048 tokens.
  The JSONs are what ``qtool plan`` reads from data/methods/ to show measured decode latency per method (the record
  whose ``model`` is the planned shape's name).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def _budget(shape, rank: int):
    from qtool.adapters.spec import AdapterSpec
    from qtool.plan.methods import matched_specs

    return matched_specs(shape, AdapterSpec(targets="qkvo", rank=rank, alpha=2 * rank))


def _size_kw(spec) -> dict:
    if spec.method == "adapter":
        return {"adapter_size": spec.adapter_size}
    if spec.method == "prefix":
        return {"prefix_len": spec.prefix_len}
    if spec.method == "adalora":  # TrainSettings takes AdaLoRA's ranks as init_rank/target_rank (rank is LoRA's)
        return {"init_rank": spec.rank, "target_rank": spec.adalora.target_rank, "alpha": spec.alpha,
                "targets": spec.targets}
    return {"rank": spec.rank, "alpha": spec.alpha, "targets": spec.targets}


# ------------------------------------------------------------------------------------------------------ (a) CPU
def _plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        steps, losses = zip(*r["eval_curve"])
        ax.plot(steps, losses, marker="o", label=f"{r['name']} ({r['trainable_params']:,})")
        tl = r["losses"]
        smooth = [sum(tl[max(0, i - 9):i + 1]) / len(tl[max(0, i - 9):i + 1]) for i in range(len(tl))]
        bx.plot(range(1, len(tl) + 1), smooth, label=r["name"])
    ax.set(xlabel="step", ylabel="held-out loss", title=title)
    ax.legend(fontsize=8)
    bx.set(xlabel="step", ylabel="training loss (running mean of 10 steps)", title="training loss")
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_cpu(args) -> None:
    import torch
    import transformers

    from tools import fixtures
    from qtool.convert.pipeline import convert
    from qtool.train.recipe import TrainSettings, run
    from qtool.train.settings import read_shape

    src, text = fixtures.smollm2(), fixtures.shakespeare()
    folder = (args.cache or fixtures.cache_dir() / "bench-methods") / "smollm2-nf4"
    if not (folder / "qtool_report.json").exists():
        print(f"converting {src} -> {folder}", file=sys.stderr, flush=True)
        convert(src, folder, overwrite=True)
    shape = read_shape(folder)
    specs = _budget(shape, args.rank)
    results = []
    for item in args.runs.split(","):
        method, _, lr = item.partition("@")
        spec = specs[method]
        st = TrainSettings(method=method, steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size,
                           lr=float(lr or args.lr), warmup_steps=args.warmup_steps, eval_blocks=args.eval_blocks,
                           eval_every=args.eval_every, grad_checkpointing=not args.no_checkpointing,
                           optimizer="adamw_torch", seed=args.seed, **_size_kw(spec))
        print(f"{item}: {spec.describe()}, {args.steps} steps ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()

        def progress(step, loss, seconds):
            if (step + 1) % 10 == 0:
                print(f"  step {step + 1}: loss {loss:.3f} ({seconds:.1f} s)", file=sys.stderr, flush=True)

        res = run(folder, text, None, st, progress=progress)
        results.append({"name": item if "@" in item else f"{method}@{st.lr:g}", "method": method,
                        "config": spec.describe(), "lr": st.lr, "trainable_params": res.trainable_params,
                        "eval_loss_before": res.eval_loss_before, "eval_loss_after": res.eval_loss,
                        "eval_curve": res.eval_curve, "losses": res.losses,
                        "seconds_per_step": statistics.median(res.step_seconds),
                        "train_seconds": time.perf_counter() - t0, "compute_dtype": res.compute_dtype})
        _write(args.out, _cpu_record(args, torch, transformers, shape, results))  # partial results survive
    _plot(results, args.out.with_suffix(".png"),
          f"SmolLM2-135M NF4 on Shakespeare, seq {args.seq_len} x batch {args.batch_size}: held-out loss")
    print(f"\nSmolLM2-135M NF4, Shakespeare, {args.steps} steps of {args.batch_size} x {args.seq_len} tokens, "
          f"budget of LoRA r={args.rank} on q,k,v,o; CPU timings on a shared machine")
    print(f"{'run':<16} {'config':<28} {'trainable':>10} {'held-out before':>15} {'after':>8} {'s/step':>7}")
    for r in results:
        print(f"{r['name']:<16} {r['config']:<28} {r['trainable_params']:>10,} {r['eval_loss_before']:>15.4f} "
              f"{r['eval_loss_after']:>8.4f} {r['seconds_per_step']:>7.2f}")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def _cpu_record(args, torch, transformers, shape, results) -> dict:
    return {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads (shared)", "torch": torch.__version__,
            "transformers": transformers.__version__, "model": "SmolLM2-135M (tools/fixtures.py), NF4",
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"},
            "results": results}


def _write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------------ (b) GPU
def train_gpu(shape, specs: dict, args, device) -> list[dict]:
    """qtool's trainer per method on random NF4 weights; measured against the plan."""
    import gc

    import torch

    from qtool.train.data import Blocks
    from qtool.train.load import random_decoder
    from qtool.train.measure import compare_with_plan
    from qtool.train.recipe import TrainSettings, train

    rows = []
    gen = torch.Generator().manual_seed(0)
    blocks = Blocks(torch.randint(0, shape.vocab, (64, args.train_seq), generator=gen),
                    torch.randint(0, shape.vocab, (1, args.train_seq), generator=gen), 0)
    for method, spec in specs.items():
        st = TrainSettings(method=method, steps=args.train_steps, seq_len=args.train_seq, batch_size=1, lr=1e-4,
                           eval_blocks=1, device=str(device), optimizer="auto" if device.type == "cuda"
                           else "adamw_torch", **_size_kw(spec))
        torch.manual_seed(0)
        t0 = time.perf_counter()
        # what earlier runs of this process still hold (each CUDA-graph run's cuBLAS workspaces stay for the life of
        # the process): subtracted from this run's peak, so that each row reads as a fresh process would
        carried = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        try:  # one device call runs all methods: a failure is recorded, and the others still run
            model = random_decoder(shape, device, spec=st.spec, compute_dtype=torch.bfloat16 if device.type == "cuda"
                                   else torch.float32)
            res = train(model, blocks, st, device=device)
        except Exception as exc:  # noqa: BLE001 - reported in the JSON and on stdout, not swallowed
            rows.append({"method": method, "config": _size_kw(spec), "error": f"{type(exc).__name__}: {exc}"})
            print(f"train {method}: FAILED {rows[-1]['error'][:300]}", flush=True)
            model = res = None
            gc.collect()
            continue
        timed = res.step_seconds[max(st.measure_after, 2):] or res.step_seconds
        peaks = {k: v - carried if k == "peak_allocated_bytes" and v else v for k, v in res.peaks.items()}
        comparison = compare_with_plan(shape, st, res.memory, peaks)
        planned = next(r for r in comparison if r["name"] == "peak allocated")
        rows.append({"method": method, "config": _size_kw(spec), "describe": spec.describe(),
                     "trainable_params": res.trainable_params, "tokens_per_s": args.train_seq / statistics.median(timed),
                     "step_seconds": res.step_seconds, "cuda_graph": res.cuda_graph, "peaks": res.peaks,
                     "carried_allocated_bytes": carried,
                     "plan_comparison": comparison, "planned_peak_allocated_bytes": planned["planned_bytes"],
                     "plan_error_pct": planned["error_pct"], "seconds": time.perf_counter() - t0})
        print(f"train {method}: {rows[-1]['tokens_per_s']:,.0f} tokens/s, peak allocated "
              f"{(peaks.get('peak_allocated_bytes') or 0) / 2**30:.2f} GiB (plan {planned['planned_bytes'] / 2**30:.2f}"
              f" GiB), graph {res.cuda_graph}", flush=True)
        del model, res
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _hf_config(shape, smoke: bool):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                       num_hidden_layers=shape.n_layers, num_attention_heads=shape.n_heads,
                       num_key_value_heads=shape.n_kv_heads, max_position_embeddings=max(shape.max_positions, 4096),
                       head_dim=shape.head_dim, tie_word_embeddings=shape.tied_embeddings)


def build_inference(shape, specs: dict, args, device) -> dict:
    """The five variants as callables ``(ids, cache_factory)``; the prefix is a cache factory of its own."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn
    from transformers import DynamicCache, LlamaForCausalLM

    from qtool.adapters.houlsby import HoulsbyAdapter

    torch.manual_seed(0)
    with device:
        base = LlamaForCausalLM(_hf_config(shape, args.smoke)).to(torch.bfloat16).eval()
    lora = specs["lora"]
    cfg = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     lora_dropout=0.0, init_lora_weights=False)
    bypass = get_peft_model(copy.deepcopy(base), cfg).eval()
    with torch.no_grad():
        for name, p in bypass.named_parameters():
            if "lora_B" in name:
                p.mul_(0.01)  # a QLoRA-sized update
    merged = copy.deepcopy(bypass).merge_and_unload().eval()
    adapted = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(2)
    m = specs["adapter"].adapter_size
    for layer in adapted.model.layers:
        for holder, name in ((layer.self_attn, "o_proj"), (layer.mlp, "down_proj")):
            a = HoulsbyAdapter.initial(shape.hidden, m, gen, torch.bfloat16, device)
            with torch.no_grad():
                a.up.normal_(0, 0.01)  # non-zero, as after training (the products run either way)
            setattr(holder, name, nn.Sequential(getattr(holder, name), a))
    adapted.eval()
    l = specs["prefix"].prefix_len
    kv = torch.randn(shape.n_layers, 2, 1, shape.n_kv_heads, l, shape.head_dim, generator=gen).to(device,
                                                                                                  torch.bfloat16)

    def prefix_cache():
        cache = DynamicCache()
        for i in range(shape.n_layers):
            cache.update(kv[i, 0], kv[i, 1], i)
        return cache

    return {"base": (base, None), "lora-merged": (merged, None), "lora-unmerged": (bypass, None),
            "adapter": (adapted, None), "prefix": (base, prefix_cache)}


def _timer(device):
    from merge_latency import Timer

    return Timer(device)


def decode_ms(model, cache_factory, prompt, n_new: int) -> list[float]:
    """Per-step milliseconds of ``n_new`` greedy decode steps after ``prompt`` (batch 1, KV cache; a prefix, when
    given, is the cache the prompt starts from)."""
    import torch

    with torch.inference_mode():
        cache = cache_factory() if cache_factory else None
        out = model(prompt, past_key_values=cache, use_cache=True)
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        timer = _timer(prompt.device)
        timer.mark()
        for _ in range(n_new):
            out = model(tok, past_key_values=cache, use_cache=True)
            cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            timer.mark()
        return timer.intervals_ms()


def prefill_ms(model, cache_factory, ids) -> float:
    import torch

    with torch.inference_mode():
        cache = cache_factory() if cache_factory else None
        timer = _timer(ids.device)
        timer.mark()
        model(ids, past_key_values=cache, use_cache=cache is not None)
        timer.mark()
        return timer.intervals_ms()[0]


def infer_gpu(shape, specs: dict, args, device) -> list[dict]:
    import torch

    from merge_latency import summary

    variants = build_inference(shape, specs, args, device)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, shape.vocab, (1, args.prompt), generator=g).to(device)
    long = torch.randint(0, shape.vocab, (1, args.prefill), generator=g).to(device)
    for model, cache in variants.values():  # warm-up at the full lengths
        decode_ms(model, cache, prompt, args.new_tokens)
        prefill_ms(model, cache, long)
    names = list(variants)
    dec = {k: [] for k in names}
    pre = {k: [] for k in names}
    medians = {k: [] for k in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order each round
            steps = decode_ms(*variants[name], prompt, args.new_tokens)
            dec[name] += steps
            medians[name].append(statistics.median(steps))
            pre[name].append(prefill_ms(*variants[name], long))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {medians[k][-1]:.2f}" for k in names) + " ms/token",
              flush=True)
    config = {"base": {}, "lora-merged": {"rank": specs["lora"].rank, "targets": specs["lora"].targets},
              "lora-unmerged": {"rank": specs["lora"].rank, "targets": specs["lora"].targets},
              "adapter": {"adapter_size": specs["adapter"].adapter_size},
              "prefix": {"prefix_len": specs["prefix"].prefix_len}}
    rows = []
    for k in names:
        rows.append({"variant": k, "config": config[k], "decode_ms_per_token": statistics.median(dec[k]),
                     "decode_ms": summary(dec[k]), "decode_round_medians_ms": medians[k],
                     "prefill_tokens_per_s": args.prefill / (statistics.median(pre[k]) / 1e3),
                     "prefill_ms": summary(pre[k])})
    for row in rows:
        row["decode_vs_base_pct"] = 100 * (row["decode_ms_per_token"] / rows[0]["decode_ms_per_token"] - 1)
        row["prefill_vs_base_pct"] = 100 * (row["prefill_tokens_per_s"] / rows[0]["prefill_tokens_per_s"] - 1)
    return rows


def run_gpu(args) -> None:
    import dataclasses
    import gc

    import torch

    from qtool.arch import known_shape

    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke on the CPU")
    if args.smoke:  # the code paths on a tiny shape, in seconds
        args.train_seq, args.train_steps, args.prompt, args.new_tokens, args.prefill, args.rounds = 64, 3, 32, 4, 64, 2
    records = []
    for model in args.models.split(","):
        t0 = time.perf_counter()
        shape = known_shape(model)
        if args.smoke:
            shape = dataclasses.replace(shape, name=f"{model} (smoke)", hidden=128, intermediate=352, n_layers=2,
                                        n_heads=4, n_kv_heads=4, head_dim=32, vocab=1000)
        specs = _budget(shape, args.rank)
        training = [] if args.skip_training else train_gpu(shape, specs, args, device)
        inference = infer_gpu(shape, specs, args, device)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        record = {"date": time.strftime("%Y-%m-%d"), "model": shape.name, "shape": "random weights",
                  "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                  "versions": _versions(), "cuda": torch.version.cuda,
                  "budget": {k: s.to_json() for k, s in specs.items()},
                  "n_trainable": {k: s.n_trainable(shape) for k, s in specs.items()},
                  "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"},
                  "training": training, "inference": inference, "seconds": time.perf_counter() - t0}
        _write(args.out_dir / f"{model}.json", record)
        records.append(record)
        _print_gpu(record, args)
    _print_summary(records, args.out_dir)


def _versions() -> dict:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("torch", "transformers", "peft", "bitsandbytes") if _installed(md, p)}


def _print_gpu(record: dict, args) -> None:
    training, inference = record["training"], record["inference"]
    print(f"\n{record['model']}, random weights, on {record['device']}; budget of LoRA r={args.rank} on q,k,v,o "
          f"({record['n_trainable']['lora']:,} params); {record['seconds']:.0f} s")
    if training:
        print(f"training, seq {args.train_seq} x batch 1 (qtool train, CUDA graph, paged AdamW):")
        print(f"  {'method':<9} {'config':<28} {'trainable':>11} {'tokens/s':>9} {'peak alloc GiB':>14} "
              f"{'plan GiB':>9} {'plan err':>8}")
        for r in training:
            if "error" in r:
                print(f"  {r['method']:<9} FAILED: {r['error'][:100]}")
                continue
            peak = r["peaks"].get("peak_allocated_bytes") or 0
            err = "-" if r["plan_error_pct"] is None else f"{r['plan_error_pct']:+.1f}%"
            print(f"  {r['method']:<9} {r['describe']:<28} {r['trainable_params']:>11,} {r['tokens_per_s']:>9,.0f} "
                  f"{peak / 2**30:>14.2f} {r['planned_peak_allocated_bytes'] / 2**30:>9.2f} {err:>8}")
    print(f"inference, batch 1, bf16 (decode after a {args.prompt}-token prompt; prefill of {args.prefill} tokens):")
    print(f"  {'variant':<14} {'decode ms/token':>15} {'vs base':>8} {'prefill tok/s':>14} {'vs base':>8}")
    for r in inference:
        print(f"  {r['variant']:<14} {r['decode_ms_per_token']:>15.2f} {r['decode_vs_base_pct']:>+7.1f}% "
              f"{r['prefill_tokens_per_s']:>14,.0f} {r['prefill_vs_base_pct']:>+7.1f}%")


def _print_summary(records: list[dict], out_dir: Path) -> None:
    """The short table printed last: per model and method, training tokens/s and peak vs plan, decode vs base."""
    print("\nsummary (model, method: train tok/s, peak alloc GiB / plan GiB (err), decode ms/token (vs base), "
          "prefill tok/s):")
    for rec in records:
        train = {r["method"]: r for r in rec["training"]}
        for inf in rec["inference"]:
            method = {"lora-unmerged": "lora", "lora-merged": None}.get(inf["variant"], inf["variant"])
            t = train.get(method)
            if t is None or "error" in t:
                tr = "train " + ("FAILED" if t else "-")
            else:
                err = "-" if t["plan_error_pct"] is None else f"{t['plan_error_pct']:+.1f}%"
                tr = (f"train {t['tokens_per_s']:,.0f} tok/s, {(t['peaks'].get('peak_allocated_bytes') or 0) / 2**30:.2f}"
                      f" / {t['planned_peak_allocated_bytes'] / 2**30:.2f} GiB ({err})")
            print(f"  {rec['model']:<14} {inf['variant']:<14} {tr:<48} decode {inf['decode_ms_per_token']:6.2f} ms "
                  f"({inf['decode_vs_base_pct']:+.1f}%), prefill {inf['prefill_tokens_per_s']:,.0f} tok/s")
    print(f"wrote {', '.join(str(out_dir / (r['model'] + '.json')) for r in records)}")


def _installed(md, name: str) -> bool:
    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="part", required=True)
    cpu = sub.add_parser("cpu", help="(a) held-out loss after the same steps, SmolLM2 + Shakespeare")
    cpu.add_argument("--runs", default="lora,adapter,prefix",
                     help="method[@lr],... (default: the three at --lr)")
    cpu.add_argument("--steps", type=int, default=150)
    cpu.add_argument("--seq-len", type=int, default=128)
    cpu.add_argument("--batch-size", type=int, default=1)
    cpu.add_argument("--rank", type=int, default=16, help="the budget: LoRA rank on q,k,v,o")
    cpu.add_argument("--lr", type=float, default=1e-3)
    cpu.add_argument("--warmup-steps", type=int, default=10)
    cpu.add_argument("--eval-every", type=int, default=30)
    cpu.add_argument("--eval-blocks", type=int, default=16)
    cpu.add_argument("--seed", type=int, default=0)
    cpu.add_argument("--no-checkpointing", action="store_true", help="keep activations (faster on the CPU)")
    cpu.add_argument("--cache", type=Path, default=None, help="where the converted fixture goes")
    cpu.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "methods_compare_cpu.json")
    cpu.set_defaults(func=run_cpu)
    gpu = sub.add_parser("gpu", help="(b) training speed and memory, decode and prefill latency, 7B shapes")
    gpu.add_argument("--models", default="llama-2-7b,smollm2-135m",
                     help="known shapes, comma-separated (qtool plan --list-models)")
    gpu.add_argument("--rank", type=int, default=16)
    gpu.add_argument("--train-seq", type=int, default=2048)
    gpu.add_argument("--train-steps", type=int, default=10)
    gpu.add_argument("--skip-training", action="store_true")
    gpu.add_argument("--prompt", type=int, default=512)
    gpu.add_argument("--new-tokens", type=int, default=128)
    gpu.add_argument("--prefill", type=int, default=2048)
    gpu.add_argument("--rounds", type=int, default=4)
    gpu.add_argument("--smoke", action="store_true", help="tiny shape on the CPU: checks the code, not the figures")
    gpu.add_argument("--out-dir", type=Path, required=True, help="one <model>.json per model (data/methods/ is "
                     "what qtool plan reads)")
    gpu.set_defaults(func=run_gpu)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()

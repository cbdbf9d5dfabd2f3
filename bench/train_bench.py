"""Training speed and memory on a GPU: qtool's trainer against transformers + PEFT + bitsandbytes, and the measured
peaks that calibrate and validate ``qtool plan``. Each (profile, model) runs in its own process
(bench/gpu_worker.py) so that memory counters start clean; all configurations of one model share that process.

    python bench/train_bench.py --suite smoke --out OUT_DIR     # one shape, both sides, profiles of one step
    python bench/train_bench.py --suite full  --out OUT_DIR     # the planner's matrix + the speed comparison
    python bench/train_bench.py --report data/memory/h200-2026-11-29.json   # the tables of recorded runs
    python bench/train_bench.py --suite adalora --profiles qtool --out OUT_DIR  # AdaLoRA peaks beside the plan
    python bench/train_bench.py --suite unsloth --profiles qtool,hf,hf-prepare,unsloth --out OUT_DIR  # issue 11

Writes OUT_DIR/records.json (the schema of data/memory/README.md) and prints a table last: per speed row and
profile, tokens/s, achieved TFLOP/s (bench/flops.py) and its share of the GPU's dense bf16 peak, and the three
memory counters. The unsloth profile runs one process per configuration (bench/gpu_worker.py run_unsloth).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # qtool and bench.flops


def c(seq, rank, targets="qkvo", gc=True, batch=1):
    return {"seq_len": seq, "rank": rank, "targets": targets, "gc": gc, "batch_size": batch}


# The speed comparison of issue 4 (rank 16, q,k,v,o, GC, batch 1) on real shapes, plus the planner's matrix:
# 0.1B-65B shapes, seq 512-8192, rank 8-64, qkvo and all-linear, GC on and off; both profiles run every entry.
SUITES = {
    "smoke": {"llama-2-7b": [c(2048, 16), c(512, 16)], "llama-3-8b": [c(2048, 16)], "llama-1-65b": [c(512, 16)]},
    "full": {
        "smollm2-135m": [c(512, 8), c(2048, 64, "all-linear", gc=False), c(8192, 16, "all-linear")],
        "qwen2.5-0.5b": [c(1024, 16, "all-linear"), c(4096, 32, gc=False)],
        "llama-2-7b": [c(512, 16), c(2048, 16), c(2048, 64, "all-linear", gc=False), c(4096, 8, batch=2)],
        "llama-3-8b": [c(2048, 16), c(8192, 8, "all-linear")],
        "mistral-7b": [c(4096, 32)],
        "llama-2-13b": [c(1024, 16, gc=False)],
        "llama-1-65b": [c(512, 16), c(1024, 64, "all-linear")],
    },
    # issue 9: AdaLoRA (init rank -> target 8) in the CUDA-graph trainer, qtool profile only; planned within 5%?
    "adalora": {
        "smollm2-135m": [c(2048, 12, "all-linear") | {"method": "adalora"}],
        "llama-2-7b": [c(2048, 12, "all-linear") | {"method": "adalora"}, c(512, 12) | {"method": "adalora"},
                       c(4096, 24, "all-linear", gc=False) | {"method": "adalora", "target_rank": 16}],
        "llama-3-8b": [c(8192, 12, "all-linear") | {"method": "adalora"}],
    },
    # issue 11: the speed rows against Unsloth and against the loop right after prepare_model_for_kbit_training
    "unsloth": {"llama-2-7b": [c(512, 16), c(2048, 16)], "llama-3-8b": [c(2048, 16)]},
}
SPEED_ROWS = [("llama-2-7b", 512), ("llama-2-7b", 2048), ("llama-3-8b", 2048), ("llama-1-65b", 512)]
PROFILE_ORDER = ("qtool", "qtool-offload", "hf", "hf-prepare", "unsloth")


def run_worker(profile, model, configs, env, timeout):
    cmd = [sys.executable, str(HERE / "gpu_worker.py"), profile, model, json.dumps(configs)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    sys.stderr.write(proc.stderr[-6000:] if proc.returncode else "\n".join(
        ln for ln in proc.stderr.splitlines() if ln.startswith(("###", "  ")) and "ms" in ln) + "\n")
    print(f"[{time.perf_counter() - t:6.1f} s] {profile} {model}: {len(records)}/{len(configs)} records"
          f"{'' if proc.returncode == 0 else f' (exit {proc.returncode})'}", file=sys.stderr, flush=True)
    return records


def gib(x):
    return f"{x / 2**30:.2f}" if x else "-"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", choices=list(SUITES), default="smoke")
    ap.add_argument("--out")
    ap.add_argument("--report", help="print the tables of a records file instead of running")
    ap.add_argument("--profiles", default="qtool,hf")
    ap.add_argument("--models", default="", help="comma-separated subset of the suite's models")
    ap.add_argument("--timeout", type=int, default=400, help="seconds per worker process")
    args = ap.parse_args()
    if args.report:
        return report(json.loads(Path(args.report).read_text()))
    if not args.out:
        ap.error("--out is required to run")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.suite == "smoke":
        env["QTOOL_PROFILE"] = "1"
    suite = SUITES[args.suite]
    models = [m for m in suite if not args.models or m in args.models.split(",")]
    records = []
    for model in models:
        for profile in args.profiles.split(","):
            # unsloth fixes max_seq_length and its checkpointing mode at load: one process per configuration
            groups = [[cfg] for cfg in suite[model]] if profile == "unsloth" else [suite[model]]
            for configs in groups:
                try:
                    records += run_worker(profile, model, configs, env, args.timeout)
                except subprocess.TimeoutExpired:
                    print(f"timeout after {args.timeout} s: {profile} {model}", file=sys.stderr, flush=True)
                (out / "records.json").write_text(json.dumps(records, indent=1))
    report(records)


def report(records):
    rows = []
    for r in records:
        m, s = r["measured"], r["settings"]
        rows.append([r["profile"], r["model"]["name"], s["seq_len"], s["batch_size"], s["rank"], s["targets"],
                     "on" if s["grad_checkpointing"] else "off", f"{m.get('tokens_per_second', 0):,.0f}",
                     tflops(r), gib(m.get("peak_allocated_bytes")), gib(m.get("peak_reserved_bytes")),
                     gib(m.get("nvml_used_bytes")), r.get("error") or ""])
    header = ["profile", "model", "seq", "b", "r", "targets", "GC", "tok/s", "TFLOP/s", "alloc GiB", "reserved",
              "NVML", "err"]
    plan_rows = _plan_errors(records)
    print_table(header, rows)
    if plan_rows:
        print("\nplan vs measured peak allocated (less what earlier runs in the process left; goal within 5%):")
        for row in plan_rows:
            print("  " + row)
    speed_table(records)


def tflops(r) -> str:
    t = achieved(r)
    return f"{t:.0f}" if t else "-"


def achieved(r) -> float | None:
    """The record's achieved TFLOP/s; for records made before bench/gpu_worker.py wrote it, the same count over the
    mean of the same timed steps (after the two warm-up steps and the one after them)."""
    from bench.flops import achieved_tflops, step_flops
    from qtool.arch import shape_from_config

    m, s = r["measured"], r["settings"]
    if "achieved_tflops" in m or not m.get("step_seconds"):
        return m.get("achieved_tflops")
    timed = m["step_seconds"][3:] or m["step_seconds"][1:]
    shape = shape_from_config({"model_type": "llama", **r["model"]}, name=r["model"].get("name", "record"))
    flops = step_flops(shape, s["seq_len"], s["batch_size"], s["rank"], s["targets"], s["grad_checkpointing"])
    return achieved_tflops(flops["total"], sum(timed) / len(timed))


def print_table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header] + rows:
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))


def label(r) -> str:
    """A record's row name: its profile, "-offload" for qtool's --offload-activations."""
    return r["profile"] + ("-offload" if r["settings"].get("offload_activations") else "")


def speed_table(records):
    """The speed rows (rank 16, q,k,v,o, GC, batch 1), every profile measured: tokens/s (median step), achieved
    TFLOP/s (mean step, bench/flops.py) and its share of the GPU's dense bf16 peak, qtool's speed-up over the row,
    the three memory counters and, for Unsloth, the pinned host memory its checkpointing offloads to."""
    from bench.flops import peak_tflops

    speed = {(r["model"]["name"], r["settings"]["seq_len"], label(r)): r for r in records
             if r["settings"]["rank"] == 16 and r["settings"]["targets"] == "qkvo" and r["settings"]["batch_size"] == 1
             and r["settings"]["grad_checkpointing"] and not r.get("error") and "tokens_per_second" in r["measured"]}
    profiles = [p for p in PROFILE_ORDER if any(k[2] == p for k in speed)]
    profiles += sorted({k[2] for k in speed} - set(profiles))
    rows = []
    for model, seq in SPEED_ROWS:
        q = speed.get((model, seq, "qtool"))
        for profile in profiles:
            r = speed.get((model, seq, profile))
            if r is None:
                continue
            m = r["measured"]
            peak = peak_tflops(r["gpu"])
            share = f"{100 * achieved(r) / peak:.0f}%" if peak and achieved(r) else "-"
            ratio = f"{q['measured']['tokens_per_second'] / m['tokens_per_second']:.2f}x" if q else "-"
            host = (r.get("unsloth") or {}).get("gc_host_buffer_bytes")
            rows.append([profile, model, seq, f"{m['tokens_per_second']:,.0f}", tflops(r), share, ratio,
                         gib(m.get("peak_allocated_bytes")), gib(m.get("peak_reserved_bytes")),
                         gib(m.get("nvml_used_bytes")), gib(host)])
    if rows:
        peaks = sorted({f"{r['gpu']} {peak_tflops(r['gpu']):.0f}" for r in speed.values() if peak_tflops(r["gpu"])})
        print(f"\nspeed (rank 16, q,k,v,o, GC, batch 1); % of dense bf16 peak TFLOP/s ({', '.join(peaks) or '?'}); "
              "qtool x = qtool tok/s / row tok/s; host = pinned host memory of Unsloth's checkpoint offload")
        print_table(["profile", "model", "seq", "tok/s", "TFLOP/s", "% peak", "qtool x", "alloc GiB", "reserved GiB",
                     "NVML GiB", "host GiB"], rows)


def _plan_errors(records) -> list[str]:
    """One line per measured record: the planner's peak allocated against the measured one (tests/test_plan.py's
    replay, for records not yet in data/memory/)."""
    from qtool.plan.records import carried_allocated_bytes, plan_for_record

    from qtool.plan.settings import PROFILES

    lines = []
    for r in records:
        if r.get("error") or not r["measured"].get("peak_allocated_bytes") or r["profile"] not in PROFILES:
            continue  # a CPU dry run, or a profile qtool plan does not model (yet): nothing to compare
        p = plan_for_record(r)
        measured = r["measured"]["peak_allocated_bytes"] - carried_allocated_bytes(r, p)
        extra = r["measured"].get("adalora")
        lines.append(f"{r['id']}: plan {p.peak_allocated_bytes / 2**30:.3f} GiB ({p.peak_phase}), measured "
                     f"{measured / 2**30:.3f} GiB, error {(p.peak_allocated_bytes - measured) / measured:+.1%}; "
                     f"trainable {p.n_trainable:,} planned / {r.get('trainable_params', 0):,}; "
                     f"cuda graph {r['measured'].get('cuda_graph')}"
                     + (f"; budget {extra['init_budget']} -> {extra['final_budget']} at steps {extra['mask_steps']}"
                        if extra else ""))
    return lines


if __name__ == "__main__":
    main()

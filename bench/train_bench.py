"""Training speed and memory on a GPU: qtool's trainer against transformers + PEFT + bitsandbytes, and the measured
peaks that calibrate and validate ``qtool plan``. Each (profile, model) runs in its own process
(bench/gpu_worker.py) so that memory counters start clean; all configurations of one model share that process.

    python bench/train_bench.py --suite smoke --out OUT_DIR     # one shape, both sides, profiles of one step
    python bench/train_bench.py --suite full  --out OUT_DIR     # the planner's matrix + the speed comparison
    python bench/train_bench.py --report data/memory/h200-2026-11-29.json   # the tables of recorded runs
    python bench/train_bench.py --suite adalora --profiles qtool --out OUT_DIR  # AdaLoRA peaks beside the plan

Writes OUT_DIR/records.json (the schema of data/memory/README.md) and prints a table last.
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
}
SPEED_ROWS = [("llama-2-7b", 512), ("llama-2-7b", 2048), ("llama-3-8b", 2048), ("llama-1-65b", 512)]


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
    ap.add_argument("--timeout", type=int, default=400)
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
            try:
                records += run_worker(profile, model, suite[model], env, args.timeout)
            except subprocess.TimeoutExpired:
                print(f"timeout: {profile} {model}", file=sys.stderr)
            (out / "records.json").write_text(json.dumps(records, indent=1))
    report(records)


def report(records):
    rows = []
    for r in records:
        m, s = r["measured"], r["settings"]
        rows.append([r["profile"], r["model"]["name"], s["seq_len"], s["batch_size"], s["rank"], s["targets"],
                     "on" if s["grad_checkpointing"] else "off", f"{m.get('tokens_per_second', 0):,.0f}",
                     gib(m.get("peak_allocated_bytes")), gib(m.get("peak_reserved_bytes")),
                     gib(m.get("nvml_used_bytes")), r.get("error") or ""])
    header = ["profile", "model", "seq", "b", "r", "targets", "GC", "tok/s", "alloc GiB", "reserved", "NVML", "err"]
    plan_rows = _plan_errors(records)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header] + rows:
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))
    if plan_rows:
        print("\nplan vs measured peak allocated (less what earlier runs in the process left; goal within 5%):")
        for row in plan_rows:
            print("  " + row)
    speed = {(r["model"]["name"], r["settings"]["seq_len"], r["profile"]): r for r in records
             if r["settings"]["rank"] == 16 and r["settings"]["targets"] == "qkvo" and r["settings"]["batch_size"] == 1
             and r["settings"]["grad_checkpointing"] and not r.get("error")}
    print("\nspeed (rank 16, qkvo, GC, batch 1):  tokens/s qtool / hf = ratio;  peak allocated qtool / hf GiB")
    for model, seq in SPEED_ROWS:
        q, h = speed.get((model, seq, "qtool")), speed.get((model, seq, "hf"))
        if q and h:
            qm, hm = q["measured"], h["measured"]
            print(f"  {model:12s} {seq:5d}: {qm['tokens_per_second']:8,.0f} / {hm['tokens_per_second']:8,.0f} = "
                  f"{qm['tokens_per_second'] / hm['tokens_per_second']:.2f}x;  {gib(qm['peak_allocated_bytes'])} / "
                  f"{gib(hm['peak_allocated_bytes'])}")



def _plan_errors(records) -> list[str]:
    """One line per measured record: the planner's peak allocated against the measured one (tests/test_plan.py's
    replay, for records not yet in data/memory/)."""
    sys.path.insert(0, str(HERE.parent))
    from qtool.plan.planner import carried_allocated_bytes, plan_for_record

    lines = []
    for r in records:
        if r.get("error") or "peak_allocated_bytes" not in r["measured"]:
            continue
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

"""The trainer's long-sequence and shape sweep (issue 14): every architecture qtool train builds, from seq 512 to the
model's maximum (32k where it allows), batch 1-8, rank 8-64, q,k,v,o and all-linear — each row trained twice from the
same initialisation on random NF4 weights of the real shape: once eagerly (no CUDA graph) and once as the product
runs (CUDA graph captured at step 2). A row passes when every loss is finite and the graph run's losses equal the
eager run's within bf16 noise (relative 2e-3; the attention backward is not bitwise deterministic). Peak allocated is
printed beside ``qtool plan``'s for the same settings. GPU only.

    python bench/long_seq_sweep.py [--rows all|quick] [--out results.jsonl]

Prints one line per row as it finishes and a table last; exits 1 if any row fails.
"""
from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.jsonl import emit  # noqa: E402
from qtool.arch import known_shape  # noqa: E402
from qtool.train.data import Blocks  # noqa: E402
from qtool.train.load import random_decoder  # noqa: E402
from qtool.train.measure import compare_with_plan  # noqa: E402
from qtool.train.recipe import TrainSettings, train  # noqa: E402

# (model, seq_len, batch, rank, targets): a covering set — every architecture at a short and at its longest length,
# every batch size, every rank and both target sets somewhere; the first row is the one issue 14 reported.
ROWS = [
    ("llama-2-7b", 8192, 1, 16, "qkvo"),
    ("llama-2-7b", 512, 8, 32, "all-linear"),
    ("llama-2-7b", 4096, 2, 64, "all-linear"),
    ("llama-3.2-1b", 2048, 4, 8, "qkvo"),
    ("llama-3.2-1b", 32768, 1, 16, "all-linear"),
    ("mistral-7b", 2048, 4, 16, "qkvo"),
    ("mistral-7b", 8192, 1, 32, "all-linear"),   # beyond its 4096 window: the mask path
    ("qwen2.5-0.5b", 512, 8, 64, "all-linear"),
    ("qwen2.5-0.5b", 32768, 1, 8, "qkvo"),
    ("qwen3-0.6b", 2048, 8, 16, "qkvo"),
    ("qwen3-0.6b", 32768, 1, 32, "all-linear"),
    ("qwen3-8b", 8192, 1, 16, "qkvo"),
    ("phi-3-mini", 512, 8, 16, "qkvo"),
    ("phi-3-mini", 4096, 2, 64, "all-linear"),   # beyond its 2047 window
    ("gemma-2-2b", 512, 8, 8, "qkvo"),
    ("gemma-2-2b", 8192, 1, 16, "all-linear"),   # soft-capped explicit attention, sliding layers masked
    ("gemma-3-1b", 512, 8, 32, "qkvo"),
    ("gemma-3-1b", 32768, 1, 16, "all-linear"),
]
QUICK = [0, 6, 11, 13, 15, 17]
STEPS, MEASURE_AFTER, RTOL = 4, 2, 2e-3


def run_once(shape, row, graphs: bool, device) -> dict:
    model_name, seq, batch, rank, targets = row
    cuda = device.type == "cuda"
    st = TrainSettings(steps=STEPS, seq_len=seq, batch_size=batch, rank=rank, alpha=2 * rank, targets=targets,
                       lr=2e-4, eval_blocks=1, measure_after=MEASURE_AFTER, max_grad_norm=0.3, cuda_graphs=graphs,
                       device=device.type, optimizer="auto" if cuda else "adamw_torch")
    gen = torch.Generator().manual_seed(0)
    blocks = Blocks(torch.randint(0, shape.vocab, (batch * STEPS + 1, seq), generator=gen),
                    torch.randint(0, shape.vocab, (1, seq), generator=gen), 0)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    carried = torch.cuda.memory_allocated(device) if cuda else 0
    torch.manual_seed(0)
    model = random_decoder(shape, device, spec=st.spec)  # same seed: the same weights and adapter init both times
    try:
        res = train(model, blocks, st, device=device)
    finally:
        del model
    peaks = {k: v - carried if k == "peak_allocated_bytes" and v else v for k, v in res.peaks.items()}
    peaks.setdefault("peak_allocated_bytes", 0)
    compared = compare_with_plan(shape, st, res.memory, peaks)
    planned = next(r for r in compared if r["name"] == "peak allocated")
    timed = res.step_seconds[MEASURE_AFTER + 1:] or res.step_seconds[-1:]
    return {"losses": res.losses, "cuda_graph": res.cuda_graph, "peak_allocated_bytes": peaks["peak_allocated_bytes"],
            "planned_peak_allocated_bytes": planned["planned_bytes"], "plan_error_pct": planned["error_pct"],
            "tokens_per_s": batch * seq / (sum(timed) / len(timed)),
            "peaks": peaks, "plan_comparison": compared}  # reserved and NVML too (earlier rows' context included)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="all", help="all, quick, or comma-separated row numbers")
    ap.add_argument("--out", type=Path, default=None, help="append one JSON line per row")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU check of the code paths: 2 layers, seq <= 64, batch <= 2; no graphs, nothing measured")
    args = ap.parse_args()
    pick = range(len(ROWS)) if args.rows == "all" else QUICK if args.rows == "quick" else \
        [int(i) for i in args.rows.split(",")]
    device = torch.device("cpu" if args.dry_run else "cuda")
    results = []
    for i in pick:
        row = ROWS[i]
        shape = known_shape(row[0])
        if args.dry_run:
            from dataclasses import replace

            shape = replace(shape, n_layers=2, layer_types=shape.layer_types[:2])
            row = (row[0], min(row[1], 64), min(row[2], 2), row[3], row[4])
        t0 = time.perf_counter()
        rec = {"row": i, "model": row[0], "model_type": shape.model_type, "seq_len": row[1], "batch_size": row[2],
               "rank": row[3], "targets": row[4], "date": time.strftime("%Y-%m-%d"),
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__}
        try:
            eager = run_once(shape, row, False, device)
            graph = run_once(shape, row, True, device)
            finite = all(math.isfinite(x) for x in eager["losses"] + graph["losses"])
            worst = max(abs(a - b) / abs(a) for a, b in zip(eager["losses"], graph["losses"])) if finite else math.inf
            rec.update(eager=eager, graph=graph, max_rel_diff=worst,
                       ok=finite and worst <= RTOL and (graph["cuda_graph"] == "on" or args.dry_run))
        except Exception as exc:  # noqa: BLE001 - a failing row is a result: recorded, the others still run
            rec.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        results.append(rec)
        emit(rec, args.out)
    print(f"\n{'model':<13} {'seq':>6} {'b':>2} {'r':>3} {'targets':<10} {'graph loss 0..3':<31} {'rel diff':>8} "
          f"{'tok/s':>8} {'peak GiB':>8} {'plan':>6} {'err%':>6}  ok")
    for r in results:
        head = f"{r['model']:<13} {r['seq_len']:>6} {r['batch_size']:>2} {r['rank']:>3} {r['targets']:<10}"
        if "error" in r:
            print(f"{head} {r['error'][:90]}  FAIL")
            continue
        g = r["graph"]
        print(f"{head} {' '.join(f'{x:.4f}' for x in g['losses']):<31} {r['max_rel_diff']:8.1e} "
              f"{g['tokens_per_s']:8,.0f} {g['peak_allocated_bytes'] / 2**30:8.2f} "
              f"{g['planned_peak_allocated_bytes'] / 2**30:6.2f} {g['plan_error_pct'] or 0:+6.1f}  "
              f"{'ok' if r['ok'] else 'FAIL'}")
    failed = [r for r in results if not r["ok"]]
    print(f"\n{len(results) - len(failed)}/{len(results)} rows pass")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

"""What ``--offload-activations`` saves and costs on a GPU (issue 11): each configuration trained twice from the same
random NF4 weights of the real shape (qtool.train.load.random_decoder), with and without offloading, both with the
CUDA-graph step; peak allocated measured beside ``qtool plan``'s, tokens/s over the replayed steps, the losses
compared (relative 2e-3: the attention backward is not bitwise deterministic). Also the copy bandwidth of one layer
input to and from pinned host memory, which bounds what offloading can cost. GPU only.

    python bench/offload_memory.py [--configs llama-2-7b:2048:1,llama-3-8b:2048:1] [--out results.jsonl]

A configuration is MODEL:SEQ_LEN:BATCH (rank 16 on q,k,v,o, as the issue's comparison with Unsloth).
"""
from __future__ import annotations

import argparse
import gc
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

STEPS, MEASURE_AFTER, RTOL = 8, 2, 2e-3


def copy_bandwidth(n_bytes: int, device) -> dict:
    """GB/s of one ``n_bytes`` bf16 tensor copied device-to-host and host-to-device through pinned memory (the
    median of 20 copies after 3 warm-ups, CUDA events)."""
    x = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=device)
    host = torch.empty(n_bytes // 2, dtype=torch.bfloat16, pin_memory=True)
    out = {}
    for name, dst, src in (("d2h", host, x), ("h2d", x, host)):
        times = []
        for i in range(23):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            if i >= 3:
                times.append(start.elapsed_time(end) / 1e3)
        out[f"{name}_gb_per_s"] = n_bytes / sorted(times)[len(times) // 2] / 1e9
    return out


def run_once(shape, seq: int, batch: int, offload: bool, device) -> dict:
    st = TrainSettings(steps=STEPS, seq_len=seq, batch_size=batch, rank=16, alpha=32, targets="qkvo", lr=2e-4,
                       measure_after=MEASURE_AFTER, max_grad_norm=0.3, offload_activations=offload)
    gen = torch.Generator().manual_seed(0)
    blocks = Blocks(torch.randint(0, shape.vocab, (batch * STEPS + 1, seq), generator=gen),
                    torch.randint(0, shape.vocab, (1, seq), generator=gen), 0)
    gc.collect()
    torch.cuda.empty_cache()
    carried = torch.cuda.memory_allocated(device)
    torch.manual_seed(0)
    model = random_decoder(shape, device, spec=st.spec)  # same seed: the same weights and adapter init both times
    try:
        res = train(model, blocks, st, device=device)
    finally:
        del model
    peaks = {**res.peaks, "peak_allocated_bytes": res.peaks["peak_allocated_bytes"] - carried}
    compared = compare_with_plan(shape, st, res.memory, peaks)
    planned = next(r for r in compared if r["name"] == "peak allocated")
    timed = res.step_seconds[MEASURE_AFTER + 1:]
    return {"offload": offload, "losses": res.losses, "cuda_graph": res.cuda_graph,
            "peak_allocated_bytes": peaks["peak_allocated_bytes"], "planned_peak_allocated_bytes": planned["planned_bytes"],
            "plan_error_pct": planned["error_pct"], "tokens_per_s": batch * seq / (sum(timed) / len(timed)),
            "pinned_host_bytes": res.peaks.get("pinned_host_bytes", 0), "plan_comparison": compared}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="llama-2-7b:2048:1", help="comma-separated MODEL:SEQ_LEN:BATCH")
    ap.add_argument("--out", type=Path, default=None, help="append one JSON line per configuration")
    args = ap.parse_args()
    device = torch.device("cuda")
    rows = []
    for config in args.configs.split(","):
        name, seq, batch = config.split(":")
        shape, seq, batch = known_shape(name), int(seq), int(batch)
        one_input = batch * seq * shape.hidden * 2
        rec = {"model": name, "seq_len": seq, "batch_size": batch, "date": time.strftime("%Y-%m-%d"),
               "gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
               "layer_input_bytes": one_input, **copy_bandwidth(one_input, device)}
        runs = {o: run_once(shape, seq, batch, o, device) for o in (False, True)}
        worst = max(abs(a - b) / abs(a) for a, b in zip(runs[False]["losses"], runs[True]["losses"]))
        rec.update(plain=runs[False], offload=runs[True], max_rel_diff=worst,
                   ok=worst <= RTOL and all(r["cuda_graph"] == "on" for r in runs.values()))
        rows.append(rec)
        emit(rec, args.out)
    print(f"\n{'model':<12} {'seq':>5} {'b':>2} {'offload':<7} {'peak GiB':>8} {'plan GiB':>8} {'err%':>6} "
          f"{'tok/s':>8} {'host GiB':>8} {'D2H GB/s':>8} {'H2D GB/s':>8} {'loss diff':>9}")
    for r in rows:
        for key in ("plain", "offload"):
            g = r[key]
            print(f"{r['model']:<12} {r['seq_len']:>5} {r['batch_size']:>2} {key:<7} "
                  f"{g['peak_allocated_bytes'] / 2**30:8.2f} {g['planned_peak_allocated_bytes'] / 2**30:8.2f} "
                  f"{g['plan_error_pct'] or 0:+6.1f} {g['tokens_per_s']:8,.0f} {g['pinned_host_bytes'] / 2**30:8.2f} "
                  f"{r['d2h_gb_per_s']:8.1f} {r['h2d_gb_per_s']:8.1f} {r['max_rel_diff']:9.1e}")
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    main()

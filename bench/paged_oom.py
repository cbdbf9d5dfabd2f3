"""Issue 11, QLoRA's third idea: paged optimizer state survives a memory cap that the same state on the device does
not. One configuration, one cap on PyTorch's caching allocator (``torch.cuda.set_per_process_memory_fraction``), two
runs of qtool's trainer: ``adamw_32bit`` (two fp32 moments per trainable parameter as ordinary device tensors, inside
the cap) and ``paged_adamw_32bit`` (the same moments in CUDA managed memory, outside it). ``qtool plan`` predicts
each outcome (:mod:`qtool.plan.cap`); the bench measures it.

Each run is a fresh subprocess: the cap is per process, and bitsandbytes never frees its paged buffers. It sets the
cap before anything is allocated, builds a random-weight NF4 model of the real shape (qtool.train.load.random_decoder)
and trains a few steps (qtool.train.recipe.train, CUDA graph as the product runs), catching the allocator's
OutOfMemoryError. The cap, unless given, separates the two plans (:func:`qtool.plan.cap.separating_cap`: midway
between their peak reserved, what the cap limits). The managed memory is the optimizer
state alone (2.7 GiB by default), far below what an H200 has free.

    python bench/paged_oom.py [--model llama-3.2-1b --rank 512 --targets all-linear --seq-len 128] [--cap 6GiB]
                              [--out results.jsonl] [--dry-run]

Prints one JSON line per run and a table last; exits 1 if a measured outcome differs from the plan's prediction.
``--dry-run``: the CPU path (a tiny shape, no cap, torch AdamW in both runs; the plan still shown for the real one).

H200, 2026-12-04, on a tree with main's work in progress (flattened LoRA parameters; not this branch's trainer) and an
earlier cap rule (midway between paged reserved and unpaged allocated, 6.02 GiB): adamw_32bit ran out of memory at
its first optimizer step (allocating a 1.34 GiB moment), and so did paged_adamw_32bit, at the CUDA graph capture:
its reserved peak was 6.72 GiB against 5.43 planned (-19%; allocated 3.96 against 3.93). Under 7 GiB it trained
(NVML 10.9 GiB, 2.69 GiB paged) while adamw_32bit still ran out; under 5 GiB both did. Hence the cap rule now:
midway between the reserved peaks (6.77 GiB), which stands clear of that error on both sides.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.jsonl import emit  # noqa: E402
from qtool.arch import known_shape  # noqa: E402
from qtool.errors import QtoolError  # noqa: E402
from qtool.plan import cap as caps  # noqa: E402
from qtool.train.settings import TrainSettings  # noqa: E402

STEPS, MEASURE_AFTER = 4, 2
# measured outcome -> the verdict it confirms; "trained-eager": the CUDA graph capture ran out of memory and the
# trainer went on without a graph (qtool.train.recipe), which is not the step the plan describes
OUTCOMES = {"trained": "fits", "oom": "oom", "trained-eager": None}


def train_settings(args, optimizer: str, device: str) -> TrainSettings:
    return TrainSettings(steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, rank=args.rank,
                         alpha=2 * args.rank, targets=args.targets, lr=2e-4, eval_blocks=1,
                         measure_after=MEASURE_AFTER, max_grad_norm=0.3, device=device, optimizer=optimizer)


DRY_RUN = {"rank": 8, "seq_len": 32, "batch_size": 1, "steps": MEASURE_AFTER + 1}  # --dry-run's run, on tiny(shape)


def tiny(shape):
    """--dry-run: the model type and code paths of ``shape``, a few MB of weights."""
    return replace(shape, n_layers=2, hidden=256, intermediate=512, n_heads=4, n_kv_heads=2, head_dim=64, vocab=1024,
                   tied_embeddings=True, layer_types=shape.layer_types[:2])


# --- one run, in its own process ------------------------------------------------------------------------------------

def measure(job: dict) -> dict:
    """Train ``job``'s configuration under its cap in this process; the outcome and the counters. Call it first
    thing in a fresh process: the cap must be set before the allocator holds anything."""
    import torch

    device = torch.device(job["device"])
    cuda = device.type == "cuda"
    if cuda and device.index is None:  # set_per_process_memory_fraction wants an index
        device = torch.device("cuda", torch.cuda.current_device())
    total = fraction = None
    if cuda and job["cap_bytes"]:
        total = torch.cuda.mem_get_info(device)[1]  # the allocator's cap is fraction x this total (cudaMemGetInfo)
        fraction = job["cap_bytes"] / total
        torch.cuda.set_per_process_memory_fraction(fraction, device)  # before the first allocation

    from qtool.train.data import Blocks
    from qtool.train.allocator import set_up
    from qtool.train.load import compute_dtype_for, random_decoder
    from qtool.train.measure import MemoryMonitor, compare_with_plan
    from qtool.train.recipe import train

    args = argparse.Namespace(**job["config"])
    st = train_settings(args, job["optimizer"], device.type)
    shape = known_shape(args.model)
    shape = tiny(shape) if job["dry_run"] else shape
    gen = torch.Generator().manual_seed(0)
    blocks = Blocks(torch.randint(0, shape.vocab, (args.batch_size * args.steps + 1, args.seq_len), generator=gen),
                    torch.randint(0, shape.vocab, (1, args.seq_len), generator=gen), 0)
    nvml = MemoryMonitor(device)
    seen = {"steps_done": 0, "peak_allocated_bytes": 0, "peak_reserved_bytes": 0}

    def peaks_so_far():  # the trainer resets the peak counters after its warm-up: keep the whole run's maxima
        if cuda:
            seen["peak_allocated_bytes"] = max(seen["peak_allocated_bytes"], torch.cuda.max_memory_allocated(device))
            seen["peak_reserved_bytes"] = max(seen["peak_reserved_bytes"], torch.cuda.max_memory_reserved(device))

    def progress(step, loss, seconds):
        seen["steps_done"] = step + 1
        peaks_so_far()

    out = {"optimizer": job["optimizer"], "optimizer_run": st.optimizer, "cap_bytes": job["cap_bytes"],
           "total_bytes": total, "fraction": fraction, "device": str(device),
           "gpu": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
           "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}
    phase, res = "load", None
    try:
        torch.manual_seed(0)
        compute_dtype = compute_dtype_for("auto", device)[0]
        out["expandable_segments"] = set_up(device, True)  # as qtool train sets the allocator up before loading
        model = random_decoder(shape, device, spec=st.spec, compute_dtype=compute_dtype)
        phase = "train"
        res = train(model, blocks, st, device=device, progress=progress)
        graph_oom = res.cuda_graph.startswith("capture failed") and "out of memory" in res.cuda_graph.lower()
        out.update(outcome="trained-eager" if graph_oom else "trained",
                   losses=res.losses, cuda_graph=res.cuda_graph, paged_state_bytes=res.paged_state_bytes,
                   peaks_after_warmup=res.peaks, plan_comparison=compare_with_plan(shape, st, res.memory, res.peaks))
    except torch.cuda.OutOfMemoryError as exc:  # the allocator's cap (or the card) ran out
        out.update(outcome="oom", oom_phase=phase, error=" ".join(str(exc).split())[:600], paged_state_bytes=None)
    peaks_so_far()
    samples = res.memory if res else []
    nvml_now = nvml.nvml_used_bytes()
    out.update(steps_done=seen["steps_done"],
               peak_allocated_bytes=max([seen["peak_allocated_bytes"]] + [s["peak_allocated_bytes"] for s in samples]),
               peak_reserved_bytes=max([seen["peak_reserved_bytes"]] + [s["peak_reserved_bytes"] for s in samples]),
               nvml_used_bytes=max([n for n in [nvml_now] + [s["nvml_used_bytes"] for s in samples] if n is not None],
                                   default=None),
               num_ooms=torch.cuda.memory_stats(device).get("num_ooms", 0) if cuda else 0)
    return out


def run_child(job: dict, timeout_s: int) -> dict:
    """``measure(job)`` in a fresh Python process; its last stdout line is the result."""
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], stdout=subprocess.PIPE, text=True,
                          timeout=timeout_s)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"optimizer": job["optimizer"], "outcome": f"failed (exit {proc.returncode})", "steps_done": 0}
    return json.loads(lines[-1])


# --- the bench --------------------------------------------------------------------------------------------------

def gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-3.2-1b", help="a known shape (qtool plan --list-models)")
    ap.add_argument("--rank", type=int, default=512)
    ap.add_argument("--targets", default="all-linear")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--optimizer", default="paged_adamw_32bit",
                    help="paged_adamw_32bit or paged_adamw_8bit; run beside its unpaged counterpart")
    ap.add_argument("--cap", help="allocator cap, e.g. 6GiB  [default: the plan's separating cap]")
    ap.add_argument("--out", type=Path, help="append one JSON line per run")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per run")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU path: a tiny shape, no cap, torch AdamW; the plan is still the real configuration's")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    return ap


def planned(args) -> tuple[int, dict]:
    """(the allocator cap, optimizer -> its :class:`qtool.plan.cap.CapCheck`) for the bench's configuration."""
    from qtool.train.measure import plan_settings

    shape = known_shape(args.model)
    settings = plan_settings(train_settings(args, args.optimizer, "cuda"))
    cap_bytes = caps.parse_cap(args.cap) if args.cap else caps.separating_cap(shape, settings)
    return cap_bytes, {c.optimizer: c for c in caps.check_cap(shape, settings, cap_bytes)}


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.child:
        print(json.dumps(measure(json.loads(args.child))), flush=True)
        return 0

    try:
        cap_bytes, checks = planned(args)
    except QtoolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config = {k: getattr(args, k) for k in ("model", "rank", "targets", "seq_len", "batch_size", "steps")}
    print(f"{args.model} rank {args.rank} on {args.targets}, seq {args.seq_len} x batch {args.batch_size}; allocator "
          f"cap {cap_bytes:,} bytes = {gib(cap_bytes)} GiB" + (" (given)" if args.cap else
                                                                 " (midway between the planned reserved peaks)"),
          file=sys.stderr)
    results = []
    run_config = {**config, **DRY_RUN} if args.dry_run else config
    for name, check in checks.items():
        job = {"config": run_config, "optimizer": "adamw_torch" if args.dry_run else name, "device":
               "cpu" if args.dry_run else "cuda", "cap_bytes": None if args.dry_run else cap_bytes,
               "dry_run": args.dry_run}
        t0 = time.perf_counter()
        rec = {**run_child(job, args.timeout), "optimizer": name, "config": config, "run_config": run_config,
               "dry_run": args.dry_run,
               "planned": check.to_dict(), "predicted": check.verdict, "date": time.strftime("%Y-%m-%d")}
        measured = OUTCOMES.get(rec["outcome"])
        rec["as_predicted"] = None if args.dry_run else measured == check.verdict
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        results.append(rec)
        emit(rec, args.out)
    print(f"\n{'optimizer':<18} {'plan alloc':>10} {'plan res':>8} {'cap':>6} {'predicted':<9} {'measured':<13} "
          f"{'steps':>5} {'peak alloc':>10} {'peak res':>8} {'NVML':>6} {'paged':>6}  (GiB)")
    for r in results:
        p = r["planned"]
        print(f"{r['optimizer']:<18} {gib(p['peak_allocated_bytes']):>10} {gib(p['peak_reserved_bytes']):>8} "
              f"{gib(p['cap_bytes']):>6} {r['predicted']:<9} {r['outcome'][:13]:<13} {r['steps_done']:>5} "
              f"{gib(r.get('peak_allocated_bytes')):>10} {gib(r.get('peak_reserved_bytes')):>8} "
              f"{gib(r.get('nvml_used_bytes')):>6} {gib(r.get('paged_state_bytes')):>6}")
    print(f"- {caps.OUTSIDE_NOTE}")
    if args.dry_run:
        print("- dry run: CPU, tiny shape, no cap, torch AdamW in both runs; nothing compared with the plan")
    wrong = [r for r in results if r["as_predicted"] is False or r["outcome"].startswith("failed")]
    print(f"{len(results) - len(wrong)}/{len(results)} runs as predicted" if not args.dry_run else
          f"{len(results) - len(wrong)}/{len(results)} runs completed")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())

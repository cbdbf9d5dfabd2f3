"""How long ``qtool merge`` takes on the CPU, phase by phase, run as a user runs it (a fresh ``qtool`` process).

    python bench/merge_speed.py                                   # SmolLM2-135M fixture, synthetic r16 adapter
    python bench/merge_speed.py --base out/smollm2-nf4 --adapter out/adapter --repeat 3
    python bench/merge_speed.py --wait-policy both                # OpenMP passive waiting (qtool's) vs libgomp's default

Base: the NF4 conversion of the SmolLM2-135M fixture (``tools/fixtures.py``), converted once into ``--work`` unless
``--base`` names a folder. Adapter: unless ``--adapter`` names one, a synthetic LoRA of rank 16 on all seven Linear
kinds of every layer (210 modules) with ``|dW| / |W0|`` around 1e-3, like a short QLoRA run (the time does not depend
on the values). Each run is ``qtool merge BASE ADAPTER OUT --overwrite --json`` (through ``python -c``, with this
checkout first on ``sys.path``); the phases come from the report (``phase_seconds``), ``startup`` is the rest of the
wall time (Python, torch and click imports), ``cpu`` is the child's user + system time.

``--wait-policy``: ``passive`` runs qtool as shipped (``qtool merge`` sets ``OMP_WAIT_POLICY=PASSIVE`` unless the
environment sets it); ``default`` emulates libgomp's default (spin 300,000 times before sleeping, set through
``GOMP_SPINCOUNT``, which libgomp honours over the policy), i.e. qtool before it chose passive waiting.

The machine's load average is printed with each run: on a shared machine the wall times depend on it.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def nf4_base(work: Path) -> Path:
    out = work / "smollm2-nf4"
    if not (out / "config.json").exists():
        sys.path.insert(0, str(ROOT))
        from qtool.convert.pipeline import convert
        from tools import fixtures

        print(f"converting the SmolLM2 fixture into {out} (once)", flush=True)
        convert(fixtures.smollm2(), out, target="cpu", overwrite=True)
    return out


def synthetic_adapter(base: Path, work: Path, rank: int) -> Path:
    """Rank-``rank`` LoRA factors on every Linear of the 7 kinds, sized like a short QLoRA run's."""
    out = work / f"adapter-r{rank}"
    if (out / "adapter_config.json").exists():
        return out
    sys.path.insert(0, str(ROOT))
    import torch

    from qtool.format.peft_adapter import save_adapter

    config = json.loads((base / "config.json").read_text())
    hidden, inter, n_layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim
    shapes = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
              "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    g = torch.Generator().manual_seed(0)
    factors = {}
    for i in range(n_layers):
        for kind, (n_out, n_in) in shapes.items():
            part = "self_attn" if kind.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            a = torch.randn(rank, n_in, generator=g) / n_in**0.5
            b = torch.randn(n_out, rank, generator=g) * 2e-4  # with scale 2: |dW|/|W0| ~ 1e-3 on SmolLM2
            factors[f"model.layers.{i}.{part}.{kind}"] = (a, b)
    return save_adapter(out, factors, rank=rank, alpha=2 * rank, target_modules=list(TARGETS))


def run_once(base: Path, adapter: Path, out: Path, policy: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("OMP_WAIT_POLICY", None)
    env.pop("GOMP_SPINCOUNT", None)
    if policy == "default":
        env["GOMP_SPINCOUNT"] = "300000"  # libgomp's spin count when OMP_WAIT_POLICY is unset
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", "from qtool.cli import main; main()", "merge", str(base),
                           str(adapter), str(out), "--overwrite", "--json"], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"qtool merge failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout)
    phases = report.get("phase_seconds") or {"merge() total": report["seconds"]}
    return {"policy": policy, "load_avg_1min": load, "wall": wall, "startup": wall - report["seconds"],
            "phases": phases, "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "verification_rel": (report.get("verification") or {}).get("merged_vs_bypass", {}).get("rel")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, help="NF4 (or 16-bit) base folder [convert the SmolLM2 fixture]")
    ap.add_argument("--adapter", type=Path, help="adapter folder [a synthetic r16 adapter on all Linear kinds]")
    ap.add_argument("--rank", type=int, default=16, help="rank of the synthetic adapter")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "qtool-merge-speed",
                    help="where the converted base, the synthetic adapter and the outputs go")
    ap.add_argument("--repeat", type=int, default=1, help="runs per wait policy (interleaved)")
    ap.add_argument("--wait-policy", choices=["passive", "default", "both"], default="passive")
    ap.add_argument("--out", type=Path, help="write the runs as JSON here")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    base = args.base or nf4_base(args.work)
    adapter = args.adapter or synthetic_adapter(base, args.work, args.rank)
    policies = ["passive", "default"] if args.wait_policy == "both" else [args.wait_policy]
    runs = []
    for r in range(args.repeat):
        for policy in policies:
            run = run_once(base, adapter, args.work / "merged", policy)
            runs.append(run)
            phases = "  ".join(f"{k} {v:.2f}" for k, v in run["phases"].items())
            print(f"[{policy}] wall {run['wall']:.1f} s (cpu {run['cpu']:.1f} s, load {run['load_avg_1min']:.1f}): "
                  f"startup {run['startup']:.2f}  {phases}", flush=True)
    print(f"\nqtool merge {base} {adapter}, {os.cpu_count()} CPUs; median of {args.repeat} run(s), seconds")
    for policy in policies:
        mine = [r for r in runs if r["policy"] == policy]
        names = list(mine[0]["phases"])
        cols = ["wall", "cpu", "startup"] + names
        med = [statistics.median(r[c] if c in r else r["phases"][c] for r in mine) for c in cols]
        print(f"{policy:>8}: " + "  ".join(f"{c} {m:.2f}" for c, m in zip(cols, med)))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"base": str(base), "adapter": str(adapter), "cpus": os.cpu_count(),
                                        "runs": runs}, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Which LoRA initialisation to use on an NF4 base: zero, symmetric, PiSSA, LoftQ (1 and 5 iterations), trained the
same way on real text, with the error each starts from.

    python bench/init_compare.py                         # SmolLM2-135M, Shakespeare, 200 steps on the CPU
    python bench/init_compare.py --steps 50 --quick      # a smoke run

For each init: the SmolLM2 fixture converted to NF4 (plain for zero/symmetric; `--lora-init pissa|loftq` for the
others), `qtool train` with the same seed, data order, rank, targets, learning rate and steps; recorded: the training
loss of every step, the held-out loss before and after, and the step-0 error — the mean relative weight error of the
initial model against the 16-bit weights over the adapted modules (``||W - deq(Q) - s·B·A|| / ||W||``; for zero and
symmetric the bypass is zero at step 0, so it is plain NF4's error) and the held-out loss of the 16-bit model itself
(transformers, fp32) as the floor. Writes JSON and a PNG (loss curves, running mean over 10 steps) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

INITS = (("zero", "zero", 1), ("symmetric", "symmetric", 1), ("pissa", "pissa", 1), ("loftq-1", "loftq", 1),
         ("loftq-5", "loftq", 5))


def _convert(src: Path, cache: Path, init: str, loftq_iter: int, spec_kw: dict) -> tuple[Path, dict | None]:
    from qtool.adapters.spec import AdapterSpec
    from qtool.convert.pipeline import convert

    tag = "plain" if init in ("zero", "symmetric") else f"{init}-{loftq_iter}-r{spec_kw['rank']}-{spec_kw['targets']}"
    out = cache / tag
    report = out / "qtool_report.json"
    if not report.exists():
        lora_init = None if tag == "plain" else AdapterSpec(init=init, loftq_iter=loftq_iter, **spec_kw)
        convert(src, out, lora_init=lora_init, overwrite=True)
    return out, json.loads(report.read_text()).get("lora_init")


def _plain_error(folder: Path, src: Path, spec_kw: dict) -> float:
    """Mean relative error of plain NF4 over the adapted modules, from the conversion report."""
    from qtool.adapters.spec import AdapterSpec
    from qtool.train.settings import read_shape

    shape = read_shape(folder)
    names = set(AdapterSpec(**spec_kw).module_ranks(shape))
    report = json.loads((folder / "qtool_report.json").read_text())
    errs = [t["rel_error"] for t in report["tensors"] if t["quantized"] and t["name"].split(".")[-2] in names]
    return sum(errs) / len(errs)


def _reference_eval_loss(src: Path, blocks) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        losses = [float(model(blocks.eval[i:i + 2], labels=blocks.eval[i:i + 2]).loss)
                  for i in range(0, len(blocks.eval), 2)]
    return sum(losses) / len(losses)


def _plot(results: list[dict], floor: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    for r in results:
        losses = r["losses"]
        smooth = [sum(losses[max(0, i - 9):i + 1]) / len(losses[max(0, i - 9):i + 1]) for i in range(len(losses))]
        ax.plot(range(1, len(losses) + 1), smooth, label=r["name"])
    ax.set(xlabel="step", ylabel="training loss (running mean of 10 steps)",
           title="SmolLM2-135M NF4 + LoRA on Shakespeare: training loss by init")
    ax.legend()
    names = [r["name"] for r in results]
    x = range(len(names))
    bx.bar([i - 0.2 for i in x], [r["eval_loss_before"] for r in results], 0.4, label="before training")
    bx.bar([i + 0.2 for i in x], [r["eval_loss_after"] for r in results], 0.4, label="after")
    bx.axhline(floor, color="k", lw=1, ls="--", label="16-bit model (fp32)")
    lo = min(floor, *(r["eval_loss_after"] for r in results))
    hi = max(r["eval_loss_before"] for r in results)
    bx.set_ylim(lo - 0.3 * (hi - lo), hi + 0.1 * (hi - lo))
    bx.set_xticks(list(x), names, rotation=20)
    bx.set(ylabel="held-out loss", title="held-out loss")
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--targets", default="all-linear")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup-steps", type=int, default=10)
    ap.add_argument("--only", default=None, help="comma-separated subset of: " + ", ".join(n for n, *_ in INITS))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "init_compare.json")
    ap.add_argument("--cache", type=Path, default=None, help="converted folders (default: fixtures cache)")
    args = ap.parse_args()

    import torch
    import transformers

    from tools import fixtures
    from qtool.train.recipe import TrainSettings, run

    src, text = fixtures.smollm2(), fixtures.shakespeare()
    cache = args.cache or fixtures.cache_dir() / "bench-init"
    spec_kw = dict(rank=args.rank, alpha=args.alpha, targets=args.targets)
    wanted = set(args.only.split(",")) if args.only else None
    results, floor = [], None
    for name, init, t in INITS:
        if wanted and name not in wanted:
            continue
        t0 = time.perf_counter()
        folder, init_report = _convert(src, cache, init, t, spec_kw)
        convert_s = time.perf_counter() - t0
        st = TrainSettings(steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                           warmup_steps=args.warmup_steps, init=init, eval_blocks=32, **spec_kw)
        print(f"{name}: training {args.steps} steps ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        res = run(folder, text, None, st)
        if floor is None:
            from qtool.train.data import pack
            from transformers import AutoTokenizer

            floor = _reference_eval_loss(src, pack(text, AutoTokenizer.from_pretrained(src), args.seq_len,
                                                   st.eval_fraction, st.eval_blocks))
        step0 = init_report["mean_init_rel_error"] if init_report else _plain_error(folder, src, spec_kw)
        results.append({"name": name, "init": init, "loftq_iter": t, "step0_weight_rel_error": step0,
                        "eval_loss_before": res.eval_loss_before, "eval_loss_after": res.eval_loss,
                        "losses": res.losses, "train_seconds": time.perf_counter() - t0, "convert_seconds": convert_s,
                        "compute_dtype": res.compute_dtype})
    record = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads", "torch": torch.__version__, "transformers": transformers.__version__,
              "settings": {**vars(args), "out": str(args.out), "cache": str(cache)},
              "reference_eval_loss_16bit_fp32": floor, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    _plot(results, floor, args.out.with_suffix(".png"))
    print(f"16-bit model held-out loss (fp32): {floor:.4f}")
    print(f"{'init':<10} {'step-0 weight err':>17} {'held-out before':>15} {'after':>8} {'last-10 train':>13}")
    for r in results:
        last = sum(r["losses"][-10:]) / len(r["losses"][-10:])
        print(f"{r['name']:<10} {r['step0_weight_rel_error']:>17.4f} {r['eval_loss_before']:>15.4f} "
              f"{r['eval_loss_after']:>8.4f} {last:>13.4f}")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()

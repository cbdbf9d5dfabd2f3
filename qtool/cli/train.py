"""``qtool train``: parse flags, call :func:`qtool.train.recipe.run`, render the result (and the plan beside it)."""
from __future__ import annotations

import json

import click

from qtool.cli import CONTEXT_SETTINGS


@click.command("train", context_settings=CONTEXT_SETTINGS)
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Plain text, or JSONL with a 'text' field.")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Adapter folder (PEFT format).")
@click.option("--steps", default=100, show_default=True, type=int)
@click.option("--seq-len", default=512, show_default=True, type=int)
@click.option("--batch-size", default=1, show_default=True, type=int)
@click.option("--grad-accum", default=1, show_default=True, type=int, help="Micro-batches per optimizer step.")
@click.option("--rank", default=16, show_default=True, type=int)
@click.option("--alpha", default=32.0, show_default=True, type=float)
@click.option("--dropout", default=0.0, show_default=True, type=float)
@click.option("--targets", default="qkvo", show_default=True, help="qkvo, mlp, all-linear or q_proj,v_proj,...")
@click.option("--lr", default=2e-4, show_default=True, type=float)
@click.option("--warmup-steps", default=0, show_default=True, type=int)
@click.option("--max-grad-norm", default=0.3, show_default=True, type=float, help="0 disables clipping.")
@click.option("--optimizer", default="auto", show_default=True,
              help="auto (paged_adamw_32bit on CUDA, adamw_torch on CPU), paged_adamw_8bit, adamw_8bit, sgd, ...")
@click.option("--grad-checkpointing/--no-grad-checkpointing", default=True, show_default=True)
@click.option("--rslora", is_flag=True, help="Scale the bypass by alpha/sqrt(rank) instead of alpha/rank.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def train_cmd(model_dir, data, out, as_json, overwrite, rslora, max_grad_norm, **kw):
    """Train LoRA adapters on a converted NF4 checkpoint; report GPU memory measured beside the plan.

    \b
    Examples:
      qtool train ./llama2-7b-nf4 --data text.txt --steps 200 --seq-len 2048 --out ./adapter
      qtool train ./smollm2-nf4 --data shakespeare.txt --steps 20 --seq-len 256 --targets all-linear --json
    """
    from tqdm import tqdm

    from qtool.train.recipe import TrainSettings, run

    st = TrainSettings(use_rslora=rslora, max_grad_norm=max_grad_norm or None, **kw)
    bar = tqdm(total=st.steps, desc="training", file=click.get_text_stream("stderr"), disable=None, leave=False)

    def progress(step, loss, seconds):
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{st.batch_size * st.seq_len * st.grad_accum / seconds:,.0f}")

    try:
        result = run(model_dir, data, out, st, overwrite=overwrite, progress=progress)
    finally:
        bar.close()
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=1))
        return
    click.echo(f"{len(result.losses)} steps on {result.device} ({result.optimizer}): loss {result.losses[0]:.4f} -> "
               f"{result.losses[-1]:.4f}, eval loss {result.eval_loss:.4f}, {result.tokens_per_second:,.0f} tokens/s, "
               f"{result.trainable_params:,} trainable parameters")
    from tabulate import tabulate

    rows = [[r["name"], f"{r['planned_bytes'] / 2**30:.2f}",
             "-" if r["measured_bytes"] is None else f"{r['measured_bytes'] / 2**30:.2f}",
             "-" if r["error_pct"] is None else f"{r['error_pct']:+.1f}%"] for r in result.plan_comparison]
    click.echo(tabulate(rows, headers=["GPU memory", "plan GiB", "measured GiB", "plan error"], tablefmt="simple"))
    if result.device == "cpu":
        click.echo("(measured on a CUDA device only; the plan is for one GPU with these settings)")
    if result.adapter:
        click.echo(f"wrote {result.adapter}")

"""``qtool train``: parse flags, check them (no torch yet), call :func:`qtool.train.recipe.run`, render the result
(and the plan beside it)."""
from __future__ import annotations

import json

import click

from qtool.adapters.spec import INITS, METHODS
from qtool.cli import CONTEXT_SETTINGS
from qtool.train.settings import COMPUTE_DTYPES, OPTIMIZERS


@click.command("train", context_settings=CONTEXT_SETTINGS)
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Plain text, or JSONL with a 'text' field; packed into --seq-len blocks, the last 5% held out.")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Adapter folder: PEFT's format for lora and prefix, qtool's for adapter.")
@click.option("--method", default="lora", show_default=True, type=click.Choice(METHODS),
              help="lora: low-rank bypass of chosen Linears (merges into W); adapter: Houlsby bottleneck adapters "
                   "after every attention and MLP block; prefix: trainable keys/values in every attention.")
@click.option("--adapter-size", default=64, show_default=True, type=int,
              help="--method adapter: the bottleneck width m (1 to the hidden size).")
@click.option("--prefix-len", default=20, show_default=True, type=int,
              help="--method prefix: key/value vectors per layer (they take positions before the sequence).")
@click.option("--prefix-projection", default=0, show_default=True, type=int,
              help="--method prefix: train the prefix through an MLP of this hidden width (PEFT's prefix_projection; "
                   "0: train the vectors directly, started from the keys/values of the text's first tokens).")
@click.option("--steps", default=100, show_default=True, type=int, help="Optimizer steps.")
@click.option("--seq-len", default=512, show_default=True, type=int, help="Tokens per training sequence.")
@click.option("--batch-size", default=1, show_default=True, type=int, help="Sequences per micro-batch.")
@click.option("--grad-accum", default=1, show_default=True, type=int, help="Micro-batches per optimizer step.")
@click.option("--rank", default=16, show_default=True, type=int, help="LoRA rank r (per module: see --targets).")
@click.option("--alpha", default=32.0, show_default=True, type=float, help="LoRA alpha; the bypass is scaled alpha/r.")
@click.option("--dropout", default=0.0, show_default=True, type=float, help="Dropout on the LoRA input.")
@click.option("--targets", default="qkvo", show_default=True,
              help="qkvo, mlp, all-linear or module names, each optionally =RANK: q_proj=8,v_proj=32.")
@click.option("--init", "init", default="zero", show_default=True, type=click.Choice(INITS),
              help="zero: B=0 (step 0 = base); symmetric: A, B non-zero, offset frozen (step 0 = base); "
                   "pissa, loftq: made by `qtool convert --lora-init` from the 16-bit model.")
@click.option("--lr", default=2e-4, show_default=True, type=float, help="Peak learning rate.")
@click.option("--warmup-steps", default=0, show_default=True, type=int, help="Linear warm-up steps.")
@click.option("--max-grad-norm", default=0.3, show_default=True, type=float, help="Clip gradients; 0 disables.")
@click.option("--optimizer", default="auto", show_default=True, type=click.Choice(("auto",) + OPTIMIZERS),
              help="auto: paged_adamw_32bit on CUDA, adamw_torch on the CPU.")
@click.option("--compute-dtype", default="auto", show_default=True, type=click.Choice(COMPUTE_DTYPES),
              help="dtype of the products. auto: bfloat16 on CUDA and on CPUs with bf16 instructions, else float32.")
@click.option("--grad-checkpointing/--no-grad-checkpointing", default=True, show_default=True,
              help="Keep only each layer's input and recompute it in the backward.")
@click.option("--rslora", is_flag=True, help="Scale the bypass by alpha/sqrt(rank) instead of alpha/rank.")
@click.option("--eval-blocks", default=32, show_default=True, type=int,
              help="Held-out blocks for the loss before and after training (at most 5% of the data).")
@click.option("--eval-every", default=0, show_default=True, type=int,
              help="Also measure the held-out loss every this many steps (0: before and after only).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the init, the data order and dropout.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def train_cmd(model_dir, data, out, as_json, overwrite, rslora, max_grad_norm, **kw):
    """Train adapters (LoRA, Houlsby adapters or a prefix) on a converted NF4 checkpoint; report GPU memory measured
    beside the plan.

    \b
    Examples:
      qtool train ./llama2-7b-nf4 --data text.txt --steps 200 --seq-len 2048 --out ./adapter
      qtool train ./smollm2-nf4 --data shakespeare.txt --steps 20 --seq-len 256 --targets all-linear --json
      qtool train ./smollm2-nf4 --data shakespeare.txt --targets q_proj=8,v_proj=32 --init symmetric
      qtool train ./smollm2-nf4 --data shakespeare.txt --method prefix --prefix-len 64 --out ./prefix
      qtool train ./smollm2-nf4 --data shakespeare.txt --method adapter --adapter-size 32 --out ./houlsby
    """
    from click.core import ParameterSource

    from qtool.train.settings import TrainSettings, check_inputs

    ctx = click.get_current_context()
    fields = {"rslora": "use_rslora"}
    given = {fields.get(name, name) for name in ctx.params
             if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE}
    st = TrainSettings(use_rslora=rslora, max_grad_norm=max_grad_norm or None, **kw)
    check_inputs(model_dir, data, out, st, overwrite=overwrite, given=given)  # flags and paths first: no torch yet
    from qtool.cli import progress_bar
    from qtool.train.recipe import run

    bars = {}

    def progress(step, loss, seconds):
        bar = bars.get("train") or bars.setdefault("train", progress_bar(st.steps, "training"))
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{st.batch_size * st.seq_len * st.grad_accum / seconds:,.0f}")

    def eval_progress(phase, done, total):
        label = f"held-out loss {phase}" + (" training" if phase in ("before", "after") else "")
        bar = bars.get(phase) or bars.setdefault(phase, progress_bar(total, label))
        bar.update(done - bar.n)

    try:
        result = run(model_dir, data, out, st, overwrite=overwrite, progress=progress, eval_progress=eval_progress,
                     given=given)
    finally:
        for bar in bars.values():
            bar.close()
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=1))
        return
    click.echo(f"{len(result.losses)} steps on {result.device} ({result.optimizer}, compute {result.compute_dtype}), "
               f"{result.trainable_params:,} trainable parameters, {result.tokens_per_second:,.0f} tokens/s")
    click.echo(f"held-out loss {result.eval_loss_before:.4f} -> {result.eval_loss:.4f} "
               f"({result.eval_loss - result.eval_loss_before:+.4f}); training loss of the first/last step "
               f"{result.losses[0]:.4f} / {result.losses[-1]:.4f} (one batch each)")
    if len(result.eval_curve) > 2:
        click.echo("held-out loss by step: " + ", ".join(f"{step}: {loss:.4f}" for step, loss in result.eval_curve))
    from tabulate import tabulate

    rows = [[r["name"], f"{r['planned_bytes'] / 2**30:.2f}",
             "-" if r["measured_bytes"] is None else f"{r['measured_bytes'] / 2**30:.2f}",
             "-" if r["error_pct"] is None else f"{r['error_pct']:+.1f}%"] for r in result.plan_comparison]
    click.echo(tabulate(rows, headers=["GPU memory", "plan GiB", "measured GiB", "plan error"], tablefmt="simple"))
    if result.device == "cpu":
        click.echo("(measured on a CUDA device only; the plan is for one GPU with these settings)")
    if result.adapter:
        click.echo(f"wrote {result.adapter}")

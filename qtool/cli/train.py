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
              help="lora: low-rank bypass of chosen Linears (merges into W); adalora: P·diag(λ)·Q from "
                   "--init-rank, the rank budget shrunk to --target-rank per module on average, spent where the "
                   "importance scores say; adapter: Houlsby bottleneck adapters after every attention and MLP "
                   "block; prefix: trainable keys/values in every attention.")
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
              help="qkvo, mlp, all-linear or module names, each optionally =RANK: q_proj=8,v_proj=32; embed_tokens "
                   "and lm_head add LoRA on the embedding and the head (one shared adapter on a tied model).")
@click.option("--init", "init", default="zero", show_default=True, type=click.Choice(INITS),
              help="zero: B=0 (step 0 = base); symmetric: A, B non-zero, offset frozen (step 0 = base); "
                   "pissa, loftq: made by `qtool convert --lora-init` from the 16-bit model.")
@click.option("--init-rank", type=int, default=None, help="AdaLoRA: the rank every module starts at.  [default: 12]")
@click.option("--target-rank", type=int, default=None,
              help="AdaLoRA: the average rank per module at the end (budget = target-rank x modules).  [default: 8]")
@click.option("--tinit", type=int, default=None, help="AdaLoRA: steps before the budget starts to fall.  [default: 0]")
@click.option("--tfinal", type=int, default=None,
              help="AdaLoRA: last steps trained at the final budget, mask fixed.  [default: 0]")
@click.option("--delta-t", type=int, default=None, help="AdaLoRA: steps between two maskings.  [default: 1]")
@click.option("--beta1", type=float, default=None, help="AdaLoRA: EMA factor of the sensitivity.  [default: 0.85]")
@click.option("--beta2", type=float, default=None, help="AdaLoRA: EMA factor of its uncertainty.  [default: 0.85]")
@click.option("--orth-reg", type=float, default=None,
              help="AdaLoRA: weight of the orthogonality regulariser (mean of ||QQᵀ-I||, ||PᵀP-I||).  [default: 0.5]")
@click.option("--export", "export", type=click.Choice(("lora",)), default=None,
              help="AdaLoRA: also write OUT/lora, the same adapter as plain LoRA (per-module rank_pattern, modules "
                   "at rank 0 dropped) for qtool merge and LoRA-only loaders; see qtool adapter export-lora.")
@click.option("--lr", default=2e-4, show_default=True, type=float, help="Peak learning rate.")
@click.option("--warmup-steps", default=0, show_default=True, type=int, help="Linear warm-up steps.")
@click.option("--max-grad-norm", default=0.3, show_default=True, type=float, help="Clip gradients; 0 disables.")
@click.option("--optimizer", default="auto", show_default=True, type=click.Choice(("auto",) + OPTIMIZERS),
              help="auto: paged_adamw_32bit on CUDA, adamw_torch on the CPU.")
@click.option("--compute-dtype", default="auto", show_default=True, type=click.Choice(COMPUTE_DTYPES),
              help="dtype of the products. auto: bfloat16 on CUDA and on CPUs with bf16 instructions, else float32.")
@click.option("--grad-checkpointing/--no-grad-checkpointing", default=True, show_default=True,
              help="Keep only each layer's input and recompute it in the backward.")
@click.option("--offload-activations", is_flag=True,
              help="Keep the checkpointed layer inputs in pinned host memory instead of on the GPU (copied while "
                   "the next layer runs, fetched back for the backward); needs --grad-checkpointing.")
@click.option("--expandable-segments/--no-expandable-segments", default=True, show_default=True,
              help="Let PyTorch's CUDA allocator map its segments in pages as they grow "
                   "(expandable_segments:True): less memory reserved beside the tensors, hence less NVML-used. A "
                   "PYTORCH_CUDA_ALLOC_CONF in the environment decides instead.")
@click.option("--rslora", is_flag=True, help="Scale the bypass by alpha/sqrt(rank) instead of alpha/rank.")
@click.option("--eval-blocks", default=32, show_default=True, type=int,
              help="Held-out blocks for the loss before and after training (at most 5% of the data).")
@click.option("--eval-every", default=0, show_default=True, type=int,
              help="Also measure the held-out loss every this many steps (0: before and after only).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the init, the data order and dropout.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
@click.option("--nproc", default=1, show_default=True, type=int,
              help="Data-parallel processes on this machine, started through torchrun (on CUDA one GPU each, gloo "
                   "on the CPU): FSDP2 shards the NF4 weights, the adapter and its optimizer state over them, each "
                   "reads only its shard; --batch-size stays the global batch, split evenly, so the run trains what "
                   "one process would. Under `torchrun --nproc-per-node N -m qtool train ...` leave it out. Not yet "
                   "with --method adalora/prefix or --offload-activations; CUDA graphs are off.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def train_cmd(model_dir, data, out, as_json, overwrite, rslora, max_grad_norm, export, **kw):
    """Train adapters (LoRA, AdaLoRA, Houlsby adapters or a prefix) on a converted NF4 checkpoint; report GPU memory
    measured beside the plan. Models: llama, mistral, qwen2, qwen3, phi3 (Llama 2/3, SmolLM2, Mistral with its
    sliding window at any --seq-len, Qwen2/2.5/3, Phi-3 4k); mixture-of-experts and other types are refused (the
    converted folder still trains with transformers + PEFT/TRL).

    \b
    Examples:
      qtool train ./llama2-7b-nf4 --data text.txt --steps 200 --seq-len 2048 --out ./adapter
      qtool train ./smollm2-nf4 --data shakespeare.txt --steps 20 --seq-len 256 --targets all-linear --json
      qtool train ./smollm2-nf4 --data shakespeare.txt --targets q_proj=8,v_proj=32 --init symmetric
      qtool train ./smollm2-nf4 --data shakespeare.txt --targets all-linear,lm_head=8 --out ./adapter
      qtool train ./smollm2-nf4 --data shakespeare.txt --method adalora --init-rank 12 --target-rank 8
      qtool train ./smollm2-nf4 --data shakespeare.txt --method prefix --prefix-len 64 --out ./prefix
      qtool train ./smollm2-nf4 --data shakespeare.txt --method adapter --adapter-size 32 --out ./houlsby
      qtool train ./phi-3-mini-nf4 --data text.txt --targets qkvo,mlp  # qkv_proj, o_proj, gate_up_proj, down_proj
      qtool train ./smollm2-nf4 --data shakespeare.txt --nproc 2 --batch-size 4 --out ./adapter  # 2 processes
      torchrun --nproc-per-node 8 -m qtool train ./llama2-70b-nf4 --data text.txt --batch-size 8 --out ./adapter
    """
    from click.core import ParameterSource

    from qtool.errors import UsageError
    from qtool.train.settings import TrainSettings, check_inputs

    ctx = click.get_current_context()
    if kw["method"] == "adalora" and ctx.get_parameter_source("rank") == ParameterSource.COMMANDLINE:
        raise UsageError("--rank is LoRA's; AdaLoRA starts at --init-rank and ends at --target-rank per module",
                         hint="use --init-rank R0 --target-rank R")
    _check_export(export, kw["method"], out)
    fields = {"rslora": "use_rslora"}
    given = {fields.get(name, name) for name in ctx.params
             if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE}
    from qtool.train.distributed import is_main_process, launch, torchrun_world_size

    world = torchrun_world_size()
    if world > 1 and "nproc" in given:
        raise UsageError(f"--nproc {kw['nproc']}: this process is already one of {world} that torchrun started",
                         hint="leave --nproc out under torchrun (or run qtool train --nproc N without torchrun)")
    if world > 1:
        kw["nproc"] = world
    st = TrainSettings(use_rslora=rslora, max_grad_norm=max_grad_norm or None, **kw)
    # flags and paths first: no torch yet (under torchrun only rank 0 checks --out, the one that writes it)
    check_inputs(model_dir, data, out if is_main_process() else None, st, overwrite=overwrite, given=given)
    if st.nproc > 1 and world == 1:  # start the processes: each runs this command without --nproc
        ctx.exit(launch(st.nproc, ["train", *command_line(ctx, leave_out=("nproc",))]))
    from qtool.cli import progress_bar
    from qtool.train.recipe import run

    if not is_main_process():  # rank 0 reports for all
        run(model_dir, data, out, st, overwrite=overwrite, given=given)
        return
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
    exported = None
    if export == "lora" and result.adapter:  # read back from OUT: the export is of exactly what was saved
        from pathlib import Path

        from qtool.format.peft_adalora import export_lora

        exported = export_lora(result.adapter, Path(result.adapter) / "lora")
    if as_json:
        click.echo(json.dumps({**result.to_json(), **({"lora_export": exported} if exported else {})}, indent=1))
        return
    click.echo(f"{len(result.losses)} steps on {result.device} ({result.optimizer}, compute {result.compute_dtype}), "
               f"{result.trainable_params:,} trainable parameters, {result.tokens_per_second:,.0f} tokens/s")
    click.echo(f"held-out loss {result.eval_loss_before:.4f} -> {result.eval_loss:.4f} "
               f"({result.eval_loss - result.eval_loss_before:+.4f}); training loss of the first/last step "
               f"{result.losses[0]:.4f} / {result.losses[-1]:.4f} (one batch each)")
    if len(result.eval_curve) > 2:
        click.echo("held-out loss by step: " + ", ".join(f"{step}: {loss:.4f}" for step, loss in result.eval_curve))
    if result.distributed:  # sharded: the planner models one GPU holding everything, so no plan table
        d = result.distributed
        click.echo(f"{d['world_size']} processes ({d['backend']}, FSDP2): parameter shards " + ", ".join(
            f"rank {r['rank']} {r['param_bytes'] / 2**20:,.1f} MiB" for r in d["ranks"])
            + f" of {d['ranks'][0]['model_param_bytes'] / 2**20:,.1f} MiB")
    from tabulate import tabulate

    rows = [[r["name"], f"{r['planned_bytes'] / 2**30:.2f}",
             "-" if r["measured_bytes"] is None else f"{r['measured_bytes'] / 2**30:.2f}",
             "-" if r["error_pct"] is None else f"{r['error_pct']:+.1f}%"] for r in result.plan_comparison]
    if rows:
        click.echo(tabulate(rows, headers=["GPU memory", "plan GiB", "measured GiB", "plan error"], tablefmt="simple"))
    if result.device == "cpu" and rows:
        click.echo("(measured on a CUDA device only; the plan is for one GPU with these settings)")
    if result.adalora:
        from qtool.cli.adapter import budget_lines

        click.echo("")
        click.echo(budget_lines(result.adalora["summary"]))
        if "heatmap" in result.adalora:
            click.echo(f"heat map: {result.adalora['heatmap']}")
    if result.adapter:
        click.echo(f"wrote {result.adapter}")
    if exported:
        click.echo(f"wrote {exported['adapter']}: plain LoRA, {len(exported['ranks'])} modules, ranks "
                   f"{min(exported['ranks'].values())}-{max(exported['ranks'].values())}, "
                   f"{len(exported['dropped'])} module(s) at rank 0 dropped")


def command_line(ctx: click.Context, leave_out=()) -> list[str]:
    """The arguments and the options given on the command line of ``ctx``'s command, as a list that parses back to
    the same values (what ``--nproc`` passes to each process torchrun starts)."""
    from click.core import ParameterSource

    args, options = [], []
    for param in ctx.command.params:
        name, value = param.name, ctx.params.get(param.name)
        if name in leave_out or ctx.get_parameter_source(name) != ParameterSource.COMMANDLINE:
            continue
        if isinstance(param, click.Argument):
            args.append(str(value))
        elif param.is_flag:
            if value == param.flag_value or value is True:
                options.append(param.opts[0])
            elif param.secondary_opts:
                options.append(param.secondary_opts[0])
        else:
            options += [param.opts[0], str(value)]
    return args + options


def _check_export(export, method, out) -> None:
    """``--export lora`` converts the AdaLoRA adapter this run writes: refused before any work otherwise."""
    from qtool.errors import UsageError

    if export is None:
        return
    if method != "adalora":
        raise UsageError(f"--export {export} converts an AdaLoRA adapter; --method {method} already writes a plain "
                         "LoRA adapter", hint="add --method adalora, or leave --export out")
    if out is None:
        raise UsageError(f"--export {export} writes OUT/{export} beside the adapter: it needs --out",
                         hint="add --out FOLDER")

"""``qtool plan``: parse -> :func:`qtool.plan.planner.plan` -> a table or JSON. Imports no torch (it must start in < 0.5 s)."""
from __future__ import annotations

import json

import click
from tabulate import tabulate

from qtool.plan import planner
from qtool.arch import known_names, parse_param_count, resolve_model, shape_for_params
from qtool.errors import UsageError
from qtool.units import fmt_bytes


def _both(n_bytes: int) -> tuple[str, str]:
    return f"{n_bytes / 1e9:,.2f}", f"{n_bytes / 2**30:,.2f}"


def _shape(model: str | None, params: str | None):
    if (model is None) == (params is None):
        raise UsageError("give exactly one of --model (a name, config.json, folder or hub id) and --params",
                         hint="example: qtool plan --params 65e9 --rank 16")
    if model is not None:
        return resolve_model(model)
    try:
        return shape_for_params(parse_param_count(params))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _render(p: planner.Plan, table: list[dict], fit: planner.Fit | None, fit_label: str) -> str:
    st, shape = p.settings, p.shape
    ranks = sorted(set(st.module_ranks(shape).values()))
    head = (f"{shape.name} ({shape.model_type}, {shape.n_params():,} params) - profile {st.profile}; "
            f"LoRA rank {'/'.join(map(str, ranks))} on {st.targets} ({p.n_trainable:,} trainable); "
            f"seq {st.seq_len} x batch {st.batch_size}; checkpointing {'on' if st.grad_checkpointing else 'off'}; "
            f"{st.optimizer}; {st.attention} attention; {st.loss} loss")
    rows = [(r.name, *_both(r.bytes), r.where, r.counter) for r in p.rows]
    lines = [head, "", tabulate(rows, headers=("item", "GB", "GiB", "where", "counted from"),
                                 colalign=("left", "right", "right", "left", "left"), disable_numparse=True), ""]
    unquantised = p.weights_4bit_total_bytes - p.nf4_weights_bytes
    lines.append(f"weights: fp16 {fmt_bytes(p.fp16_weights_bytes)} ({fmt_bytes(p.fp16_weights_bytes, 'GiB')}) -> "
                 f"4-bit {fmt_bytes(p.weights_4bit_total_bytes)} = NF4 packed + constants "
                 f"{fmt_bytes(p.nf4_weights_bytes)} + unquantised embeddings/head/norms {fmt_bytes(unquantised)}")
    lines.append(f"peak (during {p.peak_phase}): allocated {fmt_bytes(p.peak_allocated_bytes)}, "
                 f"reserved {fmt_bytes(p.peak_reserved_bytes)}, NVML used {fmt_bytes(p.peak_nvml_bytes)} "
                 f"({fmt_bytes(p.peak_nvml_bytes, 'GiB')})")
    gpu_rows = [(g["gpu"], fmt_bytes(g["memory_bytes"], "GiB", 1), "yes" if g["fits"] else "no",
                 fmt_bytes(g["headroom_bytes"], "GiB", 1), str(g["max_seq_len"] or "-")) for g in table]
    lines += ["", tabulate(gpu_rows, headers=("GPU", "memory", "fits", "headroom",
                                              f"max seq-len (batch {st.batch_size})"),
                           colalign=("left", "right", "left", "right", "right"), disable_numparse=True)]
    if fit is not None:
        knob = fit.knob.replace("_", "-")
        if fit.value is None:
            lines += ["", f"--fit {fit_label}: nothing fits, not even --{knob} 1"]
        else:
            bound = " (the search bound)" if fit.limited else f"; at {fit.value + 1} it does not"
            lines += ["", f"--fit {fit_label} ({fmt_bytes(fit.capacity_bytes)}): largest --{knob} that fits is "
                      f"{fit.value} (NVML used {fmt_bytes(fit.plan.peak_nvml_bytes)}{bound})"]
    if p.notes:
        lines += ["", "notes:"] + [f"- {note}" for note in p.notes]
    return "\n".join(lines)


@click.command("plan", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("model_arg", metavar="[MODEL]", required=False)
@click.option("--model", "-m", help="Known name (llama-2-7b, qwen2.5-7b, ...), config.json, model folder or hub id "
              "(local cache only). Same as the MODEL argument.")
@click.option("--params", help="A bare parameter count (65e9, 7B); the closest known shape is assumed.")
@click.option("--profile", default="qtool", show_default=True, help="qtool (our trainer) or hf (transformers + PEFT).")
@click.option("--rank", "-r", type=int, default=16, show_default=True)
@click.option("--alpha", type=float, help="LoRA alpha (no effect on memory) [default: 2 x rank]")
@click.option("--targets", default="qkvo", show_default=True,
              help="qkvo, mlp, all-linear and/or module names, each with an optional rank: qkvo,down_proj=32")
@click.option("--seq-len", type=int, default=2048, show_default=True)
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--grad-checkpointing/--no-grad-checkpointing", default=True, show_default=True)
@click.option("--optimizer", default="paged_adamw_32bit", show_default=True, help=", ".join(planner.OPTIMIZERS))
@click.option("--adapter-dtype", default="float32", show_default=True)
@click.option("--compute-dtype", default="bfloat16", show_default=True)
@click.option("--no-double-quant", is_flag=True, help="fp32 absmax per block instead of 8-bit + nested absmax.")
@click.option("--block-size", type=int, default=64, show_default=True)
@click.option("--attention", default="sdpa", show_default=True, help="sdpa (flash/efficient when possible) or eager.")
@click.option("--loss", help="chunked (qtool default) or full (fp32 logits; hf always).")
@click.option("--fit", "fit_to", help="A memory size (24GB, 80GiB) or GPU name: solve for the largest --solve value.")
@click.option("--solve", type=click.Choice(["seq-len", "batch-size", "rank"]), default="seq-len", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--list-models", is_flag=True, help="List the known model names and exit.")
def plan_cmd(model_arg, model, params, no_double_quant, fit_to, solve, as_json, list_models, **options):
    """Plan the GPU memory of QLoRA training: every byte on a named row, the peak, and what fits.

    \b
    Examples:
      qtool plan --params 65e9 --rank 16
      qtool plan llama-2-7b --targets all-linear --seq-len 4096 --profile hf
      qtool plan ./llama2-7b-nf4 --fit "RTX 4090" --solve batch-size --json
    """
    if list_models:
        click.echo("\n".join(known_names()))
        return
    if model_arg and model:
        raise UsageError("give the model once: as the MODEL argument or with --model")
    shape = _shape(model_arg or model, params)
    settings = planner.Settings(double_quant=not no_double_quant, **options)
    p = planner.plan(shape, settings)
    table = planner.fit_table(shape, settings)
    fit, fit_label = None, ""
    if fit_to:
        fit_label, capacity = planner.capacity_bytes(fit_to)
        fit = planner.largest_fitting(shape, settings, capacity, solve.replace("-", "_"))
    if as_json:
        out = p.to_dict()
        out["fit_table"] = table
        if fit is not None:
            out["fit"] = {"target": fit_label, "capacity_bytes": fit.capacity_bytes, "knob": fit.knob,
                          "value": fit.value, "limited": fit.limited,
                          "peak_nvml_bytes": fit.plan.peak_nvml_bytes if fit.plan else None}
        click.echo(json.dumps(out, indent=1))
        for note in p.notes:
            click.echo(f"note: {note}", err=True)
        return
    click.echo(_render(p, table, fit, fit_label))

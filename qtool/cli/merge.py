"""``qtool merge``: parse flags, call :func:`qtool.merge.pipeline.merge`, render the summary."""
from __future__ import annotations

import json
import os
import sys

import click

from qtool.cli import CONTEXT_SETTINGS, byte_progress
from qtool.units import fmt_bytes, parse_size


def _size(ctx, param, value):
    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


# What the table's columns mean, printed under it and in -h (definitions: qtool.merge.math).
COLUMNS_FOOTNOTE = ("dW = scale·B·A, the adapter's update of W0. dW kept: the share of dW that the written weights "
                    "carry (<e, dW>/|dW|², e = written W' - W0 rounded alike; 1 = all). dW error: |e - dW|/|dW|, what "
                    "rounding to the output dtype did to the update (0 = exact, 1 = as if dW were dropped).")


def _modules_table(rows: list[dict], n: int = 8) -> str:
    from tabulate import tabulate

    top = sorted(rows, key=lambda r: -(r["dw_rel"] or 0))[:n]
    body = [[r["module"], r["rank"], _fmt(r["scale"]), _fmt(r["dw_rel"], ".2e"), _fmt(r["dw_max_abs"], ".2e"),
             _fmt(r.get("dw_kept"), ".3f"), _fmt(r.get("dw_rel_error"), ".2e")] for r in top]
    return tabulate(body, headers=[f"largest updates ({len(top)} of {len(rows)})", "rank", "scale", "|dW|/|W0|",
                                   "max |dW|", "dW kept", "dW error"], tablefmt="simple", disable_numparse=True)


def _verification_table(v: dict) -> str:
    from tabulate import tabulate

    rows = [["merged vs base + adapter", _fmt(v["merged_vs_bypass"]["rel"], ".2e"),
             _fmt(v["merged_vs_bypass"]["max_abs"], ".3g"), _fmt(v["tolerance_rel"], ".0e")],
            ["base + adapter vs base", _fmt(v["adapter_effect"]["rel"], ".2e"),
             _fmt(v["adapter_effect"]["max_abs"], ".3g"), ""]]
    if v.get("rounding_floor"):
        rows.append(["rounding alone (base in output dtype)", _fmt(v["rounding_floor"]["rel"], ".2e"),
                     _fmt(v["rounding_floor"]["max_abs"], ".3g"), ""])
    if "merged_vs_trained_nf4" in v:
        rows.append(["merged vs NF4 base + adapter", _fmt(v["merged_vs_trained_nf4"]["rel"], ".2e"),
                     _fmt(v["merged_vs_trained_nf4"]["max_abs"], ".3g"), ""])
    return tabulate(rows, headers=[f"logits on {v['tokens'][0]}x{v['tokens'][1]} tokens", "rel diff", "max |diff|",
                                   "limit"], tablefmt="simple", disable_numparse=True)


@click.command("merge", context_settings=CONTEXT_SETTINGS)
@click.argument("base_dir", metavar="BASE_DIR")
@click.argument("adapter_dir", metavar="ADAPTER_DIR", type=click.Path(exists=True))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None,
              help="Output dtype [default: the model's dtype in config.json].")
@click.option("--requantize", is_flag=True,
              help="Write NF4 again instead of 16-bit, and report how much of each update survived (usually little).")
@click.option("--target", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True,
              help="With --requantize: whose NF4 bytes to reproduce, as in qtool convert.")
@click.option("--max-shard-size", default="50GB", show_default=True, callback=_size, help="Largest output shard.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Compare logits of the merged model with base + adapter (holds an fp32 copy of the model in RAM).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (only once the new one is complete).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def merge_cmd(base_dir, adapter_dir, out, dtype, requantize, target, max_shard_size, verify, overwrite, as_json):
    """Fold a LoRA adapter (qtool's or PEFT's) into its base: a 16-bit checkpoint that plain transformers loads,
    with no LoRA layers left (zero extra latency).

    BASE_DIR is the NF4 folder the adapter was trained on (recommended: W0 is its dequantised weight, so the merged
    model is the trained model) or the original 16-bit folder (a note says how much quantisation error that adds back).

    The summary lists the largest updates dW = scale·B·A: |dW|/|W0|, max |dW|, "dW kept" (the share of dW that the
    written weights carry, 1 = all) and "dW error" (|e - dW|/|dW|, e = written W' minus W0 rounded alike: what
    rounding to the output dtype did to the update; 1 = as if dW were dropped). A warning on stderr says when bf16
    rounding erases most of the update (small updates on large weights) and suggests --dtype fp32 or fp16. Then the
    logits check: merged vs base + adapter, against the adapter's own effect and the limit that rounding explains.

    \b
    Examples:
      qtool merge ./llama2-7b-nf4 ./adapter ./llama2-7b-merged
      qtool merge ./llama2-7b-nf4 ./adapter ./merged --dtype fp16 --max-shard-size 5GB --json
      qtool merge ./llama2-7b-nf4 ./adapter ./merged-nf4 --requantize
    then: AutoModelForCausalLM.from_pretrained("./llama2-7b-merged")
    """
    # A merge is thousands of short parallel regions (passes over each tensor, a forward on 64 tokens). With
    # OpenMP's default waiting, a thread that reaches a barrier first spins while its partner waits for a core; on a
    # shared 2-core machine (load 4-6) that made the merge 2-3.5x slower (bench/merge_speed.py --wait-policy both).
    # Passive waiting sleeps instead. libgomp reads the variable when torch loads it, so only a process that has not
    # imported torch yet is concerned (the `qtool` command imports it lazily); a value in the environment wins.
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from qtool.merge.refusal import refuse_unmergeable

    refuse_unmergeable(adapter_dir)  # a Houlsby adapter or a prefix: the reason at once, before torch loads
    from qtool.merge.pipeline import REPORT_NAME, merge

    with byte_progress("merging") as progress:
        result = merge(base_dir, adapter_dir, out, dtype=dtype, requantize_nf4=requantize, target=target,
                       max_shard_bytes=max_shard_size, overwrite=overwrite, verify=verify, progress=progress)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    summary = result.to_json()
    if as_json:
        summary["modules"] = sorted(summary["modules"], key=lambda r: -(r["dw_rel"] or 0))[:10]
        click.echo(json.dumps(summary, indent=1))
        return
    click.echo(_modules_table(result.modules))
    click.echo(COLUMNS_FOOTNOTE)
    if result.verification:
        click.echo("")
        click.echo(_verification_table(result.verification))
    click.echo("")
    kind = "NF4 (re-quantised)" if requantize else result.settings["dtype"]
    click.echo(f"{len(result.modules)} modules merged into the {result.base_kind} base; wrote {kind} "
               f"{fmt_bytes(result.output_bytes)} in {result.seconds:.1f} s to {result.out} "
               f"(report: {result.out}/{REPORT_NAME})")

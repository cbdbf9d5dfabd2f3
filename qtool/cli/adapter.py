"""``qtool adapter``: work on trained adapters. ``export-lora`` converts an AdaLoRA adapter to a plain LoRA adapter
(exactly: the same function); ``budget`` shows where an AdaLoRA adapter's rank budget went."""
from __future__ import annotations

import json

import click

from qtool.cli import CONTEXT_SETTINGS, table


def budget_lines(summary: dict) -> str:
    """The budget of :func:`qtool.adapters.budget.summarise` as text: one row per layer (its rank per module type and
    its total), then the total and the mean rank per module type."""
    types = summary["module_types"]
    short = [t.removesuffix("_proj") for t in types]
    rows = [(str(layer), *("-" if r is None else str(r) for r in row), str(total["rank"]),
             f"{100 * total['share']:.1f}%")
            for layer, row, total in zip(summary["layers"], summary["grid"], summary["by_layer"])]
    rows.append(("total", *(str(t["rank"]) for t in summary["by_type"]), str(summary["final_budget"]), "100%"))
    rows.append(("mean", *(f"{t['mean']:.1f}" for t in summary["by_type"]), "", ""))
    rows.append(("share", *(f"{100 * t['share']:.1f}%" for t in summary["by_type"]), "", ""))
    head = (f"AdaLoRA rank budget: {summary['final_budget']} of {summary['init_budget']} triplets kept "
            f"({summary['n_modules']} modules from rank {summary['init_rank']}; "
            f"{sum(1 for r in summary['modules'].values() if r == 0)} pruned to 0)")
    return head + "\n" + table(rows, ("layer", *short, "layer total", "share"), "l" + "r" * (len(types) + 2))


@click.group("adapter", context_settings=CONTEXT_SETTINGS)
def adapter_cmd():
    """Work on trained adapters: convert AdaLoRA to plain LoRA, show an AdaLoRA rank budget.

    \b
    Examples:
      qtool adapter export-lora ./ada ./ada-lora
      qtool adapter budget ./ada --json
    """


@adapter_cmd.command("export-lora", context_settings=CONTEXT_SETTINGS)
@click.argument("adalora_dir", type=click.Path(exists=True))
@click.argument("out", type=click.Path())
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def export_lora_cmd(adalora_dir, out, overwrite, as_json):
    """Convert an AdaLoRA adapter (qtool train --method adalora, or PEFT's) to a plain PEFT LoRA adapter.

    A = Q and B = (alpha/init_r)·P·diag(λ) per module, its own rank and alpha = rank (scale 1) in
    rank_pattern/alpha_pattern; modules pruned to rank 0 are dropped. qtool merge, PEFT and LoRA-only loaders
    (vLLM, ...) read the result.

    \b
    Example:
      qtool adapter export-lora ./ada ./ada-lora && qtool merge ./smollm2-nf4 ./ada-lora ./merged
    """
    from pathlib import Path

    from qtool.format.atomic import check_destination
    from qtool.format.peft_config import read_adalora_config

    read_adalora_config(adalora_dir)  # an adapter of another type is refused before torch is imported
    check_destination(Path(out), overwrite, inputs=(Path(adalora_dir),))
    from qtool.format.peft_adalora import export_lora

    result = export_lora(adalora_dir, out, overwrite=overwrite)
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    ranks = result["ranks"]
    click.echo(f"wrote {result['adapter']}: {len(ranks)} modules, ranks {min(ranks.values())}-{max(ranks.values())} "
               f"(r = {result['r']} for most, the others in rank_pattern/alpha_pattern), scale 1; "
               f"{len(result['dropped'])} module(s) at rank 0 dropped")


@adapter_cmd.command("budget", context_settings=CONTEXT_SETTINGS)
@click.argument("adalora_dir", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def budget_cmd(adalora_dir, as_json):
    """Where an AdaLoRA adapter's rank budget went: the final rank per module, by layer and by module type (read from
    its rank_pattern; works for PEFT's AdaLoRA adapters too).

    \b
    Example:
      qtool adapter budget ./ada
    """
    from qtool.adapters.budget import summarise
    from qtool.errors import InputError
    from qtool.format.peft_config import CONFIG_NAME, read_adalora_config

    folder, config = read_adalora_config(adalora_dir)  # torch-free
    init_r = config.get("init_r")
    if not isinstance(init_r, int) or isinstance(init_r, bool) or init_r < 1:
        raise InputError(f"{folder / CONFIG_NAME}: init_r={init_r!r}, expected a positive int")
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, dict) or not all(isinstance(v, list) and len(v) == init_r for v in pattern.values()):
        raise InputError(f"{folder / CONFIG_NAME}: rank_pattern is not a map of module -> {init_r} booleans")
    ranks = {k.split(".lora_E")[0]: sum(map(bool, v)) for k, v in pattern.items()}
    if not ranks:
        raise InputError(f"{folder / CONFIG_NAME}: no rank_pattern; the adapter was saved before any masking, every "
                         f"module is at init_r {init_r}")
    try:
        summary = summarise(ranks, init_r)
    except ValueError as exc:
        raise InputError(f"{folder / CONFIG_NAME}: {exc}") from None
    click.echo(json.dumps(summary, indent=1) if as_json else budget_lines(summary))

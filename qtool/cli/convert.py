"""``qtool convert`` and ``qtool verify``: parse flags, call :mod:`qtool.convert.pipeline` / :mod:`qtool.convert.verify`, render."""
from __future__ import annotations

import json
import math

import click

from qtool.adapters.spec import CONVERTER_INITS, AdapterSpec
from qtool.cli import CONTEXT_SETTINGS, byte_progress
from qtool.errors import UsageError
from qtool.units import fmt_bytes, parse_size


def _size(ctx, param, value):
    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _worst_table(tensors, n: int = 8) -> str:
    from tabulate import tabulate

    quantized = sorted((t for t in tensors if t.quantized), key=lambda t: -t.rel_error)
    rows = [[t.name, "x".join(map(str, t.shape)), f"{t.rel_error:.4f}", f"{t.ideal_rel_error:.4f}",
             f"{t.max_abs_error:.3g}", "inf" if math.isinf(t.snr_db) else f"{t.snr_db:.2f}", t.nonfinite, t.flag or ""]
            for t in quantized[:n]]
    return tabulate(rows, headers=["worst tensors", "shape", "rel err", "NF4 alone", "max |err|", "SNR dB", "NaN/Inf",
                                   "flag"], tablefmt="simple")


def _import_frozen(module: str):
    """Import ``module`` (torch and all) for a command that converts or verifies tensors:

    * with the garbage collector off, then frozen: the cyclic GC otherwise walks torch's ~10^5 objects again and
      again while they load and while tensors are converted (measured: ~0.5 s of the ~6 s of CPU of a 1.3 GB
      conversion);
    * with OpenMP's threads told to sleep, not spin, between torch's parallel operations (unless the user chose):
      spinning, torch.mean of 262k values took 9 ms instead of 0.14 ms on a busy 2-core VM (measured), and a
      conversion makes a few such operations per weight. Results do not change.
    """
    import gc
    import importlib
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch's OpenMP runtime starts: before import
    gc.disable()
    try:
        return importlib.import_module(module)
    finally:
        gc.freeze()
        gc.enable()


@click.command("convert", context_settings=CONTEXT_SETTINGS)
@click.argument("source")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--block-size", default=64, show_default=True, type=int, help="NF4 block size (32..4096, power of two).")
@click.option("--double-quant/--no-double-quant", default=True, show_default=True,
              help="Quantise the block absmax to 8 bits (QLoRA's double quantisation).")
@click.option("--target", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True,
              help="Whose bytes to reproduce: bitsandbytes on a GPU (what transformers users get) or on the CPU.")
@click.option("--device", default="cpu", show_default=True,
              help="Where to quantise: cpu, or cuda[:N], which with --target cuda writes exactly the bytes "
                   "bitsandbytes makes on that GPU (its reciprocal and mean); elsewhere the same bytes as cpu.")
@click.option("--skip", "skip", multiple=True, metavar="MODULE",
              help="Keep MODULE in 16-bit (like llm_int8_skip_modules); repeatable.")
@click.option("--max-shard-size", default="50GB", show_default=True, callback=_size, help="Largest output shard.")
@click.option("--max-rel-error", type=float, default=None,
              help="Fail (and write nothing) if any tensor's relative reconstruction error exceeds this.")
@click.option("--lora-init", type=click.Choice(CONVERTER_INITS), default=None,
              help="Split each targeted weight into an initial LoRA adapter and an NF4 residual (PiSSA, or LoftQ: "
                   "quantisation-aware), written beside the base for `qtool train --init`.")
@click.option("--rank", default=16, show_default=True, type=int, help="--lora-init: LoRA rank r.")
@click.option("--alpha", default=32.0, show_default=True, type=float, help="--lora-init: LoRA alpha (scale alpha/r).")
@click.option("--targets", default="qkvo", show_default=True,
              help="--lora-init: qkvo, mlp, all-linear or module names, each optionally =RANK.")
@click.option("--loftq-iter", default=1, show_default=True, type=int,
              help="--lora-init loftq: alternations of NF4 quantisation and rank-r SVD.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (only once the new one is complete).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def convert_cmd(source, out, block_size, double_quant, target, device, skip, max_shard_size, max_rel_error,
                lora_init, rank, alpha, targets, loftq_iter, overwrite, as_json):
    """Convert a 16/32-bit safetensors checkpoint (folder or cached hub id) to NF4 that transformers loads as is.

    \b
    Examples:
      qtool convert ./Llama-2-7b-hf ./llama2-7b-nf4
      qtool convert meta-llama/Llama-2-7b-hf ./llama2-7b-nf4 --max-shard-size 5GB
      qtool convert ./model ./model-nf4 --skip model.layers.0.mlp --json
      qtool convert ./Llama-2-7b-hf ./llama2-7b-loftq --lora-init loftq --loftq-iter 5 --rank 16 --targets all-linear
    then: AutoModelForCausalLM.from_pretrained("./llama2-7b-nf4")

    \b
    Exit codes:
      0  converted (and verified)
      2  bad input or flags: a missing or damaged checkpoint, NaN/Inf weights, an unknown --skip module
      3  the output cannot be written: it exists (see --overwrite), the disk is full, no permission
      4  a check failed: a tensor's error exceeds --max-rel-error (nothing is written)
    """
    from qtool.convert.arguments import check_convert_paths, check_settings

    check_settings(block_size, target, device, max_rel_error)  # flags and paths first: before torch loads
    spec = None
    if lora_init is not None:
        spec = AdapterSpec(targets=targets, rank=rank, alpha=alpha, init=lora_init, loftq_iter=loftq_iter)
        if spec.problems():
            raise UsageError(spec.problems())
    check_convert_paths(source, out, overwrite)
    convert = _import_frozen("qtool.convert.pipeline").convert

    with byte_progress("quantising") as progress:
        result = convert(source, out, blocksize=block_size, double_quant=double_quant, target=target, device=device,
                         skip=list(skip) or None, max_shard_bytes=max_shard_size, overwrite=overwrite,
                         max_rel_error=max_rel_error, progress=progress, lora_init=spec)
    summary = result.to_json()
    if as_json:
        summary.pop("tensors")
        summary["worst"] = [t.to_json() for t in sorted(result.tensors, key=lambda t: -t.rel_error)[:10]]
        click.echo(json.dumps(summary, indent=1))
        return
    n_q = summary["n_quantized"]
    click.echo(_worst_table(result.tensors))
    click.echo("")
    click.echo(f"{n_q} tensors quantised, {len(result.tensors) - n_q} copied, {len(result.flagged)} flagged; "
               f"{fmt_bytes(result.input_bytes)} -> {fmt_bytes(result.output_bytes)} in {result.seconds:.1f} s "
               f"(peak RSS {fmt_bytes(result.peak_rss_bytes, 'GiB')}, largest tensor "
               f"{fmt_bytes(result.largest_tensor_bytes, 'GiB')})")
    if result.lora_init:
        li = result.lora_init
        click.echo(f"--lora-init {li['spec']['init']}: {len(li['tensors'])} weights stored as NF4 residuals; error of "
                   f"the initial model (NF4 base + s·B·A) against the 16-bit weights {li['mean_init_rel_error']:.4f} "
                   f"(mean relative), plain NF4 {li['mean_nf4_rel_error']:.4f}; initial adapter in "
                   f"{result.out}/qtool_lora_init (train from it: qtool train {result.out} --init "
                   f"{li['spec']['init']} --rank {rank} --alpha {alpha:g} --targets {targets})")
    for t in result.flagged:
        click.echo(f"flag {t.flag}: {t.name} (relative error {t.rel_error:.4f})", err=True)
    click.echo(f"wrote {result.out} (report: {result.out}/qtool_report.json)")


@click.command("verify", context_settings=CONTEXT_SETTINGS)
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--source", default=None,
              help="The original checkpoint: re-quantise it and compare bytes, and measure every tensor's error.")
@click.option("--max-rel-error", type=float, default=None, help="Fail if a tensor's relative error exceeds this.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def verify_cmd(folder, source, max_rel_error, as_json):
    """Re-check a converted folder: structure, index, shard hashes and (with --source) the quantised bytes and
    reconstruction error of every weight.

    \b
    Examples:
      qtool verify ./llama2-7b-nf4
      qtool verify ./llama2-7b-nf4 --source ./Llama-2-7b-hf

    \b
    Exit codes:
      0  every check passed
      2  bad input: no such folder, not a converted (NF4) folder, unreadable files, a missing --source
      4  verification failed: a hash, the index, a quantised weight's bytes or error, a copied tensor
    """
    from qtool.convert.arguments import check_verify_paths

    check_verify_paths(folder, source)  # before torch loads
    verify = _import_frozen("qtool.convert.verify")
    raise_if_failed, verify_folder = verify.raise_if_failed, verify.verify_folder

    result = verify_folder(folder, source, max_rel_error)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=1))
    else:
        if source is not None:
            click.echo(_worst_table(result.tensors))
        hashes = ("no shard hashes checked" if not result.hashes_checked else
                  f"{result.hashes_differ} of {result.hashes_checked} shard hashes differ" if result.hashes_differ
                  else f"{result.hashes_checked} of {result.hashes_checked} shard hashes match")
        requant = f", {result.requantized} re-quantised from the source" if source is not None else ""
        n = len(result.problems)
        click.echo(f"{result.n_quantized} quantised weights{requant}, {hashes}, {n} problem{'s' * (n != 1)}")
        if result.requantize_note:
            click.echo(f"note: {result.requantize_note}", err=True)
    raise_if_failed(result)

"""``qtool plan``: parse -> :func:`qtool.plan.planner.plan` -> a table or JSON. Imports no torch and no numpy; the
planner itself is imported when the command runs, so that ``qtool -h`` does not pay for it."""
from __future__ import annotations

from dataclasses import replace

import click

from qtool.cli import CONTEXT_SETTINGS, table
from qtool.errors import UsageError
from qtool.plan.settings import ALIASES, ATTENTIONS, BLOCKSIZES, DTYPES, LOSSES, METHODS, OPTIMIZERS, PROFILES
from qtool.units import fmt_bytes, fmt_both

UNITS = "GB = 10^9 bytes, GiB = 2^30 bytes"


class _SettingChoice(click.Choice):
    """The values of a planner setting: ``-h`` lists them; case and the planner's aliases (bf16, fp32, adamw, ...)
    are accepted and mapped to the listed value. Any other value is passed on unchanged, so that the planner's
    validation reports it together with every other problem of the command line (one run names them all)."""

    def __init__(self, choices: tuple[str, ...]):
        super().__init__(choices, case_sensitive=False)

    def convert(self, value, param, ctx):
        key = str(value).strip().lower()
        key = ALIASES.get(key, key)
        return key if key in self.choices else value


def _aliases(choices: tuple[str, ...]) -> str:
    names = [alias for alias, target in ALIASES.items() if target in choices]
    return f" Also accepted: {', '.join(names)}." if names else ""


def _shape(model: str | None, params: str | None):
    from qtool.arch import parse_param_count, resolve_model, shape_for_params

    if (model is None) == (params is None):
        raise UsageError("give exactly one of --model (a name, config.json, folder or hub id) and --params",
                         hint="example: qtool plan --params 65e9 --rank 16")
    if model is not None:
        return resolve_model(model)
    try:
        return shape_for_params(parse_param_count(params))
    except ValueError as exc:
        raise UsageError(f"--params: {exc}") from None


def _gb_gib(n_bytes: int, digits: int = 2) -> tuple[str, str]:
    return f"{n_bytes / 1e9:,.{digits}f}", f"{n_bytes / 2**30:,.{digits}f}"


def _max_seq(row: dict) -> str:
    if row["max_seq_len"] is None:
        return "-"
    return f"{row['max_seq_len']:,}" + (" (capped)" if row["max_seq_len_limited"] else "")


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def _measured(m: dict | None) -> str:
    if not m or m.get("decode_vs_base_pct") is None:
        return "-"
    return f"{m['decode_vs_base_pct']:+.1f}%" + (f" ({m['merged_decode_vs_base_pct']:+.1f}% merged)"
                                                  if m.get("merged_decode_vs_base_pct") is not None else "")


INFERENCE_FOOTNOTE = ("inference in 16-bit, batch 1: extra FLOPs per token count matmuls (multiply-add = 2); LoRA "
                      "runs unmerged unless merged (then 0); the prefix's KV cache is per sequence; decode vs base: "
                      "measured by bench/methods_compare.py --gpu (data/methods/), '-' when no record matches")


def _inference_table(costs: list[dict]) -> str:
    rows = [(c["method"], c["config"], f"{c['n_trainable']:,}", f"{c['extra_flops_per_token'] / 1e6:,.1f}",
             "0" if c["mergeable"] else "-", _mib(c["extra_weight_bytes"]), _mib(c["extra_kv_cache_bytes"]),
             f"{c['positions_taken']:,}", "yes" if c["mergeable"] else "no", _measured(c["measured"]))
            for c in costs]
    return table(rows, ("method", "config", "trainable", "extra MFLOP/token", "merged", "weights MiB",
                        "KV cache MiB/seq", "positions taken", "mergeable", "decode vs base"), "llrrrrrrll")


def _render_compare(shape, settings, rows: list[dict]) -> str:
    head = (f"{shape.name} ({shape.model_type}, {shape.n_params():,} params) - the methods at the trainable-"
            f"parameter budget of LoRA rank {settings.rank} on {settings.targets}; seq {settings.seq_len} x batch "
            f"{settings.batch_size}; profile {settings.profile}")
    train_rows = [(r["method"], r["config"], f"{r['n_trainable']:,}", *_gb_gib(r["peak_allocated_bytes"]),
                   *_gb_gib(r["peak_nvml_bytes"])) for r in rows]
    return "\n".join([head, "", "training (one step, as qtool train runs it):",
                      table(train_rows, ("method", "config", "trainable", "peak alloc GB", "GiB", "NVML GB", "GiB"),
                            "llrrrrr"), "", "inference:", _inference_table([r["inference"] for r in rows]),
                      INFERENCE_FOOTNOTE,
                      "sizes: adapter m and prefix l are the integers whose trainable count is nearest LoRA's "
                      "(L·2·(2hm + h + m) and 2·L·l·kv); AdaLoRA ends at LoRA's rank on average, from 1.5x it "
                      "(its training peak; inference: the plain LoRA it exports to)", "", f"units: {UNITS}"])


def _render(p, gpus: list[dict], seq_limit: tuple[int, str], fit, fit_label: str, inference=None,
            cap_checks=None, counts=None) -> str:
    st, shape = p.settings, p.shape
    ranks = sorted(set(st.module_ranks(shape).values()))
    if st.method == "adalora":
        what = (f"AdaLoRA init rank {'/'.join(map(str, ranks))} -> target {st.spec.adalora.target_rank} on "
                f"{st.targets}")
    elif st.method == "lora":
        what = f"LoRA rank {'/'.join(map(str, ranks))} on {st.targets}"
    else:
        what = st.spec.describe()
    batch = (f"{st.batch_size} (global: {st.per_gpu_batch} per GPU on {st.gpus} GPUs, FSDP2)" if st.gpus > 1
             else f"{st.batch_size}")
    head = (f"{shape.name} ({shape.model_type}, {shape.n_params():,} params) - profile {st.profile}; "
            f"{what} ({p.n_trainable:,} trainable); "
            f"seq {st.seq_len} x batch {batch}; checkpointing "
            f"{('on, inputs offloaded' if st.offload_activations else 'on') if st.grad_checkpointing else 'off'}; "
            f"{st.optimizer}; {st.attention} attention; {st.loss} loss"
            + ("; expandable segments" if st.expandable_segments and st.device == "cuda" else ""))
    rows = [(r.name, *_gb_gib(r.bytes), r.where, r.counter) for r in p.rows]
    lines = [head, "", table(rows, ("item", "GB", "GiB", "where", "counted from"), "lrrll"), ""]
    unquantised = p.weights_4bit_total_bytes - p.nf4_weights_bytes
    lines.append(f"weights: fp16 {fmt_bytes(p.fp16_weights_bytes)} ({fmt_bytes(p.fp16_weights_bytes, 'GiB')}) -> "
                 f"4-bit {fmt_bytes(p.weights_4bit_total_bytes)} = NF4 packed + constants "
                 f"{fmt_bytes(p.nf4_weights_bytes)} + unquantised embeddings/head/norms {fmt_bytes(unquantised)}")
    lines.append(f"{'peak per GPU' if st.gpus > 1 else 'peak'} (during {p.peak_phase}): allocated "
                 f"{fmt_bytes(p.peak_allocated_bytes)}, "
                 f"reserved {fmt_bytes(p.peak_reserved_bytes)}, NVML used {fmt_both(p.peak_nvml_bytes)}")
    gpu_rows = [(g["gpu"], *_gb_gib(g["memory_bytes"]), "yes" if g["fits"] else "no",
                 *_gb_gib(g["headroom_bytes"]), _max_seq(g)) for g in gpus]
    lines += ["", table(gpu_rows, ("GPU", "memory GB", "memory GiB", "fits", "headroom GB", "headroom GiB",
                                   f"max seq-len (batch {st.batch_size}"
                                   + (f" over {st.gpus} GPUs)" if st.gpus > 1 else ")")), "lrrlrrr")]
    if any(g["max_seq_len_limited"] for g in gpus):
        lines.append(f"(capped): {seq_limit[0]:,} fits, and the search stops there, at the {seq_limit[1]}")
    if fit is not None:
        knob = fit.knob.replace("_", "-")
        target = f"--fit {fit_label} ({fmt_both(fit.capacity_bytes)})"
        if fit.value is None:
            lines += ["", f"{target}: nothing fits, not even --{knob} {fit.step}"]
        else:
            bound = (f"; the search stops there, at the {fit.limit_reason}" if fit.limited
                     else f"; at {fit.value + fit.step:,} it does not fit")
            lines += ["", f"{target}: largest --{knob} that fits is {fit.value:,} "
                      f"(NVML used {fmt_both(fit.plan.peak_nvml_bytes)}){bound}"]
    if cap_checks:
        lines += ["", _render_cap(cap_checks)]
    if counts is not None:
        lines += ["", _render_counts(counts)]
    if inference is not None:
        lines += ["", "inference:", _inference_table([inference]), INFERENCE_FOOTNOTE]
    if p.notes:
        lines += ["", "notes:"] + [f"- {note}" for note in p.notes]
    lines += ["", f"units: {UNITS}; --fit takes either (24GB, 24GiB) or a GPU name"]
    return "\n".join(lines)


def _render_counts(result: dict) -> str:
    """The --fit-gpus section: the per-GPU peak at each GPU count, then per GPU the smallest count that fits."""
    batch = result["global_batch_size"]
    per_count = [(c["gpus"], c["per_gpu_batch_size"] or "-", *(f"{c[k] / 2**30:,.2f}" if c[k] is not None else "-"
                  for k in ("peak_allocated_bytes", "peak_nvml_bytes")), c["peak_phase"] or "batch does not split")
                 for c in result["counts"]]
    verdict = {True: "yes", False: "no", None: "-"}
    per_gpu = [(g["gpu"], f"{g['memory_bytes'] / 2**30:,.2f}", *(verdict[v["fits"]] for v in g["fits"]),
                g["smallest_gpus"] or "none") for g in g_rows] if (g_rows := result["table"]) else []
    counts = [c["gpus"] for c in result["counts"]]
    lines = [f"--fit-gpus: FSDP2 data parallelism; --batch-size {batch} is the global batch, split evenly over the "
             "GPUs (per-GPU peaks):",
             table(per_count, ("GPUs", "batch per GPU", "peak alloc GiB", "NVML GiB", "peak phase"), "rrrrl"), "",
             "smallest number of GPUs whose per-GPU peak (NVML used) fits:",
             table(per_gpu, ("GPU", "memory GiB", *(f"{n} GPU" + ("s" if n > 1 else "") for n in counts),
                             "smallest"), "lr" + "l" * len(counts) + "r")]
    unsplit = [str(c["gpus"]) for c in result["counts"] if c["per_gpu_batch_size"] is None]
    if unsplit:
        lines.append(f"-: --batch-size {batch} does not split over {', '.join(unsplit)} GPUs (each rank trains "
                     f"batch / N sequences); a global batch of {max(counts)} or a multiple of it tries every count")
    return "\n".join(lines)


CAP_VERDICTS = {"fits": "fits under the cap", "oom": "OOM expected"}


def _render_cap(checks) -> str:
    """The --allocator-cap section: per optimizer, the verdict and the planned counters beside the cap."""
    from qtool.plan.cap import OUTSIDE_NOTE

    cap_bytes = checks[0].cap_bytes
    rows = [(c.optimizer, CAP_VERDICTS[c.verdict], *(f"{n / 2**30:,.2f}" for n in (
        c.peak_allocated_bytes, c.peak_reserved_bytes, c.reserved_margin_bytes, c.device_optimizer_bytes,
        c.paged_bytes, c.peak_nvml_bytes)), "yes" if c.live_tensors_fit else "no") for c in checks]
    lines = [f"--allocator-cap {fmt_both(cap_bytes)} (torch.cuda.set_per_process_memory_fraction: it limits the "
             "caching allocator's reserved bytes):",
             table(rows, ("optimizer", "verdict", "peak alloc GiB", "peak reserved GiB", "cap - reserved GiB",
                          "opt. state in cap GiB", "paged GiB", "NVML GiB", "live tensors fit"), "llrrrrrrl"),
             f"- {OUTSIDE_NOTE}; the card must still hold it (NVML column)",
             "- the verdict compares the planned peak reserved with the cap; where the live tensors (peak allocated) "
             "fit all the same, only the allocator's cache is over it, which it cannot return during a CUDA graph "
             "capture"]
    return "\n".join(lines)


def _list_models(as_json: bool) -> str:
    from dataclasses import asdict

    from qtool.arch import known_names, known_shape

    shapes = [known_shape(name) for name in known_names()]
    if as_json:
        import json

        return json.dumps({"models": [{**asdict(s), "n_params": s.n_params()} for s in shapes]}, indent=1)
    rows = [(s.name, s.model_type, f"{s.n_params() / 1e9:.2f}B", f"{s.max_positions:,}",
             f"{s.sliding_window:,}" if s.sliding_window else "-") for s in shapes]
    return table(rows, ("name", "type", "params", "max positions", "sliding window"), "llrrr")


@click.command("plan", context_settings=CONTEXT_SETTINGS)
@click.argument("model_arg", metavar="[MODEL]", required=False)
@click.option("--model", "-m", help="Known name (llama-2-7b, qwen2.5-7b, ...; see --list-models), config.json, model "
              "folder or hub id (local cache only). Same as the MODEL argument.")
@click.option("--params", help="A bare parameter count (65e9, 7B); the closest known shape is assumed.")
@click.option("--profile", type=_SettingChoice(PROFILES), default="qtool", show_default=True,
              help="Whose training step: qtool (qtool train); hf (transformers + PEFT + bitsandbytes as Trainer "
              "and SFTTrainer run it: non-reentrant checkpointing); hf-prepare (the same stack in a loop right after "
              "prepare_model_for_kbit_training: reentrant checkpointing); unsloth (Unsloth 2026.10.9's FastLanguageModel, "
              "LoRA on q,k,v,o, its offloaded \"unsloth\" checkpointing and fused loss; Llama, bf16, one GPU).")
@click.option("--method", type=click.Choice(METHODS), default="lora", show_default=True,
              help="What is trained: lora, adalora (P, λ, Q at --init-rank, the peak: pruning masks, frees nothing; "
                   "and their importance EMAs), adapter (Houlsby) or prefix (prefix tuning).")
@click.option("--adapter-size", type=int, default=64, show_default=True, help="--method adapter: bottleneck width.")
@click.option("--prefix-len", type=int, default=20, show_default=True, help="--method prefix: vectors per layer.")
@click.option("--prefix-projection", type=int, default=0, show_default=True,
              help="--method prefix: hidden width of the reparameterisation MLP while training (0: none).")
@click.option("--compare-methods", is_flag=True,
              help="Plan lora, adalora, adapter and prefix side by side at the trainable-parameter budget of --rank on "
                   "--targets: training memory and inference cost.")
@click.option("--rank", "-r", type=int, default=16, show_default=True,
              help="LoRA rank of every targeted module (--targets can set one per module).")
@click.option("--init-rank", type=int, default=None, help="AdaLoRA: the initial rank of every module.  [default: 12]")
@click.option("--target-rank", type=int, default=None,
              help="AdaLoRA: the average final rank (checked; no byte depends on it).  [default: 8]")
@click.option("--alpha", type=float, help="LoRA alpha (no effect on memory)  [default: 2 x rank]")
@click.option("--targets", default="qkvo", show_default=True,
              help="qkvo, mlp, all-linear and/or module names (embed_tokens and lm_head included), each with an "
                   "optional rank: qkvo,down_proj=32,lm_head=8")
@click.option("--seq-len", type=int, default=2048, show_default=True, help="Tokens per sequence.")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Sequences per micro-batch.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--grad-checkpointing/--no-grad-checkpointing", default=True, show_default=True,
              help="Recompute each layer's activations in the backward instead of keeping them.")
@click.option("--offload-activations", is_flag=True,
              help="qtool train --offload-activations: the checkpointed layer inputs in pinned host memory (a host "
                   "row no GPU counter sees); on the GPU only the one or two being copied.")
@click.option("--optimizer", type=_SettingChoice(OPTIMIZERS), default="paged_adamw_32bit", show_default=True,
              help="bitsandbytes (paged_*, *_8bit), torch AdamW or SGD." + _aliases(OPTIMIZERS))
@click.option("--adapter-dtype", type=_SettingChoice(DTYPES), default="float32", show_default=True,
              help="dtype of the LoRA weights, their gradients and optimizer inputs." + _aliases(DTYPES))
@click.option("--compute-dtype", type=_SettingChoice(DTYPES), default="bfloat16", show_default=True,
              help="dtype the NF4 weights are dequantised to for the matmuls." + _aliases(DTYPES))
@click.option("--no-double-quant", is_flag=True, help="fp32 absmax per block instead of 8-bit + nested absmax.")
@click.option("--block-size", type=int, default=64, show_default=True,
              help=f"NF4 block size, one of {', '.join(map(str, BLOCKSIZES))}.")
@click.option("--attention", type=_SettingChoice(ATTENTIONS), default="sdpa", show_default=True,
              help="sdpa (flash/efficient kernels when possible), flash (flash_attention_2) or eager."
              + _aliases(ATTENTIONS))
@click.option("--loss", type=_SettingChoice(LOSSES),
              help="chunked (fp32 logits a chunk at a time) or full (all fp32 logits).  "
              "[default: chunked for qtool; hf and hf-prepare are always full]")
@click.option("--expandable-segments/--no-expandable-segments", default=None,
              help="PyTorch's CUDA allocator with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True: one segment per "
                   "stream and pool that grows in 2 MiB (small) or 20 MiB (large) pages, whose free pages "
                   "torch.cuda.empty_cache() gives back. qtool train sets it on CUDA unless PYTORCH_CUDA_ALLOC_CONF is "
                   "set.  [default: on for --profile qtool, off for the others]")
@click.option("--fit", "fit_to", help="A GPU name (\"RTX 4090\", H200) or a memory size: 24GB is 24 x 10^9 bytes, "
              "24GiB (or 24Gi) 24 x 2^30 bytes. With it, solve for the largest --solve value that fits.")
@click.option("--solve", type=click.Choice(["seq-len", "batch-size", "rank"]),
              help="What --fit solves for, the other settings fixed.  [default: seq-len]")
@click.option("--allocator-cap", help="A cap on PyTorch's caching allocator, as torch.cuda."
              "set_per_process_memory_fraction sets it (6GiB = 6 x 2^30 bytes, 6GB = 6 x 10^9): does the step fit "
              "under it with --optimizer and with its paged/unpaged counterpart? Paged state is outside the cap.")
@click.option("--gpus", type=int, default=1, show_default=True,
              help="Data-parallel GPUs (PyTorch FSDP2, profile qtool): plan one GPU's memory, with the base, adapters, "
                   "gradients and optimizer state sharded. --batch-size is then the global batch, split evenly.")
@click.option("--fit-gpus", is_flag=True,
              help="For each GPU of the table, the smallest count of 1, 2, 4, 8 whose per-GPU peak fits (FSDP2; "
                   "--batch-size is the global batch: a count that does not divide it is skipped).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout (with --list-models too).")
@click.option("--list-models", is_flag=True, help="List the known model names with their shapes and exit.")
def plan_cmd(model_arg, model, params, no_double_quant, fit_to, solve, as_json, list_models, compare_methods,
             allocator_cap, fit_gpus, **options):
    """Plan the GPU memory of QLoRA training: every byte on a named row, the peak, and what fits; and what the
    trained adapter costs at inference.

    \b
    Examples:
      qtool plan --params 65e9 --rank 16
      qtool plan llama-2-7b --targets all-linear --seq-len 4096 --profile hf
      qtool plan llama-3-8b --profile hf-prepare
      qtool plan ./llama2-7b-nf4 --fit "RTX 4090" --solve batch-size --json
      qtool plan llama-2-7b --method prefix --prefix-len 64
      qtool plan llama-2-7b --compare-methods --rank 16
      qtool plan llama-3.2-1b --rank 512 --targets all-linear --seq-len 128 --allocator-cap 6GiB
      qtool plan llama-3.1-70b --seq-len 8192 --batch-size 8 --gpus 4
      qtool plan llama-3.1-70b --seq-len 8192 --batch-size 8 --fit-gpus
    """
    if list_models:
        click.echo(_list_models(as_json))
        return
    if solve is not None and fit_to is None:
        raise UsageError(f"--solve {solve} needs --fit: it solves for the largest --{solve} that fits a GPU",
                         hint=f"add --fit with a GPU name or a size, e.g. --fit 24GiB --solve {solve}")
    if model_arg and model:
        raise UsageError("give the model once: as the MODEL argument or with --model")
    if fit_gpus and options["gpus"] != 1:
        raise UsageError("--fit-gpus tries 1, 2, 4 and 8 GPUs itself: drop --gpus",
                         hint="--gpus N plans N GPUs; --fit-gpus finds the smallest count that fits")
    init_rank = options.pop("init_rank")
    if options["method"] == "adalora":
        if click.get_current_context().get_parameter_source("rank").name == "COMMANDLINE":
            raise UsageError("--rank is LoRA's; AdaLoRA is planned at --init-rank (its peak)",
                             hint="use --init-rank R0 --target-rank R")
        options["rank"] = 12 if init_rank is None else init_rank
    elif init_rank is not None:
        raise UsageError("--init-rank is an AdaLoRA setting; add --method adalora")
    from qtool.plan import fit as fitting
    from qtool.plan import planner

    from click.core import ParameterSource

    from qtool.adapters.spec import ignored_flag_problems

    ctx = click.get_current_context()
    ignored = ignored_flag_problems(options["method"], [name for name in ctx.params if ctx.get_parameter_source(name)
                                                        == ParameterSource.COMMANDLINE])
    if ignored:
        raise UsageError(ignored)
    from qtool.plan import cap

    cap_bytes = cap.parse_cap(allocator_cap) if allocator_cap else None  # a bad size fails before any planning
    shape = _shape(model_arg or model, params)
    settings = planner.Settings(double_quant=not no_double_quant, **options)
    if compare_methods:
        if settings.method != "lora" or fit_to or allocator_cap or settings.gpus != 1 or fit_gpus:
            dropped = [flag for flag, given in (("--method", settings.method != "lora"), ("--fit", fit_to),
                                                ("--allocator-cap", allocator_cap), ("--gpus", settings.gpus != 1),
                                                ("--fit-gpus", fit_gpus)) if given]
            raise UsageError("--compare-methods plans all four methods at LoRA's budget: drop "
                             + " and ".join(dropped), hint="set the budget with --rank and --targets")
        rows = planner.compare_methods(shape, settings)
        if as_json:
            import json

            click.echo(json.dumps({"model": shape.name, "methods": rows}, indent=1))
        else:
            click.echo(_render_compare(shape, settings, rows))
        return
    p = planner.plan(shape, settings)
    from qtool.plan import methods

    inference = methods.inference_cost(shape, p.settings.spec, methods.load_records()).to_json()
    gpus = fitting.fit_table(shape, settings)
    seq_limit = fitting.knob_limit(shape, settings, "seq_len")
    fit, fit_label = None, ""
    if fit_to:
        fit_label, capacity = fitting.capacity_bytes(fit_to)
        fit = fitting.largest_fitting(shape, settings, capacity, (solve or "seq-len").replace("-", "_"))
    cap_checks = cap.check_cap(shape, settings, cap_bytes) if allocator_cap else None
    counts = fitting.gpu_counts(shape, settings) if fit_gpus else None
    if not as_json:
        click.echo(_render(p, gpus, seq_limit, fit, fit_label, inference, cap_checks, counts))
        return
    import json

    out = p.to_dict()
    out["inference"] = inference
    out["fit_table"] = gpus
    out["seq_len_limit"] = {"value": seq_limit[0], "reason": seq_limit[1]}
    if p.settings.gpus > 1:
        out["data_parallel"] = {"strategy": "FSDP2", "gpus": p.settings.gpus,
                                "global_batch_size": p.settings.batch_size,
                                "per_gpu_batch_size": p.settings.per_gpu_batch, "rows": "per GPU (rank 0)"}
    if fit is not None:
        out["fit"] = {"target": fit_label, "capacity_bytes": fit.capacity_bytes, "knob": fit.knob,
                      "value": fit.value, "limited": fit.limited, "limit": fit.limit,
                      "limit_reason": fit.limit_reason,
                      "peak_nvml_bytes": fit.plan.peak_nvml_bytes if fit.plan else None,
                      **({"step": fit.step} if fit.step != 1 else {})}
    if counts is not None:
        out["fit_gpus"] = counts
    if cap_checks:
        from qtool.plan.cap import OUTSIDE_NOTE

        out["allocator_cap"] = {"cap_bytes": cap_checks[0].cap_bytes, "checks": [c.to_dict() for c in cap_checks],
                                "note": OUTSIDE_NOTE}
    click.echo(json.dumps(out, indent=1))
    for note in p.notes:
        click.echo(f"note: {note}", err=True)

"""One GPU worker process: build one random-weight NF4 model of a real shape for one profile, then run a list of
training configurations on it, printing one JSON record per configuration (schema: data/memory/README.md).

Profiles:
  qtool       our trainer (qtool.train.model.random_decoder + qtool.train.recipe.train), paged AdamW 32-bit
  hf          transformers + PEFT + bitsandbytes as transformers' Trainer runs it: Linear4bit NF4 + double quant
              (compute bf16), prepare_model_for_kbit_training, then gradient_checkpointing_enable() (no kwargs:
              non-reentrant), get_peft_model, bnb PagedAdamW32bit, loss from model(input_ids, labels=...), clipping
  hf-prepare  the same loop right after prepare_model_for_kbit_training(model) with its defaults and no further
              gradient_checkpointing_enable(): peft passes gradient_checkpointing_kwargs={}, so transformers calls
              torch's checkpoint without use_reentrant, which is reentrant (through torch 2.13, with a warning);
              input gradients on (enable_input_require_grads), norms, embeddings and head in fp32. GC only.
  unsloth     Unsloth's FastLanguageModel on a pre-quantised folder of the same weights (bench/random_folder.py):
              from_pretrained(load_in_4bit=True, max_seq_length=seq), get_peft_model(use_gradient_checkpointing=
              "unsloth"), bnb PagedAdamW32bit, a plain loop (loss, backward, step, zero_grad; no clipping). Needs the
              unsloth wheels on the path and one configuration per process (see run_unsloth).

All profiles get the *same* random NF4 weights (made directly in packed form on the GPU, never in 16-bit; unsloth's
folder holds the same bytes), so a 65B model needs no 130 GB file. Every record carries ``achieved_tflops``: the
model FLOPs of bench/flops.py (recompute included) over the mean step time after warm-up. Run by
bench/train_bench.py; usable alone:

    python bench/gpu_worker.py qtool llama-2-7b '[{"seq_len": 512, "rank": 16, "targets": "qkvo", "gc": true}]'

qtool rows run with the allocator's expandable segments, as qtool train sets it up (QTOOL_BENCH_EXPANDABLE=0: the
default segments; a PYTORCH_CUDA_ALLOC_CONF decides instead, as it does for qtool train).
QTOOL_PROFILE=1 prints a torch.profiler summary of one eager forward+backward after each qtool/hf row (stderr);
QTOOL_PROFILE=replay profiles the last two steps of each qtool row (CUDA-graph replays on the GPU) and adds the
GPU time per kernel kind, the idle time and the ideal time at the dense bf16 peak to the record (``kernel_profile``).
QTOOL_BENCH_DEVICE=cpu makes a slow dry run of the code paths (no measurements); QTOOL_BENCH_LAYERS=N cuts the
shape to N decoder layers for it. A qtool configuration with ``"offload": true`` trains with
``--offload-activations`` (needs ``"gc": true``). A configuration with ``"method": "adalora"`` (qtool only) trains
AdaLoRA from ``rank`` (= init rank) to ``target_rank`` (default 8), with ``tinit`` = ``tfinal`` = 1 unless given:
over the default 6 steps the budget falls during the CUDA-graph replays (masking in place between them) and the mask
is fixed at step 5.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.flops import PEAK_BF16_TFLOPS, TARGETS, achieved_tflops, step_flops  # noqa: E402
from bench.random_folder import bench_shape, hf_config_dict  # noqa: E402,F401 (hf_config_dict: tests import it here)
from qtool.train.measure import MemoryMonitor  # noqa: E402

WARMUP = int(os.environ.get("QTOOL_BENCH_WARMUP", 2))
DEVICE = os.environ.get("QTOOL_BENCH_DEVICE", "cuda")  # "cpu": a slow dry run of the code paths, no measurements
PROFILES = ("qtool", "hf", "hf-prepare", "unsloth")


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "bitsandbytes", "transformers", "peft", "triton"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    out["qtool"] = __import__("qtool").__version__
    out["cuda"] = torch.version.cuda
    return out


def cleanup():
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def paged_state_bytes(opt) -> int:
    """Bytes of bitsandbytes' paged (managed-memory) optimizer state — never freed by bitsandbytes, so later
    configurations in the same process see them in NVML's count."""
    total = 0
    for state in opt.state.values():
        for t in state.values():
            if torch.is_tensor(t) and getattr(t, "is_paged", False):
                total += t.numel() * t.element_size()
    return total


# ----------------------------------------------------------------------------------------------------------- qtool
def run_qtool(shape, configs, steps, warmup):
    from qtool.train.data import Blocks
    from qtool.adapters.attach import attach_adapters, detach_adapters
    from qtool.adapters.spec import AdapterSpec
    from qtool.train.load import random_decoder
    from qtool.train.settings import decoder_shape
    from qtool.train.recipe import TrainSettings, train

    from qtool.train.allocator import set_up

    device = torch.device(DEVICE)
    cfg = decoder_shape(hf_config_dict(shape))
    # as qtool train sets it up before loading (QTOOL_BENCH_EXPANDABLE=0: the allocator's default segments)
    expandable = set_up(device, os.environ.get("QTOOL_BENCH_EXPANDABLE", "1") != "0")
    t0 = time.perf_counter()
    model = random_decoder(cfg, device)
    build_s = time.perf_counter() - t0
    leaked = 0
    for c in configs:
        cleanup()
        ada = {k: c.get(k, d) for k, d in (("target_rank", 8), ("tinit", 1), ("tfinal", 1))} \
            if c.get("method") == "adalora" else {}
        spec = AdapterSpec(c["targets"], rank=c["rank"], alpha=c.get("alpha", 2 * c["rank"]),
                           init=c.get("init", "zero"))
        if ada:
            from qtool.adapters.spec import AdaLoRASchedule

            spec = spec.with_(method="adalora", adalora=AdaLoRASchedule(**ada, total_steps=steps))
        attach_adapters(model, spec)
        gen = torch.Generator().manual_seed(0)
        n = c.get("batch_size", 1) * (steps + 1) + 1
        blocks = Blocks(torch.randint(0, cfg.vocab, (n, c["seq_len"]), generator=gen),
                        torch.randint(0, cfg.vocab, (1, c["seq_len"]), generator=gen), 0)
        st = TrainSettings(steps=steps, seq_len=c["seq_len"], batch_size=c.get("batch_size", 1), rank=c["rank"],
                           alpha=c.get("alpha", 2 * c["rank"]), targets=c["targets"], init=c.get("init", "zero"),
                           grad_checkpointing=c["gc"], offload_activations=c.get("offload", False),
                           optimizer=c.get("optimizer", "paged_adamw_32bit") if DEVICE == "cuda" else "adamw_torch", measure_after=warmup, max_grad_norm=0.3,
                           **({"method": "adalora", "init_rank": c["rank"], **ada} if ada else {}))
        monitor = MemoryMonitor(device)
        after_load = monitor.sample("after_load")
        profiler = ReplayProfiler(steps) if os.environ.get("QTOOL_PROFILE") == "replay" else None
        try:
            res = train(model, blocks, st, device=device, progress=profiler.progress if profiler else None)
            err = None
        except torch.cuda.OutOfMemoryError as exc:
            res, err = None, f"OOM: {str(exc)[:200]}"
        rec = record("qtool", shape, c, after_load, res, err, leaked, build_s)
        rec["settings"]["expandable_segments"] = expandable
        if profiler and res is not None:
            rec["kernel_profile"] = profiler.summary(step_flops(shape, c["seq_len"], c.get("batch_size", 1), c["rank"],
                                                         c["targets"], c["gc"]), res.step_seconds[-2:])
            print(format_profile(rec["id"], rec["kernel_profile"]), file=sys.stderr)
        if c.get("offload"):  # planned as it ran (data/memory/README.md: settings hold Settings fields)
            rec["settings"]["offload_activations"] = True
        if res is not None:
            rec["trainable_params"] = res.trainable_params
            rec["measured"]["cuda_graph"] = res.cuda_graph
            rec["measured"]["paged_state_bytes"] = res.paged_state_bytes
            leaked += res.paged_state_bytes
            if res.adalora:  # the budget really fell during the graph replays
                rec["measured"]["adalora"] = {k: res.adalora[k] for k in ("init_budget", "target_budget",
                                                                          "final_budget", "mask_steps", "budgets")}
        print(json.dumps(rec), flush=True)
        if os.environ.get("QTOOL_PROFILE") == "1" and res is not None:
            profile_step(lambda: model.loss(blocks.train[:st.batch_size].to(device)).backward(), f"qtool-{shape.name}")
        detach_adapters(model)


def record(profile, shape, c, after_load, res, err, leaked, build_s, step_seconds=None, peaks=None, losses=None,
           adapter_dtype="float32"):
    settings = {"rank": c["rank"], "alpha": c.get("alpha", 2 * c["rank"]), "targets": c["targets"],
                "seq_len": c["seq_len"], "batch_size": c.get("batch_size", 1), "grad_checkpointing": c["gc"],
                "optimizer": c.get("optimizer", "paged_adamw_32bit"), "double_quant": True, "block_size": 64,
                "compute_dtype": "bfloat16", "adapter_dtype": adapter_dtype, "attention": "sdpa",
                # unsloth: its fused cross-entropy, which works through the logits chunk by chunk
                "loss": "chunked" if profile in ("qtool", "unsloth") else "full",
                **({"init": c["init"]} if "init" in c else {})}
    if profile == "qtool":
        from qtool.train.loss import LOSS_CHUNK_MIB
        from qtool.train.recipe import REVISION

        settings["loss_chunk_mib"] = LOSS_CHUNK_MIB
        settings["flat_params"] = DEVICE == "cuda"  # qtool/train/flat.py: the CUDA-graph path
    if c.get("method") == "adalora":  # the planner's Settings fields (qtool.plan.settings)
        settings.update(method="adalora", target_rank=c.get("target_rank", 8))
    rec = {**({"trainer": REVISION} if profile == "qtool" else {}), "id": f"{profile}-{shape.name}-s{c['seq_len']}-b{settings['batch_size']}-r{c['rank']}-{c['targets']}-"
                 f"{'gc' if c['gc'] else 'nogc'}" + (f"-{c['init']}" if c.get("init", "zero") != "zero" else "")
                 + ("-adalora" if c.get("method") == "adalora" else "") + ("-offload" if c.get("offload") else ""),
           "date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "versions": versions(),
           "profile": profile,
           "model": {"name": shape.name, **{k: v for k, v in hf_config_dict(shape).items() if k != "dtype"}},
           "settings": settings, "error": err,
           "measured": {"after_load_allocated_bytes": after_load.allocated_bytes,
                        "after_load_nvml_used_bytes": after_load.nvml_used_bytes,
                        "paged_bytes_leaked_by_earlier_runs": leaked, "model_build_seconds": round(build_s, 2)}}
    if res is not None:
        step_seconds = res.step_seconds if step_seconds is None else step_seconds
        peaks = res.peaks if peaks is None else peaks
        losses = res.losses if losses is None else losses
    if step_seconds:
        timed = sorted(step_seconds[WARMUP + 1:] or step_seconds[1:] or step_seconds)  # after capture / warm-up
        median = timed[len(timed) // 2]
        rec["measured"].update(peaks)
        mean = sum(timed) / len(timed)
        flops = step_flops(shape, settings["seq_len"], settings["batch_size"], c["rank"], c["targets"], c["gc"])
        rec["measured"].update({"step_seconds": [round(s, 4) for s in step_seconds], "median_step_seconds": median,
                                "mean_step_seconds": mean,
                                "tokens_per_second": settings["seq_len"] * settings["batch_size"] / median,
                                "flops_per_step": flops["total"],
                                "achieved_tflops": achieved_tflops(flops["total"], mean),
                                "losses": [round(float(x), 4) for x in losses]})
    return rec


# -------------------------------------------------------------------------------------------------------------- hf
def build_hf(shape):
    """transformers model of ``shape`` whose Linears are bitsandbytes Linear4bit holding random NF4 weights."""
    import bitsandbytes as bnb
    import transformers
    from torch import nn

    from qtool.format import bnb_nf4 as layout
    from qtool.train.load import random_quantized

    config = transformers.AutoConfig.for_model(**hf_config_dict(shape))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and full != "lm_head":
                qw = random_quantized((child.out_features, child.in_features), DEVICE, gen)
                entries = layout.weight_entries("w", qw)
                stats = {k[2:]: v.to(DEVICE) for k, v in entries.items() if k != "w"}
                lin = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                        compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                        device="meta")
                lin.weight = bnb.nn.Params4bit.from_prequantized(entries["w"], stats, requires_grad=False,
                                                                 device=DEVICE)
                if child.bias is not None:
                    lin.bias = nn.Parameter(torch.zeros(child.out_features, dtype=torch.bfloat16, device=DEVICE),
                                            requires_grad=False)
                setattr(module, child_name, lin)
    for name, p in list(model.named_parameters()):
        if p.is_meta:
            mod_name, _, pname = name.rpartition(".")
            mod = model.get_submodule(mod_name)
            init = torch.ones if "norm" in name else (lambda s, **kw: torch.randn(s, **kw) * 0.02)
            setattr(mod, pname, nn.Parameter(init(p.shape, device=DEVICE, dtype=torch.bfloat16), requires_grad=False))
    if shape.tied_embeddings:
        model.tie_weights()
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:  # rotary inv_freq: rebuild the module on the GPU
            mod_name = name.rpartition(".")[0]
            mod = model.get_submodule(mod_name)
            parent_name, _, attr = mod_name.rpartition(".")
            with torch.device(DEVICE):
                fresh = type(mod)(config=config)
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, fresh)
    model.is_loaded_in_4bit = True  # what from_pretrained(quantization_config=...) sets; PEFT dispatches on it
    return model


def run_hf(shape, configs, steps, warmup, profile="hf"):
    """Profiles hf and hf-prepare (module docstring): one model, prepared once, each configuration's adapters
    attached by get_peft_model and removed by unload() after its run."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if profile == "hf-prepare" and not all(c["gc"] for c in configs):
        raise ValueError("profile hf-prepare trains with the checkpointing prepare_model_for_kbit_training turns on: "
                         "every configuration needs \"gc\": true")
    device = torch.device(DEVICE)
    t0 = time.perf_counter()
    model = build_hf(shape)
    model = prepare_model_for_kbit_training(model)  # fp32 casts of non-4-bit params, GC on (reentrant), input grads
    build_s = time.perf_counter() - t0
    leaked = 0
    for c in configs:
        cleanup()
        if profile == "hf" and c["gc"]:  # as transformers' Trainer does: no kwargs, so use_reentrant=False
            model.gradient_checkpointing_enable()
        elif profile == "hf":
            model.gradient_checkpointing_disable()
        reentrant = checkpoint_use_reentrant(model)
        peft_model = get_peft_model(model, LoraConfig(r=c["rank"], lora_alpha=c.get("alpha", 2 * c["rank"]),
                                                      target_modules=list(TARGETS.get(c["targets"], c["targets"])),
                                                      lora_dropout=0.0, task_type="CAUSAL_LM"))
        peft_model.train()
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = bnb.optim.PagedAdamW32bit(params, lr=2e-4) if DEVICE == "cuda" else torch.optim.AdamW(params, lr=2e-4)
        monitor = MemoryMonitor(device)
        after_load = monitor.sample("after_load")
        losses, step_seconds, peaks, err, ids = train_loop(peft_model, params, opt, shape.vocab, c, steps, warmup,
                                                            monitor, max_grad_norm=0.3)
        rec = record(profile, shape, c, after_load, None, err, leaked, build_s, step_seconds, peaks, losses)
        rec["settings"]["gc_use_reentrant"] = reentrant if c["gc"] else None
        rec["trainable_params"] = sum(p.numel() for p in params)
        rec["measured"]["paged_state_bytes"] = paged_state_bytes(opt)
        leaked += rec["measured"]["paged_state_bytes"]
        print(json.dumps(rec), flush=True)
        if os.environ.get("QTOOL_PROFILE") == "1" and not err:
            profile_step(lambda: peft_model(input_ids=ids, labels=ids).loss.backward(), f"{profile}-{shape.name}")
        del opt, params
        model = peft_model.unload()
        del peft_model


def checkpoint_use_reentrant(model) -> bool | None:
    """Whether the model's layers checkpoint reentrantly (None: no checkpointing function set). transformers binds
    its kwargs with functools.partial; without ``use_reentrant`` torch's own default applies, which is reentrant
    through torch 2.13 (torch/utils/checkpoint.py: a warning, then ``use_reentrant = True``)."""
    for module in model.modules():
        fn = getattr(module, "_gradient_checkpointing_func", None)
        if fn is not None and getattr(module, "gradient_checkpointing", False):
            return bool(getattr(fn, "keywords", {}).get("use_reentrant", True))
    return None


def train_loop(model, params, opt, vocab, c, steps, warmup, monitor, max_grad_norm=None):
    """The eager step of the hf, hf-prepare and unsloth profiles: ``loss = model(input_ids=ids, labels=ids).loss``
    (the output, and its logits, dropped before backward, as transformers' Trainer does), backward, clipping when
    ``max_grad_norm``, step, ``zero_grad(set_to_none=True)``. Random ids of exactly batch x seq, no padding or mask.
    Each step is timed between device synchronisations (Unsloth's checkpointing copies on side streams; bitsandbytes
    steps on the legacy stream). Returns ``(losses, step_seconds, peaks, error, last_ids)``; peaks are taken from
    step ``warmup`` on, and error is set (and the rest None) on an out-of-memory error."""
    device = torch.device(DEVICE)
    gen = torch.Generator().manual_seed(0)
    b = c.get("batch_size", 1)
    losses, step_seconds, since, ids = [], [], 0, None
    try:
        for step in range(steps):
            if step == warmup:
                monitor.reset_peaks()
                since = len(monitor.samples)
            ids = torch.randint(0, vocab, (b, c["seq_len"]), generator=gen).to(device)
            sync()
            t = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            if step >= warmup:
                monitor.sample("forward")
            loss.backward()
            if step >= warmup:
                monitor.sample("backward")
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
            sync()
            step_seconds.append(time.perf_counter() - t)
            monitor.sample("optimizer_step")
    except torch.cuda.OutOfMemoryError as exc:
        return None, None, None, f"OOM: {str(exc)[:200]}", None
    return losses, step_seconds, monitor.peaks(since), None, ids


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------------------- unsloth
# Set before Unsloth is imported: no statistics download (unsloth/models/_utils.py get_statistics skips it under any
# of these), no hub look-ups (has_internet() answers False when either offline variable is set), and Unsloth's
# compiled-module cache outside the repository.
UNSLOTH_ENV = {"UNSLOTH_DISABLE_STATISTICS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_DATASETS_OFFLINE": "1"}


def run_unsloth(shape, configs, steps, warmup):
    """Profile unsloth (module docstring). One configuration per process: ``max_seq_length`` is fixed at load, and
    it decides the checkpointing (Unsloth's "unsloth" mode falls back to plain checkpointing below 512; at 512 and
    above it offloads each checkpointed layer input to pinned host buffers, unsloth_zoo/gradient_checkpointing.py,
    which no GPU counter sees: the record gives their size). The folder is written once per shape under
    QTOOL_BENCH_FOLDERS (default: the temporary directory) and reused by later processes."""
    import contextlib

    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # Unsloth's banner and notices: stdout carries only the record
        rec = unsloth_record(shape, configs, steps, warmup)
    print(json.dumps(rec), file=stdout, flush=True)


def unsloth_record(shape, configs, steps, warmup) -> dict:
    import tempfile
    from pathlib import Path

    if len(configs) != 1:
        raise ValueError(f"profile unsloth runs one configuration per process, got {len(configs)}")
    c = configs[0]
    if "transformers" in sys.modules or "peft" in sys.modules:
        raise RuntimeError("unsloth must be imported before transformers and peft (it patches them on import)")
    for k, v in UNSLOTH_ENV.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", tempfile.mkdtemp(prefix="unsloth-compiled-"))
    t0 = time.perf_counter()
    import unsloth
    from unsloth import FastLanguageModel
    import bitsandbytes as bnb

    from bench.random_folder import write_random_nf4_folder

    import_s = time.perf_counter() - t0
    device = torch.device(DEVICE)
    t0 = time.perf_counter()
    root = Path(os.environ.get("QTOOL_BENCH_FOLDERS", tempfile.gettempdir()))
    folder = write_random_nf4_folder(shape, root / f"qtool-bench-{shape.name}-{shape.n_layers}l-nf4", device)
    cleanup()
    folder_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model, _tokenizer = FastLanguageModel.from_pretrained(
        str(folder), max_seq_length=c["seq_len"], dtype=torch.bfloat16, load_in_4bit=True,
        fix_tokenizer=False)  # the word-level bench tokenizer needs no chat-template or pad fixes
    model = FastLanguageModel.get_peft_model(
        model, r=c["rank"], target_modules=list(TARGETS.get(c["targets"], c["targets"])),
        lora_alpha=c.get("alpha", 2 * c["rank"]), lora_dropout=0, bias="none",
        use_gradient_checkpointing="unsloth" if c["gc"] else False, random_state=0)
    FastLanguageModel.for_training(model)  # training mode: checkpointing only runs in it
    build_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.PagedAdamW32bit(params, lr=2e-4) if DEVICE == "cuda" else torch.optim.AdamW(params, lr=2e-4)
    monitor = MemoryMonitor(device)
    after_load = monitor.sample("after_load")
    losses, step_seconds, peaks, err, _ = train_loop(model, params, opt, shape.vocab, c, steps, warmup, monitor)
    rec = record("unsloth", shape, c, after_load, None, err, 0, build_s, step_seconds, peaks, losses,
                 adapter_dtype=str(params[0].dtype).removeprefix("torch."))
    rec["trainable_params"] = sum(p.numel() for p in params)
    rec["measured"]["paged_state_bytes"] = paged_state_bytes(opt)
    rec["measured"].update(unsloth_import_seconds=round(import_s, 2), folder_write_seconds=round(folder_s, 2))
    rec["unsloth"] = unsloth_report(unsloth, model)
    return rec


def unsloth_report(unsloth, model) -> dict:
    """What Unsloth says it set up: versions, attention back-ends, its checkpointing mode and offload buffers, where
    the embeddings live, the sequence length it prepared for. A value it does not expose is None."""
    import importlib
    import importlib.metadata as md
    import importlib.util

    def module_attr(module, name):
        try:
            return getattr(importlib.import_module(module), name, None)
        except ImportError:
            return None

    def buffer_bytes(buffers):
        return sum(t.numel() * t.element_size() for t in (buffers or []) if torch.is_tensor(t))

    gc_module = "unsloth_zoo.gradient_checkpointing"
    embed = model.get_input_embeddings().weight
    out = {"version": getattr(unsloth, "__version__", None),
           "unsloth_zoo": md.version("unsloth_zoo") if importlib.util.find_spec("unsloth_zoo") else None,
           "has_flash_attention": module_attr("unsloth.models._utils", "HAS_FLASH_ATTENTION"),
           "xformers": md.version("xformers") if importlib.util.find_spec("xformers") else None,
           "gradient_checkpointing": getattr(model, "_unsloth_gradient_checkpointing", None),
           "checkpoint_function": torch.utils.checkpoint.CheckpointFunction.__name__,
           "gc_host_buffer_bytes": buffer_bytes(module_attr(gc_module, "CPU_BUFFERS")),
           "gc_device_buffer_bytes": buffer_bytes(module_attr(gc_module, "GPU_BUFFERS"))
           + buffer_bytes(module_attr(gc_module, "GPU_BUFFERS_B")),
           "embedding_device": str(embed.device), "embedding_dtype": str(embed.dtype),
           "max_seq_length": getattr(model, "max_seq_length", None)}
    print(f"### unsloth: {json.dumps(out)}", file=sys.stderr)
    return out


KERNEL_KINDS = (  # (kind, substrings of the lower-cased kernel name); the first match wins
    ("memcpy", ("memcpy", "memset")),
    ("gemm", ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas")),
    ("attention", ("fmha", "flash", "attention", "cudnn")),
    ("dequant", ("dequant",)),
    ("fused norm/rope/swiglu", ("_rms_", "_rope", "_swiglu")),
    ("optimizer", ("optimizer", "adam")),
    ("loss (softmax, nll)", ("softmax", "nll", "logsumexp", "cross_entropy")),
)


STEP_SPAN = "profiler step span"  # torch.profiler's ProfilerStep#N annotation: the step's span, not a kernel


def kernel_kind(name: str) -> str:
    k = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(s in k for s in keys)), "elementwise/other")


class ReplayProfiler:
    """torch.profiler over the last two steps of :func:`qtool.train.recipe.train` — CUDA-graph replays on the
    graph path — advanced by train's ``progress`` callback; :meth:`summary` gives GPU time per step by kernel kind
    (kernels inside a replayed graph are traced one by one) beside the step's wall time and its ideal time at the
    GPU's dense bf16 peak."""

    def __init__(self, steps: int):
        from torch.profiler import ProfilerActivity, profile, schedule

        self.events = None
        self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                            schedule=schedule(wait=max(steps - 3, 0), warmup=1, active=2, repeat=1),
                            on_trace_ready=self._ready)
        self.prof.start()

    def _ready(self, prof):
        self.events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]

    def progress(self, step, loss, seconds):
        self.prof.step()

    def summary(self, flops: dict, step_seconds: list) -> dict:
        self.prof.stop()
        n = 2
        wall_ms = 1e3 * sum(step_seconds) / len(step_seconds)
        kinds, top = {}, []
        for e in self.events or []:
            ms = e.self_device_time_total / 1e3
            kind = STEP_SPAN if e.key.startswith("ProfilerStep") else kernel_kind(e.key)
            launches, total = kinds.get(kind, (0, 0.0))
            kinds[kind] = (launches + e.count, total + ms)
            top.append((ms / n, e.count // n, kind, e.key[:90]))
        per_step = {k: {"ms": round(ms / n, 3), "launches": c // n} for k, (c, ms) in kinds.items()}
        compute_ms = sum(v["ms"] for k, v in per_step.items() if k not in ("memcpy", STEP_SPAN))
        gemm_ms = per_step.get("gemm", {}).get("ms", 0.0)
        peak = PEAK_BF16_TFLOPS.get(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
        gemm_flops = flops["linear"] + flops["head"] + flops["lora"]
        return {"steps_profiled": n, "wall_ms": round(wall_ms, 3), "kernels_ms": per_step,
                "compute_kernels_ms": round(compute_ms, 3),
                "idle_ms": round(max(wall_ms - compute_ms, 0.0), 3),
                "gemm_tflops": round(gemm_flops / (gemm_ms / 1e3) / 1e12, 1) if gemm_ms else None,
                "ideal_ms_at_peak": round(flops["total"] / (peak * 1e12) * 1e3, 3) if peak else None,
                "peak_tflops": peak,
                "top_kernels": [{"ms": round(ms, 3), "launches": c, "kind": k, "name": name}
                                for ms, c, k, name in sorted(top, reverse=True)[:15]]}


def format_profile(tag: str, p: dict) -> str:
    lines = [f"### replay profile {tag}: wall {p['wall_ms']:.1f} ms/step, compute kernels {p['compute_kernels_ms']:.1f} ms, "
             f"idle {p['idle_ms']:.1f} ms, ideal at {p['peak_tflops']} TFLOP/s {p['ideal_ms_at_peak']} ms, "
             f"GEMMs at {p['gemm_tflops']} TFLOP/s"]
    for kind, v in sorted(p["kernels_ms"].items(), key=lambda kv: -kv[1]["ms"]):
        lines.append(f"  {v['ms']:9.2f} ms  {v['launches']:6d}x  [{kind}]")
    for k in p["top_kernels"][:10]:
        lines.append(f"  {k['ms']:9.2f} ms  {k['launches']:6d}x  {k['kind']:<24} {k['name'][:70]}")
    return "\n".join(lines)


def profile_step(fn, tag):
    """Where one forward+backward spends GPU time: top kernels, and GPU-busy vs wall time (to stderr)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_total = sum(e.self_device_time_total for e in kernels) / 1e3
    cats = {}
    for e in kernels:
        k = e.key.lower()
        cat = ("gemm" if any(s in k for s in ("gemm", "nvjet", "cutlass_80", "sm90_xmma", "cublas")) else
               "attention" if any(s in k for s in ("fmha", "flash", "attention", "cudnn")) else
               "dequant" if "dequant" in k else
               "fused(qtool)" if any(s in k for s in ("_rms_", "_rope", "_swiglu")) else
               "optimizer" if any(s in k for s in ("optimizer", "adam")) else "elementwise/other")
        n, ms = cats.get(cat, (0, 0.0))
        cats[cat] = (n + e.count, ms + e.self_device_time_total / 1e3)
    print(f"### profile {tag}: wall {wall * 1e3:.1f} ms, GPU kernels {gpu_total:.1f} ms in "
          f"{sum(e.count for e in kernels)} launches", file=sys.stderr)
    for cat, (n, ms) in sorted(cats.items(), key=lambda kv: -kv[1][1]):
        print(f"  {ms:9.2f} ms  {n:6d}x  [{cat}]", file=sys.stderr)
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:8]:
        print(f"  {e.self_device_time_total / 1e3:9.2f} ms  {e.count:6d}x  {e.key[:80]}", file=sys.stderr)


def main(argv):
    profile, name, configs = argv[0], argv[1], json.loads(argv[2])
    if profile not in PROFILES:
        raise SystemExit(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
    steps = int(os.environ.get("QTOOL_BENCH_STEPS", 6))
    warmup = WARMUP
    shape = bench_shape(name, int(os.environ.get("QTOOL_BENCH_LAYERS", 0)) or None)
    if profile == "unsloth":
        run_unsloth(shape, configs, steps, warmup)
    elif profile == "qtool":
        run_qtool(shape, configs, steps, warmup)
    else:
        run_hf(shape, configs, steps, warmup, profile)


if __name__ == "__main__":
    main(sys.argv[1:])

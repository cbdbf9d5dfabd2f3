"""One GPU worker process: build one random-weight NF4 model of a real shape for one profile, then run a list of
training configurations on it, printing one JSON record per configuration (schema: data/memory/README.md).

Profiles:
  qtool  our trainer (qtool.train.model.random_decoder + qtool.train.recipe.train), paged AdamW 32-bit
  hf     transformers + PEFT + bitsandbytes as people run it: Linear4bit NF4 + double quant (compute bf16),
         prepare_model_for_kbit_training, get_peft_model, gradient checkpointing, bnb PagedAdamW32bit, loss from
         model(input_ids, labels=...)

Both sides get the *same* random NF4 weights (made directly in packed form on the GPU, never in 16-bit), so a
65B model needs no 130 GB file. Run by bench/train_bench.py; usable alone:

    python bench/gpu_worker.py qtool llama-2-7b '[{"seq_len": 512, "rank": 16, "targets": "qkvo", "gc": true}]'

A qtool configuration with ``"offload": true`` trains with ``--offload-activations`` (needs ``"gc": true``).
A configuration with ``"method": "adalora"`` (qtool only) trains AdaLoRA from ``rank`` (= init rank) to
``target_rank`` (default 8), with ``tinit`` = ``tfinal`` = 1 unless given: over the default 6 steps the budget falls
during the CUDA-graph replays (masking in place between them) and the mask is fixed at step 5.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from qtool.arch import known_shape  # noqa: E402
from qtool.train.measure import MemoryMonitor  # noqa: E402

WARMUP = int(os.environ.get("QTOOL_BENCH_WARMUP", 2))
DEVICE = os.environ.get("QTOOL_BENCH_DEVICE", "cuda")  # "cpu": a slow dry run of the code paths, no measurements
TARGETS = {"qkvo": ["q_proj", "k_proj", "v_proj", "o_proj"],
           "all-linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def hf_config_dict(shape) -> dict:
    return {"model_type": shape.model_type, "hidden_size": shape.hidden, "intermediate_size": shape.intermediate,
            "num_hidden_layers": shape.n_layers, "num_attention_heads": shape.n_heads,
            "num_key_value_heads": shape.n_kv_heads, "head_dim": shape.head_dim, "vocab_size": shape.vocab,
            "tie_word_embeddings": shape.tied_embeddings, "max_position_embeddings": max(shape.max_positions, 8192),
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "dtype": "bfloat16"}


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

    device = torch.device(DEVICE)
    cfg = decoder_shape(hf_config_dict(shape))
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
        try:
            res = train(model, blocks, st, device=device)
            err = None
        except torch.cuda.OutOfMemoryError as exc:
            res, err = None, f"OOM: {str(exc)[:200]}"
        rec = record("qtool", shape, c, after_load, res, err, leaked, build_s)
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
        if os.environ.get("QTOOL_PROFILE") and res is not None:
            profile_step(lambda: model.loss(blocks.train[:st.batch_size].to(device)).backward(), f"qtool-{shape.name}")
        detach_adapters(model)


def record(profile, shape, c, after_load, res, err, leaked, build_s, step_seconds=None, peaks=None, losses=None):
    settings = {"rank": c["rank"], "alpha": c.get("alpha", 2 * c["rank"]), "targets": c["targets"],
                "seq_len": c["seq_len"], "batch_size": c.get("batch_size", 1), "grad_checkpointing": c["gc"],
                "optimizer": c.get("optimizer", "paged_adamw_32bit"), "double_quant": True, "block_size": 64,
                "compute_dtype": "bfloat16", "adapter_dtype": "float32", "attention": "sdpa",
                "loss": "chunked" if profile == "qtool" else "full", **({"init": c["init"]} if "init" in c else {})}
    if c.get("method") == "adalora":  # the planner's Settings fields (qtool.plan.settings)
        settings.update(method="adalora", target_rank=c.get("target_rank", 8))
    rec = {"id": f"{profile}-{shape.name}-s{c['seq_len']}-b{settings['batch_size']}-r{c['rank']}-{c['targets']}-"
                 f"{'gc' if c['gc'] else 'nogc'}" + (f"-{c['init']}" if c.get("init", "zero") != "zero" else "")
                 + ("-adalora" if c.get("method") == "adalora" else ""),
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
        rec["measured"].update({"step_seconds": [round(s, 4) for s in step_seconds], "median_step_seconds": median,
                                "tokens_per_second": settings["seq_len"] * settings["batch_size"] / median,
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


def run_hf(shape, configs, steps, warmup):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    device = torch.device(DEVICE)
    t0 = time.perf_counter()
    model = build_hf(shape)
    model = prepare_model_for_kbit_training(model)  # fp32 casts of non-4-bit params, GC on, input grads
    build_s = time.perf_counter() - t0
    leaked = 0
    vocab = shape.vocab
    for c in configs:
        cleanup()
        if c["gc"]:
            model.gradient_checkpointing_enable()
        else:
            model.gradient_checkpointing_disable()
        peft_model = get_peft_model(model, LoraConfig(r=c["rank"], lora_alpha=c.get("alpha", 2 * c["rank"]),
                                                      target_modules=TARGETS.get(c["targets"], c["targets"]),
                                                      lora_dropout=0.0, task_type="CAUSAL_LM"))
        peft_model.train()
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = bnb.optim.PagedAdamW32bit(params, lr=2e-4) if DEVICE == "cuda" else torch.optim.AdamW(params, lr=2e-4)
        monitor = MemoryMonitor(device)
        after_load = monitor.sample("after_load")
        gen = torch.Generator().manual_seed(0)
        b = c.get("batch_size", 1)
        losses, step_seconds, err = [], [], None
        try:
            for step in range(steps):
                if step == warmup:
                    monitor.reset_peaks()
                    since = len(monitor.samples)
                ids = torch.randint(0, vocab, (b, c["seq_len"]), generator=gen).to(device)
                if DEVICE == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                loss = peft_model(input_ids=ids, labels=ids).loss
                if step >= warmup:
                    monitor.sample("forward")
                loss.backward()
                if step >= warmup:
                    monitor.sample("backward")
                torch.nn.utils.clip_grad_norm_(params, 0.3)
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss))
                step_seconds.append(time.perf_counter() - t)
                monitor.sample("optimizer_step")
        except torch.cuda.OutOfMemoryError as exc:
            err = f"OOM: {str(exc)[:200]}"
        rec = record("hf", shape, c, after_load, None, err, leaked, build_s, step_seconds if not err else None,
                     monitor.peaks(since) if not err else None, losses)
        rec["trainable_params"] = sum(p.numel() for p in params)
        rec["measured"]["paged_state_bytes"] = paged_state_bytes(opt)
        leaked += rec["measured"]["paged_state_bytes"]
        print(json.dumps(rec), flush=True)
        if os.environ.get("QTOOL_PROFILE") and not err:
            profile_step(lambda: peft_model(input_ids=ids, labels=ids).loss.backward(), f"hf-{shape.name}")
        del opt, params
        model = peft_model.unload()
        del peft_model


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
    steps = int(os.environ.get("QTOOL_BENCH_STEPS", 6))
    warmup = WARMUP
    shape = known_shape(name)
    {"qtool": run_qtool, "hf": run_hf}[profile](shape, configs, steps, warmup)


if __name__ == "__main__":
    main(sys.argv[1:])

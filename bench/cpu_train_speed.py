"""QLoRA training speed on the CPU: qtool's trainer against transformers + PEFT + bitsandbytes on the same NF4 folder.

    python bench/cpu_train_speed.py                     # SmolLM2-135M NF4, LoRA r16 q,k,v,o, seq 128, batch 2
    python bench/cpu_train_speed.py --steps 6 --targets all-linear

Both sides: the SmolLM2 fixture converted by `qtool convert`, LoRA on the same modules and rank, gradient
checkpointing, torch AdamW (bitsandbytes' optimizers need CUDA), the same random token batches. transformers loads
the folder as it is (pre-quantised bitsandbytes NF4; `Linear4bit` dequantises per product on the CPU), then
`prepare_model_for_kbit_training` + `get_peft_model` as its docs show; it runs once with the checkpoint's bf16 compute
dtype (what a user gets by default) and once with fp32 (each Linear4bit's compute dtype and the non-quantised weights
in fp32: the fastest choice on a CPU without bf16 instructions). qtool picks its compute dtype itself (`auto`). The first
step of each run is reported separately (one-off costs); tokens/s is the median of the rest. One process per run,
so no run inherits another's warm caches. Prints a table; `--json` writes the rows.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL = QKVO + ["gate_proj", "up_proj", "down_proj"]


def _batches(vocab: int, n: int, batch: int, seq: int):
    import torch

    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (batch, seq), generator=gen) for _ in range(n)]


def run_qtool(folder: str, a) -> dict:
    import torch

    from qtool.adapters.spec import AdapterSpec
    from qtool.train.load import compute_dtype_for, load_decoder

    dtype, why = compute_dtype_for("auto", torch.device("cpu"))
    model = load_decoder(folder, AdapterSpec(a.targets, rank=a.rank, alpha=2 * a.rank), compute_dtype=dtype)
    model.train()
    model.grad_checkpointing = True
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for ids in _batches(model.shape.vocab, a.steps, a.batch_size, a.seq_len):
        t0 = time.perf_counter()
        model.loss(ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {"side": "qtool", "compute_dtype": f"{str(dtype).removeprefix('torch.')} ({why})", "times": times,
            "trainable": sum(p.numel() for p in params)}


def run_hf(folder: str, a, compute: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, compute)
    # transformers keeps a pre-quantised folder's other weights in the folder's bnb compute dtype: cast them here
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    for t in list(model.parameters()) + list(model.buffers()):  # not .to(): refused for quantised models
        if t.dtype.is_floating_point:
            t.data = t.data.to(dtype)
    for m in model.modules():
        if hasattr(m, "compute_dtype"):
            m.compute_dtype = dtype
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    targets = {"qkvo": QKVO, "all-linear": ALL}.get(a.targets, a.targets.split(","))
    model = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules=targets,
                                             task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for ids in _batches(model.config.vocab_size, a.steps, a.batch_size, a.seq_len):
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {"side": "transformers + PEFT + bitsandbytes", "compute_dtype": compute, "times": times,
            "trainable": sum(p.numel() for p in params)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="qkvo")
    ap.add_argument("--json", type=Path, default=None, help="write the rows here")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one side in this process
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        side, _, compute = a.one.partition(":")
        row = run_qtool(a.folder, a) if side == "qtool" else run_hf(a.folder, a, compute)
        print("ROW " + json.dumps(row))
        return

    import torch

    from tools import fixtures
    from qtool.convert.pipeline import convert

    folder = fixtures.cache_dir() / "bench-cpu-train" / "smollm2-nf4"
    if not (folder / "qtool_report.json").exists():
        convert(fixtures.smollm2(), folder, target="cpu", overwrite=True)
    rows = []
    for one in ("qtool", "hf:bfloat16", "hf:float32"):
        cmd = [sys.executable, __file__, "--one", one, "--folder", str(folder), "--steps", str(a.steps), "--seq-len",
               str(a.seq_len), "--batch-size", str(a.batch_size), "--rank", str(a.rank), "--targets", a.targets]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("ROW ")), None)
        if line is None:
            raise SystemExit(f"{one} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(line[4:]))
    tokens = a.batch_size * a.seq_len
    print(f"# CPU QLoRA step, SmolLM2-135M NF4, LoRA r{a.rank} {a.targets}, seq {a.seq_len} x batch {a.batch_size}, "
          f"gradient checkpointing, AdamW; {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print(f"| side | compute dtype | first step s | median step s | tokens/s | trainable |")
    print(f"|---|---|---|---|---|---|")
    for r in rows:
        med = statistics.median(r["times"][1:])
        r.update(first_step_s=r["times"][0], median_step_s=med, tokens_per_s=tokens / med)
        print(f"| {r['side']} | {r['compute_dtype']} | {r['times'][0]:.2f} | {med:.2f} | {tokens / med:,.0f} | "
              f"{r['trainable']:,} |")
    if a.json:
        a.json.write_text(json.dumps({"settings": vars(a) | {"json": str(a.json)}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

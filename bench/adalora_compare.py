"""AdaLoRA on the CPU, two comparisons on the SmolLM2 fixture (NF4) and Shakespeare (issue 9):

(a) qtool's AdaLoRA against PEFT's (transformers + bitsandbytes NF4 + AdaLoraConfig, its RankAllocator called after
    each optimizer step as its docs say): the same data order, seed, initial P and Q (ours copied into PEFT's), budget
    and schedule, optimizer and clipping. Prints the final held-out loss of both (goal: within 2%) and the two rank
    allocations side by side.
(b) qtool's AdaLoRA at target rank r against qtool's plain LoRA at rank r (the same final total rank, r per module on
    average): held-out loss every --eval-every steps, both curves (and PEFT's) on one PNG.

    python bench/adalora_compare.py                  # defaults sized for a shared 2-core CPU (~45-60 min there)
    python bench/adalora_compare.py --steps 40 --tinit 4 --tfinal 8 --eval-every 10 --eval-blocks 4 \
        --out bench/results                          # the committed record: ~8 min on a shared 2-core CPU
    python bench/adalora_compare.py --steps 300 --seq-len 128 --batch-size 4 --tinit 30 --tfinal 60   # longer

Both sides compute in fp32 (transformers' Linear4bit is switched to an fp32 compute dtype and its embeddings and
norms to fp32: the checkpoint says bf16, which CPUs without bf16 instructions run ~15x slower), without gradient
checkpointing (it changes no number, only time). The bypass scale is the same for LoRA and AdaLoRA:
alpha = 2 x rank (LoRA r: 2r / r = 2; AdaLoRA: 2 init_r / init_r = 2), and so is the learning rate. Note that at
the same learning rate AdaLoRA's update starts ~100x smaller than LoRA's: both start with a zero bypass, but LoRA's
B grows against a Kaiming A (entries ~1/sqrt(in) = 0.04) while AdaLoRA's λ grows between P and Q of std 0.02 (PEFT's
and the paper's init), so the default learning rate (5e-3) is higher than QLoRA's usual 2e-4 to let both move in a
few dozen steps. Writes OUT/adalora_compare.{json,png}.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batches(n_rows: int, batch_size: int, steps: int, seed: int):
    """The rows qtool.train.recipe.train draws, in its order (a seeded permutation, re-drawn when used up)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    order, cursor = torch.randperm(n_rows, generator=gen), 0
    for _ in range(steps):
        rows = []
        for _ in range(batch_size):
            if cursor == len(order):
                order, cursor = torch.randperm(n_rows, generator=gen), 0
            rows.append(order[cursor])
            cursor += 1
        yield torch.stack(rows)


def run_ours(folder, blocks, a, method: str, curve: list, init_out: dict | None = None):
    import torch

    from qtool.train.load import load_decoder
    from qtool.train.recipe import TrainSettings, evaluate, train

    common = dict(steps=a.steps, seq_len=a.seq_len, batch_size=a.batch_size, lr=a.lr, grad_checkpointing=False,
                  targets="all-linear", seed=a.seed, compute_dtype="float32", max_grad_norm=0.3)
    if method == "adalora":
        st = TrainSettings(method="adalora", init_rank=a.init_rank, target_rank=a.target_rank, tinit=a.tinit,
                           tfinal=a.tfinal, delta_t=a.delta_t, orth_reg=a.orth_reg, alpha=2.0 * a.init_rank, **common)
    else:  # LoRA may take its own learning rate (--lora-lr): at AdaLoRA's it can be past its best
        st = TrainSettings(rank=a.target_rank, alpha=2.0 * a.target_rank, **(common | {"lr": a.lora_lr or a.lr}))
    model = load_decoder(folder, st.spec, compute_dtype=torch.float32, seed=a.seed)
    if init_out is not None:  # the initial P and Q, for PEFT
        from qtool.adapters.adalora import adalora_modules

        init_out.update({p: (m.lora_a.detach().clone(), m.lora_b.detach().clone())
                         for p, m in adalora_modules(model).items()})
    device = torch.device("cpu")
    t0 = time.perf_counter()

    def progress(step, loss, seconds):
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            curve.append((step + 1, evaluate(model, blocks.eval, a.batch_size, device)))
            print(f"  [{method} qtool] step {step + 1}: held-out {curve[-1][1]:.4f} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)

    res = train(model, blocks, st, device=device, progress=progress)
    return model, res, time.perf_counter() - t0


def run_peft(folder, blocks, a, init: dict, curve: list):
    import bitsandbytes as bnb
    import torch
    import torch.nn.functional as F
    from peft import AdaLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    for m in model.modules():  # fp32 compute (the checkpoint's config says bf16; see the docstring)
        if isinstance(m, bnb.nn.Linear4bit):
            m.compute_dtype = torch.float32
    for p in model.parameters():
        if p.dtype == torch.bfloat16:
            p.data = p.data.float()
    config = AdaLoraConfig(init_r=a.init_rank, target_r=a.target_rank, tinit=a.tinit, tfinal=a.tfinal,
                           deltaT=a.delta_t, beta1=0.85, beta2=0.85, orth_reg_weight=a.orth_reg, total_step=a.steps,
                           lora_alpha=2 * a.init_rank, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    with torch.no_grad():
        for path, (q, p) in init.items():
            layer = model.base_model.model.get_submodule(path)
            layer.lora_A["default"].copy_(q)
            layer.lora_B["default"].copy_(p)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)

    def held_out() -> float:
        model.eval()
        with torch.no_grad():  # cross-entropy from the logits: PEFT adds the regulariser to outputs.loss
            losses = [F.cross_entropy(model(input_ids=x).logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten())
                      for x in blocks.eval.split(a.batch_size)]
        model.train()
        return float(sum(losses) / len(losses))

    model.train()
    t0 = time.perf_counter()
    for step, rows in enumerate(batches(len(blocks.train), a.batch_size, a.steps, a.seed)):
        x = blocks.train[rows]
        model(input_ids=x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad(set_to_none=True)
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            curve.append((step + 1, held_out()))
            print(f"  [adalora PEFT] step {step + 1}: held-out {curve[-1][1]:.4f} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
    pattern = model.peft_config["default"].rank_pattern
    ranks = {k.split(".lora_E")[0]: int(sum(v)) for k, v in pattern.items()}
    return ranks, time.perf_counter() - t0


def side_by_side(ours: dict, theirs: dict) -> list[str]:
    from qtool.adapters.budget import summarise

    a, b = summarise(ours, 0), summarise(theirs, 0)
    lines = [f"final budget: qtool {a['final_budget']}, PEFT {b['final_budget']}; modules at rank 0: qtool "
             f"{sum(r == 0 for r in ours.values())}, PEFT {sum(r == 0 for r in theirs.values())}; same rank in "
             f"{sum(ours[m] == theirs.get(m) for m in ours)} of {len(ours)} modules",
             "", "by module type (total rank, qtool | PEFT):"]
    lines += [f"  {x['module']:<10} {x['rank']:5d} | {y['rank']:5d}" for x, y in zip(a["by_type"], b["by_type"])]
    lines += ["", "by layer (total rank, qtool | PEFT):"]
    lines += ["  " + "  ".join(f"{x['layer']:>2}: {x['rank']:3d}|{y['rank']:<3d}" for x, y in
                               zip(a["by_layer"][i:i + 6], b["by_layer"][i:i + 6])) for i in range(0, len(a["by_layer"]), 6)]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--init-rank", type=int, default=12)
    ap.add_argument("--target-rank", type=int, default=8)
    ap.add_argument("--tinit", type=int, default=6)
    ap.add_argument("--tfinal", type=int, default=12)
    ap.add_argument("--delta-t", type=int, default=1)
    ap.add_argument("--orth-reg", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--lora-lr", type=float, default=None, help="part b: LoRA's learning rate  [default: --lr]")
    ap.add_argument("--eval-every", type=int, default=15)
    ap.add_argument("--eval-blocks", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parts", default="a,b", help="a: against PEFT's AdaLoRA; b: against LoRA at the target rank")
    ap.add_argument("--out", type=Path, default=None, help="where the JSON and PNG go  [default: fixtures cache]")
    a = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from qtool.adapters.adalora import adalora_modules
    from qtool.convert.pipeline import convert
    from qtool.train.data import pack
    from tools import fixtures

    folder = fixtures.cache_dir() / "bench-cpu-train" / "smollm2-nf4"
    if not (folder / "qtool_report.json").exists():
        convert(fixtures.smollm2(), folder, target="cpu", overwrite=True)
    out = a.out or fixtures.cache_dir() / "bench-adalora"
    out.mkdir(parents=True, exist_ok=True)
    blocks = pack(fixtures.shakespeare(), AutoTokenizer.from_pretrained(folder), a.seq_len, 0.05, a.eval_blocks)
    parts = a.parts.split(",")
    print(f"# AdaLoRA on the CPU: SmolLM2-135M NF4, all-linear (210 modules), Shakespeare {len(blocks.train)} train / "
          f"{len(blocks.eval)} held-out blocks of {a.seq_len}, batch {a.batch_size}, {a.steps} steps, lr {a.lr}, "
          f"AdamW, clip 0.3, fp32; AdaLoRA {a.init_rank} -> {a.target_rank}, tinit {a.tinit}, tfinal {a.tfinal}, "
          f"delta_t {a.delta_t}, orth_reg {a.orth_reg}; {platform.machine()}, {torch.get_num_threads()} threads "
          f"(a shared machine: times are indicative), torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    result = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}}
    curves = {}
    init: dict = {}
    curves["qtool AdaLoRA"] = []
    model, ada, secs = run_ours(folder, blocks, a, "adalora", curves["qtool AdaLoRA"], init)
    ours_ranks = ada.adalora["ranks"]
    n_final = sum(ours_ranks[p] * (m.in_features + m.out_features + 1) for p, m in adalora_modules(model).items())
    result["qtool_adalora"] = {"eval_loss": ada.eval_loss, "eval_loss_before": ada.eval_loss_before, "seconds": secs,
                               "ranks": ours_ranks, "final_trainable": n_final, "curve": curves["qtool AdaLoRA"]}
    del model
    lines = [f"qtool AdaLoRA: held-out {ada.eval_loss_before:.4f} -> {ada.eval_loss:.4f} ({secs:.0f} s); final "
             f"budget {ada.adalora['final_budget']}, {n_final:,} trainable parameters kept"]
    if "a" in parts:
        curves["PEFT AdaLoRA"] = []
        peft_ranks, secs = run_peft(folder, blocks, a, init, curves["PEFT AdaLoRA"])
        peft_loss = curves["PEFT AdaLoRA"][-1][1]
        diff = (ada.eval_loss - peft_loss) / peft_loss
        result["peft_adalora"] = {"eval_loss": peft_loss, "seconds": secs, "ranks": peft_ranks,
                                  "curve": curves["PEFT AdaLoRA"], "relative_difference": diff}
        lines += [f"PEFT  AdaLoRA: held-out -> {peft_loss:.4f} ({secs:.0f} s); qtool - PEFT = {100 * diff:+.2f}% "
                  f"(goal: within 2%)", ""] + side_by_side(ours_ranks, peft_ranks) + [""]
    if "b" in parts:
        curves[f"qtool LoRA r{a.target_rank}"] = []
        model, lora, secs = run_ours(folder, blocks, a, "lora", curves[f"qtool LoRA r{a.target_rank}"])
        result["qtool_lora"] = {"eval_loss": lora.eval_loss, "seconds": secs, "trainable": lora.trainable_params,
                                "curve": curves[f"qtool LoRA r{a.target_rank}"]}
        lines += [f"qtool LoRA r{a.target_rank} (lr {a.lora_lr or a.lr}): held-out {lora.eval_loss_before:.4f} -> "
                  f"{lora.eval_loss:.4f} "
                  f"({secs:.0f} s), {lora.trainable_params:,} trainable parameters; AdaLoRA - LoRA = "
                  f"{ada.eval_loss - lora.eval_loss:+.4f} ({'AdaLoRA' if ada.eval_loss < lora.eval_loss else 'LoRA'} "
                  f"lower)"]
    print("\n".join(lines))
    (out / "adalora_compare.json").write_text(json.dumps(result, indent=1))
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("(no PNG: matplotlib is not installed)")
        return
    fig = Figure(figsize=(7, 4.2), dpi=110)
    ax = fig.add_subplot()
    for name, curve in curves.items():
        ax.plot([s for s, _ in curve], [v for _, v in curve], marker="o", label=name)
    ax.axvspan(a.tinit, a.steps - a.tfinal, color="grey", alpha=0.1, label="AdaLoRA budget falls")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out loss")
    ax.set_title(f"SmolLM2-135M NF4, Shakespeare, seq {a.seq_len} x {a.batch_size}: AdaLoRA {a.init_rank}->"
                 f"{a.target_rank} vs LoRA r{a.target_rank}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "adalora_compare.png")
    print(f"wrote {out / 'adalora_compare.json'} and {out / 'adalora_compare.png'}")


if __name__ == "__main__":
    main()

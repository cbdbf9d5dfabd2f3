"""qtool's LoftQ against PEFT's `loftq_init` on the same real weights: ``||W - deq(Q) - s·B·A|| / ||W||``.

    python bench/loftq_vs_peft.py --extract .bench-data/smollm2-tensors.safetensors   # here: pick real tensors
    python bench/loftq_vs_peft.py --tensors .bench-data/smollm2-tensors.safetensors   # on a CUDA machine

PEFT's ``loftq_init`` computes on CUDA only (it hard-codes the device), quantises with bitsandbytes NF4 *without*
double quantisation, and returns factors with ``L·R ≈ W - deq(Q)`` — no room for the LoRA scale ``s = alpha/r``
(PEFT issue 1982), so the model it initialises computes ``deq(Q) + s·L·R``. We report PEFT's error both as it
intends it (s = 1) and as the model applies it (s = alpha/r), and qtool's, which folds s into the factors, with
PEFT's quantiser settings (no double quant) and with the base qtool stores (double quant), for 1 and 5 iterations.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NAMES = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
         "model.layers.15.self_attn.v_proj.weight", "model.layers.29.mlp.up_proj.weight")


def extract(out: Path) -> None:
    from safetensors.torch import load_file, save_file

    from tools import fixtures

    tensors = load_file(fixtures.smollm2() / "model.safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({n: tensors[n].contiguous() for n in NAMES}, out)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")


def compare(path: Path, rank: int, alpha: float, out_json: Path | None) -> None:
    import torch
    from peft.utils.loftq_utils import loftq_init as peft_loftq
    from safetensors.torch import load_file

    from qtool.adapters.init import loftq_init
    from qtool.nf4 import codec as nf4

    s = alpha / rank
    rows = []
    for name, w in load_file(path).items():
        w32 = w.float()
        norm = w32.norm()
        for t in (1, 5):
            q, lora_a, lora_b = peft_loftq(w32.clone(), num_bits=4, reduced_rank=rank, num_iter=t)
            q, lora_a, lora_b = q.float().cpu(), lora_a.float().cpu(), lora_b.float().cpu()
            row = {"tensor": name, "shape": list(w.shape), "iterations": t,
                   "peft_s1": float((w32 - q - lora_b @ lora_a).norm() / norm),
                   "peft_as_applied": float((w32 - q - s * lora_b @ lora_a).norm() / norm)}
            for dq in (False, True):
                def quantize(res, dq=dq):
                    qw = nf4.quantize(res.to(w.dtype), double_quant=dq, target="cuda")
                    return qw, nf4.dequantize(qw, torch.float32)

                t0 = time.perf_counter()
                a, b, qw, _ = loftq_init(w32, rank, s, quantize, n_iter=t, name=name)
                row[f"qtool_{'dq' if dq else 'no_dq'}"] = float(
                    (w32 - nf4.dequantize(qw, torch.float32) - s * b @ a).norm() / norm)
                row[f"qtool_{'dq' if dq else 'no_dq'}_seconds"] = time.perf_counter() - t0
            plain = nf4.dequantize(nf4.quantize(w, double_quant=False, target="cuda"), torch.float32)
            row["nf4_only"] = float((w32 - plain).norm() / norm)
            rows.append(row)
    print(f"# LoftQ, rank {rank}, alpha {alpha} (s = {s:g}); relative error ||W - deq(Q) - s·B·A|| / ||W||")
    print("| tensor | T | NF4 alone | PEFT (s=1, as it intends) | PEFT (as the model applies s) | qtool, no DQ | "
          "qtool, DQ (stored) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tensor'].removeprefix('model.')} {tuple(r['shape'])} | {r['iterations']} | {r['nf4_only']:.4f} | "
              f"{r['peft_s1']:.4f} | {r['peft_as_applied']:.4f} | {r['qtool_no_dq']:.4f} | {r['qtool_dq']:.4f} |")
    if out_json:
        out_json.write_text(json.dumps({"rank": rank, "alpha": alpha, "rows": rows}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--extract", type=Path, help="write the real tensors to compare into this file")
    ap.add_argument("--tensors", type=Path, help="compare on these tensors (needs CUDA: PEFT's loftq_init does)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    if a.extract:
        extract(a.extract)
    if a.tensors:
        compare(a.tensors, a.rank, a.alpha, a.json)


if __name__ == "__main__":
    main()

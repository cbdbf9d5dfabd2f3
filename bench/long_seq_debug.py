"""Where a long-sequence step goes non-finite (issue 14: Llama-2-7B shape, seq 8192, r16 qkvo, GC, batch 1 stopped
with "loss became nan at step 1" on the H200). GPU only; prints one line per probe, a table last.

    python bench/long_seq_debug.py [--model llama-2-7b] [--seqs 2048,8192]

Probes, each one forward+backward of the random-weight NF4 model (the bench's weights) on random tokens:
  eager       the trainer's forward (fused Triton kernels, SDPA), gradient checkpointing on
  no-gc       the same without checkpointing, with a hook on every layer's output gradient
  torch-ref   the fused kernels replaced by their torch references
  sdpa-X      attention forced to one SDPA backend (flash, efficient, cudnn, math)
For each: the loss, the largest |hidden| over layers, whether all LoRA gradients are finite, and the first layer
(from the top, i.e. in backward order) whose output gradient is not finite.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qtool.adapters.attach import attach_adapters  # noqa: E402
from qtool.adapters.spec import AdapterSpec  # noqa: E402
from qtool.arch import known_shape  # noqa: E402
from qtool.train import fused, model as model_mod  # noqa: E402
from qtool.train.load import random_decoder  # noqa: E402


def probe(model, ids, *, gc: bool, layer_hooks: bool):
    stats = {"max_hidden": 0.0, "bad_grad_layers": []}
    orig = model_mod.DecoderLayer.forward

    def wrapped(self, *args, **kw):
        out = orig(self, *args, **kw)
        stats["max_hidden"] = max(stats["max_hidden"], float(out.detach().abs().max()))
        if layer_hooks and out.requires_grad:
            i = next(j for j, layer in enumerate(model.layers) if layer is self)

            def hook(g, i=i):
                if not torch.isfinite(g).all():
                    stats["bad_grad_layers"].append(i)
            out.register_hook(hook)
        return out

    model_mod.DecoderLayer.forward = wrapped
    try:
        model.grad_checkpointing = gc
        for p in model.parameters():
            p.grad = None
        loss = model.loss(ids)
        loss.backward()
        if ids.is_cuda:
            torch.cuda.synchronize()
    finally:
        model_mod.DecoderLayer.forward = orig
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p.grad).all()]
    gmax = max(float(g.abs().max()) for g in grads)
    return {"loss": float(loss), "max_hidden": stats["max_hidden"], "grad_max": gmax, "bad_params": len(bad),
            "first_bad_param": bad[0] if bad else "", "bad_grad_layers": sorted(set(stats["bad_grad_layers"]))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-2-7b")
    ap.add_argument("--seqs", default="2048,8192")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    shape = known_shape(args.model)
    dev = torch.device(args.device)
    model = random_decoder(shape, dev)
    attach_adapters(model, AdapterSpec("qkvo", rank=args.rank, alpha=2 * args.rank))
    # B = 0 at step 0 makes A's gradient 0: give B a small value, as after a first step
    for m in model.lora_modules().values():
        torch.nn.init.normal_(m.lora_b, std=1e-3)
    model.train()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    rows = []
    for seq in [int(s) for s in args.seqs.split(",")]:
        ids = torch.randint(0, shape.vocab, (1, seq), generator=torch.Generator().manual_seed(0)).to(dev)
        probes = [("eager", dict(gc=True), contextlib.nullcontext),
                  ("no-gc", dict(gc=False), contextlib.nullcontext),
                  ("torch-ref", dict(gc=True), "ref")]
        probes += [(f"sdpa-{k}", dict(gc=True), (lambda b=b: sdpa_kernel([b]))) for k, b in backends.items()]
        for name, kw, ctx in probes:
            saved = fused._use_triton
            try:
                if ctx == "ref":
                    fused._use_triton = lambda x: False
                    ctx = contextlib.nullcontext
                with ctx():
                    r = probe(model, ids, layer_hooks=not kw["gc"], **kw)
            except Exception as exc:  # a backend that cannot run this shape
                r = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"}
            finally:
                fused._use_triton = saved
            r.update(seq=seq, probe=name)
            print(r, flush=True)
            rows.append(r)
            torch.cuda.empty_cache()
    print(f"\n{'seq':>6} {'probe':<15} {'loss':>9} {'max|h|':>10} {'max|g|':>10} {'bad':>4}  first bad")
    for r in rows:
        if "error" in r:
            print(f"{r['seq']:>6} {r['probe']:<15} {r['error']}")
            continue
        print(f"{r['seq']:>6} {r['probe']:<15} {r['loss']:9.4f} {r['max_hidden']:10.3g} {r['grad_max']:10.3g} "
              f"{r['bad_params']:>4}  {r['first_bad_param']} {r['bad_grad_layers'] or ''}")


if __name__ == "__main__":
    main()

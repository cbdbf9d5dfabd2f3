"""Where a sweep row's loss goes non-finite (bench/long_seq_sweep.py rows that failed). GPU only.

    python bench/nan_hunt.py MODEL SEQ BATCH RANK TARGETS

The trainer's eager step written out (same model, data, optimizer and clipping as long_seq_sweep's eager run), with
checks after each phase: loss finite, every LoRA gradient finite (the first bad parameter named, and the first layer
in backward order whose output gradient is not finite), every parameter finite after the optimizer step. Then the
same under variants: fused Triton kernels off, torch AdamW instead of bitsandbytes' paged AdamW, no gradient
checkpointing, each SDPA backend.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qtool.arch import known_shape  # noqa: E402
from qtool.train import fused, model as model_mod  # noqa: E402
from qtool.train.load import random_decoder  # noqa: E402
from qtool.train.recipe import TrainSettings, make_optimizer  # noqa: E402


def hunt(shape, seq, batch, rank, targets, *, optimizer="paged_adamw_32bit", gc=True, steps=4, ctx=None,
         eval_first=True):
    st = TrainSettings(steps=steps, seq_len=seq, batch_size=batch, rank=rank, alpha=2 * rank, targets=targets,
                       lr=2e-4, max_grad_norm=0.3, cuda_graphs=False)
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = random_decoder(shape, device, spec=st.spec)
    model.train()
    model.grad_checkpointing = gc
    params = [p for p in model.parameters() if p.requires_grad]
    names = {id(p): n for n, p in model.named_parameters()}
    _, opt = make_optimizer(params, optimizer, device, st.lr, 0.0)
    # the data and order of long_seq_sweep's rows (Blocks of batch*steps+1 rows, one held-out row; train()'s order)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, shape.vocab, (batch * steps + 1, seq), generator=gen)
    held_out = torch.randint(0, shape.vocab, (1, seq), generator=gen)
    data = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))]
    losses = []
    bad_layers = []
    orig = model_mod.DecoderLayer.forward

    def wrapped(self, *args, **kw):
        out = orig(self, *args, **kw)
        if out.requires_grad and not gc:
            i = next(j for j, layer in enumerate(model.layers) if layer is self)
            out.register_hook(lambda g, i=i: bad_layers.append(i) if not torch.isfinite(g).all() else None)
        return out

    model_mod.DecoderLayer.forward = wrapped
    try:
        with ctx() if ctx else contextlib.nullcontext():
            if eval_first:  # train() measures the held-out loss first, in eval mode without gradients
                model.eval()
                with torch.no_grad():
                    losses.append(f"eval {float(model.loss(held_out.to(device))):.4f}")
                model.train()
            for step in range(steps):
                ids = data[step * batch:(step + 1) * batch].to(device)
                loss = model.loss(ids)
                if not torch.isfinite(loss):
                    h = model.hidden_states(ids).detach()
                    return (f"step {step}: loss {float(loss)} after {' '.join(losses)}; final hidden finite: "
                            f"{bool(torch.isfinite(h).all())}, "
                            f"max|h| {float(h.float().abs().max()):.3g}")
                losses.append(f"{float(loss):.4f}")
                loss.backward()
                bad = [names[id(p)] for p in params if not torch.isfinite(p.grad).all()]
                if bad:
                    return (f"step {step}: loss {float(loss):.4f} finite, {len(bad)} non-finite grads, first "
                            f"{bad[0]}; bad layer outputs (backward order) {sorted(set(bad_layers))[:8]}")
                torch.nn.utils.clip_grad_norm_(params, st.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                badp = [names[id(p)] for p in params if not torch.isfinite(p).all()]
                if badp:
                    return f"step {step}: params non-finite after the optimizer step, first {badp[0]}"
        return f"all {steps} steps finite: {' '.join(losses)}"
    finally:
        model_mod.DecoderLayer.forward = orig
        del model, opt
        torch.cuda.empty_cache()


def main():
    name, seq, batch, rank, targets = sys.argv[1], *map(int, sys.argv[2:5]), sys.argv[5]
    shape = known_shape(name)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def no_triton():
        saved = fused._use_triton
        fused._use_triton = lambda x: False

        @contextlib.contextmanager
        def cm():
            try:
                yield
            finally:
                fused._use_triton = saved
        return cm()

    variants = [("default", {}), ("no eval first", {"eval_first": False}), ("no fused kernels", {"ctx": no_triton}),
                ("torch AdamW", {"optimizer": "adamw_torch"}), ("no GC (layer hooks)", {"gc": False})]
    variants += [(f"sdpa {k}", {"ctx": (lambda b=b: sdpa_kernel([b]))}) for k, b in
                 (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION))]
    for label, kw in variants:
        try:
            out = hunt(shape, seq, batch, rank, targets, **kw)
        except Exception as exc:  # noqa: BLE001 - a backend that cannot run this shape
            out = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        print(f"{name} s{seq} b{batch} r{rank} {targets} | {label:<20} | {out}", flush=True)


def through_train(name, seq, batch, rank, targets, label, **overrides):
    """The same row through qtool.train.recipe.train itself (as long_seq_sweep runs it), with settings overridden."""
    from qtool.train.data import Blocks
    from qtool.train.recipe import train

    shape = known_shape(name)
    kw = dict(steps=4, seq_len=seq, batch_size=batch, rank=rank, alpha=2 * rank, targets=targets, lr=2e-4,
              eval_blocks=1, measure_after=2, max_grad_norm=0.3, cuda_graphs=False, device="cuda")
    kw.update(overrides)
    st = TrainSettings(**kw)
    gen = torch.Generator().manual_seed(0)
    blocks = Blocks(torch.randint(0, shape.vocab, (batch * 4 + 1, seq), generator=gen),
                    torch.randint(0, shape.vocab, (1, seq), generator=gen), 0)
    torch.manual_seed(0)
    model = random_decoder(shape, torch.device("cuda"), spec=st.spec)
    try:
        res = train(model, blocks, st, device=torch.device("cuda"))
        out = f"finite: {' '.join(f'{x:.4f}' for x in res.losses)}"
    except Exception as exc:  # noqa: BLE001
        out = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
    print(f"{name} s{seq} b{batch} r{rank} {targets} | train() {label:<24} | {out}", flush=True)
    del model
    torch.cuda.empty_cache()


if __name__ == "__main__":
    if sys.argv[1] == "train":  # train MODEL SEQ BATCH RANK TARGETS LABEL [key=value ...]
        import ast

        extra = {k: ast.literal_eval(v) for k, v in (a.split("=", 1) for a in sys.argv[8:] if "=" in a)}
        if "patch:zero-to-none" in sys.argv:  # graph mode's zero_grad(set_to_none=False) made set_to_none=True
            zero = torch.optim.Optimizer.zero_grad
            torch.optim.Optimizer.zero_grad = lambda self, set_to_none=True: zero(self, True)
        through_train(sys.argv[2], *map(int, sys.argv[3:6]), sys.argv[6], sys.argv[7], **extra)
    else:
        main()

"""The allocations of one training step, tensor by tensor and in order, for :mod:`qtool.plan.allocator` to replay:
what ``memory_reserved`` becomes depends on the order and the sizes, not only on the peak's sum. Pure Python.

Two steps, each read from the code that runs (as the transient formulas of :mod:`qtool.plan.transient`, whose peak
the replay reproduces within 2.5%); this module has qtool's, :mod:`qtool.plan.trace_hf` the other:

* :class:`QtoolStep`: qtool/train on a GPU — Triton RMSNorm, RoPE and SwiGLU (each output a fresh tensor, the norm
  also an fp32 rstd), NF4 products that dequantise into a transient buffer, LoRA ``addmm(y, x Aᵀ, (s B)ᵀ)`` in the
  compute dtype, flash SDPA (out and an fp32 logsumexp; its backward an fp32 dq accumulator, and k/v gradients
  expanded to the query heads under GQA), non-reentrant checkpointing (the layer recomputed at its backward), the
  chunked cross-entropy of qtool/train/loss.py.
* :class:`HFStep`: transformers' Llama with PEFT LoRA on bitsandbytes ``Linear4bit`` after
  ``prepare_model_for_kbit_training`` (fp32 hidden states): LlamaRMSNorm's pow/mean/rsqrt/mul chain, bitsandbytes'
  ``x.to(compute dtype)``, absmax reconstruction, dequantised weight and ``.to(fp32)`` output, PEFT's
  ``result.clone() + lora_B(lora_A(x)) * scaling``, rotate-half RoPE, SDPA efficient (or math with repeated k, v and
  s² probabilities for GQA), full fp32 logits and cross-entropy.

Every Llama-family layer (q/k/v or a fused qkv_proj; gate/up, a fused gate_up_proj or a plain MLP) is traced with the
same ops; what a model family adds beyond that (Gemma's extra norms, q/k norms, sliding-window masks, soft-capping)
and the other adapter methods are not traced: their allocator slack is taken as that of the plain LoRA step
(:mod:`qtool.plan.process`). Each cuBLAS handle (one per thread and stream) allocates its 32 MiB workspace at its
first product, where the replay puts it; a workspace is never freed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from qtool.plan.resident import CUBLAS_WORKSPACE_BYTES, PAGED_MIN_NUMEL
from qtool.plan.settings import layer_linears
from qtool.plan.transient import _io_names, loss_chunk_tokens, widths

if TYPE_CHECKING:
    from qtool.arch import Shape
    from qtool.plan.allocator import CachingAllocator
    from qtool.plan.settings import Settings


class Stream:
    """Allocations made on one CUDA stream into one pool of ``allocator``: the stream's own (``pool`` None) or a
    CUDA graph's private pool. ``workspaces`` is shared by the process's streams: (stream, thread) -> workspace."""

    def __init__(self, allocator: CachingAllocator, name, pool=None, workspaces: dict | None = None):
        self.allocator, self.name, self.pool = allocator, name, name if pool is None else pool
        self.workspaces = {} if workspaces is None else workspaces

    def new(self, n_bytes: int):
        return self.allocator.malloc(n_bytes, self.pool) if n_bytes > 0 else None

    def drop(self, *blocks) -> None:
        for block in blocks:
            if block is not None:
                self.allocator.free(block)

    def workspace(self, thread: str) -> None:
        """The first cuBLAS product of ``thread`` (main | autograd) on this stream allocates its workspace here."""
        if (self.name, thread) not in self.workspaces:
            self.workspaces[(self.name, thread)] = self.new(CUBLAS_WORKSPACE_BYTES)


class _Step:
    """What both steps share: the adapter tensors, gradients and optimizer state of one configuration."""

    def __init__(self, shape: Shape, st: Settings):
        self.shape, self.st = shape, st
        self.ranks = st.module_ranks(shape) if st.method in ("lora", "adalora") else {}
        self.lins = {lin.name: lin for lin in layer_linears(shape)}
        self.attn_in, self.attn_out, self.mlp_in, self.mlp_out = _io_names(shape)
        self.rb, self.cb, self.ab, _ = widths(st)
        self.lora: dict[tuple, tuple] = {}
        self.grads: dict[tuple, object] = {}
        self.optimizer: list = []
        self.flat: list = []  # qtool's flat parameter and gradient buffers (qtool/train/flat.py)
        self.frozen: list = []  # the symmetric init's frozen copies of the factors
        self.T = st.batch_size * st.seq_len

    def attach(self, mem: Stream) -> None:
        """The LoRA factors, module by module in forward order, A before B (PEFT and qtool alike); the symmetric
        init's frozen copies beside them."""
        for i in range(self.shape.n_layers):
            for name, r in self.ranks.items():
                lin = self.lins[name]
                self.lora[(i, name)] = (mem.new(self.ab * r * lin.n_in), mem.new(self.ab * lin.n_out * r))
                if self.st.init == "symmetric":
                    self.frozen += [mem.new(self.ab * r * lin.n_in), mem.new(self.ab * lin.n_out * r)]

    def flatten(self, mem: Stream) -> None:
        """qtool/train/flat.py: the factors moved into one parameter buffer, their gradients into a zeroed second
        one; the factors' own blocks freed and the cache emptied (recipe.py)."""
        n = sum(r * (self.lins[name].n_in + self.lins[name].n_out) for (_, name) in self.lora
                for r in (self.ranks[name],))
        self.flat = [mem.new(self.ab * n), mem.new(self.ab * n)]
        mem.drop(*(b for pair in self.lora.values() for b in pair))
        self.lora = {key: () for key in self.lora}
        mem.allocator.empty_cache()

    def detach(self, mem: Stream, keep_factors: bool = False) -> list:
        """Free gradients, optimizer state and (unless ``keep_factors``: returned instead) the factors."""
        mem.drop(*self.grads.values(), *self.optimizer, *self.flat, *self.frozen)
        factors = [b for pair in self.lora.values() for b in pair]
        if not keep_factors:
            mem.drop(*factors)
        self.grads, self.optimizer, self.lora, self.flat, self.frozen = {}, [], {}, [], []
        return factors if keep_factors else []

    def optimizer_state(self, mem: Stream) -> None:
        """The optimizer's device state, made at its first step (bitsandbytes: tensors of >= 1e5 elements are paged,
        outside the allocator; 8-bit: uint8 states and fp32 absmax per 256; torch AdamW: two in the parameter
        dtype; SGD: none), tensor by tensor in parameter order."""
        opt = self.st.optimizer
        if opt == "sgd":
            return
        sizes = [n for (_, name) in self.lora for lin, r in ((self.lins[name], self.ranks[name]),)
                 for n in (r * lin.n_in, lin.n_out * r)]
        for n in [sum(sizes)] if self.flat and sizes else sizes:
            if opt == "adamw_torch":
                self.optimizer += [mem.new(self.ab * n), mem.new(self.ab * n)]
            elif opt.startswith("paged_") and n >= PAGED_MIN_NUMEL:
                if opt.endswith("8bit"):
                    self.optimizer += [mem.new(4 * -(-n // 256)), mem.new(4 * -(-n // 256))]
            elif opt.endswith("8bit") and n >= 4096:
                self.optimizer += [mem.new(n), mem.new(n), mem.new(4 * -(-n // 256)), mem.new(4 * -(-n // 256))]
            else:
                self.optimizer += [mem.new(4 * n), mem.new(4 * n)]

    def clip_and_step(self, mem: Stream) -> None:
        """``clip_grad_norm_`` (one 0-dim norm per gradient, their stack, the total and the clip coefficient) and the
        optimizer's step (torch AdamW's foreach temporaries: one per parameter)."""
        norms = [mem.new(4) for _ in (self.flat[1:] or self.grads)]
        stacked, total = mem.new(4 * len(norms)), mem.new(4)
        mem.drop(*norms, stacked)
        coef = mem.new(4)
        mem.drop(coef, total)
        if self.st.optimizer == "adamw_torch":
            tmp = [mem.new(self.ab * (r * (lin.n_in + lin.n_out)) // 2) for (_, name) in self.lora
                   for lin, r in ((self.lins[name], self.ranks[name]),) for _ in range(2)]
            mem.drop(*tmp)

    def keep_grad(self, mem: Stream, key: tuple, grad) -> None:
        """AccumulateGrad: the first gradient of a parameter becomes its ``.grad``; later ones (and every one into
        a flat gradient buffer) are added in place."""
        if key in self.grads or self.flat:
            mem.drop(grad)
        else:
            self.grads[key] = grad


class QtoolStep(_Step):
    """One micro-batch of qtool's trainer on a GPU (qtool/train/model.py, loss.py, fused.py; qtool/adapters)."""

    recorded_trainer = False  # the trainer of 2026-11-29 (qtool.plan.process.RECORDED_TRAINER): an NF4 Linear's
    #                           bias added after the product; the loss backward keeping p, not g, into the next chunk

    def linear(self, mem: Stream, name: str, save: bool) -> tuple[object, list]:
        """(output, saved) of one NF4 product with its LoRA bypass: the dequantised weight, the product, then
        ``A.to(cb)``, ``x Aᵀ``, ``(B·s).to(cb)`` (via an fp32 temporary) and the addmm's fresh output."""
        lin, r, T, cb = self.lins[name], self.ranks.get(name), self.T, self.cb
        w = mem.new(cb * lin.n_out * lin.n_in)
        mem.workspace("main")
        y = mem.new(cb * T * lin.n_out)
        mem.drop(w)
        if lin.bias and self.recorded_trainer:  # the trainer of 2026-11-29: y + bias, a second output
            biased = mem.new(cb * T * lin.n_out)
            mem.drop(y)
            y = biased
        if not r:
            return y, []
        a, xa = mem.new(cb * r * lin.n_in), mem.new(cb * T * r)
        tmp = mem.new(4 * lin.n_out * r)
        b = mem.new(cb * lin.n_out * r)
        mem.drop(tmp)
        out = mem.new(cb * T * lin.n_out)
        mem.drop(y)
        if save:
            return out, [a, xa, b]
        mem.drop(a, xa, b)
        return out, []

    def linear_backward(self, mem: Stream, layer: int, name: str, saved: list, release=()):
        """The input gradient of one product: the LoRA branch first (x Aᵀ's and B's gradients, B's through its cast
        and scale into an fp32 gradient, then A's; then ``release``, tensors whose last holder was A's product),
        then the base branch (dequantised weight and product); the two input gradients summed in place."""
        lin, r, T, cb = self.lins[name], self.ranks.get(name), self.T, self.cb
        lora_dx = None
        if r:
            a, xa, b = saved
            mem.workspace("autograd")
            d_xa, d_b = mem.new(cb * T * r), mem.new(cb * r * lin.n_out)
            d_b32 = mem.new(4 * lin.n_out * r)
            mem.drop(d_b)
            grad_b = mem.new(self.ab * lin.n_out * r)
            mem.drop(d_b32)
            self.keep_grad(mem, (layer, name, "B"), grad_b)
            mem.drop(xa, b)
            lora_dx, d_a = mem.new(cb * T * lin.n_in), mem.new(cb * r * lin.n_in)
            mem.drop(d_xa)
            grad_a = mem.new(self.ab * r * lin.n_in)
            mem.drop(d_a)
            self.keep_grad(mem, (layer, name, "A"), grad_a)
            mem.drop(a)
        mem.drop(*release)
        w = mem.new(cb * lin.n_out * lin.n_in)
        mem.workspace("autograd")
        dx = mem.new(cb * T * lin.n_in)
        mem.drop(w, lora_dx)
        return dx

    def _group(self, mem, names, save):
        outs, saved = {}, {}
        for name in names:
            outs[name], saved[name] = self.linear(mem, name, save)
        return outs, saved

    def layer(self, mem: Stream, x, save: bool):
        """One decoder layer's forward; ``save``: autograd keeps what backward needs (else everything but the
        output is freed at its last use: a checkpointed forward)."""
        sh, T, cb = self.shape, self.T, self.cb
        h, f, q, kv = sh.hidden, sh.intermediate, sh.q_dim, sh.kv_dim
        s = {"x": x}
        s["h1"], s["rstd1"] = mem.new(cb * T * h), mem.new(4 * T)
        outs, s["lin_attn"] = self._group(mem, self.attn_in, save)
        if not (save and any(n in self.ranks for n in self.attn_in)):
            mem.drop(s.pop("h1"))
        fused = len(self.attn_in) == 1
        s["q"] = mem.new(cb * T * q)
        if not fused:
            mem.drop(outs[self.attn_in[0]])
        s["k"] = mem.new(cb * T * kv)
        if not fused:
            mem.drop(outs[self.attn_in[1]])
            s["v"] = outs[self.attn_in[2]]
        else:  # phi3: v made contiguous, the fused output freed
            s["v"] = mem.new(cb * T * kv)
            mem.drop(outs[self.attn_in[0]])
        s["o"], s["lse"] = mem.new(cb * T * q), mem.new(4 * T * sh.n_heads)
        if not save:
            mem.drop(s.pop("q"), s.pop("k"), s.pop("v"), s.pop("lse"))
        a, s["lin_o"] = self._group(mem, self.attn_out, save)
        if not save:
            mem.drop(s.pop("o"))
        s["x2"] = mem.new(cb * T * h)
        mem.drop(*a.values())
        s["h2"], s["rstd2"] = mem.new(cb * T * h), mem.new(4 * T)
        outs, s["lin_mlp"] = self._group(mem, self.mlp_in, save)
        if not (save and any(n in self.ranks for n in self.mlp_in)):
            mem.drop(s.pop("h2"))
        s["up"] = list(outs.values())
        s["act"] = mem.new(cb * T * f)
        if not save:
            mem.drop(*s.pop("up"))
        m, s["lin_down"] = self._group(mem, self.mlp_out, save)
        if not (save and any(n in self.ranks for n in self.mlp_out)):
            mem.drop(s.pop("act"))
        out = mem.new(cb * T * h)
        mem.drop(*m.values())
        if not save:
            mem.drop(s["rstd1"], s["rstd2"], s["x2"])
            return out, None
        return out, s

    def layer_backward(self, mem: Stream, i: int, dy, s: dict):
        sh, T, cb = self.shape, self.T, self.cb
        h, f, q, kv = sh.hidden, sh.intermediate, sh.q_dim, sh.kv_dim
        d_act = self.linear_backward(mem, i, self.mlp_out[0], s["lin_down"][self.mlp_out[0]], [s.get("act")])
        d_up = [mem.new(cb * T * f) for _ in (0, 1)] if self.shape.mlp == "gated" else [mem.new(cb * T * f)]
        mem.drop(d_act, *s["up"])
        if len(self.mlp_in) == 1 and len(d_up) == 2:  # phi3: the two gradients concatenated for gate_up_proj
            cat = mem.new(2 * cb * T * f)
            mem.drop(*d_up)
            d_up = [cat]
        dh = []
        for name, d in zip(reversed(self.mlp_in), reversed(d_up)):
            last = name == self.mlp_in[0]
            dh.append(self.linear_backward(mem, i, name, s["lin_mlp"][name], [s.get("h2")] if last else []))
            mem.drop(d)
        mem.drop(*dh[1:])
        dx2 = mem.new(cb * T * h)
        mem.drop(dh[0], s["rstd2"], s["x2"], dy)
        d_o = self.linear_backward(mem, i, self.attn_out[0], s["lin_o"][self.attn_out[0]])
        dq, dk, dv = mem.new(cb * T * q), mem.new(cb * T * kv), mem.new(cb * T * kv)
        accum, d_lse = mem.new(4 * T * q), mem.new(4 * T * sh.n_heads)
        if kv != q:  # FA2 computes k and v gradients per query head, then sums each group
            expanded = (mem.new(cb * T * q), mem.new(cb * T * q))
            mem.drop(*expanded)
        mem.drop(accum, d_lse, d_o, s["q"], s["k"], s["o"], s["lse"])
        dq2, dk2 = mem.new(cb * T * q), mem.new(cb * T * kv)  # RoPE's backward
        mem.drop(dq, dk)
        grads = {"q": dq2, "k": dk2, "v": dv}
        if len(self.attn_in) == 1:
            qkv = mem.new(cb * T * (q + 2 * kv))
            mem.drop(*grads.values())
            grads = {"qkv": qkv}
        dh = []
        for name, d in zip(reversed(self.attn_in), reversed(list(grads.values()))):
            last = name == self.attn_in[0]
            dh.append(self.linear_backward(mem, i, name, s["lin_attn"][name], [s.get("h1")] if last else []))
            mem.drop(d)
        mem.drop(*dh[1:], s["v"])
        dx = mem.new(cb * T * h)
        mem.drop(dh[0], s["rstd1"], dx2)
        return dx

    def step(self, mem: Stream) -> None:
        """Forward and backward of one micro-batch (the optimizer step is :meth:`clip_and_step`)."""
        sh, st, T, cb = self.shape, self.st, self.T, self.cb
        b, t, h, V = st.batch_size, st.seq_len, sh.hidden, sh.vocab
        x = mem.new(cb * T * h)
        cos, sin = self._rope_tables(mem, t)
        offload = st.offload_activations and st.grad_checkpointing  # inputs copied to pinned host buffers
        layers, previous = [], None
        for _ in range(sh.n_layers):
            if offload:  # the previous layer's input is released when the next layer starts
                mem.drop(previous)
                previous = x
            out, saved = self.layer(mem, x, save=not st.grad_checkpointing)
            layers.append((None if offload else x, saved))
            x = out
        mem.drop(previous)
        normed, rstd = mem.new(cb * T * h), mem.new(4 * T)
        n = b * (t - 1)
        flat = mem.new(cb * n * h) if b > 1 else None  # h[:, :-1].reshape copies for batch > 1
        targets, total, lse = mem.new(8 * n), mem.new(4), mem.new(4 * n)
        chunk = loss_chunk_tokens(V, st.loss_chunk_mib)
        previous = None
        for start in range(0, n, chunk):  # forward: z, its fp32 copy, logsumexp's (x - max) temporary
            c = min(chunk, n - start)
            z = mem.new(cb * c * V)
            mem.workspace("main")
            logits = mem.new(4 * c * V)
            mem.drop(z, previous)
            mem.drop(mem.new(4 * c * V))
            previous = logits
        mem.drop(previous)
        d_h, previous = mem.new(cb * n * h), None
        for start in range(0, n, chunk):  # backward: logits again, minus lse, exp, scaled, cast; g @ W
            c = min(chunk, n - start)
            z = mem.new(cb * c * V)
            mem.workspace("autograd")
            logits = mem.new(4 * c * V)
            mem.drop(z)
            diff = mem.new(4 * c * V)
            mem.drop(logits)
            p = mem.new(4 * c * V)
            mem.drop(diff)
            if self.recorded_trainer:  # p lived until the next chunk's was made; the cast one only for g @ W
                mem.drop(previous)
                scaled = mem.new(4 * c * V)
                g = mem.new(cb * c * V)
                mem.drop(scaled)
                mem.drop(mem.new(cb * c * h), g)
                previous = p
            else:  # `del p` once g is made; g lives until the next chunk's g (qtool/train/loss.py)
                scaled = mem.new(4 * c * V)
                g = mem.new(cb * c * V)
                mem.drop(scaled, previous, p)
                mem.drop(mem.new(cb * c * h))
                previous = g
        mem.drop(previous, lse, targets, total)
        d_full = mem.new(cb * T * h)  # slice backward
        mem.drop(d_h, flat)
        dx = mem.new(cb * T * h)  # final norm backward
        mem.drop(d_full, normed, rstd, x)
        fetched = None
        for i in reversed(range(sh.n_layers)):
            x_in, saved = layers[i]
            if offload:  # this layer's input copied back (or prefetched), the previous one prefetched
                x_in = fetched or mem.new(cb * T * h)
                fetched = mem.new(cb * T * h) if i else None
            if st.grad_checkpointing:  # recomputed up to the last saved tensor: the output is not rebuilt
                out, saved = self.layer(mem, x_in, save=True)  # (offloading recomputes it: the backward's root)
                if not offload:
                    mem.drop(out)
                    out = None
            dx = self.layer_backward(mem, i, dx, saved)
            mem.drop(x_in, out if st.grad_checkpointing else None)
        mem.drop(dx, cos, sin)

    def _rope_tables(self, mem: Stream, t: int):
        """Positions, fp32 angles, cos and sin in fp32, then cast (qtool/train/model.py rope_tables)."""
        d = self.shape.rotary_dim
        pos, freqs, emb = mem.new(4 * t), mem.new(2 * t * d), mem.new(4 * t * d)
        mem.drop(freqs)
        tables = []
        for _ in (0, 1):
            full = mem.new(4 * t * d)
            tables.append(mem.new(self.cb * t * d))
            mem.drop(full)
        mem.drop(emb, pos)
        return tables

    def evaluate(self, mem: Stream) -> None:
        """The held-out pass (no gradients, batch 1): one layer's tensors at a time, then the loss's chunks."""
        st, sh, keep = self.st, self.shape, self.T
        self.T = st.seq_len
        ids, x = mem.new(8 * self.T), mem.new(self.cb * self.T * sh.hidden)
        cos, sin = self._rope_tables(mem, st.seq_len)
        for _ in range(sh.n_layers):
            out, _ = self.layer(mem, x, save=False)
            mem.drop(x)
            x = out
        normed, n = mem.new(self.cb * self.T * sh.hidden), st.seq_len - 1
        mem.drop(x)
        chunk, lse, previous = loss_chunk_tokens(sh.vocab, st.loss_chunk_mib), mem.new(4 * n), None
        for start in range(0, n, chunk):
            c = min(chunk, n - start)
            z = mem.new(self.cb * c * sh.vocab)
            mem.workspace("main")
            logits = mem.new(4 * c * sh.vocab)
            mem.drop(z, previous)
            mem.drop(mem.new(4 * c * sh.vocab))
            previous = logits
        mem.drop(previous, lse, normed, cos, sin, ids)
        self.T = keep


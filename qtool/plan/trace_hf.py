"""The allocations of one step of transformers + PEFT + bitsandbytes (the hf and hf-prepare profiles), tensor by
tensor, for :mod:`qtool.plan.allocator` to replay; what the steps share is in :mod:`qtool.plan.trace`. Pure Python.
"""
from __future__ import annotations

from qtool.plan.trace import Stream, _Step
from qtool.plan.transient import attention_kernel, sdpa_mask_bytes


class HFStep(_Step):
    """One step of transformers + PEFT + bitsandbytes (bench/gpu_worker.py's hf profile), everything on the default
    stream. Hidden states are ``rb`` wide (fp32 after prepare_model_for_kbit_training)."""

    def dequantise(self, mem: Stream, name: str) -> list:
        """bitsandbytes' fallback product: the fp32 absmax rebuilt from the nested one (two fp32 tensors with double
        quantisation), the weight dequantised in the compute dtype (backends/cuda/ops.py _dequant_linear_fallback)."""
        lin, st = self.lins[name], self.st
        n_blocks = -(-lin.n_in * lin.n_out // st.block_size)
        absmax = [mem.new(4 * n_blocks) for _ in range(2 if st.double_quant else 0)]
        return absmax + [mem.new(self.cb * lin.n_in * lin.n_out)]

    def linear(self, mem: Stream, name: str, save: bool):
        """(output, saved) of a PEFT LoRA Linear4bit: ``x.to(cb)``, the product, ``.to(rb)``, ``.clone()``; then
        ``x`` cast to the adapter dtype when it differs, ``x Aᵀ`` (saved), ``(x Aᵀ) Bᵀ``, ``* scaling``, the sum."""
        lin, r, T, rb, cb, ab = self.lins[name], self.ranks.get(name), self.T, self.rb, self.cb, self.ab
        x16 = mem.new(cb * T * lin.n_in) if cb != rb else None
        tmp = self.dequantise(mem, name)
        mem.workspace("main")
        y = mem.new(cb * T * lin.n_out)
        mem.drop(*tmp, x16)
        y_rb = mem.new(rb * T * lin.n_out) if cb != rb else y
        if y_rb is not y:
            mem.drop(y)
        if not r:
            return y_rb, []
        result = mem.new(rb * T * lin.n_out)
        mem.drop(y_rb)
        x_ab = mem.new(ab * T * lin.n_in) if ab != rb else None
        xa = mem.new(ab * T * r)
        xab = mem.new(ab * T * lin.n_out)
        scaled = mem.new(ab * T * lin.n_out)
        mem.drop(xab)
        out = mem.new(rb * T * lin.n_out)
        mem.drop(result, scaled)
        if save:
            return out, [xa, x_ab]
        mem.drop(xa, x_ab)
        return out, []

    def linear_backward(self, mem: Stream, layer: int, name: str, saved: list):
        """Input gradient: the LoRA branch first (``* scaling``'s, then B's and x Aᵀ's, then A's and x's), then the
        base branch (the gradient cast to cb, absmax and weight dequantised again, the product, ``.to(rb)``)."""
        lin, r, T, rb, cb, ab = self.lins[name], self.ranks.get(name), self.T, self.rb, self.cb, self.ab
        lora_dx = None
        if r:
            xa, x_ab = saved
            d_scaled = mem.new(ab * T * lin.n_out)
            mem.workspace("autograd")
            d_xa = mem.new(ab * T * r)
            self.keep_grad(mem, (layer, name, "B"), mem.new(ab * lin.n_out * r))
            mem.drop(d_scaled, xa)
            lora_dx = mem.new(ab * T * lin.n_in)
            self.keep_grad(mem, (layer, name, "A"), mem.new(ab * r * lin.n_in))
            mem.drop(d_xa, x_ab)
            if ab != rb:
                cast = mem.new(rb * T * lin.n_in)
                mem.drop(lora_dx)
                lora_dx = cast
        dy16 = mem.new(cb * T * lin.n_out) if cb != rb else None
        tmp = self.dequantise(mem, name)
        mem.workspace("autograd")
        dx = mem.new(cb * T * lin.n_in)
        mem.drop(*tmp, dy16)
        if cb != rb:
            dx_rb = mem.new(rb * T * lin.n_in)
            mem.drop(dx)
            dx = dx_rb
        if lora_dx is not None:  # the second gradient is added in place into the first
            mem.drop(dx)
            dx = lora_dx
        return dx

    def norm(self, mem: Stream, save: bool):
        """LlamaRMSNorm: pow(2), mean, + eps, rsqrt (kept), x * rsqrt, weight * that (the output)."""
        T, h, rb = self.T, self.shape.hidden, self.rb
        sq = mem.new(4 * T * h)
        var = mem.new(4 * T)
        mem.drop(sq)
        eps = mem.new(4 * T)
        mem.drop(var)
        rsqrt = mem.new(4 * T)
        mem.drop(eps)
        xn = mem.new(4 * T * h)
        out = mem.new(rb * T * h)
        mem.drop(xn)
        if not save:
            mem.drop(rsqrt)
            rsqrt = None
        return out, rsqrt

    def norm_backward(self, mem: Stream, rsqrt):
        """Four fp32 [T, h] tensors at once (w·g, its product with x for the rsqrt gradient, the mean's expanded
        gradient, pow's), the input gradient the first of them."""
        T, h = self.T, self.shape.hidden
        dxn, dx, prod = mem.new(4 * T * h), mem.new(4 * T * h), mem.new(4 * T * h)
        d_rsqrt = mem.new(4 * T)
        mem.drop(prod)
        d_var = mem.new(4 * T)
        mem.drop(d_rsqrt)
        d_mean = mem.new(4 * T * h)
        mem.drop(d_var)
        d_sq = mem.new(4 * T * h)
        mem.drop(d_mean, dxn, d_sq, rsqrt)
        return dx

    def _rope(self, mem: Stream, x, width: int):
        """q·cos + rotate_half(q)·sin: four [T, width] temporaries, one result."""
        T, rb = self.T, self.rb
        qc, neg = mem.new(rb * T * width), mem.new(rb * T * width // 2)
        half = mem.new(rb * T * width)
        mem.drop(neg)
        hs = mem.new(rb * T * width)
        mem.drop(half)
        out = mem.new(rb * T * width)
        mem.drop(qc, hs, x)
        return out

    def layer(self, mem: Stream, x, save: bool):
        sh, st, T, rb = self.shape, self.st, self.T, self.rb
        h, f, q, kv = sh.hidden, sh.intermediate, sh.q_dim, sh.kv_dim
        s = {"x": x}
        s["h1"], s["rs1"] = self.norm(mem, save)
        outs, s["lin_attn"] = {}, {}
        for name in self.attn_in:
            outs[name], s["lin_attn"][name] = self.linear(mem, name, save)
        if not (save and any(n in self.ranks for n in self.attn_in)):
            mem.drop(s.pop("h1"))
        fused = len(self.attn_in) == 1
        s["q"] = self._rope(mem, outs[self.attn_in[0]] if not fused else None, q)
        s["k"] = self._rope(mem, outs[self.attn_in[1]] if not fused else None, kv)
        s["v"] = outs[self.attn_in[2]] if not fused else outs[self.attn_in[0]]
        s["extra"] = []
        if self.kernel == "math":  # repeated k, v; q and k scaled; the s² probabilities (math SDPA, enable_gqa)
            s_len, U = st.seq_len, 4 * st.batch_size * sh.n_heads * st.seq_len ** 2
            k_rep, v_rep = mem.new(rb * T * q), mem.new(rb * T * q)
            qs, ks = mem.new(rb * T * q), mem.new(rb * T * q)
            mem.drop(k_rep)
            causal = mem.new(s_len * s_len)
            additive = mem.new(4 * s_len * s_len)
            mem.drop(causal)
            scores = mem.new(U)
            mem.drop(additive)
            probs = mem.new(U)
            mem.drop(scores)
            heads_first = mem.new(rb * T * q)
            s["o"] = mem.new(rb * T * q)  # transpose(1, 2).contiguous()
            mem.drop(heads_first)
            s["extra"], s["lse"] = [v_rep, qs, ks, probs], None
        else:
            mask = mem.new(4 * sdpa_mask_bytes(sh, st)) if sdpa_mask_bytes(sh, st) else None
            s["o"], s["lse"] = mem.new(rb * T * q), mem.new(4 * T * sh.n_heads)
            s["extra"] = [mask]
        if not save:
            mem.drop(s.pop("q"), s.pop("k"), s.pop("v"), s.pop("lse"), *s.pop("extra"))
        a, s["lin_o"] = self.linear(mem, self.attn_out[0], save)
        if not save:
            mem.drop(s.pop("o"))
        s["x2"] = mem.new(rb * T * h)
        mem.drop(a)
        s["h2"], s["rs2"] = self.norm(mem, save)
        s["lin_mlp"], ups = {}, []
        for name in self.mlp_in:
            out, s["lin_mlp"][name] = self.linear(mem, name, save)
            ups.append(out)
            if name == self.mlp_in[0]:
                ups.append(mem.new(rb * T * f))  # act(gate)
        if not (save and any(n in self.ranks for n in self.mlp_in)):
            mem.drop(s.pop("h2"))
        s["ups"] = ups
        s["act"] = mem.new(rb * T * f) if sh.mlp == "gated" else None
        if not save:
            mem.drop(*s.pop("ups"))
        m, s["lin_down"] = self.linear(mem, self.mlp_out[0], save)
        if not (save and any(n in self.ranks for n in self.mlp_out)):
            mem.drop(s.pop("act"))
        out = mem.new(rb * T * h)
        mem.drop(m)
        if not save:
            mem.drop(s["x2"])
            return out, None
        return out, s

    def layer_backward(self, mem: Stream, i: int, dy, s: dict):
        sh, st, T, rb = self.shape, self.st, self.T, self.rb
        h, f, q, kv = sh.hidden, sh.intermediate, sh.q_dim, sh.kv_dim
        d_m = self.linear_backward(mem, i, self.mlp_out[0], s["lin_down"])
        mem.drop(s.get("act"))
        d_act, d_up = mem.new(rb * T * f), mem.new(rb * T * f)
        mem.drop(d_m, s["ups"][-1])
        dh = [self.linear_backward(mem, i, self.mlp_in[-1], s["lin_mlp"][self.mlp_in[-1]])]
        mem.drop(d_up)
        d_gate = mem.new(rb * T * f)
        mem.drop(d_act, *s["ups"][:-1])
        if len(self.mlp_in) > 1:
            dh.append(self.linear_backward(mem, i, self.mlp_in[0], s["lin_mlp"][self.mlp_in[0]]))
        mem.drop(d_gate, *dh[1:], s.get("h2"))
        dx2 = self.norm_backward(mem, s["rs2"])
        mem.drop(dh[0], s["x2"], dy)
        d_o = self.linear_backward(mem, i, self.attn_out[0], s["lin_o"])
        mem.drop(s["o"])
        if self.kernel == "math":
            U = 4 * st.batch_size * sh.n_heads * st.seq_len ** 2
            d_probs, dv = mem.new(U), mem.new(rb * T * q)
            mem.drop(d_o)
            product = mem.new(U)  # CUDA's softmax backward materialises grad * probs
            d_scores = mem.new(U)
            mem.drop(product, d_probs)
            dq, dk = mem.new(rb * T * q), mem.new(rb * T * q)
            mem.drop(d_scores, *s["extra"])
            grads = []
            for d, width in ((dq, q), (dk, kv), (dv, kv)):  # unscaled, and k, v summed back to their heads
                grads.append(mem.new(rb * T * width))
                mem.drop(d)
            dq, dk, dv = grads
        else:
            dq, dk, dv = mem.new(rb * T * q), mem.new(rb * T * kv), mem.new(rb * T * kv)
            mem.drop(mem.new(4 * T * sh.n_heads), d_o, s["lse"], *s["extra"])
        mem.drop(s["q"], s["k"])
        grads = []
        for d, width in ((dq, q), (dk, kv)):  # RoPE's backward: grad·cos + rotate_half's backward of grad·sin
            out, t1, t2 = mem.new(rb * T * width), mem.new(rb * T * width), mem.new(rb * T * width)
            mem.drop(t1, d, t2)
            grads.append(out)
        grads.append(dv)
        dh = []
        for name, d in zip(self.attn_in, grads if len(self.attn_in) == 3 else [None]):
            dh.append(self.linear_backward(mem, i, name, s["lin_attn"][name]))
            mem.drop(d)
        if len(self.attn_in) == 1:
            mem.drop(*grads)
        mem.drop(*dh[1:], s["v"], s.get("h1"))
        dx = self.norm_backward(mem, s["rs1"])
        mem.drop(dh[0], dx2)
        return dx

    def step(self, mem: Stream, keep: bool = False) -> list:
        """Forward and backward of one step; ``keep``: also return two hidden-state-sized blocks, what the bench
        worker's ``loss`` variable holds of the graph until the next step (see :mod:`qtool.plan.process`)."""
        sh, st, T, rb = self.shape, self.st, self.T, self.rb
        b, t, h, V, d = st.batch_size, st.seq_len, sh.hidden, sh.vocab, sh.head_dim
        ids, x, pos = mem.new(8 * T), mem.new(rb * T * h), mem.new(8 * t)
        tmp = [mem.new(4 * d // 2), mem.new(4 * t), mem.new(4 * t * d // 2), mem.new(4 * t * d)]
        cos, sin = mem.new(4 * t * d), mem.new(4 * t * d)
        mem.drop(*tmp)
        mask = mem.new(b * t * t) if sdpa_mask_bytes(sh, st) else None
        layers = []
        for _ in range(sh.n_layers):
            out, saved = self.layer(mem, x, save=not st.grad_checkpointing)
            layers.append((x, saved))
            x = out
        normed, rsqrt = self.norm(mem, True)
        logits = mem.new(4 * T * V)  # the fp32 head
        mem.workspace("main")
        padded = mem.new(8 * b * (t + 1))
        labels = mem.new(8 * T)
        mem.drop(padded)
        log_probs = mem.new(4 * T * V)
        mem.drop(logits)  # the output object is dropped: only the loss is kept
        d_log_probs, d_logits = mem.new(4 * T * V), mem.new(4 * T * V)
        mem.drop(d_log_probs, log_probs, labels)
        mem.workspace("autograd")
        d_h = mem.new(rb * T * h)
        mem.drop(d_logits, normed)
        dx = self.norm_backward(mem, rsqrt)
        mem.drop(d_h, x)
        for i in reversed(range(sh.n_layers)):
            x_in, saved = layers[i]
            out = None
            if st.grad_checkpointing:  # reentrant (hf-prepare): the output rebuilt too, kept through the backward
                out, saved = self.layer(mem, x_in, save=True)
                if not st.reentrant_checkpointing:
                    mem.drop(out)
                    out = None
            dx = self.layer_backward(mem, i, dx, saved)
            mem.drop(x_in, out)
        mem.drop(dx, cos, sin, pos, ids, mask)
        # what the worker's `loss` keeps of the step's graph until its next step (data/memory/README.md): about
        # two fp32 hidden states
        return [mem.new(rb * T * h), mem.new(rb * T * h)] if keep else []

    @property
    def kernel(self) -> str:
        return attention_kernel(self.shape, self.st)

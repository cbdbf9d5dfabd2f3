"""AdaLoRA (Zhang et al., ICLR 2023, arXiv 2303.10512) on a frozen NF4 Linear: the bypass in SVD form and the
allocator that spends a global rank budget on the triplets that matter.

Each adapted module computes ``y = x W0ᵀ (+ b) + s · dropout(x) (diag(λ) Q)ᵀ Pᵀ``, i.e. ``ΔW = s · P diag(λ) Q``, with
P ``(out, r)`` the left singular vectors, λ ``(r, 1)`` the singular values and Q ``(r, in)`` the right singular
vectors, all trainable, ``r`` = init_r and ``s = alpha / (init_r + 1e-5)`` (PEFT's scaling, kept when ranks are
pruned; :func:`qtool.adapters.spec.adalora_scale`). PEFT stores them as ``lora_B`` = P, ``lora_E`` = λ, ``lora_A``
= Q, and so do we (``lora_b``, ``lora_e``, ``lora_a``). Step 0 is the base model: λ = 0, P and Q ~ N(0, 0.02²) (paper
§3.1; PEFT ``reset_lora_parameters``).

The :class:`RankAllocator` does the rest of the paper's Algorithm 1 around the optimizer step:

* between backward and the optimizer step, :meth:`RankAllocator.observe` updates, per trainable element, the smoothed
  sensitivity ``Ī = β1 Ī + (1-β1) |w·∂L/∂w|`` and uncertainty ``Ū = β2 Ū + (1-β2) |I - Ī|`` (paper eqs. 8-10) from the
  gradient and the weights it was taken at (Algorithm 1, lines 4-5; PEFT and the authors' code take it after the
  step, at the updated weights);
* after the optimizer step, :meth:`RankAllocator.allocate` keeps the ``b(t)`` triplets of highest score
  ``S = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)``, ``s = Ī·Ū`` (eq. 7), over all modules, and sets the other λ to 0
  in place (Algorithm 1, line 8: the truncation acts on the λ the gradient step produced). Exactly ``b(t)`` are kept
  (ties broken by position); PEFT masks every score ``<=`` the k-th smallest, which keeps fewer on ties. A masked
  triplet keeps its P and Q columns and can come back while the budget still moves; from ``final_step`` on the mask
  is fixed and re-applied after every step (the optimizer would otherwise move the masked λ again).

Both run outside the forward and backward, on parameters in place, so a CUDA graph of forward+backward stays valid;
the orthogonality regulariser is part of the objective, inside the graph.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qtool.adapters.nf4_linear import NF4Linear
from qtool.adapters.spec import AdaLoRASchedule

INIT_STD = 0.02  # P and Q ~ N(0, 0.02²): the paper's Gaussian init, PEFT's and the authors' std


def adalora_init(n_out: int, n_in: int, rank: int, generator: torch.Generator, dtype=torch.float32, device="cpu"):
    """``(Q (r, in), λ (r, 1), P (out, r))``: Q and P ~ N(0, 0.02²) drawn in that order from ``generator``, λ = 0."""
    q = torch.empty(rank, n_in).normal_(0.0, INIT_STD, generator=generator)
    p = torch.empty(n_out, rank).normal_(0.0, INIT_STD, generator=generator)
    e = torch.zeros(rank, 1)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, e, p))


class AdaLoRALinear(nn.Module):
    """A trainable bypass ``s · P diag(λ) Q`` around a frozen :class:`NF4Linear` (``base``). ``kept`` (bool, ``(r,)``)
    is the allocator's current mask: the triplets whose λ it has not set to zero."""

    def __init__(self, base: NF4Linear, a: torch.Tensor, e: torch.Tensor, b: torch.Tensor, *, alpha: float,
                 scale: float, dropout: float = 0.0):
        super().__init__()
        rank = a.shape[0]
        if a.shape != (rank, base.in_features) or b.shape != (base.out_features, rank) or e.shape != (rank, 1):
            raise ValueError(f"Q {tuple(a.shape)} / λ {tuple(e.shape)} / P {tuple(b.shape)} do not fit a "
                             f"{base.out_features}x{base.in_features} weight at rank {rank}")
        self.base = base
        self.rank, self.alpha, self.scale = rank, float(alpha), scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_a = nn.Parameter(a)  # Q, right singular vectors
        self.lora_e = nn.Parameter(e)  # λ, singular values
        self.lora_b = nn.Parameter(b)  # P, left singular vectors
        self.register_buffer("kept", torch.ones(rank, dtype=torch.bool, device=a.device), persistent=False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        x = self.dropout(x)
        # diag(λ)·Q in fp32, then one copy in the compute dtype (as LoRALinear's A): fp32 gradients reach Q and λ
        h = F.linear(x, (self.lora_a * self.lora_e).to(x.dtype)).reshape(-1, self.rank)
        p = (self.lora_b * self.scale).to(x.dtype)
        return torch.addmm(y.reshape(-1, y.shape[-1]), h, p.t()).view(y.shape)

    def delta_weight(self) -> torch.Tensor:
        """``s · P diag(λ) Q`` in fp32, ``(out, in)``: what merging adds to W0."""
        q, e, p = (t.detach().float() for t in (self.lora_a, self.lora_e, self.lora_b))
        return (p @ (q * e)) * self.scale

    def pruned_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[bool]]:
        """``(Q, λ, P, mask)`` with only the kept triplets (fp32, CPU), as PEFT saves a pruned module, and the mask
        over the ``rank`` initial triplets."""
        keep = self.kept.cpu()
        a, e, b = (t.detach().float().cpu() for t in (self.lora_a, self.lora_e, self.lora_b))
        return a[keep].contiguous(), e[keep].contiguous(), b[:, keep].contiguous(), keep.tolist()

    def extra_repr(self) -> str:
        return f"rank={self.rank} (kept {int(self.kept.sum())}), scale={self.scale:g}"


def adalora_modules(model) -> dict[str, AdaLoRALinear]:
    """``{transformers module path: module}`` for every AdaLoRA bypass of ``model`` (a Decoder), in forward order."""
    return {path: holder[name] for path, (holder, name) in model.linears().items()
            if isinstance(holder[name], AdaLoRALinear)}


def orthogonality(modules: list[AdaLoRALinear]) -> torch.Tensor:
    """``R = mean over the 2n matrices of ‖QQᵀ - I‖_F and ‖PᵀP - I‖_F`` (fp32 scalar).

    The form is PEFT's (``AdaLoraModel.forward``) and the authors' (``loralib.compute_orth_regu``): the mean of the
    non-squared Frobenius norms, not the paper's sum of squared norms (§3.1, eq. 5). The published hyperparameters
    (``--reg_orth_coef 0.1`` in the authors' scripts, ``orth_reg_weight=0.5`` in PEFT) were chosen with this form; the
    paper's sum over modules would grow with the number of modules (210 for SmolLM2 all-linear) and the square with
    r², so the same weight would mean a different objective on every model."""
    total = torch.zeros((), dtype=torch.float32, device=modules[0].lora_a.device)
    for m in modules:
        for gram in (m.lora_a @ m.lora_a.t(), m.lora_b.t() @ m.lora_b):
            eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            total = total + torch.linalg.matrix_norm(gram - eye)
    return total / (2 * len(modules))


class RankAllocator:
    """The global rank budget of one training run over ``modules`` (module path -> :class:`AdaLoRALinear`), with
    ``schedule`` (its ``total_steps`` set). Holds the two fp32 EMAs per trainable element until the mask is fixed."""

    def __init__(self, modules: dict[str, AdaLoRALinear], schedule: AdaLoRASchedule):
        if not modules:
            raise ValueError("no AdaLoRA modules")
        if schedule.total_steps is None:
            raise ValueError("the schedule needs total_steps")
        self.modules, self.schedule = modules, schedule
        self.init_budget = sum(m.rank for m in modules.values())
        self.target_budget = schedule.target_rank * len(modules)
        self.params = [p for m in modules.values() for p in (m.lora_a, m.lora_e, m.lora_b)]
        # Ī and Ū, fp32, one per trainable element (the planner's "importance EMAs" row); freed at the final mask
        self.sensitivity = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.uncertainty = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.mask_steps: list[int] = []  # the steps that masked, and the budget each kept
        self.budgets: list[int] = []
        self.fixed = False

    def regulariser(self) -> torch.Tensor:
        """``orth_reg · R`` (see :func:`orthogonality`), to add to each micro-batch's loss (divided like it)."""
        return self.schedule.orth_reg * orthogonality(list(self.modules.values()))

    @torch.no_grad()
    def observe(self, step: int) -> None:
        """Update Ī and Ū from the gradients in ``.grad`` (call between backward and the optimizer step). Nothing
        once the mask is fixed (PEFT and the authors stop at ``T - tfinal`` too)."""
        if self.fixed or step >= self.schedule.final_step:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        # one fp32 temporary per trainable element (the planner's "importance update" row), freed at return
        current = torch._foreach_mul(self.params, grads)
        torch._foreach_abs_(current)
        torch._foreach_lerp_(self.sensitivity, current, 1 - self.schedule.beta1)  # Ī = β1 Ī + (1-β1) I
        torch._foreach_sub_(current, self.sensitivity)
        torch._foreach_abs_(current)
        torch._foreach_lerp_(self.uncertainty, current, 1 - self.schedule.beta2)  # Ū = β2 Ū + (1-β2) |I - Ī|

    @torch.no_grad()
    def allocate(self, step: int) -> None:
        """Mask to the budget of ``step`` (call after the optimizer step): every ``delta_t`` steps during the cubic
        decrease, the final mask at ``final_step`` (then the EMAs are freed), the fixed mask after it."""
        if self.fixed:
            for m in self.modules.values():  # the optimizer moved the masked λ: put them back to 0
                m.lora_e.masked_fill_(~m.kept[:, None], 0.0)
            return
        budget, now = self.schedule.budget(step, self.init_budget, len(self.modules))
        if not now:
            return
        self._mask_to(budget)
        self.budgets.append(budget)
        self.mask_steps.append(step)
        if step >= self.schedule.final_step:
            self.fixed = True
            self.sensitivity = self.uncertainty = []

    @torch.no_grad()
    def _mask_to(self, budget: int) -> None:
        scores = torch.cat([self._triplet_scores(i, m) for i, m in enumerate(self.modules.values())])
        # exactly `budget` kept: the highest scores, ties broken by position (stable sort)
        order = torch.argsort(scores, descending=True, stable=True)
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep[order[:budget]] = True
        offset = 0
        for m in self.modules.values():
            m.kept.copy_(keep[offset:offset + m.rank])
            m.lora_e.masked_fill_(~m.kept[:, None], 0.0)
            offset += m.rank

    def _triplet_scores(self, i: int, m: AdaLoRALinear) -> torch.Tensor:
        """``S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)`` for module ``i`` (fp32, ``(r,)``), ``s = Ī·Ū``."""
        s = [self.sensitivity[3 * i + k] * self.uncertainty[3 * i + k] for k in range(3)]  # Q, λ, P
        return s[1].view(-1) + s[0].mean(dim=1) + s[2].mean(dim=0)

    def ranks(self) -> dict[str, int]:
        """Module path -> the number of triplets it keeps now."""
        return {path: int(m.kept.sum()) for path, m in self.modules.items()}

    def report(self) -> dict:
        """What the allocation did: budgets, the steps it masked at, and the final rank per module."""
        ranks = self.ranks()
        return {"init_rank": next(iter(self.modules.values())).rank, "target_rank": self.schedule.target_rank,
                "n_modules": len(self.modules), "init_budget": self.init_budget, "target_budget": self.target_budget,
                "final_budget": sum(ranks.values()), "mask_fixed": self.fixed,
                "mask_steps": self.mask_steps, "budgets": self.budgets, "ranks": ranks,
                "orth_reg": float(orthogonality(list(self.modules.values())).detach())}

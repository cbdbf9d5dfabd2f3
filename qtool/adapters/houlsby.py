"""Houlsby bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", §2.1): a small
residual module after a block's output projection,

    adapter(y) = y + W_up · f(W_down · y + b_down) + b_up

with ``W_down (m, h)``, ``b_down (m,)``, ``W_up (h, m)``, ``b_up (h,)``, ``f`` = GELU and ``m`` the bottleneck width
(``adapter_size``). A decoder layer gets two: after the attention block (on o_proj's output) and after the MLP (on
down_proj's output), each before the layer's residual add, as in the paper's Figure 2. The paper also trains the
layer norms; we keep them frozen (the norms are buffers of the NF4 model), so the trainable parameters are the
adapters' alone: ``2hm + h + m`` per adapter.

Initialisation: ``W_down`` ~ U(±1/sqrt(h)) (as a LoRA A), ``b_down = 0``, and ``W_up = 0``, ``b_up = 0``: the
adapter is exactly the identity at step 0, so the model is the base model exactly (the paper draws both near zero
instead); like LoRA's B = 0, only the up-projection gets a gradient at the first step.

Why it cannot be merged into W: ``f`` sits between the two products, so ``W_up f(W_down y)`` is not linear in ``y``
and no matrix added to any weight reproduces it; the adapter stays two extra sequential products per block at
inference.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"gelu": F.gelu}  # qtool.adapters.spec.ADAPTER_ACTIVATION names the one used


class HoulsbyAdapter(nn.Module):
    """One bottleneck adapter on hidden states of width ``hidden``. Master weights in the dtype given (fp32 by
    default); the products run in the input's dtype, as LoRA's do."""

    def __init__(self, down: torch.Tensor, down_bias: torch.Tensor, up: torch.Tensor, up_bias: torch.Tensor,
                 activation: str = "gelu"):
        super().__init__()
        size, hidden = down.shape
        if down_bias.shape != (size,) or up.shape != (hidden, size) or up_bias.shape != (hidden,):
            raise ValueError(f"down {tuple(down.shape)}, down bias {tuple(down_bias.shape)}, up {tuple(up.shape)}, "
                             f"up bias {tuple(up_bias.shape)} do not form a {hidden} -> {size} -> {hidden} adapter")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
        self.size, self.hidden, self.activation = size, hidden, activation
        self.down = nn.Parameter(down)
        self.down_bias = nn.Parameter(down_bias)
        self.up = nn.Parameter(up)
        self.up_bias = nn.Parameter(up_bias)

    @classmethod
    def initial(cls, hidden: int, size: int, generator: torch.Generator, dtype=torch.float32,
                device="cpu") -> HoulsbyAdapter:
        """The identity at step 0: ``W_down`` ~ U(±1/sqrt(hidden)), the rest zero (see the module docstring)."""
        bound = 1.0 / math.sqrt(hidden)
        down = torch.empty(size, hidden, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        zeros = lambda *s: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
        return cls(down.to(device=device, dtype=dtype), zeros(size), zeros(hidden, size), zeros(hidden))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        dt = y.dtype
        h = ACTIVATIONS[self.activation](F.linear(y, self.down.to(dt), self.down_bias.to(dt)))
        return y + F.linear(h, self.up.to(dt), self.up_bias.to(dt))  # exactly y while W_up and b_up are zero

    def tensors(self) -> dict[str, torch.Tensor]:
        """The four tensors by their saved names (:mod:`qtool.format.houlsby_adapter`), detached."""
        return {"down.weight": self.down.detach(), "down.bias": self.down_bias.detach(),
                "up.weight": self.up.detach(), "up.bias": self.up_bias.detach()}

    def extra_repr(self) -> str:
        return f"{self.hidden} -> {self.size} -> {self.hidden}, {self.activation}"

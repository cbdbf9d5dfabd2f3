"""The trainable parameters and their gradients in one buffer per dtype, so the optimizer updates them in one launch.

A QLoRA step on a 65B model has 640 LoRA tensors; bitsandbytes' AdamW launches one kernel (and a Python call) per
tensor, about 40 ms a step there, all of it outside the CUDA graph (its kernels run on the legacy default stream,
which cannot be captured beside the graph's stream). Here every parameter keeps its ``nn.Parameter`` object — the
modules, the adapter writer and AdaLoRA's allocator see no difference — but its data and its ``.grad`` become views
of one flat buffer each; the optimizer is given the flat buffers. Gradients are accumulated in place into those
views by autograd (a defined ``.grad`` is added to, never replaced, while grad mode is off in backward), which the
CUDA graph needs anyway, and must therefore be zeroed in place (``zero_grad(set_to_none=False)``).

The flat buffer also changes where bitsandbytes' paged optimizers keep their state: a buffer of >= 1e5 elements is
paged (CUDA managed memory) while LoRA factors of a 7B model at rank 16 (65,536 elements each) would each stay on
the device — the planner models both (``qtool.plan.settings.Settings.flat_params``).

The update is element-wise and the same per element (AdamW, SGD): training is unchanged; only the gradient norm
used for clipping sums in another order.
"""
from __future__ import annotations

import torch


def flatten_parameters(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Move ``params`` (trainable leaf tensors) into one buffer per dtype and device, their gradients into a second
    (zeroed, or holding the gradients they had), and return the buffers to optimise: leaf tensors whose ``.grad``
    is the flat gradient. Each parameter's ``.data`` and ``.grad`` are views of them afterwards."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault((p.dtype, p.device), []).append(p)
    flats = []
    for (dtype, device), group in groups.items():
        total = sum(p.numel() for p in group)
        data = torch.empty(total, dtype=dtype, device=device)
        grad = torch.zeros(total, dtype=dtype, device=device)
        offset = 0
        for p in group:
            n = p.numel()
            data[offset:offset + n].copy_(p.detach().reshape(-1))
            if p.grad is not None:
                grad[offset:offset + n].copy_(p.grad.reshape(-1))
            with torch.no_grad():
                p.data = data[offset:offset + n].view_as(p)
            p.grad = grad[offset:offset + n].view_as(p)
            offset += n
        flat = data.requires_grad_(False)
        flat.grad = grad
        flats.append(flat)
    return flats

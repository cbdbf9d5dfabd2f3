"""What ``--offload-activations`` moves off the GPU, and what of it is still on the GPU at each moment (qtool's
trainer only: qtool/train/offload.py). Pure Python (no torch).

Checkpointing keeps one hidden state per layer, ``b s h`` elements in the hidden-state dtype
(:func:`qtool.plan.transient.checkpoint_bytes`). Offloading keeps them in pinned host buffers, one per layer,
allocated in the first step and kept (no GPU counter sees them; the plan shows them as a ``host`` row). On the GPU:

* forward: the input of the running layer while it is copied out (the previous one is released when the next layer
  starts) — under what the backward holds, so never the peak;
* backward of layer i: its input, copied back, and layer i - 1's, prefetched during it (none for layer 0); and the
  recomputed layer's output, which torch's own checkpoint does not rebuild but a recomputation from a fetched input
  does (the autograd root of the layer's backward);
* loss and final-norm backward: nothing (every forward copy has completed).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from qtool.plan.resident import alloc
from qtool.plan.transient import checkpoint_bytes

if TYPE_CHECKING:
    from qtool.arch import Shape
    from qtool.plan.settings import Settings

HOST_ROW = "checkpointed layer inputs, offloaded (pinned host buffers, one per layer)"


def host_bytes(shape: Shape, st: Settings) -> int:
    """The pinned host buffers: every layer's input, as checkpointing would keep it on the GPU."""
    return checkpoint_bytes(shape, st) if st.offload_activations else 0


def layer_input_bytes(shape: Shape, st: Settings) -> int:
    """One layer's input (one hidden state) as the allocator books it."""
    return alloc(checkpoint_bytes(shape, st) // shape.n_layers)


def backward_rows(shape: Shape, st: Settings, first: bool = False) -> list[tuple[str, int]]:
    """(name, bytes) on the GPU while a decoder layer runs its backward with offloading (``first``: layer 0, which
    has no predecessor to prefetch)."""
    one = layer_input_bytes(shape, st)
    if first:
        return [("offload: layer 0's input, copied back from the host", one),
                ("offload: the recomputed layer's output", one)]
    return [("offload: this layer's input, copied back, and the previous layer's, prefetched", 2 * one),
            ("offload: the recomputed layer's output", one)]

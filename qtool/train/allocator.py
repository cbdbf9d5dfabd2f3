"""PyTorch's CUDA caching allocator as the trainer sets it up: expandable segments unless the user chose.

With ``expandable_segments:True`` the allocator reserves one large virtual range per stream and pool and maps
physical pages into it as it grows (20 MiB pages for blocks over 1 MiB, 2 MiB for small ones), instead of one
``cudaMalloc`` segment per cache miss. Blocks of any size then pack into the same range, so the weights' 8 MiB
tensors no longer leave 4 MiB of each 20 MiB segment empty, and ``empty_cache()`` gives back any wholly free page,
not only wholly free segments. On the H200 this took peak reserved from 5.20 to 4.75 GiB and NVML-used from 6.76 to
6.27 GiB on Llama-2-7B at seq 2048 (bench/results/reserved_probe_h200_2026-12-04.txt); the planner replays both
modes (qtool.plan.allocator).

The setting must be made before the first CUDA allocation worth keeping (the weights): a segment made before it
stays what it was. A ``PYTORCH_ALLOC_CONF`` or ``PYTORCH_CUDA_ALLOC_CONF`` in the environment is the user's
choice and is left alone; the run then reports the mode it found.
"""
from __future__ import annotations

import os

import torch

ENV = "PYTORCH_CUDA_ALLOC_CONF"
ENVS = ("PYTORCH_ALLOC_CONF", ENV)  # torch >= 2.9 reads the first (device-neutral) before the older CUDA name


def user_setting() -> bool | None:
    """The expandable_segments value of the allocator configuration the user set (``PYTORCH_ALLOC_CONF``, else
    ``PYTORCH_CUDA_ALLOC_CONF``): None when neither is set; False when it is set without the option, the
    allocator's default."""
    conf = next((os.environ[name] for name in ENVS if name in os.environ), None)
    if conf is None:
        return None
    for item in conf.replace(";", ",").split(","):
        key, _, value = item.partition(":")
        if key.strip() == "expandable_segments":
            return value.strip().lower() == "true"
    return False


def set_up(device: torch.device, expandable: bool) -> bool:
    """Set the allocator of ``device`` for a training run; returns whether its new segments are expandable. On the
    CPU nothing is set (False)."""
    if torch.device(device).type != "cuda":
        return False
    chosen = user_setting()
    if chosen is not None:
        return chosen
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is None:  # torch before 2.9
        setter = torch.cuda.memory._set_allocator_settings
    setter(f"expandable_segments:{'True' if expandable else 'False'}")
    return expandable

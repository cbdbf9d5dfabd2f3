"""One line item of a plan: :class:`Row`. Its own module so that every module that builds rows (the planner, the
FSDP per-GPU rows) shares it without importing the planner."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    """One line item. ``where``: device | paged | host. ``counter``: the first memory counter that sees it
    (allocated < reserved < nvml; none for host memory); the peaks are cumulative sums over the counters."""

    name: str
    bytes: int
    where: str = "device"
    counter: str = "allocated"

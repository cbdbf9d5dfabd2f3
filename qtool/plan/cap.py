"""A cap on PyTorch's caching allocator (``torch.cuda.set_per_process_memory_fraction``): does a step fit under it,
with and without paged optimizer state? Pure Python, like the rest of the planner.

What the cap limits: the allocator raises OutOfMemoryError when its *reserved* bytes (its segments) would pass
``fraction x total``. So the plan's peak reserved is compared with the cap: ``fits`` when it is within, ``oom``
otherwise. Before raising, the allocator does try to return cached, unused segments to the driver
(c10/cuda/CUDACachingAllocator.cpp ``malloc``), but only whole free segments, and not at all during a CUDA graph
capture (``captures_underway``), which is where qtool's trainer meets its peak; on the H200 (bench/paged_oom.py) both
runs whose live tensors fitted under a cap their reserved peak exceeded ran out of memory. ``live_tensors_fit`` says
when the planned peak allocated is within the cap all the same: such an "OOM expected" is the allocator's cache,
not the tensors.

What the cap does not limit: bitsandbytes' paged optimizer buffers (>= 1e5 elements) are CUDA managed memory
(cudaMallocManaged), which the caching allocator neither allocates nor counts; NVML sees them, and the card must
still hold them (or the driver pages them to the host). ``adamw_32bit`` keeps the same two fp32 moments as ordinary
device tensors, inside the cap.

Which allocator: the profile's (qtool on CUDA: expandable segments, as qtool train sets it up) unless
``expandable_segments`` says otherwise. bench/paged_oom.py measured the verdicts both ways on the H200: with the
default allocator (2026-12-04, bench/results/paged_oom_h200_2026-12-04.jsonl) and with expandable segments, as
qtool train runs now (bench/results/paged_oom_h200_2026-12-04b.jsonl), each 2 of 2 as predicted. With expandable
segments the allocator, before raising outside a capture, also unmaps every whole free page of its segments (not
only wholly free segments); the verdict still compares the replayed peak reserved with the cap.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from qtool.arch import Shape
from qtool.errors import UsageError
from qtool.plan.planner import Plan, plan
from qtool.plan.settings import Settings
from qtool.units import parse_size

VERDICTS = ("fits", "oom")
# separating_cap: the two plans' reserved peaks must differ by at least this fraction of the paged one, so that the
# cap midway between them stands clear of the planner's reserved error (-8%..+2% over the H200 records with the
# allocator replay, -17%..+12% with the fitted slack before it; -19% in bench/paged_oom.py's first H200 run,
# 2026-12-04, on a work-in-progress trainer: see data/memory/README.md, "Reserved and NVML")
MIN_SEPARATION = 0.3
# each optimizer beside the one that keeps the same state, paged or not
COUNTERPARTS = {"adamw_32bit": "paged_adamw_32bit", "paged_adamw_32bit": "adamw_32bit",
                "adamw_8bit": "paged_adamw_8bit", "paged_adamw_8bit": "adamw_8bit"}
OUTSIDE_NOTE = ("paged optimizer state lives in CUDA managed memory, outside the allocator cap: NVML counts it, "
                "torch.cuda.memory_reserved does not")


@dataclass(frozen=True)
class CapCheck:
    """One optimizer's plan against an allocator cap. Margins are ``cap - planned``: positive is room."""

    optimizer: str
    cap_bytes: int
    verdict: str                     # fits | oom: planned peak reserved within the cap or not
    peak_allocated_bytes: int
    peak_reserved_bytes: int         # what the cap limits
    peak_nvml_bytes: int             # the whole device, paged state and CUDA context included: not capped
    paged_bytes: int                 # optimizer state in managed memory, outside the cap
    device_optimizer_bytes: int      # optimizer state the allocator holds, inside the cap
    peak_phase: str

    @property
    def reserved_margin_bytes(self) -> int:
        return self.cap_bytes - self.peak_reserved_bytes

    @property
    def allocated_margin_bytes(self) -> int:
        return self.cap_bytes - self.peak_allocated_bytes

    @property
    def live_tensors_fit(self) -> bool:
        """The planned peak allocated is within the cap (only the allocator's cache is over it)."""
        return self.allocated_margin_bytes >= 0

    def to_dict(self) -> dict:
        return {**asdict(self), "reserved_margin_bytes": self.reserved_margin_bytes,
                "allocated_margin_bytes": self.allocated_margin_bytes, "live_tensors_fit": self.live_tensors_fit}


def parse_cap(text: str) -> int:
    """Bytes of an ``--allocator-cap`` size: '6GiB' is 6 x 2^30 bytes, '6GB' 6 x 10^9, a bare number bytes."""
    try:
        cap_bytes = parse_size(text)
    except ValueError:
        raise UsageError(f"--allocator-cap {text!r} is not a size",
                         hint="give bytes with a unit: 6GiB (6 x 2^30 bytes) or 6GB (6 x 10^9 bytes)") from None
    if cap_bytes <= 0:
        raise UsageError(f"--allocator-cap {text!r} must be positive", hint="e.g. --allocator-cap 6GiB")
    return cap_bytes


def verdict(p: Plan, cap_bytes: int) -> str:
    """fits | oom: the plan's peak reserved, what the cap limits, against the cap (module docstring)."""
    return "fits" if p.peak_reserved_bytes <= cap_bytes else "oom"


def check(p: Plan, cap_bytes: int) -> CapCheck:
    """The plan ``p`` against an allocator cap of ``cap_bytes``."""
    def row_bytes(prefix: str) -> int:
        return sum(r.bytes for r in p.rows if r.name.startswith(prefix))

    return CapCheck(optimizer=p.settings.optimizer, cap_bytes=cap_bytes, verdict=verdict(p, cap_bytes),
                    peak_allocated_bytes=p.peak_allocated_bytes, peak_reserved_bytes=p.peak_reserved_bytes,
                    peak_nvml_bytes=p.peak_nvml_bytes, paged_bytes=row_bytes("optimizer state, paged"),
                    device_optimizer_bytes=row_bytes(f"optimizer state ({p.settings.optimizer})"),
                    peak_phase=p.peak_phase)


def optimizers_to_compare(optimizer: str) -> tuple[str, ...]:
    """``optimizer`` and its paged (or unpaged) counterpart, unpaged first; only itself when it has none."""
    pair = (optimizer, COUNTERPARTS[optimizer]) if optimizer in COUNTERPARTS else (optimizer,)
    return tuple(sorted(pair, key=lambda name: name.startswith("paged_")))


def plans(shape: Shape, settings: Settings) -> dict[str, Plan]:
    """optimizer -> plan, for ``settings.optimizer`` and its counterpart (:func:`optimizers_to_compare`)."""
    st = settings.check(shape)
    if st.device != "cuda":
        raise UsageError("an allocator cap is a CUDA setting (torch.cuda.set_per_process_memory_fraction)",
                         hint="plan the cap for a CUDA device")
    return {name: plan(shape, replace(st, optimizer=name)) for name in optimizers_to_compare(st.optimizer)}


def check_cap(shape: Shape, settings: Settings, cap_bytes: int) -> list[CapCheck]:
    """Does the step fit under an allocator cap of ``cap_bytes``, with ``settings.optimizer`` and with its paged or
    unpaged counterpart? One :class:`CapCheck` each, unpaged first."""
    if cap_bytes <= 0:
        raise UsageError(f"--allocator-cap must be a positive size, got {cap_bytes} bytes",
                         hint="e.g. --allocator-cap 6GiB")
    return [check(p, cap_bytes) for p in plans(shape, settings).values()]


def separating_cap(shape: Shape, settings: Settings) -> int:
    """The allocator cap midway between the paged and the unpaged plan's peak reserved: the paged run fits under it
    and the unpaged one does not, each by half the device-side optimizer state that paging moves out. UsageError
    when that is under MIN_SEPARATION of the paged peak: the planner's error could then decide the outcome."""
    by_name = plans(shape, settings)
    paged = [p for name, p in by_name.items() if name.startswith("paged_")]
    unpaged = [p for name, p in by_name.items() if not name.startswith("paged_")]
    if not (paged and unpaged):
        raise UsageError(f"--optimizer {settings.optimizer} has no paged counterpart to compare with",
                         hint="use adamw_32bit, paged_adamw_32bit, adamw_8bit or paged_adamw_8bit")
    low, high = paged[0].peak_reserved_bytes, unpaged[0].peak_reserved_bytes
    if high - low < MIN_SEPARATION * low:
        raise UsageError(f"the reserved peaks of {paged[0].settings.optimizer} ({low / 2**30:.2f} GiB) and "
                         f"{unpaged[0].settings.optimizer} ({high / 2**30:.2f} GiB) differ by less than "
                         f"{MIN_SEPARATION:.0%}: a cap between them would test the planner's error, not paging",
                         hint="move more optimizer state to managed memory: a higher --rank, --targets all-linear, "
                              "or a shorter --seq-len")
    return (low + high) // 2

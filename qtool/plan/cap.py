"""A cap on PyTorch's caching allocator (``torch.cuda.set_per_process_memory_fraction``): does a step fit under it,
with and without paged optimizer state? Pure Python, like the rest of the planner.

What the cap limits: the allocator raises OutOfMemoryError when its *reserved* bytes (its segments) would pass
``fraction x total``. Before raising it returns its cached, unused segments to the driver and retries
(c10/cuda/CUDACachingAllocator.cpp ``malloc``: ``release_available_cached_blocks``, then ``release_cached_blocks``
when no CUDA graph capture is under way). So a run needs at most its uncapped peak reserved under the cap, and at
least its peak allocated (the live tensors; plus whatever fragmentation keeps segments from being returned, which
the plan does not model). Three verdicts follow:

* ``fits``  — planned peak reserved <= cap: the allocator never reaches the cap;
* ``oom``   — planned peak allocated > cap: the live tensors alone exceed it;
* ``edge``  — in between: it fits only if the allocator can give back enough of its cache, which the plan cannot say.

What the cap does not limit: bitsandbytes' paged optimizer buffers (>= 1e5 elements) are CUDA managed memory
(cudaMallocManaged), which the caching allocator neither allocates nor counts; NVML sees them, and the card must
still hold them (or the driver pages them to the host). ``adamw_32bit`` keeps the same two fp32 moments as ordinary
device tensors, inside the cap.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from qtool.arch import Shape
from qtool.errors import UsageError
from qtool.plan.planner import Plan, plan
from qtool.plan.settings import Settings
from qtool.units import parse_size

VERDICTS = ("fits", "oom", "edge")
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
    verdict: str                     # fits | oom | edge (module docstring)
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

    def to_dict(self) -> dict:
        return {**asdict(self), "reserved_margin_bytes": self.reserved_margin_bytes,
                "allocated_margin_bytes": self.allocated_margin_bytes}


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
    """fits | oom | edge for a plan under an allocator cap (module docstring)."""
    if p.peak_reserved_bytes <= cap_bytes:
        return "fits"
    return "oom" if p.peak_allocated_bytes > cap_bytes else "edge"


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
    """A cap that the paged optimizer fits under and the unpaged one cannot: midway between the paged plan's peak
    reserved (below it, the paged run fits for sure) and the unpaged plan's peak allocated (above it, the unpaged
    run could fit by returning its cache). The margins either side are the uncertainty it tolerates. UsageError when
    there is no such cap: too little optimizer state moves to managed memory to separate the two."""
    by_name = plans(shape, settings)
    paged = [p for name, p in by_name.items() if name.startswith("paged_")]
    unpaged = [p for name, p in by_name.items() if not name.startswith("paged_")]
    if not (paged and unpaged):
        raise UsageError(f"--optimizer {settings.optimizer} has no paged counterpart to compare with",
                         hint="use adamw_32bit, paged_adamw_32bit, adamw_8bit or paged_adamw_8bit")
    low, high = paged[0].peak_reserved_bytes, unpaged[0].peak_allocated_bytes
    if low >= high:
        raise UsageError(f"no allocator cap separates {paged[0].settings.optimizer} from "
                         f"{unpaged[0].settings.optimizer} here: the paged plan reserves {low / 2**30:.2f} GiB, the "
                         f"unpaged one allocates {high / 2**30:.2f} GiB",
                         hint="move more optimizer state to managed memory: a higher --rank, --targets all-linear, "
                              "or a shorter --seq-len")
    return (low + high) // 2

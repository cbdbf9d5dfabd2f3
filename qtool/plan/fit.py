"""How far a plan goes on a GPU: does it fit, the largest seq-len / batch / rank that fits a capacity, the table of
common GPUs, and (with FSDP) how many of each GPU a run needs. Pure Python, on top of :func:`qtool.plan.planner.plan`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from qtool.arch import Shape
from qtool.errors import UsageError
from qtool.plan import fsdp, methods
from qtool.plan.planner import Plan, plan
from qtool.plan.settings import Settings, gpus_problems, layer_linears
from qtool.units import MiB, parse_size

KNOBS = ("seq_len", "batch_size", "rank")
_LIMITS = {"seq_len": 1 << 22, "batch_size": 1 << 16}

# NVML total memory of common GPUs (nvidia-smi "Total", MiB). The fit table shows the first six.
GPUS = {"RTX 4090": 24564, "A100-40GB": 40960, "L40S": 46068, "A100-80GB": 81920, "H100-80GB": 81559,
        "H200": 143771, "RTX 3090": 24576, "L4": 23034, "A10": 23028, "RTX A6000": 49140, "T4": 15360}
FIT_TABLE_GPUS = ("RTX 4090", "A100-40GB", "L40S", "A100-80GB", "H100-80GB", "H200")


def capacity_bytes(text: str) -> tuple[str, int]:
    """(label, bytes) for a size or a GPU name from GPUS (case and punctuation ignored). Sizes say their unit:
    '24GB' is 24 * 10**9 bytes, '24GiB' (or '24Gi') 24 * 2**30 bytes; a bare number is bytes."""
    key = "".join(c for c in text.lower() if c.isalnum())
    for name, mib in GPUS.items():
        if "".join(c for c in name.lower() if c.isalnum()) == key:
            return name, mib * MiB
    try:
        return text, parse_size(text)
    except ValueError:
        from difflib import get_close_matches  # an error path: not paid at start-up

        close = get_close_matches(text, list(GPUS), n=3, cutoff=0.4)
        raise UsageError(f"--fit {text!r} is neither a size (24GB = 24e9 bytes, 24GiB = 24 x 2^30 bytes) nor a "
                         "known GPU" + (f"; did you mean {', '.join(close)}?" if close else f" ({', '.join(GPUS)})")
                         ) from None


def fits(p: Plan, capacity: int) -> bool:
    """A plan fits when everything the GPU must hold (NVML-used at the peak) is within its memory."""
    return p.peak_nvml_bytes <= capacity


def knob_limit(shape: Shape, settings: Settings, knob: str) -> tuple[int, str]:
    """The largest value :func:`largest_fitting` considers for ``knob``, and why (a phrase that reads after "the").
    A seq-len stops at the model's position limit (config.json's max_position_embeddings: no more positions were
    trained, and absolute position embeddings have no more rows); a sliding window is no limit (both trainers apply
    it with a mask; a prefix is bounded by :func:`qtool.plan.methods.seq_len_bound`). A rank stops at min(in, out)
    of the smallest targeted module; a batch at the search bound."""
    st = settings.check(shape)
    if knob == "rank" and not st.module_ranks(shape):
        raise UsageError(f"--solve rank: --method {st.method} has no rank",
                         hint="solve for seq-len or batch-size, or plan --method lora")
    if knob == "rank":
        lins = {lin.name: lin for lin in layer_linears(shape)}
        name = min(st.module_ranks(shape), key=lambda n: min(lins[n].n_in, lins[n].n_out))
        return min(lins[name].n_in, lins[name].n_out), f"min(in, out) of {name}"
    if knob == "seq_len" and methods.seq_len_bound(shape, st) is not None:
        value, why = methods.seq_len_bound(shape, st)
        return (value, why) if value < _LIMITS[knob] else (_LIMITS[knob], "search bound")
    if knob == "seq_len":
        if shape.max_positions < _LIMITS[knob]:
            return shape.max_positions, f"max_position_embeddings of {shape.name}"
    return _LIMITS[knob], "search bound"


@dataclass(frozen=True)
class Fit:
    knob: str
    capacity_bytes: int
    value: int | None      # the largest value that fits, None if even 1 does not
    plan: Plan | None      # the plan at that value
    limited: bool = False  # the value is the search's upper bound (knob_limit): memory might allow more
    limit: int = 0         # that bound ...
    limit_reason: str = ""  # ... and why (knob_limit)
    step: int = 1          # the values searched are multiples of it: a global batch over --gpus N steps by N


def largest_fitting(shape: Shape, settings: Settings, capacity: int, knob: str = "seq_len") -> Fit:
    """The largest ``knob`` (seq_len, batch_size or rank) whose plan fits ``capacity``, others fixed, up to
    :func:`knob_limit` (a seq-len never beyond the model's position limit).
    Line items are non-decreasing in each knob, so an exponential then binary search is exact. (One exception: an hf
    Mistral's attention drops its s^2 term at the sliding window, where transformers switches kernels; the search
    still returns a value that fits while value + 1 does not, and memory grows again beyond the window.)
    With ``--gpus N`` the batch is the global one, so it is searched in multiples of N (the per-GPU batch)."""
    if knob not in KNOBS:
        raise UsageError(f"cannot solve for {knob!r}; choose one of {', '.join(KNOBS)}")
    st = settings.check(shape)
    step = st.gpus if knob == "batch_size" else 1
    limit, why = knob_limit(shape, st, knob)
    fit = _search(_plans_along(shape, st, knob, step), capacity, knob, limit // step, why)
    if step == 1:
        return fit
    return replace(fit, value=None if fit.value is None else fit.value * step, limit=limit // step * step, step=step)


class _Along:
    """Plans along one knob, others fixed, memoised (a fit table searches the same values for every GPU). ``at(v)``
    is the plan; ``fits_roughly(v, capacity)`` judges it without replaying the allocator (``allocator_replay=False``)
    but with the slack, as a fraction of allocated, of the nearest value replayed so far: a search probes ~30 values
    and replays only those near its answer. Values count in units of ``step`` (the plan's knob is value x step)."""

    def __init__(self, shape: Shape, st: Settings, knob: str, step: int = 1):
        self.shape, self.st, self.knob, self.step = shape, st, knob, step
        self.exact: dict[int, Plan] = {}
        self.rough: dict[int, Plan] = {}

    def _settings(self, value: int) -> Settings:
        return replace(self.st, **{self.knob: value * self.step}, alpha=None if self.knob == "rank" else self.st.alpha)

    def __call__(self, value: int) -> Plan:
        if value not in self.exact:
            self.exact[value] = plan(self.shape, self._settings(value))
        return self.exact[value]

    def fits_roughly(self, value: int, capacity: int) -> bool:
        if value not in self.rough:
            self.rough[value] = plan(self.shape, self._settings(value), allocator_replay=False)
        self(max(1, getattr(self.st, self.knob) // self.step))  # the asked value's plan: the first slack known
        nearest = self.exact[min(self.exact, key=lambda v: abs(v - value))]
        slack = (nearest.peak_reserved_bytes - nearest.peak_allocated_bytes) / nearest.peak_allocated_bytes
        rough = self.rough[value]
        return rough.peak_nvml_bytes + slack * rough.peak_allocated_bytes <= capacity


def _plans_along(shape: Shape, st: Settings, knob: str, step: int = 1) -> _Along:
    return _Along(shape, st, knob, step)


def _search(at: _Along, capacity: int, knob: str, limit: int, why: str) -> Fit:
    """The largest value that fits: exponential then binary search on rough judgements (:class:`_Along`), then
    exact plans from there: down while the value does not fit, up while the next one does."""
    if not fits(at(1), capacity):
        return Fit(knob, capacity, None, None, limit=limit, limit_reason=why)
    lo = 1
    while lo < limit and at.fits_roughly(min(2 * lo, limit), capacity):
        lo = min(2 * lo, limit)
    hi = min(2 * lo, limit + 1)  # the first value judged not to fit (or one past the limit)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if at.fits_roughly(mid, capacity) else (lo, mid)
    lo, hi = _exact_boundary(at, capacity, lo, limit)
    return Fit(knob, capacity, lo, at(lo), limited=lo == limit, limit=limit, limit_reason=why)


def _exact_boundary(at: _Along, capacity: int, guess: int, limit: int) -> tuple[int, int]:
    """(lo, hi): lo fits exactly, hi = lo + 1 does not (or is past ``limit``), galloping from ``guess``."""
    if fits(at(guess), capacity):
        lo, step = guess, 1
        while lo < limit and fits(at(min(lo + step, limit)), capacity):
            lo, step = min(lo + step, limit), 2 * step
        hi = min(lo + step, limit + 1)
    else:
        hi, step = guess, 1
        while hi - step > 1 and not fits(at(hi - step), capacity):
            hi, step = hi - step, 2 * step
        lo = max(1, hi - step)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(at(mid), capacity) else (lo, mid)
    return lo, hi


def fit_table(shape: Shape, settings: Settings, gpus: tuple[str, ...] = FIT_TABLE_GPUS) -> list[dict]:
    """Per GPU: does this plan fit, with what headroom, and the largest seq-len that fits at this batch size
    (``max_seq_len_limited``: it is :func:`knob_limit`'s bound, not the memory's)."""
    st = settings.check(shape)
    p, at, limit = plan(shape, st), _plans_along(shape, st, "seq_len"), knob_limit(shape, st, "seq_len")
    table = []
    for name in gpus:
        capacity = GPUS[name] * MiB
        best = _search(at, capacity, "seq_len", *limit)
        table.append({"gpu": name, "memory_bytes": capacity, "fits": fits(p, capacity),
                      "headroom_bytes": capacity - p.peak_nvml_bytes, "max_seq_len": best.value,
                      "max_seq_len_limited": best.limited})
    return table


def gpu_counts(shape: Shape, settings: Settings, gpus: tuple[str, ...] = FIT_TABLE_GPUS,
               counts: tuple[int, ...] = fsdp.GPU_COUNTS) -> dict:
    """``--fit-gpus``: the per-GPU plan at each count of ``counts`` (FSDP2; ``settings.batch_size`` is the global
    batch, so a count that does not divide it is not planned), and per GPU of ``gpus`` the smallest count whose
    per-GPU peak fits it (None if none does). Counts are tried in order: per-GPU memory need not fall with the count
    (NCCL's buffers come with the second GPU), so the smallest that fits is not found by bisection."""
    st = replace(settings, gpus=1).check(shape)
    problems = gpus_problems(replace(st, gpus=2, batch_size=2), shape, "--fit-gpus (FSDP2 over several GPUs)")
    if problems:
        raise UsageError(problems)
    by_count = {n: plan(shape, replace(st, gpus=n)) if st.batch_size % n == 0 else None for n in counts}
    per_count = [{"gpus": n, "per_gpu_batch_size": p.settings.per_gpu_batch if p else None,
                  "peak_allocated_bytes": p.peak_allocated_bytes if p else None,
                  "peak_reserved_bytes": p.peak_reserved_bytes if p else None,
                  "peak_nvml_bytes": p.peak_nvml_bytes if p else None, "peak_phase": p.peak_phase if p else None}
                 for n, p in by_count.items()]
    table = []
    for name in gpus:
        capacity = GPUS[name] * MiB
        verdicts = [{"gpus": n, "fits": fits(p, capacity) if p else None} for n, p in by_count.items()]
        table.append({"gpu": name, "memory_bytes": capacity, "fits": verdicts,
                      "smallest_gpus": next((v["gpus"] for v in verdicts if v["fits"]), None)})
    return {"global_batch_size": st.batch_size, "counts": per_count, "table": table}

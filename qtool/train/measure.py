"""GPU memory as three counters see it, named like the plan's rows so the two compare without translation.

* ``allocated`` / ``peak_allocated`` — ``torch.cuda.memory_allocated`` / ``max_memory_allocated``: live tensors.
* ``reserved`` / ``peak_reserved`` — the caching allocator's segments (allocated + its slack).
* ``nvml_used`` — the driver's view of the whole device: the CUDA context, the allocator's segments and memory no
  allocator statistic sees, such as bitsandbytes' paged optimizer buffers (CUDA managed memory).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class MemorySample:
    phase: str
    allocated_bytes: int
    reserved_bytes: int
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    nvml_used_bytes: int | None

    def to_json(self) -> dict:
        return asdict(self)


class MemoryMonitor:
    """Samples the three counters at phase boundaries (after a device synchronise); no-op values on the CPU."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._nvml = None
        if self.cuda:
            try:
                import pynvml

                pynvml.nvmlInit()
                index = self.device.index if self.device.index is not None else torch.cuda.current_device()
                self._nvml = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(index))
            except Exception:  # noqa: BLE001 - NVML is optional (nvidia-ml-py missing, or no driver access)
                self._nvml = None
        self.samples: list[MemorySample] = []

    def nvml_used_bytes(self) -> int | None:
        if self._nvml is None:
            return None
        pynvml, handle = self._nvml
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)

    def reset_peaks(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def sample(self, phase: str) -> MemorySample:
        if not self.cuda:
            s = MemorySample(phase, 0, 0, 0, 0, None)
        else:
            torch.cuda.synchronize(self.device)
            s = MemorySample(phase, torch.cuda.memory_allocated(self.device), torch.cuda.memory_reserved(self.device),
                             torch.cuda.max_memory_allocated(self.device),
                             torch.cuda.max_memory_reserved(self.device), self.nvml_used_bytes())
        self.samples.append(s)
        return s

    def peaks(self, since: int = 0) -> dict:
        """The largest value of each counter over the samples from index ``since`` on."""
        rows = self.samples[since:]
        nvml = [s.nvml_used_bytes for s in rows if s.nvml_used_bytes is not None]
        return {"peak_allocated_bytes": max((s.peak_allocated_bytes for s in rows), default=0),
                "peak_reserved_bytes": max((s.peak_reserved_bytes for s in rows), default=0),
                "nvml_used_bytes": max(nvml) if nvml else None}


def error_pct(planned: int | None, measured: int | None) -> float | None:
    if not planned or not measured:
        return None
    return 100.0 * (planned - measured) / measured


def plan_settings(st, n_micro_tokens: int | None = None):
    """The planner's Settings for a :class:`qtool.train.recipe.TrainSettings` (profile ``qtool``)."""
    from qtool.adapters.spec import METHOD_FLAGS, UNTARGETED_METHODS
    from qtool.plan.planner import Settings

    optimizer = st.optimizer if st.optimizer != "auto" else "paged_adamw_32bit"
    if st.method in UNTARGETED_METHODS:  # the method's own sizes; LoRA's fields stay at their defaults
        method = {"method": st.method, **{f: getattr(st, f) for f, (m, _) in METHOD_FLAGS.items() if m == st.method}}
        return Settings(profile="qtool", seq_len=st.seq_len, batch_size=st.batch_size, grad_accum=st.grad_accum,
                        grad_checkpointing=st.grad_checkpointing, offload_activations=st.offload_activations,
                        optimizer=optimizer, expandable_segments=st.expandable_segments, **method)
    adalora = {"method": "adalora", "target_rank": st.spec.adalora.target_rank} if st.method == "adalora" else {}
    return Settings(profile="qtool", rank=st.spec.rank, alpha=st.alpha, targets=st.targets, init=st.init,
                    seq_len=st.seq_len, batch_size=st.batch_size, grad_accum=st.grad_accum,
                    grad_checkpointing=st.grad_checkpointing, offload_activations=st.offload_activations,
                    optimizer=optimizer, expandable_segments=st.expandable_segments, **adalora)


def compare_with_plan(shape, st, memory: list[dict], peaks: dict) -> list[dict]:
    """Measured counters beside ``qtool plan`` for the same model shape and settings: rows of
    ``{"name", "planned_bytes", "measured_bytes", "error_pct"}`` (measured None on the CPU)."""
    from qtool.plan.planner import plan

    p = plan(shape, plan_settings(st))
    after_load = next((m for m in memory if m["phase"] == "after_load"), {})
    rows = [("after load (allocated)", p.after_load_allocated_bytes, after_load.get("allocated_bytes") or None),
            ("peak allocated", p.peak_allocated_bytes, peaks.get("peak_allocated_bytes") or None),
            ("peak reserved", p.peak_reserved_bytes, peaks.get("peak_reserved_bytes") or None),
            ("NVML used", p.peak_nvml_bytes, peaks.get("nvml_used_bytes") or None)]
    if st.offload_activations:  # the offloaded layer inputs: pinned host memory, seen by none of the GPU counters
        rows.append(("pinned host memory", sum(r.bytes for r in p.rows if r.where == "host"),
                     peaks.get("pinned_host_bytes") or None))
    return [{"name": n, "planned_bytes": a, "measured_bytes": b, "error_pct": error_pct(a, b)} for n, a, b in rows]

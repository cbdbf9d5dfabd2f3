"""Measurement records (data/memory/README.md's schema) planned as they ran: their settings, the trainer revision and
the process (earlier runs in it), and what earlier runs left in a record's peaks. Pure Python."""
from __future__ import annotations

from qtool.arch import shape_from_config
from qtool.errors import UsageError
from qtool.plan import resident as items
from qtool.plan.planner import Plan, plan
from qtool.plan.process import EVAL_FIRST_TRAINER, RECORDED_TRAINER, TRAINERS, Process, replay
from qtool.plan.settings import Settings

def settings_from_record(record: dict) -> Settings:
    """The Settings of a measurement record (schema: data/memory/README.md)."""
    known = {f for f in Settings.__dataclass_fields__}
    given = {k: v for k, v in record["settings"].items() if k in known}
    given.setdefault("expandable_segments", False)  # recorded since 2026-12-05; every run before had the default
    if record["profile"] == "qtool":  # fields recorded since 2026-12-04; before, the trainer ran as their defaults say
        given.setdefault("loss_chunk_mib", 256)  # 256 MiB of logits per loss chunk
        given.setdefault("flat_params", False)  # one optimizer tensor per LoRA factor
    return Settings(profile=record["profile"], **given)


def carried_allocated_bytes(record: dict, p: Plan) -> int:
    """Allocated bytes that a recorded peak holds from earlier runs in its process and a fresh process would not:
    bench/gpu_worker.py runs every configuration of one model in one process. What is carried shows as the record's
    after-load allocation beyond the plan's. A qtool run keeps all of it through its steps: the cuBLAS workspaces of
    the earlier runs' streams, which torch keeps for the life of the process, less the CUDA-graph capture stream's
    two, which this run reuses instead of creating them (the plan counts those). An hf run carries the previous run's
    autograd graph, freed when its first step rebinds ``loss``, and the default stream's two workspaces, which the
    plan counts: nothing at the peak (data/memory/README.md)."""
    if p.settings.profile != "qtool":
        return 0
    carried = record["measured"]["after_load_allocated_bytes"] - p.after_load_allocated_bytes
    return max(0, carried - 2 * items.CUBLAS_WORKSPACE_BYTES)


def record_process(record: dict, earlier: list[dict] = ()) -> Process:
    """How bench/gpu_worker.py ran ``record``'s configuration: random weights built on the GPU, the trainer of the
    record's date (:data:`qtool.plan.process.RECORDED_TRAINER` for the records of 2026-11-29), after the
    configurations of ``earlier`` (the records before it from the same process, in order)."""
    trainer = record.get("trainer") or (RECORDED_TRAINER if record.get("date", "") <= RECORDED_TRAINER
                                        else EVAL_FIRST_TRAINER)
    if trainer not in TRAINERS:
        raise UsageError(f"record {record.get('id', '?')}: trainer revision {trainer!r} is not one the planner "
                         f"replays ({', '.join(TRAINERS)})", hint="record it with the trainer of this qtool, or add "
                                                                  "its revision to qtool.plan.process")
    return Process(trainer, random_weights=True, earlier=tuple(settings_from_record(r) for r in earlier))


def plan_for_record(record: dict) -> Plan:
    """Plan the model and settings of one measurement record (its ``model`` holds config.json fields) as the bench
    ran it in a fresh process (:func:`record_process`)."""
    model = record["model"]
    shape = shape_from_config({"model_type": "llama", **model}, name=model.get("name", record.get("id", "record")))
    return plan(shape, settings_from_record(record), record_process(record))


def carried_reserved_bytes(record: dict, p: Plan, earlier: list[dict]) -> int:
    """Reserved bytes that a recorded peak holds because of the runs before it in its process, which a fresh
    process would not: the replay of the process (:func:`record_process` with ``earlier``) less that of a fresh
    one. qtool: the earlier runs' cuBLAS workspaces and the segments they keep (on streams no later run allocates
    on); hf: the previous run's graph, which the worker's ``loss`` holds into the first step, and the segments
    the cache kept for it."""
    if not earlier:
        return 0
    return (replay(p.shape, p.settings, record_process(record, earlier)).peak_reserved_bytes
            - replay(p.shape, p.settings, record_process(record)).peak_reserved_bytes)

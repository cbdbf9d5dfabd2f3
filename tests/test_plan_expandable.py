"""PyTorch's allocator with ``expandable_segments:True`` (qtool.plan.allocator, the planner's Settings.expandable_segments,
``qtool plan --expandable-segments``): the allocator's rules one by one, the H200 runs made with it planned within 5%,
the records made without it still read as made without it."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from qtool.arch import known_shape
from qtool.cli import main
from qtool.errors import UsageError
from qtool.plan import cap
from qtool.plan import resident as items
from qtool.plan.allocator import CachingAllocator
from qtool.plan.planner import Plan, Settings, plan
from qtool.plan.records import plan_for_record, settings_from_record
from qtool.plan.process import TRAINER, Process, replay

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20
# Measured runs with expandable segments (and their default-allocator twins). Two schemas: bench/reserved_probe.py's
# lines (config + alloc + peaks) and data/memory records (settings.expandable_segments + measured). Add a file here.
RUNS = [
    "bench/results/reserved_probe_h200_2026-12-04.jsonl",  # rows 1, 2, 3: default and expandable
    "bench/results/issue11_h200_2026-12-04b.jsonl",  # issue 11: qtool (expandable) and Unsloth rows
    "bench/results/issue11_h200_2026-12-04c.jsonl",  # the same after the offload recompute skips down_proj
]


# --- the allocator's rules ----------------------------------------------------------------------------------------

def test_pools_map_whole_pages_of_one_segment_per_stream_and_pool():
    """find_expandable_block / map_block: a large request maps the 20 MiB pages it needs (no kRoundLarge segment of
    its own), a small one 2 MiB pages; one segment per (stream, small/large) that grows; a request is split down to
    its 512-byte size (should_split), so allocated is the rounded requests."""
    a = CachingAllocator(expandable=True)
    a.malloc(21 * MiB + MiB // 2)  # the default allocator books 22 MiB in a 22 MiB segment
    assert (a.allocated_bytes, a.reserved_bytes) == (21 * MiB + MiB // 2, 40 * MiB)
    a.malloc(3 * MiB)  # the 18.5 MiB left in the mapped pages hold it
    a.malloc(1000)
    assert a.reserved_bytes == 42 * MiB and a.allocated_bytes == 24 * MiB + MiB // 2 + 1024
    a.malloc(30 * MiB)  # 15.5 MiB free at the end of the mapped range: only the shortfall is mapped, one page
    assert a.segments("default") == [(False, 60 * MiB), (True, 2 * MiB)]
    a.malloc(5 * MiB, "side")
    assert a.segments("side") == [(False, 20 * MiB)] and a.reserved_bytes == 82 * MiB
    b = CachingAllocator(expandable=True)
    b.malloc(19 * MiB + MiB // 2)  # 0.5 MiB left in the page: split all the same (default: the whole 20 MiB block)
    assert (b.allocated_bytes, b.reserved_bytes) == (19 * MiB + MiB // 2, 20 * MiB)
    assert b.malloc(MiB // 2 + 512).segment.pool == ("default", True)  # a small request: the small pool's page
    default = CachingAllocator()
    for n in (21 * MiB + MiB // 2, 3 * MiB, 1000, 30 * MiB):
        default.malloc(n)
    assert default.reserved_bytes == (22 + 20 + 2 + 30) * MiB and default.allocated_bytes == items.booked(
        [21 * MiB + MiB // 2, 3 * MiB, 1000, 30 * MiB])


def test_free_mapped_space_is_reused_and_the_growable_tail_is_kept():
    """get_free_block: best fit among the free mapped blocks, but one followed by unmapped space counts as that much
    larger, so a larger free block inside the mapped range is taken first; freed blocks merge with free neighbours."""
    a = CachingAllocator(expandable=True)
    x, y, z = a.malloc(4 * MiB), a.malloc(8 * MiB), a.malloc(2 * MiB)  # 6 MiB free at the end of the 20 MiB page
    a.free(y)
    taken = a.malloc(5 * MiB)  # the 6 MiB tail would be the tighter fit; the 8 MiB hole at 4 MiB is taken
    assert taken.offset == 4 * MiB and a.reserved_bytes == 20 * MiB
    assert a.malloc(6 * MiB).offset == 14 * MiB and a.reserved_bytes == 20 * MiB  # the tail, when nothing else fits
    a.free(x), a.free(taken)
    assert a.malloc(9 * MiB).offset == 0 and a.reserved_bytes == 20 * MiB  # 4 + 5 MiB merged, 3 MiB still free
    a.free(z)


def test_empty_cache_unmaps_only_whole_free_pages_and_the_lowest_gap_is_mapped_again():
    """release_cached_blocks -> unmap_block: every free block gives back the whole pages inside it, also in a
    segment that still holds a tensor; the partial pages stay mapped and free. A wholly unmapped segment is released.
    The next growth maps the lowest-addressed unmapped range with room (find_expandable_block), merged with the free
    block after it."""
    a = CachingAllocator(expandable=True)
    x = a.malloc(30 * MiB)           # pages [0, 40)
    y = a.malloc(5 * MiB)            # [30, 35): the second page keeps a tensor
    a.free(x)
    a.empty_cache()                  # [0, 20) unmapped; [20, 30) and [35, 40) partial, kept
    assert (a.reserved_bytes, a.allocated_bytes) == (20 * MiB, 5 * MiB)
    again = a.malloc(15 * MiB)       # the gap at 0 (20 MiB) with the free [20, 30) after it: one page mapped
    assert again.offset == 0 and a.reserved_bytes == 40 * MiB
    a.free(again), a.free(y)
    a.empty_cache()
    assert a.reserved_bytes == 0 and a.segments("default") == []
    default = CachingAllocator()  # the default allocator returns whole free segments only
    x, y = default.malloc(30 * MiB), default.malloc(5 * MiB)
    default.free(x)
    default.empty_cache()
    assert default.reserved_bytes == 20 * MiB and default.segment_bytes("default") == 20 * MiB


def test_a_live_graph_pool_is_separate_and_keeps_its_pages():
    """A CUDA graph's private pool has segments of its own (expandable too, as the H200 probe's snapshot shows) and
    release_cached_blocks leaves a live graph's pool alone."""
    a = CachingAllocator(expandable=True)
    t = a.malloc(3 * MiB)
    g = a.malloc(3 * MiB, ("graph", 0))
    assert a.segments("default") == [(False, 20 * MiB)] and a.segments(("graph", 0)) == [(False, 20 * MiB)]
    a.free(t), a.free(g)
    a.empty_cache(keep=(("graph", 0),))
    assert a.segment_bytes("default") == 0 and a.segment_bytes(("graph", 0)) == 20 * MiB
    a.empty_cache()
    assert a.reserved_bytes == 0


def test_the_default_allocator_is_the_one_without_expandable_segments():
    sizes = [100_000, 21 * MiB + MiB // 2, 12 * MiB + MiB // 2, MiB + MiB // 16, 3 * MiB, 2 * MiB]
    counters = []
    for alloc in (CachingAllocator(), CachingAllocator(expandable=False)):
        blocks = [alloc.malloc(n) for n in sizes]
        alloc.free(blocks[2])
        alloc.empty_cache()
        counters.append((alloc.allocated_bytes, alloc.reserved_bytes, alloc.peak_reserved_bytes))
    assert counters[0] == counters[1]


# --- the measured runs ------------------------------------------------------------------------------------------

def _runs() -> list[dict]:
    out = []
    for name in RUNS:
        out += [json.loads(line) for line in (ROOT / name).read_text().splitlines() if line.startswith("{")]
    return [r for r in out if not r.get("error")]


def _planned(run: dict) -> tuple[Plan, dict]:
    """(plan, measured peaks) of a run as it ran: a fresh process, random weights, today's trainer."""
    if "config" in run:  # bench/reserved_probe.py
        model, seq, batch, rank, targets, optimizer = run["config"]
        st = Settings(seq_len=seq, batch_size=batch, rank=rank, targets=targets, optimizer=optimizer,
                      expandable_segments=run["alloc"] == "expandable")
        return plan(known_shape(model), st, Process(random_weights=True)), run["peaks"]
    return plan_for_record(run), run["measured"]


def test_the_runs_with_expandable_segments_are_planned_within_5_percent():
    """Allocated, reserved and NVML of each run, with expandable segments and without, within 5%. Measured on the
    H200 (Llama-2-7B s2048 r16 qkvo): expandable segments cut reserved from 5.20 to 4.75 GiB; planned 5.20 -> 4.68."""
    runs = _runs()
    expandable = [r for r in runs if r.get("alloc") == "expandable" or r.get("settings", {}).get("expandable_segments")]
    assert expandable and len(runs) > len(expandable)
    for run in runs:
        p, m = _planned(run)
        assert p.settings.expandable_segments == (run in expandable)
        for planned, key in ((p.peak_allocated_bytes, "peak_allocated_bytes"),
                             (p.peak_reserved_bytes, "peak_reserved_bytes"), (p.peak_nvml_bytes, "nvml_used_bytes")):
            assert abs(planned - m[key]) / m[key] < 0.05, (run.get("id") or run["alloc"], key, planned, m[key])
    by_alloc = {r["alloc"]: _planned(r) for r in runs if "alloc" in r and r["config"][0] == "llama-2-7b"}
    (default, measured_default), (exp, measured_exp) = by_alloc["default"], by_alloc["expandable"]
    measured_cut = measured_default["peak_reserved_bytes"] - measured_exp["peak_reserved_bytes"]
    planned_cut = default.peak_reserved_bytes - exp.peak_reserved_bytes
    assert abs(planned_cut - measured_cut) < 0.3 * measured_cut, (planned_cut, measured_cut)
    # no unsplit large blocks with expandable segments: the rounding row goes, and the measured allocated peak falls
    # by about as much (49 of its 48 MiB)
    rounding = [r.bytes for r in default.rows if r.name.startswith("allocator rounding")]
    assert rounding and not any(r.name.startswith("allocator rounding") for r in exp.rows)
    fall = measured_default["peak_allocated_bytes"] - measured_exp["peak_allocated_bytes"]
    assert abs(fall - rounding[0]) < 4 * MiB, (fall, rounding)


def test_the_graph_pool_and_the_side_stream_replay_as_the_snapshot_shows():
    """bench/reserved_probe.py's segments per pool at the end of the run: the CUDA graph's private pool and the
    warm-up stream's pool do not change after the capture (the final held-out pass runs on the default stream),
    so the replay's reserved bytes per pool after the steps meet them: the graph pool within 6% (the expandable
    one, whole 20 MiB pages: to the byte for llama-2-7b s2048; -5.0% for llama-3-8b s8192 all-linear, whose peak
    counters still plan within 2.1% — the pool is one term of them, measured after the pool-level test was
    written), the expandable side stream's too (80 of 82 MiB: a 2 MiB small-pool page with a live tensor is not
    replayed; llama-3-8b s8192: one page more than measured). The default allocator's side stream is replayed at 118 MiB where the snapshot has 78 (three
    segments): not checked here."""
    checked = 0
    for run in _runs():
        if "segments" not in run:
            continue
        p, _ = _planned(run)
        pools = dict(replay(p.shape, p.settings, Process(random_weights=True)).pool_bytes)
        side = [g for g in run["segments"] if g["pool"] == "default" and g["stream"] != 0]
        graph = [g for g in run["segments"] if g["pool"].startswith("graph")]
        assert len(side) == len(graph) == 1
        assert all(g["expandable"] == p.settings.expandable_segments for g in run["segments"])
        pairs = [(pools[("graph", 0)], graph[0]["bytes"])]
        pairs += [(pools[("side", 0)], side[0]["bytes"])] if p.settings.expandable_segments else []
        for planned, measured in pairs:
            # or within one 20 MiB page: the side stream's pool is a few pages (llama-3-8b s8192: 6 planned, 5 + a
            # small one measured)
            assert abs(planned - measured) < max(0.06 * measured, 20 * MiB), (run["alloc"], planned, measured)
        if p.settings.expandable_segments:
            # whole pages, 20 MiB and 2 MiB ones, on both sides (how many small pages: 2 both for llama-2-7b; the
            # s8192 run maps other small pages than replayed)
            assert pools[("graph", 0)] % (2 * MiB) == 0 and graph[0]["bytes"] % (2 * MiB) == 0
            if run["config"][0] == "llama-2-7b":
                assert pools[("graph", 0)] == graph[0]["bytes"]
        checked += 1
    assert checked >= 2


def test_records_made_before_the_setting_read_as_the_default_allocator():
    """Every record of data/memory and bench/results ran with the default allocator: without the field it reads
    False; a record that says True plans with expandable segments."""
    records = [r for path in sorted((ROOT / "data/memory").glob("*.json")) for r in json.loads(path.read_text())]
    records += [json.loads(line) for line in
                (ROOT / "bench/results/issue11_rows_h200_2026-12-04b.jsonl").read_text().splitlines()]
    assert len(records) > 30
    for r in records:
        assert "expandable_segments" not in r["settings"]
        assert settings_from_record(r).expandable_segments is False
    r = records[-1]
    assert plan_for_record(r).settings.expandable_segments is False
    marked = {**r, "settings": {**r["settings"], "expandable_segments": True}}
    assert plan_for_record(marked).settings.expandable_segments is True
    assert plan_for_record(marked).peak_reserved_bytes < plan_for_record(r).peak_reserved_bytes


# --- settings, CLI, other users of the replay -----------------------------------------------------------------------

def test_the_profile_decides_unless_told():
    shape = known_shape("llama-2-7b")
    resolved = {profile: Settings(profile=profile).check(shape).expandable_segments
                for profile in ("qtool", "hf", "hf-prepare", "unsloth")}
    assert resolved == {"qtool": True, "hf": False, "hf-prepare": False, "unsloth": False}
    assert Settings(device="cpu").check(shape).expandable_segments is False
    assert Settings(profile="hf", expandable_segments=True).check(shape).expandable_segments is True
    assert Settings(expandable_segments=False).check(shape).expandable_segments is False
    for bad in (Settings(profile="unsloth", expandable_segments=True), Settings(device="cpu", expandable_segments=True)):
        with pytest.raises(UsageError, match="expandable"):
            bad.check(shape)
    # hf with expandable segments replays the same step through the expandable allocator
    hf, hf_exp = plan(shape, Settings(profile="hf")), plan(shape, Settings(profile="hf", expandable_segments=True))
    assert hf_exp.peak_reserved_bytes < hf.peak_reserved_bytes


def test_cli_flag_and_json():
    def planned(*args):
        result = CliRunner().invoke(main, ["plan", "llama-2-7b", "--json", *args])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    on, off, hf = planned(), planned("--no-expandable-segments"), planned("--profile", "hf")
    assert (on["settings"]["expandable_segments"], off["settings"]["expandable_segments"]) == (True, False)
    assert hf["settings"]["expandable_segments"] is False
    assert planned("--profile", "hf", "--expandable-segments")["settings"]["expandable_segments"] is True
    assert on["peak_reserved_bytes"] < off["peak_reserved_bytes"] and on["peak_nvml_bytes"] < off["peak_nvml_bytes"]
    assert planned("--allocator-cap", "6GiB")["settings"]["expandable_segments"] is True  # the profile's, as measured
    text = CliRunner().invoke(main, ["plan", "llama-2-7b"]).output
    assert "expandable segments" in text.splitlines()[0]
    assert "expandable segments" not in CliRunner().invoke(main, ["plan", "llama-2-7b", "--no-expandable-segments"]
                                                           ).output.splitlines()[0]
    help_text = " ".join(CliRunner().invoke(main, ["plan", "--help"]).output.split())
    assert "PYTORCH_CUDA_ALLOC_CONF" in help_text and "qtool train sets it" in help_text
    bad = CliRunner().invoke(main, ["plan", "llama-2-7b", "--profile", "unsloth", "--expandable-segments"])
    assert bad.exit_code != 0 and "expandable" in bad.output


def test_cap_and_fit_with_expandable_segments():
    """The cap verdicts plan the profile's allocator (qtool on CUDA: expandable segments, as qtool train and
    bench/paged_oom.py run) unless told; the reserved difference between the unpaged and the paged plan is still the
    state that paging moves out, within one 20 MiB page. The --fit search runs with the expandable replay, and finds
    a longer sequence than without."""
    shape = known_shape("llama-3.2-1b")
    st = Settings(rank=512, targets="all-linear", seq_len=128)
    assert all(p.settings.expandable_segments is True for p in cap.plans(shape, st).values())
    assert all(p.settings.expandable_segments is False
               for p in cap.plans(shape, replace(st, expandable_segments=False)).values())
    unpaged, paged = cap.check_cap(shape, st, 1)
    moved = unpaged.device_optimizer_bytes
    assert abs(unpaged.peak_reserved_bytes - paged.peak_reserved_bytes - moved) < 20 * MiB
    from qtool.plan.fit import largest_fitting

    shape = known_shape("llama-2-7b")
    on, off = (largest_fitting(shape, Settings(expandable_segments=e), 16 * 2**30) for e in (True, False))
    assert on.value >= off.value and on.plan.settings.expandable_segments and not off.plan.settings.expandable_segments


def test_replay_of_the_probe_process_keeps_the_trainer():
    shape = known_shape("llama-2-7b")
    st = Settings(expandable_segments=True).check(shape)
    run = replay(shape, st, Process(random_weights=True))
    assert Process().trainer == TRAINER and run.peak_reserved_bytes >= run.sampled_reserved_bytes
    assert run.resident_slack_bytes < 64 * MiB  # only partial pages survive the capture's empty_cache

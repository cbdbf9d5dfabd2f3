"""qtool.train.allocator: expandable segments unless PYTORCH_CUDA_ALLOC_CONF says otherwise."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from qtool.train import allocator


@pytest.mark.parametrize("conf, expected", [
    (None, None),
    ("", False),
    ("max_split_size_mb:128", False),
    ("expandable_segments:True", True),
    ("expandable_segments:true", True),
    ("max_split_size_mb:64,expandable_segments:True", True),
    ("expandable_segments:False", False),
    ("garbage_collection_threshold:0.6, expandable_segments : True", True),
])
def test_user_setting_reads_the_environment(monkeypatch, conf, expected):
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    if conf is None:
        monkeypatch.delenv(allocator.ENV, raising=False)
    else:
        monkeypatch.setenv(allocator.ENV, conf)
    assert allocator.user_setting() is expected


def _no_user_setting(monkeypatch):
    for name in allocator.ENVS:
        monkeypatch.delenv(name, raising=False)


def test_the_device_neutral_variable_comes_first(monkeypatch):
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    monkeypatch.setenv(allocator.ENV, "expandable_segments:False")
    assert allocator.user_setting() is True
    monkeypatch.delenv("PYTORCH_ALLOC_CONF")
    assert allocator.user_setting() is False


def test_cpu_runs_set_nothing(monkeypatch):
    _no_user_setting(monkeypatch)
    called = []
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", lambda s: called.append(s), raising=False)
    assert allocator.set_up(torch.device("cpu"), True) is False and not called


def test_cuda_run_sets_the_mode_unless_the_user_chose(monkeypatch):
    called = []
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", lambda s: called.append(s), raising=False)
    _no_user_setting(monkeypatch)
    assert allocator.set_up(torch.device("cuda"), True) is True
    assert allocator.set_up(torch.device("cuda", 1), False) is False
    assert called == ["expandable_segments:True", "expandable_segments:False"]
    monkeypatch.setenv(allocator.ENV, "expandable_segments:False")
    assert allocator.set_up(torch.device("cuda"), True) is False and len(called) == 2  # left alone


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_segments_made_after_set_up_are_expandable():
    """In a fresh process (the setting is process-wide): a tensor allocated after set_up sits in an expandable
    segment, per the allocator's own snapshot."""
    code = ("import torch; from qtool.train.allocator import set_up; assert set_up(torch.device('cuda'), True); "
            "x = torch.empty(64 * 2**20, dtype=torch.uint8, device='cuda'); "
            "segs = torch.cuda.memory._snapshot()['segments']; "
            "print(all(s.get('is_expandable') for s in segs), len(segs))")
    env = {k: v for k, v in __import__("os").environ.items() if k not in allocator.ENVS}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0] == "True", out.stdout

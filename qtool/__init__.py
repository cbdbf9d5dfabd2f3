"""qtool: QLoRA toolkit — NF4 converter, memory planner, minimal trainer, LoRA merge.

Importing ``qtool`` is cheap: nothing here imports torch. The public functions are loaded on first use.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> module that defines it; resolved lazily so that `qtool plan` never pays for torch.
_API = {
    "QtoolError": "qtool.errors",
    "quantize": "qtool.nf4.codec",
    "dequantize": "qtool.nf4.codec",
    "QuantizedWeight": "qtool.nf4.codec",
    "convert": "qtool.convert.pipeline",
    "verify": "qtool.convert.verify",
    "plan": "qtool.plan.planner",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'qtool' has no attribute {name!r}")

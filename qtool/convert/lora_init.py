"""The converter's half of the initialisations that change the base (``qtool convert --lora-init pissa|loftq``).

PiSSA and LoftQ need the 16-bit weights: for each targeted Linear they split W into an initial adapter ``s·B·A`` and
a residual ``W_res``, and it is ``W_res`` that is quantised to NF4 and stored as the base. The initial adapter is
written beside the base as a PEFT LoRA adapter (``qtool_lora_init/``), from which ``qtool train --init pissa|loftq``
starts; transformers + PEFT load the pair as they are (NF4 base + ``PeftModel.from_pretrained``).

Each targeted tensor gets, beside the usual check of its stored NF4 (against ``W_res``, the tensor it quantises),
the error of the initial model ``deq(NF4(W_res)) + s·B·A`` against W and, for comparison, plain NF4's ``deq(NF4(W))``
against W — the number these initialisations exist to lower (LoftQ) or trade (PiSSA).
"""
from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qtool.adapters.init import loftq_init, pissa_init
from qtool.adapters.spec import CONVERTER_INITS, AdapterSpec
from qtool.arch import Shape
from qtool.errors import UsageError
from qtool.nf4 import codec as nf4
from qtool.train.settings import SUPPORTED as TRAINER_TYPES  # what can train from the init



@dataclass(frozen=True)
class InitCheck:
    """One targeted weight: relative Frobenius errors against the 16-bit W."""

    name: str
    rank: int
    init_rel_error: float  # ||W - deq(NF4(W_res)) - s·B·A|| / ||W||: the initial model
    nf4_rel_error: float  # ||W - deq(NF4(W))|| / ||W||: plain QLoRA's base, for comparison


class LoraInit:
    """Splits each targeted weight into NF4 residual + initial adapter, thread-safely collecting the factors."""

    def __init__(self, spec: AdapterSpec, shape: Shape):
        problems = spec.problems(shape)
        if spec.init not in CONVERTER_INITS:
            problems.append(f"--lora-init {spec.init!r} is not one of {', '.join(CONVERTER_INITS)} (zero and "
                            "symmetric need no converter: pass --init to qtool train)")
        if shape.model_type not in TRAINER_TYPES:
            problems.append(f"--lora-init: {shape.model_type} is not a model qtool train supports "
                            f"({', '.join(TRAINER_TYPES)})")
        if problems:
            raise UsageError(problems)
        self.spec, self.shape = spec, shape
        ranks = spec.module_ranks(shape)
        self._targets = {f"{shape.module_path(i, n)}.weight": (shape.module_path(i, n), n, r)
                         for i in range(shape.n_layers) for n, r in ranks.items()}
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.checks: dict[str, InitCheck] = {}
        self._lock = threading.Lock()

    @property
    def keys(self) -> list[str]:
        """The checkpoint keys of the targeted weights."""
        return list(self._targets)

    def wants(self, key: str) -> bool:
        return key in self._targets

    def quantize(self, key: str, w: torch.Tensor, blocksize: int, double_quant: bool, target: str):
        """``(qw, w_res)``: the NF4 residual to store and the residual in ``w``'s dtype (what ``qw`` quantises)."""
        path, name, rank = self._targets[key]
        scale = self.spec.scale_of(name, rank)

        def quantize_res(res: torch.Tensor):
            qw = nf4.quantize(res.to(w.dtype), blocksize, double_quant, target, name=key)
            return qw, nf4.dequantize(qw, torch.float32)

        w32 = w.float()
        if self.spec.init == "pissa":
            a, b, w_res = pissa_init(w32, rank, scale, name=key)
            qw, deq = quantize_res(w_res)
        else:
            a, b, qw, w_res = loftq_init(w32, rank, scale, quantize_res, self.spec.loftq_iter, name=key)
            deq = nf4.dequantize(qw, torch.float32)
        norm = w32.norm()
        init_err = (w32 - deq - scale * (b @ a)).norm() / norm
        plain_err = (w32 - quantize_res(w32)[1]).norm() / norm
        with self._lock:
            self.factors[path] = (a.contiguous(), b.contiguous())
            self.checks[key] = InitCheck(key, rank, float(init_err), float(plain_err))
        return qw, w_res.to(w.dtype)

    def report(self) -> dict:
        checks = [self.checks[k] for k in sorted(self.checks)]
        mean = lambda f: sum(getattr(c, f) for c in checks) / max(1, len(checks))  # noqa: E731
        return {"spec": self.spec.to_json(), "mean_init_rel_error": mean("init_rel_error"),
                "mean_nf4_rel_error": mean("nf4_rel_error"), "tensors": [asdict(c) for c in checks]}

    def write(self, stage: Path, shards: dict[str, dict]) -> Path:
        """The initial adapter in ``stage/qtool_lora_init`` (PEFT format + qtool_adapter.json naming the residual
        base by its shards' sha256, as ``shards`` maps them)."""
        import json

        from qtool.format.adapter_meta import INIT_ADAPTER_DIR, QTOOL_META_NAME
        from qtool.format.peft_adapter import save_adapter

        spec = self.spec
        names = sorted({path.rsplit(".", 1)[-1] for path in self.factors})
        ranks = spec.module_ranks(self.shape)
        meta = {"spec": spec.to_json(), "base": {"shards_sha256": {n: s["sha256"] for n, s in shards.items()}},
                "peft_export": f"{spec.init} initial adapter; the base folder holds the NF4 residual"}
        return save_adapter(stage / INIT_ADAPTER_DIR, self.factors, rank=spec.rank, alpha=spec.alpha,
                            target_modules=names, rank_pattern={n: r for n, r in ranks.items() if r != spec.rank},
                            alpha_pattern={n: a for n, a in spec.alpha_pattern}, use_rslora=spec.use_rslora,
                            dropout=spec.dropout, extra_files={QTOOL_META_NAME: json.dumps(meta, indent=1)})

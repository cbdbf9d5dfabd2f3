"""What an adapter is, without torch: the method, where it goes, its per-module rank and alpha, how it starts.

One :class:`AdapterSpec` is shared by the trainer (which modules it builds), the planner (which bytes they cost) and
the adapter writer (what ``adapter_config.json`` says), so the three cannot disagree about a rank or a target.

Targets are given as presets and module names, comma-separated, each optionally ``=rank``; later items win::

    qkvo                      q_proj, k_proj, v_proj, o_proj at --rank
    all-linear,down_proj=64   every Linear of a layer at --rank, down_proj at 64
    q_proj=8,v_proj=32        two modules with their own ranks

Initialisations (``init``), and what the model is at step 0:

* ``zero`` — A Kaiming-uniform (PEFT's default), B = 0: the base model exactly; only B gets a gradient at step 0.
* ``symmetric`` — A and B both drawn from A's distribution, and the frozen offset ``-s·B0·A0`` carried in the bypass
  so that the model is still the base model exactly; both factors get a gradient from the first step. Exported to
  PEFT as a rank-2r LoRA ``[B | -B0] @ [A ; A0]``.
* ``pissa`` — A, B from the top-r singular triplets of the 16-bit W; the base is the residual ``W - s·B·A``, quantised
  to NF4 by ``qtool convert --lora-init pissa`` (QPiSSA). Step 0 is NF4(W_res) + s·B·A.
* ``loftq`` — alternate NF4 quantisation of ``W - s·B·A`` and a rank-r SVD of what the quantisation lost, T times
  (``loftq_iter``); also made by the converter. Step 0 is NF4(W_res) + s·B·A, closer to W than NF4(W).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from qtool.errors import UsageError

if TYPE_CHECKING:
    from qtool.arch import Linear, Shape

METHODS = ("lora",)
INITS = ("zero", "symmetric", "pissa", "loftq")
CONVERTER_INITS = ("pissa", "loftq")  # they need the 16-bit weights: made by `qtool convert --lora-init`
PRESETS = {"qkvo": ("attn",), "mlp": ("mlp",), "all-linear": ("attn", "mlp")}
PRESET_ALIASES = {"all": "all-linear", "attn": "qkvo"}
DEFAULT_TARGETS = "qkvo"
_TARGETS_HINT = "use qkvo, mlp, all-linear or module names, each optionally =RANK (e.g. q_proj=8,v_proj=32)"


@dataclass(frozen=True)
class AdapterSpec:
    """A LoRA adapter's description. ``targets`` is the spec string above; per-module ranks and alphas come from it
    and from ``alpha_pattern`` (module name -> alpha). The scaling of a module is ``alpha / rank`` (rsLoRA:
    ``alpha / sqrt(rank)``), as in PEFT."""

    targets: str = DEFAULT_TARGETS
    rank: int = 16
    alpha: float = 32.0
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    init: str = "zero"
    dropout: float = 0.0
    use_rslora: bool = False
    method: str = "lora"
    loftq_iter: int = 1

    # --- per module
    def module_ranks(self, shape: Shape) -> dict[str, int]:
        """``{module name within a layer: rank}`` for the adapted Linears of ``shape`` (names as in
        :meth:`qtool.arch.Shape.linears`), in forward order. Raises UsageError on an unknown name or a malformed
        rank (:meth:`target_problems` lists them without raising)."""
        ranks, problems = _parse_targets(self.targets, self.rank, shape)
        if problems:
            raise UsageError(list(problems), hint=_TARGETS_HINT)
        return dict(ranks)

    def target_problems(self, shape: Shape) -> list[str]:
        """What is wrong with ``targets`` for ``shape``: unknown names, malformed ranks, ranks beyond a module."""
        ranks, problems = _parse_targets(self.targets, self.rank, shape)
        if not ranks and not problems:
            return [f"--targets {self.targets!r} selects no module"]
        linears = {lin.name: lin for lin in shape.linears()}
        return list(problems) + [f"rank {r} of {name} exceeds min(in, out) = min({linears[name].n_in}, {linears[name].n_out}) = "
                f"{min(linears[name].n_in, linears[name].n_out)}; a LoRA of that rank is not low-rank"
                for name, r in ranks if r > min(linears[name].n_in, linears[name].n_out)]

    def alpha_of(self, name: str) -> float:
        return dict(self.alpha_pattern).get(name, self.alpha)

    def scale_of(self, name: str, rank: int) -> float:
        """The bypass multiplier of module ``name`` at ``rank`` (PEFT ``LoraLayer.update_layer``)."""
        alpha = self.alpha_of(name)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def adapted(self, shape: Shape) -> list[tuple[Linear, int]]:
        """The adapted Linears of one layer with their ranks, in forward order."""
        ranks = self.module_ranks(shape)
        return [(lin, ranks[lin.name]) for lin in shape.linears() if lin.name in ranks]

    def n_trainable(self, shape: Shape) -> int:
        """Trainable parameters of the whole model: ``r (d_in + d_out)`` per adapted Linear and layer."""
        return shape.n_layers * sum(r * (lin.n_in + lin.n_out) for lin, r in self.adapted(shape))

    # --- checks
    def problems(self, shape: Shape | None = None) -> list[str]:
        """Everything wrong with this spec (for ``shape`` when given), collected."""
        p = []
        if self.method not in METHODS:
            p.append(f"--method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.init not in INITS:
            p.append(f"--init {self.init!r} is not one of {', '.join(INITS)}")
        if not isinstance(self.rank, int) or self.rank < 1:
            p.append(f"--rank must be at least 1 (got {self.rank})")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            p.append(f"--alpha must be a positive number (got {self.alpha})")
        if not 0 <= self.dropout < 1:
            p.append(f"--dropout must be in [0, 1) (got {self.dropout})")
        if self.loftq_iter < 1:
            p.append(f"--loftq-iter must be at least 1 (got {self.loftq_iter})")
        return p + (self.target_problems(shape) if shape is not None else [])

    def checked(self, shape: Shape | None = None) -> AdapterSpec:
        problems = self.problems(shape)
        if problems:
            raise UsageError(problems)
        return self

    def with_(self, **changes) -> AdapterSpec:
        return replace(self, **changes)

    # --- serialisation (qtool's own metadata beside a PEFT adapter)
    def to_json(self) -> dict:
        return {"method": self.method, "targets": self.targets, "rank": self.rank, "alpha": self.alpha,
                "alpha_pattern": dict(self.alpha_pattern), "init": self.init, "dropout": self.dropout,
                "use_rslora": self.use_rslora, "loftq_iter": self.loftq_iter}

    @classmethod
    def from_json(cls, d: dict) -> AdapterSpec:
        return cls(targets=d["targets"], rank=int(d["rank"]), alpha=float(d["alpha"]),
                   alpha_pattern=tuple(sorted((k, float(v)) for k, v in (d.get("alpha_pattern") or {}).items())),
                   init=d.get("init", "zero"), dropout=float(d.get("dropout", 0.0)),
                   use_rslora=bool(d.get("use_rslora", False)), method=d.get("method", "lora"),
                   loftq_iter=int(d.get("loftq_iter", 1)))


@functools.lru_cache(maxsize=256)
def _parse_targets(targets: str, rank: int, shape: Shape) -> tuple[tuple[tuple[str, int], ...], tuple[str, ...]]:
    """``(((name, rank), ...) in forward order, (problem, ...))``. Cached: a plan asks many times, and a fit search
    plans the same shape dozens of times."""
    linears = shape.linears()
    known = [lin.name for lin in linears]
    ranks: dict[str, int] = {}
    problems = []
    for item in filter(None, (t.strip() for t in str(targets).split(","))):
        name, _, r = (part.strip() for part in item.partition("="))
        name = PRESET_ALIASES.get(name, name)
        if r and not (r.isdigit() and int(r) > 0):
            problems.append(f"--targets {item!r}: the rank after '=' must be a positive integer")
            continue
        value = int(r) if r else rank
        if name in PRESETS:
            ranks.update({lin.name: value for lin in linears if lin.group in PRESETS[name]})
        elif name in known:
            ranks[name] = value
        else:
            from difflib import get_close_matches  # an error path: not paid at start-up

            close = get_close_matches(name, known, n=3)
            problems.append(f"--targets: {shape.model_type} layers have no module {name!r}"
                            + (f" (did you mean {', '.join(close)}?)" if close else
                               f" (its Linears: {', '.join(known)}; presets: {', '.join(PRESETS)})"))
    return tuple((n, ranks[n]) for n in known if n in ranks), tuple(problems)

"""Putting adapters on a model: wrap the Linears that an :class:`AdapterSpec` targets, initialised as it says."""
from __future__ import annotations

import torch

from qtool.adapters.adalora import AdaLoRALinear, adalora_init
from qtool.adapters.init import symmetric_init, zero_init
from qtool.adapters.lora import LoRALinear
from qtool.adapters.spec import CONVERTER_INITS, AdapterSpec, adalora_scale
from qtool.errors import InputError

_TRAINER_INITS = {"zero": zero_init, "symmetric": symmetric_init}


def attach_adapters(model, spec: AdapterSpec, *, seed: int = 0, adapter_dtype: torch.dtype = torch.float32,
                    initial: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
                    ) -> dict[str, LoRALinear | AdaLoRALinear]:
    """Wrap every Linear of ``model`` (a :class:`qtool.train.model.Decoder`) that ``spec`` targets in a
    :class:`LoRALinear`; returns ``{module path: module}``. Factors are drawn module by module in forward order
    from one generator seeded with ``seed`` (``zero``, ``symmetric``), or taken from ``initial`` (module path ->
    ``(A, B)``) for the inits the converter made (``pissa``, ``loftq``: the base already holds the residual).
    Adapters attached before are removed first. ``spec.method == "adalora"``: :class:`AdaLoRALinear` modules at the
    initial rank instead, P and Q drawn from the same generator."""
    shape = model.shape
    spec.checked(shape)
    ranks = spec.module_ranks(shape)
    detach_adapters(model)  # a fresh set: any earlier adapter is dropped
    gen = torch.Generator().manual_seed(seed)
    attached = {}
    for path, (holder, name) in model.linears().items():
        if name not in ranks:
            continue
        base, rank = holder[name], ranks[name]
        if spec.method == "adalora":  # Q, λ = 0, P (see qtool.adapters.adalora)
            q, e, p = adalora_init(base.out_features, base.in_features, rank, gen, adapter_dtype, base.device)
            holder[name] = attached[path] = AdaLoRALinear(base, q, e, p, alpha=spec.alpha, dropout=spec.dropout,
                                                          scale=adalora_scale(spec.alpha, rank))
            continue
        if spec.init in CONVERTER_INITS:
            if initial is None or path not in initial:
                raise InputError(f"--init {spec.init}: no initial factors for {path}",
                                 hint="the folder must come from `qtool convert SRC OUT --lora-init "
                                      f"{spec.init}` with the same --rank and --targets")
            a, b = (t.to(device=base.device, dtype=adapter_dtype) for t in initial[path])
            offset = None
            if a.shape != (rank, base.in_features) or b.shape != (base.out_features, rank):
                raise InputError(f"--init {spec.init}: the initial factors of {path} have rank {a.shape[0]}, "
                                 f"--rank/--targets ask for {rank}",
                                 hint="train with the rank the folder was converted with")
        else:
            a, b, offset = _TRAINER_INITS[spec.init](base.out_features, base.in_features, rank, gen, adapter_dtype,
                                                     base.device)
        holder[name] = attached[path] = LoRALinear(base, a, b, alpha=spec.alpha_of(name), dropout=spec.dropout,
                                                   use_rslora=spec.use_rslora, offset=offset)
    model.uses_rng = spec.dropout > 0
    return attached


def detach_adapters(model) -> None:
    """Put every Linear of ``model`` back to its frozen NF4 base (the adapters and their parameters are dropped)."""
    for holder, name in model.linears().values():
        if isinstance(holder[name], (LoRALinear, AdaLoRALinear)):
            holder[name] = holder[name].base
    model.uses_rng = False

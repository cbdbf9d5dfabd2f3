"""Putting adapters on a model: wrap the Linears that an :class:`AdapterSpec` targets, initialised as it says, or add
the modules of the other methods (Houlsby adapters, a prefix); and loading a saved adapter of any of them back onto a
model for inference (:func:`load_adapter_into`)."""
from __future__ import annotations

import torch

from qtool.adapters.adalora import AdaLoRALinear, adalora_init
from qtool.adapters.init import symmetric_init, zero_init
from qtool.adapters.lora import LoRALinear
from qtool.adapters.houlsby import HoulsbyAdapter
from qtool.adapters.prefix import PrefixTuning
from qtool.adapters.spec import CONVERTER_INITS, VOCAB_PATHS, AdapterSpec, adalora_scale
from qtool.adapters.vocab import LoRAEmbedding, LoRAHead
from qtool.errors import InputError

_TRAINER_INITS = {"zero": zero_init, "symmetric": symmetric_init}


def attach_adapters(model, spec: AdapterSpec, *, seed: int = 0, adapter_dtype: torch.dtype = torch.float32,
                    initial: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                    device: torch.device | str | None = None) -> dict[str, torch.nn.Module]:
    """Wrap every Linear of ``model`` (a :class:`qtool.train.model.Decoder`) that ``spec`` targets in a
    :class:`LoRALinear`; returns ``{module path: module}``. Factors are drawn module by module in forward order
    from one generator seeded with ``seed`` (``zero``, ``symmetric``), or taken from ``initial`` (module path ->
    ``(A, B)``) for the inits the converter made (``pissa``, ``loftq``: the base already holds the residual).
    Adapters attached before are removed first. ``spec.method == "adalora"``: :class:`AdaLoRALinear` modules at the
    initial rank instead, P and Q drawn from the same generator. Houlsby adapters and a prefix are added as the
    module docstrings of :mod:`qtool.adapters.houlsby` and :mod:`qtool.adapters.prefix` say (paths
    ``model.layers.{i}.attn_adapter`` / ``mlp_adapter``, and ``prefix``). ``embed_tokens``/``lm_head`` targets get
    their LoRA after the layers' (:func:`_attach_vocab`), drawn from the same generator. ``device``: where the
    adapters' tensors are made (default: beside the weights they adapt; :mod:`qtool.train.sharded` makes them on the
    CPU beside a base on the meta device, then shards them)."""
    shape = model.shape
    device = model.embed.device if device is None else torch.device(device)
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
            q, e, p = adalora_init(base.out_features, base.in_features, rank, gen, adapter_dtype, device)
            holder[name] = attached[path] = AdaLoRALinear(base, q, e, p, alpha=spec.alpha, dropout=spec.dropout,
                                                          scale=adalora_scale(spec.alpha, rank))
            continue
        if spec.init in CONVERTER_INITS:
            if initial is None or path not in initial:
                raise InputError(f"--init {spec.init}: no initial factors for {path}",
                                 hint="the folder must come from `qtool convert SRC OUT --lora-init "
                                      f"{spec.init}` with the same --rank and --targets")
            a, b = (t.to(device=device, dtype=adapter_dtype) for t in initial[path])
            offset = None
            if a.shape != (rank, base.in_features) or b.shape != (base.out_features, rank):
                raise InputError(f"--init {spec.init}: the initial factors of {path} have rank {a.shape[0]}, "
                                 f"--rank/--targets ask for {rank}",
                                 hint="train with the rank the folder was converted with")
        else:
            a, b, offset = _TRAINER_INITS[spec.init](base.out_features, base.in_features, rank, gen, adapter_dtype,
                                                     device)
        holder[name] = attached[path] = LoRALinear(base, a, b, alpha=spec.alpha_of(name), dropout=spec.dropout,
                                                   use_rslora=spec.use_rslora, offset=offset)
    attached.update(_attach_vocab(model, spec, gen, adapter_dtype, device))
    attached.update(_attach_own_modules(model, spec, gen, adapter_dtype, device))
    model.uses_rng = spec.dropout > 0
    return attached


def _attach_vocab(model, spec: AdapterSpec, gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> dict:
    """LoRA on the embedding (A = 0, B ~ N(0, 1)) and on the head (A Kaiming-uniform, B = 0), PEFT's starts, in that
    order; on a tied model with both targeted the head shares the embedding's factors (:mod:`qtool.adapters.vocab`)."""
    shape = model.shape
    ranks, attached = spec.vocab_ranks(shape), {}
    if "embed_tokens" in ranks:
        model.embed_adapter = attached[VOCAB_PATHS["embed_tokens"]] = LoRAEmbedding.initial(
            shape.vocab, shape.hidden, ranks["embed_tokens"], gen, dtype, device, alpha=spec.alpha_of("embed_tokens"),
            use_rslora=spec.use_rslora)
    if "lm_head" in ranks:
        common = dict(alpha=spec.alpha_of("lm_head"), dropout=spec.dropout, use_rslora=spec.use_rslora)
        if spec.shares_vocab_adapter(shape):
            head = LoRAHead(tied_to=model.embed_adapter, **common)
        else:
            a, b, _ = zero_init(shape.vocab, shape.hidden, ranks["lm_head"], gen, dtype, device)
            head = LoRAHead(a, b, **common)
        model.head_adapter = attached[VOCAB_PATHS["lm_head"]] = head
    return attached


def detach_adapters(model) -> None:
    """Put every Linear of ``model`` back to its frozen NF4 base (the adapters and their parameters are dropped)."""
    for holder, name in model.linears().values():
        if isinstance(holder[name], (LoRALinear, AdaLoRALinear)):
            holder[name] = holder[name].base
    for layer in model.layers:
        layer.attn_adapter = layer.mlp_adapter = None
    model.prefix = model.embed_adapter = model.head_adapter = None
    model.uses_rng = False


def _attach_own_modules(model, spec: AdapterSpec, gen: torch.Generator, dtype: torch.dtype,
                        device: torch.device) -> dict:
    """The methods with modules of their own: two Houlsby adapters per layer (attention block, then MLP block,
    layer by layer, drawn from ``gen`` in that order), or the model's prefix."""
    shape, attached = model.shape, {}
    if spec.method == "adapter":
        for i, layer in enumerate(model.layers):
            for block in ("attn", "mlp"):
                module = HoulsbyAdapter.initial(shape.hidden, spec.adapter_size, gen, dtype, device)
                setattr(layer, f"{block}_adapter", module)
                attached[f"model.layers.{i}.{block}_adapter"] = module
    elif spec.method == "prefix":
        model.prefix = attached["prefix"] = PrefixTuning.initial(shape, spec.prefix_len, spec.prefix_projection, gen,
                                                                 dtype, device)
    return attached


def houlsby_modules(model) -> dict[str, HoulsbyAdapter]:
    """``{path: module}`` of the model's Houlsby adapters (``model.layers.{i}.attn_adapter`` / ``mlp_adapter``)."""
    return {f"model.layers.{i}.{block}_adapter": getattr(layer, f"{block}_adapter")
            for i, layer in enumerate(model.layers) for block in ("attn", "mlp")
            if getattr(layer, f"{block}_adapter") is not None}


def load_adapter_into(model, folder, *, dtype: torch.dtype = torch.float32) -> AdapterSpec:
    """Put the adapter saved in ``folder`` on ``model`` (a :class:`qtool.train.model.Decoder` of the base it was
    trained on) for inference, replacing any adapter it has: a PEFT LoRA (``qtool train --method lora`` or PEFT),
    a PEFT ``PREFIX_TUNING`` prefix (``--method prefix`` or PEFT, without reparameterisation at load time: PEFT saves
    the vectors) or qtool's Houlsby format (``--method adapter``). Returns the adapter's spec as far as the files
    tell it. Raises InputError naming the file when the folder holds none of these or does not fit the model."""
    from pathlib import Path

    from qtool.format import houlsby_adapter, peft_adapter, prefix_adapter
    from qtool.format.adapter_meta import read_qtool_meta

    folder = Path(folder)
    shape, device = model.shape, model.embed.device
    meta = read_qtool_meta(folder) if folder.is_dir() else None
    detach_adapters(model)
    if meta is not None and meta["spec"].get("method") == "adapter":
        spec, tensors = houlsby_adapter.load_houlsby(folder, shape)
        for i, layer in enumerate(model.layers):
            for block in ("attn", "mlp"):
                t = {k: v.to(device=device, dtype=dtype) for k, v in tensors[f"model.layers.{i}.{block}_adapter"].items()}
                setattr(layer, f"{block}_adapter", HoulsbyAdapter(t["down.weight"], t["down.bias"], t["up.weight"],
                                                                  t["up.bias"], houlsby_adapter.activation_of(spec)))
        return spec
    if prefix_adapter.is_prefix_folder(folder):
        prefix = prefix_adapter.load_prefix(folder, shape)
        model.prefix = PrefixTuning(shape.n_layers, shape.n_kv_heads, shape.head_dim,
                                    prefix.embeddings.to(device=device, dtype=dtype))
        return AdapterSpec(method="prefix", prefix_len=prefix.length)
    adapter = peft_adapter.load_adapter(folder)
    if adapter.fan_in_fan_out:
        raise InputError(f"{folder}: fan_in_fan_out factors are for GPT-2's Conv1D; this model has Linear layers")
    linears = model.linears()
    _check_saved_weights(folder, model, adapter.saved_weights)
    vocab = {VOCAB_PATHS[n]: n for n in VOCAB_PATHS}
    for path, f in sorted(adapter.modules.items(), key=lambda kv: kv[1].tied_to is not None):  # embeddings first
        if path in vocab:
            _load_vocab(model, folder, vocab[path], f, bool(adapter.config.get("use_rslora", False)), dtype)
            continue
        if path not in linears:
            raise InputError(f"{folder}: module {path} is not a Linear of this {shape.model_type} model",
                             hint="load the adapter onto the model it was trained on")
        if f.bias is not None:
            raise InputError(f"{folder}: {path} has a lora_B bias; qtool's LoRA layer has none",
                             hint="merge it with qtool merge, or load it with PEFT")
        holder, name = linears[path]
        base = holder[name]
        if (f.in_features, f.out_features) != (base.in_features, base.out_features):
            raise InputError(f"{folder}: {path} factors are {f.out_features}x{f.in_features}, the model's Linear is "
                             f"{base.out_features}x{base.in_features}", hint="load it onto the model it was trained on")
        holder[name] = LoRALinear(base, f.a.to(device=device, dtype=dtype), f.b.to(device=device, dtype=dtype),
                                  alpha=f.alpha, use_rslora=bool(adapter.config.get("use_rslora", False)))
    ranks = sorted({f.rank for f in adapter.modules.values()})
    return AdapterSpec(targets=",".join(sorted({p.rsplit(".", 1)[-1] for p in adapter.modules})), rank=ranks[-1])


def _load_vocab(model, folder, name: str, f, use_rslora: bool, dtype: torch.dtype) -> None:
    """Put a saved embedding or head LoRA on ``model`` (a tied head after its embedding: it shares its factors)."""
    shape, device = model.shape, model.embed.device
    want = (shape.vocab, shape.hidden) if name == "embed_tokens" else (shape.hidden, shape.vocab)
    if f.embedding != (name == "embed_tokens") or (f.in_features, f.out_features) != want:
        raise InputError(f"{folder}: the {name} factors are A {tuple(f.a.shape)} / B {tuple(f.b.shape)}; this "
                         f"model's {name} needs " + ("an embedding LoRA, A (r, vocab) and B (hidden, r)"
                                                      if name == "embed_tokens" else "A (r, hidden) and B (vocab, r)")
                         + f" with vocab {shape.vocab}, hidden {shape.hidden}",
                         hint="load the adapter onto the model it was trained on")
    a, b = (t.to(device=device, dtype=dtype) for t in (f.a, f.b))
    if name == "embed_tokens":
        model.embed_adapter = LoRAEmbedding(a, b, alpha=f.alpha, use_rslora=use_rslora)
    elif f.tied_to is not None and model.embed_adapter is not None and shape.tied_embeddings:
        model.head_adapter = LoRAHead(alpha=f.alpha, use_rslora=use_rslora, tied_to=model.embed_adapter)
    else:
        model.head_adapter = LoRAHead(a, b, alpha=f.alpha, use_rslora=use_rslora)


def _check_saved_weights(folder, model, saved: dict[str, torch.Tensor]) -> None:
    """PEFT saves the full embedding (and head) weights beside an embedding LoRA; they must be the model's own (a
    resized vocabulary or trained tokens would need them, and qtool keeps the base's)."""
    own = {"model.embed_tokens": model.embed, "lm_head": model.lm_head}
    for path, w in saved.items():
        if path not in own or tuple(w.shape) != tuple(own[path].shape) or not torch.equal(
                w.to(own[path].dtype).cpu(), own[path].cpu()):
            raise InputError(f"{folder}: the adapter carries its own {path} weights, which differ from this "
                             "model's (a resized vocabulary or trained tokens?)",
                             hint="load it with PEFT onto the model it was trained with")

"""What an adapter is, without torch: the method, where it goes, its per-module rank and alpha, how it starts.

One :class:`AdapterSpec` is shared by the trainer (which modules it builds), the planner (which bytes they cost) and
the adapter writer (what ``adapter_config.json`` says), so the three cannot disagree about a rank or a target.

Targets are given as presets and module names, comma-separated, each optionally ``=rank``; later items win::

    qkvo                      q_proj, k_proj, v_proj, o_proj at --rank
    all-linear,down_proj=64   every Linear of a layer at --rank, down_proj at 64
    q_proj=8,v_proj=32        two modules with their own ranks
    all-linear,lm_head=8      every Linear of a layer, and the output head at rank 8

Besides the Linears of the decoder layers two model-level modules take LoRA, as PEFT does it (``VOCAB_TARGETS``;
no preset includes them, like PEFT's ``all-linear``, which leaves the output layer out):

* ``embed_tokens`` — the input embedding E ``(vocab, hidden)``: A ``(r, vocab)`` is looked up like an embedding,
  B is ``(hidden, r)``; ``x_t = E[t] + s · Aᵀ[t] Bᵀ``. A starts at zero and B Gaussian (PEFT
  ``LoraLayer.reset_lora_parameters``), so step 0 is the base. Merged: ``E' = E + s · (B A)ᵀ``.
* ``lm_head`` — a Linear LoRA on the frozen 16-bit head W ``(vocab, hidden)``: logits ``h Wᵀ + s (h Aᵀ) Bᵀ``, inside
  the chunked loss (:mod:`qtool.train.loss`), A Kaiming-uniform and B = 0.
* On a model with tied embeddings (``W = E``), ``embed_tokens`` and ``lm_head`` together are ONE shared adapter, as
  PEFT's ``ensure_weight_tying=True`` makes it: the head's factors are the embedding's transposed (A_head = B_embᵀ,
  B_head = A_embᵀ), so both modules see the same ``E + s (B A)ᵀ`` and a merge keeps the tie. Alone, either one is
  an adapter of that side only (a merge then unties the two).

Initialisations (``init``), and what the model is at step 0:

* ``zero`` — A Kaiming-uniform (PEFT's default), B = 0: the base model exactly; only B gets a gradient at step 0.
* ``symmetric`` — A and B both drawn from A's distribution, and the frozen offset ``-s·B0·A0`` carried in the bypass
  so that the model is still the base model exactly; both factors get a gradient from the first step. Exported to
  PEFT as a rank-2r LoRA ``[B | -B0] @ [A ; A0]``.
* ``pissa`` — A, B from the top-r singular triplets of the 16-bit W; the base is the residual ``W - s·B·A``, quantised
  to NF4 by ``qtool convert --lora-init pissa`` (QPiSSA). Step 0 is NF4(W_res) + s·B·A.
* ``loftq`` — alternate NF4 quantisation of ``W - s·B·A`` and a rank-r SVD of what the quantisation lost, T times
  (``loftq_iter``); also made by the converter. Step 0 is NF4(W_res) + s·B·A, closer to W than NF4(W).

AdaLoRA (``method="adalora"``, :class:`AdaLoRASchedule`): every adapted module starts at ``rank`` (= init_r) and the
rank budget is shrunk during training to ``target_rank`` per module on average (Zhang et al. 2023; see
:mod:`qtool.adapters.adalora`). Its own initialisation (λ = 0, P and Q Gaussian) makes step 0 the base model.
Methods that add modules of their own instead of a bypass of chosen Linears (``UNTARGETED_METHODS``; targets, rank,
alpha, init, rslora and dropout do not apply to them):

* ``adapter`` — Houlsby bottleneck adapters (:mod:`qtool.adapters.houlsby`), ``adapter_size`` m: two per layer,
  ``2·(2·h·m + h + m)`` trainable parameters per layer; the up-projection starts at zero, so step 0 is the base.
* ``prefix`` — prefix tuning (:mod:`qtool.adapters.prefix`), ``prefix_len`` l trainable key/value vectors per layer
  (``2·L·l·kv_dim``), produced during training by a reparameterisation MLP of hidden width ``prefix_projection``
  when it is not 0 (PEFT's ``prefix_projection`` / ``encoder_hidden_size``).
"""
from __future__ import annotations

import functools
import math
import struct
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

from qtool.errors import UsageError

if TYPE_CHECKING:
    from qtool.arch import Linear, Shape

METHODS = ("lora", "adalora", "adapter", "prefix")
UNTARGETED_METHODS = ("adapter", "prefix")  # their own modules, no bypass of chosen Linears
ADAPTER_ACTIVATION = "gelu"  # the non-linearity between the two products (Houlsby et al. 2019's code uses GELU)
INITS = ("zero", "symmetric", "pissa", "loftq")
CONVERTER_INITS = ("pissa", "loftq")  # they need the 16-bit weights: made by `qtool convert --lora-init`
PRESETS = {"qkvo": ("attn",), "mlp": ("mlp",), "all-linear": ("attn", "mlp")}
VOCAB_TARGETS = ("embed_tokens", "lm_head")  # model-level LoRA targets (PEFT's names), in forward order
VOCAB_PATHS = {"embed_tokens": "model.embed_tokens", "lm_head": "lm_head"}  # their paths in the Llama-family model
PRESET_ALIASES = {"all": "all-linear", "attn": "qkvo"}
DEFAULT_TARGETS = "qkvo"
# Settings that only LoRA reads (field -> flag), and those only one other method reads (field -> (method, flag)):
# given with another method they would be ignored silently, so they are reported instead (ignored_flag_problems).
LORA_FLAGS = {"targets": "--targets", "rank": "--rank", "alpha": "--alpha", "init": "--init", "dropout": "--dropout",
              "use_rslora": "--rslora"}
METHOD_FLAGS = {"adapter_size": ("adapter", "--adapter-size"), "prefix_len": ("prefix", "--prefix-len"),
                "prefix_projection": ("prefix", "--prefix-projection")}
_WHERE = {"adapter": "Houlsby adapters go after every attention and MLP block (their size: --adapter-size)",
          "prefix": "the prefix goes into every attention layer (its length: --prefix-len)"}
_TARGETS_HINT = ("use qkvo, mlp, all-linear, module names or embed_tokens/lm_head, each optionally =RANK (e.g. "
                 "q_proj=8,v_proj=32,lm_head=8)")


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter's description (LoRA unless ``method`` says otherwise). ``targets`` is the spec string above; per-module ranks and alphas come from it
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
    adalora: AdaLoRASchedule | None = None  # method "adalora": the budget schedule (None: the defaults)
    adapter_size: int = 64  # method "adapter": the bottleneck width m
    prefix_len: int = 20  # method "prefix": key/value vectors per layer
    prefix_projection: int = 0  # method "prefix": hidden width of the reparameterisation MLP while training; 0: none

    # --- per module
    def module_ranks(self, shape: Shape) -> dict[str, int]:
        """``{module name within a layer: rank}`` for the adapted Linears of ``shape`` (names as in
        :meth:`qtool.arch.Shape.linears`), in forward order; ``embed_tokens``/``lm_head`` are in
        :meth:`vocab_ranks`. Raises UsageError on an unknown name or a malformed rank (:meth:`target_problems`
        lists them without raising)."""
        if self.method in UNTARGETED_METHODS:
            return {}  # no Linear gets a bypass
        ranks, _, problems = _parse_targets(self.targets, self.rank, shape)
        if problems:
            raise UsageError(list(problems), hint=_TARGETS_HINT)
        return dict(ranks)

    def vocab_ranks(self, shape: Shape) -> dict[str, int]:
        """``{"embed_tokens": r, "lm_head": r}`` for those of the two that ``targets`` names (module docstring)."""
        if self.method in UNTARGETED_METHODS:
            return {}
        _, vocab, problems = _parse_targets(self.targets, self.rank, shape)
        if problems:
            raise UsageError(list(problems), hint=_TARGETS_HINT)
        return dict(vocab)

    def shares_vocab_adapter(self, shape: Shape) -> bool:
        """Whether ``embed_tokens`` and ``lm_head`` are one shared adapter: both targeted on a tied model."""
        return shape.tied_embeddings and len(self.vocab_ranks(shape)) == 2

    def target_problems(self, shape: Shape) -> list[str]:
        """What is wrong with ``targets`` for ``shape``: unknown names, malformed ranks, ranks beyond a module."""
        if self.method in UNTARGETED_METHODS:
            return []
        ranks, vocab, problems = _parse_targets(self.targets, self.rank, shape)
        if not ranks and not vocab and not problems:
            return [f"--targets {self.targets!r} selects no module"]
        linears = {lin.name: lin for lin in shape.linears()}
        p = list(problems) + [
            f"rank {r} of {name} exceeds min(in, out) = min({linears[name].n_in}, {linears[name].n_out}) = "
            f"{min(linears[name].n_in, linears[name].n_out)}; a LoRA of that rank is not low-rank"
            for name, r in ranks if r > min(linears[name].n_in, linears[name].n_out)]
        p += [f"rank {r} of {name} exceeds min(vocab, hidden) = {min(shape.vocab, shape.hidden)}; a LoRA of that "
              "rank is not low-rank" for name, r in vocab if r > min(shape.vocab, shape.hidden)]
        vocab = dict(vocab)
        if shape.tied_embeddings and len(vocab) == 2 and vocab["embed_tokens"] != vocab["lm_head"]:
            p.append(f"embed_tokens={vocab['embed_tokens']} and lm_head={vocab['lm_head']}: this model ties its "
                     "embeddings, so the two are one shared adapter (PEFT's ensure_weight_tying) of one rank; give "
                     "them the same rank")
        if shape.tied_embeddings and len(vocab) == 2 and self.alpha_of("embed_tokens") != self.alpha_of("lm_head"):
            p.append("alpha_pattern gives embed_tokens and lm_head different alphas; on this tied model they are "
                     "one shared adapter with one scale")
        return p

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
        """Trainable parameters of the whole model: ``r (d_in + d_out)`` per adapted Linear and layer (AdaLoRA: plus
        the r singular values, at the initial rank); for the other methods see :meth:`trainable_tensors`."""
        if self.method in UNTARGETED_METHODS:
            return sum(self.trainable_tensors(shape))
        extra = 1 if self.method == "adalora" else 0
        return (shape.n_layers * sum(r * (lin.n_in + lin.n_out + extra) for lin, r in self.adapted(shape))
                + sum(self.vocab_tensors(shape)))

    def trainable_tensors(self, shape: Shape) -> list[int]:
        """Element counts of every trainable tensor, in the order they are made. LoRA: A (r x in) and B (out x r)
        per adapted Linear per layer. Adapter: per layer and block (attention, MLP) down (m x h), its bias (m), up
        (h x m), its bias (h) — Houlsby §2.1's ``2hm + h + m`` per adapter. Prefix: without reparameterisation one
        (l x 2·L·kv) tensor; with it PEFT's ``PrefixEncoder``: an (l x kv) embedding and the MLP
        kv -> p -> 2·L·kv with biases (peft tuners/prefix_tuning/model.py; tests compare with PEFT's count)."""
        if self.method == "adapter":
            h, m = shape.hidden, self.adapter_size
            return [m * h, m, h * m, h] * 2 * shape.n_layers
        if self.method == "prefix":
            out, kv, p = 2 * shape.n_layers * shape.kv_dim, shape.kv_dim, self.prefix_projection
            if not p:
                return [self.prefix_len * out]
            return [self.prefix_len * kv, p * kv, p, out * p, out]
        if self.method == "adalora":  # P (r x in), λ (r), Q (out x r) at the initial rank
            return [n for lin, r in self.adapted(shape) for n in (r * lin.n_in, r, lin.n_out * r)] * shape.n_layers
        return ([n for lin, r in self.adapted(shape) for n in (r * lin.n_in, lin.n_out * r)] * shape.n_layers
                + self.vocab_tensors(shape))

    def vocab_tensors(self, shape: Shape) -> list[int]:
        """Element counts of the ``embed_tokens``/``lm_head`` factors, made after the layers': the embedding's A
        (r x vocab) and B (hidden x r), the head's A (r x hidden) and B (vocab x r); a shared adapter (tied model,
        both targeted) once."""
        vocab = self.vocab_ranks(shape)
        v, h = shape.vocab, shape.hidden
        if self.shares_vocab_adapter(shape):
            return [vocab["embed_tokens"] * v, h * vocab["embed_tokens"]]
        return [n for name, r in vocab.items() for n in ((r * v, h * r) if name == "embed_tokens" else (r * h, v * r))]

    def n_stored(self, shape: Shape) -> int:
        """Parameters the saved adapter holds for inference: the trained ones, except that a prefix trained through
        the reparameterisation MLP keeps only its output, the key/value vectors (``2·L·l·kv``), as PEFT saves it."""
        if self.method == "prefix":
            return 2 * shape.n_layers * self.prefix_len * shape.kv_dim
        return self.n_trainable(shape)

    def describe(self) -> str:
        """The adapter in a few words, for table headers."""
        if self.method == "adapter":
            return f"Houlsby adapters, size {self.adapter_size}"
        if self.method == "prefix":
            return f"prefix of {self.prefix_len}" + (f" (trained through an MLP of {self.prefix_projection})"
                                                      if self.prefix_projection else "")
        if self.method == "adalora":
            return f"AdaLoRA rank {self.rank} -> {(self.adalora or AdaLoRASchedule()).target_rank} on {self.targets}"
        return f"LoRA rank {self.rank} on {self.targets}"

    # --- checks
    def problems(self, shape: Shape | None = None) -> list[str]:
        """Everything wrong with this spec (for ``shape`` when given), collected."""
        p = []
        if self.method not in METHODS:
            p.append(f"--method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.init not in INITS:
            p.append(f"--init {self.init!r} is not one of {', '.join(INITS)}")
        if not isinstance(self.rank, int) or self.rank < 1:
            p.append(f"--{'init-' if self.method == 'adalora' else ''}rank must be at least 1 (got {self.rank})")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            p.append(f"--alpha must be a positive number (got {self.alpha})")
        if not 0 <= self.dropout < 1:
            p.append(f"--dropout must be in [0, 1) (got {self.dropout})")
        if self.loftq_iter < 1:
            p.append(f"--loftq-iter must be at least 1 (got {self.loftq_iter})")
        p += self.adalora_problems()
        p += self.method_problems(shape)
        vocab = vocab_names(self.targets) if self.method == "lora" else []
        if vocab and self.init != "zero":
            p.append(f"--init {self.init} with --targets {', '.join(vocab)}: the embedding and head adapters start as "
                     "PEFT starts them (the zero init: step 0 is the base); " + (
                         "the converter's initial adapter covers the decoder layers only" if self.init in
                         CONVERTER_INITS else "the symmetric offset is implemented for the layers' Linears only")
                     + f"; use --init zero or drop {', '.join(vocab)}")
        return p + (self.target_problems(shape) if shape is not None else [])

    def adalora_problems(self) -> list[str]:
        """What AdaLoRA cannot take from this spec (its schedule's problems included); [] for other methods."""
        if self.method != "adalora":
            return []
        p = (self.adalora or AdaLoRASchedule()).problems(self.rank)
        if self.init != "zero":
            p.append(f"--init {self.init}: AdaLoRA has its own initialisation (λ = 0, P and Q ~ N(0, 0.02²): step 0 "
                     "is the base model); leave --init out")
        if self.use_rslora:
            p.append("--rslora: AdaLoRA scales by alpha / init-rank (PEFT's AdaLoRA has no rsLoRA); leave it out")
        if "=" in str(self.targets):
            p.append(f"--targets {self.targets!r}: AdaLoRA starts every module at --init-rank and allocates the ranks "
                     "itself; give module names without =RANK")
        if self.alpha_pattern:
            p.append("alpha_pattern: AdaLoRA has one alpha for every module (PEFT's AdaLoraConfig)")
        if vocab_names(self.targets):
            p.append(f"--targets {self.targets!r}: AdaLoRA adapts Linear layers only (PEFT's AdaLoRA has no embedding "
                     f"layer, and its rank budget is for the decoder layers); drop {', '.join(vocab_names(self.targets))} "
                     "or use --method lora")
        return p

    def method_problems(self, shape: Shape | None = None) -> list[str]:
        """What is wrong with the adapter and prefix settings (for ``shape`` when given)."""
        p = []
        if self.method == "adapter" and (not isinstance(self.adapter_size, int) or self.adapter_size < 1):
            p.append(f"--adapter-size must be at least 1 (got {self.adapter_size}): the bottleneck needs a width")
        elif self.method == "adapter" and shape is not None and self.adapter_size > shape.hidden:
            p.append(f"--adapter-size {self.adapter_size} is larger than the hidden size {shape.hidden}: a "
                     f"bottleneck wider than its input is no bottleneck; use at most {shape.hidden}")
        if self.method == "prefix" and (not isinstance(self.prefix_len, int) or self.prefix_len < 1):
            p.append(f"--prefix-len must be at least 1 (got {self.prefix_len})")
        if self.method == "prefix" and (not isinstance(self.prefix_projection, int) or self.prefix_projection < 0):
            p.append(f"--prefix-projection must be 0 (none) or a hidden width (got {self.prefix_projection})")
        return p

    def checked(self, shape: Shape | None = None) -> AdapterSpec:
        problems = self.problems(shape)
        if problems:
            raise UsageError(problems)
        return self

    def with_(self, **changes) -> AdapterSpec:
        return replace(self, **changes)

    # --- serialisation (qtool's own metadata beside a PEFT adapter)
    def to_json(self) -> dict:
        d = {"method": self.method, "targets": self.targets, "rank": self.rank, "alpha": self.alpha,
             "alpha_pattern": dict(self.alpha_pattern), "init": self.init, "dropout": self.dropout,
             "use_rslora": self.use_rslora, "loftq_iter": self.loftq_iter}
        if self.adalora is not None:
            d["adalora"] = asdict(self.adalora)
        if self.method == "adapter":
            d.update(adapter_size=self.adapter_size, adapter_activation=ADAPTER_ACTIVATION)
        if self.method == "prefix":
            d.update(prefix_len=self.prefix_len, prefix_projection=self.prefix_projection)
        return d

    @classmethod
    def from_json(cls, d: dict) -> AdapterSpec:
        return cls(targets=d["targets"], rank=int(d["rank"]), alpha=float(d["alpha"]),
                   alpha_pattern=tuple(sorted((k, float(v)) for k, v in (d.get("alpha_pattern") or {}).items())),
                   init=d.get("init", "zero"), dropout=float(d.get("dropout", 0.0)),
                   use_rslora=bool(d.get("use_rslora", False)), method=d.get("method", "lora"),
                   loftq_iter=int(d.get("loftq_iter", 1)),
                   adalora=AdaLoRASchedule(**d["adalora"]) if d.get("adalora") else None,
                   adapter_size=int(d.get("adapter_size", 64)), prefix_len=int(d.get("prefix_len", 20)),
                   prefix_projection=int(d.get("prefix_projection", 0)))


def ignored_flag_problems(method: str, fields) -> list[str]:
    """One problem per flag among ``fields`` (settings field names the user set) that ``method`` ignores."""
    fields = list(fields)
    p = []
    lora = [LORA_FLAGS[f] for f in LORA_FLAGS if f in fields]
    if method in UNTARGETED_METHODS and lora:
        it = "it" if len(lora) == 1 else "them"
        p.append(f"{', '.join(lora)} given with --method {method}, which ignores {it}: {_WHERE[method]}, with no "
                 f"rank, target or LoRA init; drop {it}")
    p += [f"{flag} given with --method {method}, which ignores it; it sizes --method {owner}"
          for f, (owner, flag) in METHOD_FLAGS.items() if f in fields and owner != method]
    return p


def vocab_names(targets: str) -> list[str]:
    """The ``embed_tokens``/``lm_head`` items of a targets string (no shape needed), in forward order."""
    names = {item.partition("=")[0].strip() for item in str(targets).split(",")}
    return [n for n in VOCAB_TARGETS if n in names]


@functools.lru_cache(maxsize=256)
def _parse_targets(targets: str, rank: int, shape: Shape
                   ) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, int], ...], tuple[str, ...]]:
    """``(((name, rank), ...) of the layers' Linears in forward order, ((name, rank), ...) of embed_tokens/lm_head,
    (problem, ...))``. The one parser of ``--targets``: trainer, planner and writer call it. Cached: a plan asks
    many times, and a fit search plans the same shape dozens of times."""
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
        elif name in known or name in VOCAB_TARGETS:
            ranks[name] = value
        else:
            from difflib import get_close_matches  # an error path: not paid at start-up

            close = get_close_matches(name, known + list(VOCAB_TARGETS), n=3)
            problems.append(f"--targets: {shape.model_type} models have no module {name!r}"
                            + (f" (did you mean {', '.join(close)}?)" if close else "")
                            + f"; valid: the layers' Linears {', '.join(known)}; the model's "
                              f"{', '.join(VOCAB_TARGETS)}; presets {', '.join(PRESETS)}")
    return (tuple((n, ranks[n]) for n in known if n in ranks), tuple((n, ranks[n]) for n in VOCAB_TARGETS if n in ranks),
            tuple(problems))


# ------------------------------------------------------------------------------------------------------- AdaLoRA
# PEFT's AdaLoraConfig defaults (peft 0.21.2 tuners/adalora/config.py), so that `--method adalora` alone means what
# AdaLoraConfig() means.
ADALORA_INIT_RANK = 12


@dataclass(frozen=True)
class AdaLoRASchedule:
    """AdaLoRA's rank budget over training (Zhang et al. 2023, §3.3; PEFT ``AdaLoraConfig`` names in brackets).

    The budget counts singular values (triplets) over all adapted modules: ``b(0) = init_rank · n_modules`` until
    step ``tinit``, then the cubic decrease to ``b(T) = target_rank · n_modules`` at step ``T - tfinal``, masking the
    least important every ``delta_t`` steps [deltaT]; after that the mask is fixed. ``beta1``/``beta2`` smooth the
    sensitivity and its uncertainty; ``orth_reg`` [orth_reg_weight] weighs the orthogonality regulariser.
    ``total_steps`` [total_step] is T (None for the planner, which needs no schedule)."""

    target_rank: int = 8
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg: float = 0.5
    total_steps: int | None = None

    def problems(self, init_rank: int) -> list[str]:
        p = []
        if not isinstance(self.target_rank, int) or self.target_rank < 1:
            p.append(f"--target-rank must be at least 1 (got {self.target_rank})")
        elif isinstance(init_rank, int) and self.target_rank > init_rank:
            p.append(f"--target-rank {self.target_rank} is above --init-rank {init_rank}: AdaLoRA only prunes, so "
                     "the initial rank must be at least the target (the paper starts at 1.5x the target)")
        for name in ("tinit", "tfinal"):
            if getattr(self, name) < 0:
                p.append(f"--{name} must be at least 0 (got {getattr(self, name)})")
        if self.delta_t < 1:
            p.append(f"--delta-t must be at least 1 (got {self.delta_t})")
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                p.append(f"--{name} must be in (0, 1) (got {getattr(self, name)})")
        if not (math.isfinite(self.orth_reg) and self.orth_reg >= 0):
            p.append(f"--orth-reg must be a number >= 0 (got {self.orth_reg})")
        if self.total_steps is not None and self.tinit + self.tfinal >= self.total_steps:
            p.append(f"--tinit {self.tinit} + --tfinal {self.tfinal} >= --steps {self.total_steps}: no step is left "
                     "to shrink the rank budget; lower --tinit/--tfinal or raise --steps")
        return p

    @property
    def final_step(self) -> int:
        """The 0-based step after whose optimizer step the final mask is fixed: ``T - tfinal`` (PEFT's), or the last
        step when ``tfinal`` is 0 (PEFT's loop would end one step before its final allocation)."""
        return min(self.total_steps - self.tfinal, self.total_steps - 1)

    def budget(self, step: int, init_budget: int, n_modules: int) -> tuple[int, bool]:
        """``(b(step), mask now)`` for the 0-based ``step`` (paper eq. 11; PEFT ``RankAllocator.budget_schedule``)::

            b = b(0)                                                    step <= tinit
            b = b(T) + (b(0) - b(T)) · (1 - (step - tinit)/(T - tfinal - tinit))³    (rounded down, every delta_t)
            b = b(T)                                                    step >= final_step
        """
        t_i, t_f, T = self.tinit, self.tfinal, self.total_steps
        target = self.target_rank * n_modules
        if step >= self.final_step:
            return target, True
        if step <= t_i:
            return init_budget, False
        fraction = 1 - (step - t_i) / (T - t_f - t_i)
        return int((init_budget - target) * fraction ** 3 + target), step % self.delta_t == 0


def adalora_scale(alpha: float, init_rank: int) -> float:
    """The bypass multiplier of an AdaLoRA module: ``alpha / (init_rank + 1e-5)`` with the denominator rounded to fp32,
    exactly as PEFT computes it (``scaling / (ranknum + 1e-5)``, ``ranknum`` an fp32 tensor holding init_r, kept when a
    module is pruned), so that our modules, PEFT's reload and the plain-LoRA export compute the same function."""
    ranknum = struct.unpack("f", struct.pack("f", float(init_rank)))[0]
    return alpha / struct.unpack("f", struct.pack("f", ranknum + 1e-5))[0]

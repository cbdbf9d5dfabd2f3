"""Which tensors get quantised: exactly the ones transformers + bitsandbytes turn into ``Linear4bit`` on load.

The rule is transformers' own (:func:`select`): the model class named in config.json is instantiated on the ``meta``
device (no memory, no weights), and the rule transformers applies in ``replace_with_bnb_linear`` is applied to it —
modules whose type is exactly ``nn.Linear`` (or GPT-2's ``Conv1D``, whose weight is stored transposed), minus the
modules it keeps in 16-bit: the output head / tied embeddings (``get_keys_to_not_convert``),
``_keep_in_fp32_modules``, and ``llm_int8_skip_modules``. So the answer follows the user's transformers version (v5
keeps fused MoE experts unquantised, v4 quantised them) and any architecture it supports.

Asking costs seconds (importing transformers' modelling code: 2-7 s measured), so the converter asks in a forked
child (:class:`SelectionInChild`) — except for the common architectures in ``KNOWN``, whose answer follows from the
checkpoint's keys (:func:`known_selection`): each entry is checked against :func:`select` in
tests/test_selection.py, it applies only with the transformers major version those tests ran on, and only to a
checkpoint whose every key it recognises; anything else is asked of transformers.
"""
from __future__ import annotations

import json
import os
import re
import signal
import sys
import warnings
from dataclasses import asdict, dataclass, field

from qtool import errors
from qtool.errors import InputError


@dataclass(frozen=True)
class Selection:
    """quantize: checkpoint key -> True when the stored weight is ``[in, out]`` (Conv1D) and must be transposed.
    skip_modules_config: the value to write as ``llm_int8_skip_modules`` (None = transformers' default).
    kept_linears: Linear modules left in 16-bit (for the report)."""

    quantize: dict[str, bool]
    skip_modules_config: list[str] | None
    kept_linears: list[str]
    model_class: str
    method: str = field(default="", compare=False)  # how it was decided, for the report


def _should_convert(name: str, patterns: list[str]) -> bool:
    try:  # transformers >= 5: prefix-at-module-boundary, regex or suffix match
        from transformers.quantizers.quantizers_utils import should_convert_module

        return should_convert_module(name, patterns)
    except ImportError:  # transformers 4.x: substring-with-dot or exact match
        return not any((p + "." in name) or (p == name) for p in patterns)


def _default_not_convert(model) -> list[str]:
    try:
        from transformers.quantizers.base import get_keys_to_not_convert
    except ImportError:
        from transformers.integrations.bitsandbytes import get_keys_to_not_convert
    return list(get_keys_to_not_convert(model))


def meta_model(config: dict, folder):
    """The model class of ``config`` (its ``architectures[0]``) instantiated on the meta device."""
    import torch
    import transformers

    try:
        cfg = transformers.AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, OSError) as exc:
        raise InputError(f"{folder}/config.json: transformers {transformers.__version__} cannot read it ({exc})",
                         hint="upgrade transformers, or check model_type in config.json") from exc
    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        try:
            model = cls(cfg) if cls is not None else transformers.AutoModelForCausalLM.from_config(cfg)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"{folder}: transformers cannot build {arch or config.get('model_type')!r} ({exc})",
                             hint="qtool converts architectures that your installed transformers supports") from exc
    return model


def select(config: dict, folder, keys, skip: list[str] | None = None) -> Selection:
    """Decide, for the checkpoint keys ``keys``, which are Linear weights transformers would quantise."""
    import torch.nn as nn

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = ()
    model = meta_model(config, folder)
    keep_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    defaults = _default_not_convert(model)  # the output head / tied embeddings: kept in 16-bit with or without --skip
    not_convert = list(dict.fromkeys(list(skip or []) + defaults + keep_fp32))
    keys = set(keys)
    prefix = getattr(model, "base_model_prefix", "") or ""
    quantize: dict[str, bool] = {}
    kept: list[str] = []
    missing: list[str] = []
    for name, module in model.named_modules():
        is_conv1d = bool(Conv1D) and isinstance(module, Conv1D)
        if not (type(module) is nn.Linear or is_conv1d):
            continue
        if not _should_convert(name, not_convert):
            kept.append(name)
            continue
        key = _checkpoint_key(f"{name}.weight", keys, prefix)
        if key is None:
            missing.append(f"{name}.weight")
        else:
            quantize[key] = is_conv1d
    if missing:
        raise InputError(f"{folder}: {len(missing)} Linear weights of {type(model).__name__} are not in the "
                         f"checkpoint, e.g. {missing[0]!r}",
                         hint="qtool needs the checkpoint in the Hugging Face layout that transformers saves")
    if skip:
        unknown = [s for s in skip if not any(re.match(rf"(?:{re.escape(s)})(?:\.|$)", n) or n.endswith(s)
                                              for n, _ in model.named_modules())]
        if unknown:
            raise InputError(f"--skip {unknown[0]}: no module of {type(model).__name__} is called that",
                             hint="use module names as in the checkpoint keys, e.g. model.layers.0.mlp or lm_head")
    # With a skip list transformers drops its own default (the head); write every kept Linear so it still skips them.
    skip_config = sorted(set(skip) | set(defaults)) if skip else None
    import transformers

    return Selection(quantize, skip_config, kept, type(model).__name__,
                     f"transformers {transformers.__version__} (meta model)")


class SelectionInChild:
    """:func:`select` run in a forked child process, so that the caller never imports transformers or holds the meta
    model: importing transformers' modelling code and building the model leaves ~115 MiB of Python objects in a
    process for good, a quarter of a conversion's peak RSS on a small checkpoint (measured: 259 vs 145 MiB
    anonymous memory before and after, torch imported either way). The child starts with everything the parent has
    imported (copy-on-write) and does just the import and the meta model that ``select`` does in process, so it
    takes the same time; it answers in JSON on a pipe (the result, or the QtoolError to raise) and exits.

    Start it before any thread of the caller (the fork copies only the calling thread); ``result()`` waits for it;
    use it as a context manager so that an error before ``result()`` kills the child.
    Where ``os.fork`` is missing or not Linux, or transformers is imported already (nothing to save), ``select``
    runs in process, in ``result()``. ``fork`` forces either way (tests)."""

    def __init__(self, config: dict, folder, keys, skip: list[str] | None = None, fork: bool | None = None):
        self.args = (config, folder, list(keys), skip)
        if fork is None:
            fork = sys.platform.startswith("linux") and hasattr(os, "fork") and "transformers" not in sys.modules
        self.pid = None
        if fork:
            read_end, write_end = os.pipe()
            self.pid = os.fork()
            if self.pid == 0:  # the child: never returns
                os.close(read_end)
                self._answer(write_end)
            os.close(write_end)
            self.read_end = read_end

    def _answer(self, fd: int) -> None:
        try:
            try:
                msg = {"selection": asdict(select(*self.args))}
            except errors.QtoolError as exc:
                msg = {"error": type(exc).__name__, "message": exc.message, "hint": exc.hint}
            except BaseException as exc:  # noqa: BLE001 - reported by the parent
                msg = {"crash": f"{type(exc).__name__}: {exc}"}
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(msg))
        finally:
            os._exit(0)

    def __enter__(self) -> SelectionInChild:
        return self

    def __exit__(self, *exc) -> None:
        """An error before ``result()``: stop and reap the child, so that no process or zombie outlives the call."""
        if self.pid is not None:
            os.close(self.read_end)
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.pid = None

    def result(self) -> Selection:
        if self.pid is None:
            return select(*self.args)
        pid, self.pid = self.pid, None
        try:
            with os.fdopen(self.read_end, "r") as f:
                text = f.read()
        finally:
            _, status = os.waitpid(pid, 0)
        try:
            msg = json.loads(text)
        except ValueError:
            msg = {"crash": f"it ended with status {os.waitstatus_to_exitcode(status)} and no answer"}
        if "selection" in msg:
            return Selection(**msg["selection"])
        if "error" in msg:
            cls = getattr(errors, msg["error"], errors.InputError)
            raise cls(msg["message"], hint=msg["hint"])
        raise RuntimeError(f"the process that decides which tensors to quantise failed: {msg['crash']}")


def _checkpoint_key(param: str, keys: set[str], prefix: str) -> str | None:
    if param in keys:
        return param
    if prefix and param.startswith(prefix + ".") and param[len(prefix) + 1:] in keys:
        return param[len(prefix) + 1:]  # checkpoint saved from the base model (no "model." prefix)
    return None


# ------------------------------------------------------------------------------------------- known layouts
@dataclass(frozen=True)
class Layout:
    """The parameters of a causal LM whose Linear layers are known from its class: ``linears`` in each of the
    ``n_layers`` decoder layers under ``layers`` (quantised; ``transposed`` for Conv1D), the layers' other
    parameters ``layer_others`` (norms; the Linear layers' biases are allowed too), and the parameters outside the
    layers ``top`` (embeddings, final norm, and ``head``: the output Linear that transformers keeps in 16-bit; absent
    from the files when tied)."""

    layers: str
    linears: tuple[str, ...]
    layer_others: tuple[str, ...]
    top: tuple[str, ...]
    head: str = "lm_head"
    transposed: bool = False
    n_layers_key: str = "num_hidden_layers"


_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj")
_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")
_QK_NORMS = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")
_GEMMA_NORMS = _NORMS + ("pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight")
_TOP = ("model.embed_tokens.weight", "model.norm.weight")
KNOWN_TRANSFORMERS_MAJOR = 5  # the version the KNOWN entries were checked against (tests/test_selection.py)
KNOWN: dict[str, Layout] = {
    "LlamaForCausalLM": Layout("model.layers", _PROJECTIONS, _NORMS, _TOP),
    "MistralForCausalLM": Layout("model.layers", _PROJECTIONS, _NORMS, _TOP),
    "Qwen2ForCausalLM": Layout("model.layers", _PROJECTIONS, _NORMS, _TOP),
    "Qwen3ForCausalLM": Layout("model.layers", _PROJECTIONS, _NORMS + _QK_NORMS, _TOP),
    "Gemma2ForCausalLM": Layout("model.layers", _PROJECTIONS, _GEMMA_NORMS, _TOP),
    "Gemma3ForCausalLM": Layout("model.layers", _PROJECTIONS, _GEMMA_NORMS + _QK_NORMS, _TOP),
    "Phi3ForCausalLM": Layout("model.layers", ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                                               "mlp.down_proj"), _NORMS, _TOP),
    "GPT2LMHeadModel": Layout("transformer.h", ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
                              ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias"),
                              ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
                               "transformer.ln_f.bias"), transposed=True, n_layers_key="n_layer"),
}


def _transformers_major() -> int | None:
    """The installed transformers' major version, read from its metadata (importing it would cost seconds)."""
    from importlib import metadata

    try:
        return int(metadata.version("transformers").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return None


def known_selection(config: dict, keys, skip: list[str] | None = None) -> Selection | None:
    """:func:`select`'s answer from the checkpoint's keys alone, for an architecture in ``KNOWN``; None (ask
    transformers) with ``skip``, another transformers major version, or any key or layer count the layout does not
    account for exactly (a missing projection, an extra module, another prefix)."""
    arch = (config.get("architectures") or [None])[0]
    layout = KNOWN.get(arch)
    n_layers = config.get(layout.n_layers_key) if layout else None
    if layout is None or skip or not isinstance(n_layers, int) or _transformers_major() != KNOWN_TRANSFORMERS_MAJOR:
        return None
    keys = list(keys)
    linear = re.compile(rf"{re.escape(layout.layers)}\.(\d+)\.({'|'.join(map(re.escape, layout.linears))})\.weight")
    other = re.compile(rf"{re.escape(layout.layers)}\.(\d+)\.(?:{'|'.join(map(re.escape, layout.layer_others))}|"
                       rf"(?:{'|'.join(map(re.escape, layout.linears))})\.bias)")
    quantize: dict[str, bool] = {}
    for key in keys:
        m = linear.fullmatch(key)
        if m:
            quantize[key] = layout.transposed
        else:
            m = other.fullmatch(key)
            if not m and key not in layout.top and key != f"{layout.head}.weight":
                return None  # a parameter the layout does not know
        if m and int(m.group(1)) >= n_layers:
            return None
    if len(quantize) != n_layers * len(layout.linears) or not set(layout.top) <= set(keys):
        return None  # incomplete: transformers' own answer names what is missing
    return Selection(quantize, None, [layout.head], arch,
                     f"known layout of {arch} (checked against transformers {KNOWN_TRANSFORMERS_MAJOR}.x)")


class _Decided:
    """A selection known already, with :class:`SelectionInChild`'s interface."""

    def __init__(self, selection: Selection):
        self.selection = selection

    def __enter__(self) -> _Decided:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def result(self) -> Selection:
        return self.selection


def start_selection(config: dict, folder, keys, skip: list[str] | None = None):
    """The selection for a checkpoint: :func:`known_selection` where it applies, else a :class:`SelectionInChild`
    (started now). Use as a context manager; ``result()`` gives the :class:`Selection`."""
    known = known_selection(config, keys, skip)
    return _Decided(known) if known is not None else SelectionInChild(config, folder, keys, skip)

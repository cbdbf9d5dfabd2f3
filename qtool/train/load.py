"""Building the decoder: from a converted folder (tensor by tensor, every checkpoint tensor accounted for), or with
random NF4 weights of any shape for measurements; and the compute dtype the device runs fast."""
from __future__ import annotations

from pathlib import Path

import torch

from qtool.adapters.nf4_linear import NF4Linear
from qtool.adapters.spec import AdapterSpec
from qtool.arch import Shape
from qtool.errors import InputError
from qtool.format import bnb_nf4 as layout
from qtool.nf4.codec import QuantizedWeight
from qtool.train import gemma
from qtool.train.model import Decoder, DecoderLayer
from qtool.train.settings import read_shape

# Checkpoint tensors transformers itself ignores on load (old Llama checkpoints saved the RoPE table as a buffer).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX-BF16; Linux flags). Without them
    PyTorch converts in software: a [127x1536]@[1536x576] bf16 product took 0.41 s against 0.025 s in fp32 on an AVX2
    CPU (issue 13)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def compute_dtype_for(name: str, device: torch.device) -> tuple[torch.dtype, str]:
    """``(dtype, why)`` for ``--compute-dtype`` (``auto``, ``bfloat16``, ``float16``, ``float32``). ``auto`` is
    bfloat16 on CUDA and on CPUs with bf16 matrix instructions, float32 on other CPUs."""
    if name != "auto":
        return getattr(torch, name), "as asked"
    if device.type == "cuda":
        return torch.bfloat16, "auto: CUDA"
    if cpu_has_fast_bf16():
        return torch.bfloat16, "auto: this CPU has bf16 matrix instructions"
    return torch.float32, "auto: this CPU has no bf16 matrix instructions (bf16 would run ~15x slower)"


def build_decoder(shape: Shape, quantized, dense, *, device="cpu", compute_dtype: torch.dtype = torch.bfloat16,
                  spec: AdapterSpec | None = None, adapter_dtype: torch.dtype = torch.float32, seed: int = 0,
                  initial: dict | None = None) -> Decoder:
    """Assemble the decoder from ``quantized(key, shape) -> QuantizedWeight`` and ``dense(key, shape) -> Tensor``
    (each called once per tensor, so a weight can be produced, moved and dropped one at a time), then attach the
    adapters of ``spec`` (none when None; see :func:`qtool.adapters.attach.attach_adapters`)."""
    def dense_on(key, shape_):
        return dense(key, shape_).to(device=device, dtype=compute_dtype)

    layers = []
    for i in range(shape.n_layers):
        linears = {}
        for lin in shape.linears():
            prefix = shape.module_path(i, lin.name)
            qw = quantized(f"{prefix}.weight", (lin.n_out, lin.n_in)).to(device)
            if qw.shape != (lin.n_out, lin.n_in):
                raise InputError(f"{prefix}.weight has shape {qw.shape}, config.json implies {(lin.n_out, lin.n_in)}")
            bias = dense_on(f"{prefix}.bias", (lin.n_out,)) if lin.bias else None
            linears[lin.name] = NF4Linear(qw, bias)
        if shape.model_type in gemma.MODEL_TYPES:
            layers.append(gemma.build_layer(shape, i, linears, dense_on))
            continue
        norms = {n: dense_on(f"model.layers.{i}.{n}.weight", (shape.hidden,))
                 for n in ("input_layernorm", "post_attention_layernorm")}
        if shape.qk_norm:
            norms.update({n: dense_on(f"model.layers.{i}.{n}.weight", (shape.head_dim,))
                          for n in ("self_attn.q_norm", "self_attn.k_norm")})
        layers.append(DecoderLayer(shape, linears, norms))
    embed = dense_on("model.embed_tokens.weight", (shape.vocab, shape.hidden))
    head = None if shape.tied_embeddings else dense_on("lm_head.weight", (shape.vocab, shape.hidden))
    decoder = gemma.GemmaDecoder if shape.model_type in gemma.MODEL_TYPES else Decoder
    model = decoder(shape, layers, embed, dense_on("model.norm.weight", (shape.hidden,)), head, compute_dtype)
    if spec is not None:
        from qtool.adapters.attach import attach_adapters

        attach_adapters(model, spec, seed=seed, adapter_dtype=adapter_dtype, initial=initial)
    return model


class ConvertedFolder:
    """The tensors of a converted folder by key (validated safetensors headers, memory-mapped on first use), and
    which of them the model has used: every tensor must be (:meth:`check_all_used`)."""

    def __init__(self, folder):
        from qtool.format.safetensors import read_header

        self.folder = Path(folder)
        self.shape = read_shape(self.folder)
        files = [read_header(p) for p in sorted(self.folder.glob("*.safetensors"))]
        self.index = {k: f for f in files for k in f.tensors}
        if not layout.quantized_keys(self.index):
            raise InputError(f"{self.folder} is not a 4-bit checkpoint (no bitsandbytes NF4 weights)",
                             hint=f"convert it first: qtool convert {self.folder} {self.folder}-nf4")
        self.used: set[str] = set()

    def _get(self, name: str, meta: bool = False) -> torch.Tensor:
        if name not in self.index:
            raise KeyError(name)
        self.used.add(name)
        info = self.index[name].tensors[name]
        if meta and not name.endswith(layout.BLOB_SUFFIX):  # the JSON blob is read: it holds shape and offset
            return torch.empty(info.shape, dtype=info.dtype, device="meta")
        return self.index[name].tensor(name)

    def quantized(self, key: str, shape_=None, *, meta: bool = False) -> QuantizedWeight:
        """The NF4 weight ``key`` (its packed bytes, block constants and quant state), checked; ``meta``: its
        tensors on the meta device (shapes and dtypes only; nothing but the small quant-state blob is read)."""
        if key not in self.index:
            raise InputError(f"{self.folder}: tensor {key!r} is missing")
        qw = layout.read_weight(key, lambda name: self._get(name, meta), where=str(self.folder))
        self.used.update(k for k in self.index if k.startswith(key + ".") and layout.is_aux_key(k))
        return qw

    def dense(self, key: str, shape_=None, *, meta_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The 16-bit tensor ``key`` (a zero-copy view of the file); ``meta_dtype``: an empty meta tensor of its
        shape in that dtype instead."""
        try:
            if meta_dtype is not None:
                return self._get(key, meta=True).to(meta_dtype)
            return self._get(key)
        except KeyError:
            raise InputError(f"{self.folder}: tensor {key!r} is missing") from None

    def elements(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``start:stop`` of tensor ``key`` flattened: a zero-copy view of the memory-mapped file, so only
        the pages of that range are ever read (a rank's shard, :mod:`qtool.train.sharded`)."""
        return self.index[key].tensor(key).reshape(-1)[start:stop]

    def release(self, key: str) -> None:
        """Drop the pages of ``key`` read so far from this process's resident memory."""
        self.index[key].release(key)

    def close(self) -> None:
        """Unmap the files (tensors read from them must have been copied: views would dangle)."""
        for f in {id(f): f for f in self.index.values()}.values():
            f.close()

    def check_all_used(self) -> None:
        """InputError naming the tensors the model has no place for (nothing is dropped silently)."""
        shape = self.shape
        unused = sorted(k for k in self.index if k not in self.used and not k.endswith(_IGNORED_SUFFIXES)
                        and not (shape.tied_embeddings and k == "lm_head.weight"))
        if unused:
            raise InputError(f"{self.folder}: {len(unused)} tensor(s) the {shape.model_type} model has no place for, "
                             f"e.g. {', '.join(unused[:3])}",
                             hint="qtool train would silently ignore them; check config.json (e.g. attention_bias, "
                                  "mlp_bias) or train with transformers + PEFT, which load this folder as it is")


def load_decoder(folder, spec: AdapterSpec | None = None, **kwargs) -> Decoder:
    """The decoder of a folder written by ``qtool convert`` (or any bitsandbytes-4bit NF4 checkpoint of a supported
    architecture); keyword arguments as :func:`build_decoder`. Every tensor of the checkpoint must be used: one the
    model has no place for is an error naming it (nothing is dropped silently)."""
    tensors = ConvertedFolder(folder)
    model = build_decoder(tensors.shape, tensors.quantized, tensors.dense, spec=spec, **kwargs)
    tensors.check_all_used()
    return model


def random_quantized(shape: tuple[int, int], device, generator: torch.Generator, blocksize: int = 64,
                     dtype: torch.dtype = torch.bfloat16) -> QuantizedWeight:
    """A random NF4 weight made directly in its packed form on ``device`` (no 16-bit copy ever exists): for memory
    and speed measurements of real shapes, e.g. a 65B model on one GPU. Values look like N(0, ~0.02) weights."""
    n = shape[0] * shape[1]
    n_blocks = -(-n // blocksize)
    packed = torch.randint(0, 256, ((n + 1) // 2, 1), dtype=torch.uint8, device=device, generator=generator)
    codes = torch.randint(100, 156, (n_blocks,), dtype=torch.uint8, device=device, generator=generator)
    nested = torch.full((-(-n_blocks // 256),), 0.02, dtype=torch.float32, device=device)
    return QuantizedWeight(packed, codes, nested, 0.05, tuple(shape), dtype, blocksize)


def random_decoder(shape: Shape, device, seed: int = 0, **kwargs) -> Decoder:
    """A decoder of ``shape`` with random NF4 weights and random 16-bit embeddings/norms, built layer by layer on
    ``device``; keyword arguments as :func:`build_decoder`."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def quantized(key, shape_):
        return random_quantized(shape_, device, gen)

    def dense(key, shape_):
        if key.endswith("norm.weight") or "layernorm" in key:
            return torch.ones(shape_, device=device)
        return torch.randn(shape_, device=device, generator=gen) * 0.02

    return build_decoder(shape, quantized, dense, device=device, seed=seed, **kwargs)

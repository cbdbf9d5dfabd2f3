"""What a training run is asked to do, and every check of it that needs no torch, no tokenizer and no weights —
so that a wrong flag or path is reported in a fraction of a second, before anything heavy is imported."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qtool.adapters.spec import (ADALORA_INIT_RANK, CONVERTER_INITS, LORA_FLAGS, METHOD_FLAGS, AdaLoRASchedule,
                                 AdapterSpec, ignored_flag_problems)
from qtool.arch import MOE_KEYS, MOE_TYPES
from qtool.errors import InputError, UsageError

OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_32bit", "adamw_8bit", "adamw_torch", "sgd")
COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text")  # the model types qtool train builds
SUPPORTED_NAMES = "Llama 2/3, Mistral, Qwen2/2.5, Qwen3, Phi-3, SmolLM2, Gemma 2, Gemma 3 text-only, e.g. gemma-3-1b"
# AdaLoRA's settings (None: AdaLoraConfig's default); with --method lora none may be given
ADALORA_FIELDS = ("init_rank", "target_rank", "tinit", "tfinal", "delta_t", "beta1", "beta2", "orth_reg")
ROPE_TYPES = ("default", "llama3")
GEMMA_ROPE_TYPES = ("default", "linear")  # qtool.train.gemma.inv_freq


@dataclass
class TrainSettings:
    steps: int = 100
    seq_len: int = 512
    batch_size: int = 1
    grad_accum: int = 1
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: str = "qkvo"  # presets and names, each optionally =RANK (see qtool.adapters.spec)
    init: str = "zero"  # zero | symmetric | pissa | loftq (the last two: made by `qtool convert --lora-init`)
    compute_dtype: str = "auto"  # bf16 on CUDA and on CPUs with bf16 instructions, else fp32
    lr: float = 2e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 0.3  # QLoRA's setting
    optimizer: str = "auto"  # paged_adamw_32bit on CUDA, adamw_torch on the CPU
    grad_checkpointing: bool = True
    offload_activations: bool = False  # checkpointed layer inputs in pinned host memory (qtool.train.offload)
    cuda_graphs: bool = True  # replay each micro-batch's forward+backward as one CUDA graph (CUDA, no dropout)
    # PyTorch's allocator maps its segments in pages as they grow (qtool.train.allocator); a PYTORCH_CUDA_ALLOC_CONF
    # set by the user decides instead
    expandable_segments: bool = True
    use_rslora: bool = False
    seed: int = 0
    eval_fraction: float = 0.05
    eval_blocks: int = 32  # at most this many held-out blocks
    device: str = "auto"
    measure_after: int = 2  # steps before memory peaks are reset (optimizer state appears at the first step)
    method: str = "lora"  # lora | adalora | adapter (Houlsby) | prefix (see qtool.adapters.spec)
    init_rank: int | None = None  # AdaLoRA: the rank every module starts at (12)
    target_rank: int | None = None  # AdaLoRA: the average rank the budget falls to (8)
    tinit: int | None = None  # AdaLoRA: steps before the budget starts to fall (0)
    tfinal: int | None = None  # AdaLoRA: steps at the final budget, mask fixed (0)
    delta_t: int | None = None  # AdaLoRA: steps between two maskings (1)
    beta1: float | None = None  # AdaLoRA: EMA of the sensitivity (0.85)
    beta2: float | None = None  # AdaLoRA: EMA of its uncertainty (0.85)
    orth_reg: float | None = None  # AdaLoRA: weight of the orthogonality regulariser (0.5)
    adapter_size: int = 64  # adapter: the bottleneck width m
    prefix_len: int = 20  # prefix: key/value vectors per layer
    prefix_projection: int = 0  # hidden width of the prefix's reparameterisation MLP while training; 0: none
    eval_every: int = 0  # also measure the held-out loss every this many steps (0: before and after only)
    nproc: int = 1  # processes the run is spread over (FSDP2, qtool.train.sharded): --nproc, or torchrun's WORLD_SIZE

    @property
    def spec(self) -> AdapterSpec:
        """The adapter these settings train (shared with the planner and the adapter writer)."""
        if self.method == "adalora":
            given = {k: getattr(self, k) for k in ADALORA_FIELDS[1:] if getattr(self, k) is not None}
            rank = ADALORA_INIT_RANK if self.init_rank is None else self.init_rank
            return AdapterSpec(targets=self.targets, rank=rank, alpha=self.alpha, init=self.init, dropout=self.dropout,
                               use_rslora=self.use_rslora, method="adalora",
                               adalora=AdaLoRASchedule(**given, total_steps=self.steps))
        return AdapterSpec(targets=self.targets, rank=self.rank, alpha=self.alpha, init=self.init,
                           dropout=self.dropout, use_rslora=self.use_rslora, method=self.method,
                           adapter_size=self.adapter_size, prefix_len=self.prefix_len,
                           prefix_projection=self.prefix_projection)

    def ignored_flags(self, given=()) -> list[str]:
        """Flags that the method would ignore: those in ``given`` (fields the user set explicitly) or with a value
        other than the default (:func:`qtool.adapters.spec.ignored_flag_problems`)."""
        default = TrainSettings()
        return ignored_flag_problems(self.method, [f for f in (*LORA_FLAGS, *METHOD_FLAGS)
                                                   if f in given or getattr(self, f) != getattr(default, f)])

    def problems(self, given=()) -> list[str]:
        """Everything wrong with the settings alone; ``given``: the fields set explicitly (see ignored_flags)."""
        p = self.ignored_flags(given)
        if self.eval_every < 0:
            p.append(f"--eval-every must be 0 (off) or a step count (got {self.eval_every})")
        for name in ("steps", "seq_len", "batch_size", "grad_accum", "eval_blocks"):
            if getattr(self, name) < 1:
                p.append(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.seq_len == 1:
            p.append("--seq-len must be at least 2 (each position predicts the next token)")
        if not self.lr > 0:
            p.append(f"--lr must be positive (got {self.lr})")
        if self.optimizer not in OPTIMIZERS + ("auto",):
            p.append(f"--optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            p.append(f"--compute-dtype {self.compute_dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}")
        if not 0 < self.eval_fraction < 1:
            p.append(f"eval fraction must be in (0, 1) (got {self.eval_fraction})")
        if self.offload_activations and not self.grad_checkpointing:
            p.append("--offload-activations moves the checkpointed layer inputs to host memory: it needs "
                     "--grad-checkpointing (drop --no-grad-checkpointing or --offload-activations)")
        if self.method != "adalora":
            p += [f"--{k.replace('_', '-')} is an AdaLoRA setting; add --method adalora (or leave it out)"
                  for k in ADALORA_FIELDS if getattr(self, k) is not None]
        return p + self._sharding_problems() + self.spec.problems()

    def _sharding_problems(self) -> list[str]:
        """What a run over several processes (FSDP2, qtool.train.sharded) cannot do yet, and why."""
        n = self.nproc
        if n < 1:
            return [f"--nproc must be at least 1 (got {n})"]
        if n == 1:
            return []
        p = []
        if self.batch_size % n:
            p.append(f"--batch-size {self.batch_size} with --nproc {n}: --batch-size is the global micro-batch, split "
                     f"evenly over the processes; give a multiple of {n} (e.g. --batch-size {n * -(-self.batch_size // n)})")
        if self.method == "adalora":
            p.append(f"--method adalora with --nproc {n}: its rank allocator ranks every module's importance scores "
                     "together and masks them in place, which sharded factors do not support yet; train it in one "
                     "process")
        if self.method == "prefix":
            p.append(f"--method prefix with --nproc {n}: its start from the text's keys/values runs the layers outside "
                     "the sharded model's forward, not supported yet; use --method lora or adapter, or one process")
        if self.offload_activations:
            p.append(f"--offload-activations with --nproc {n}: not with FSDP yet (its pinned host copies are made "
                     "per process, untested with FSDP's hooks); leave one of them out")
        if self.optimizer not in ("auto", "adamw_torch", "sgd"):
            p.append(f"--optimizer {self.optimizer} with --nproc {n}: bitsandbytes' optimizers are untested on FSDP's "
                     "DTensor shards; use --optimizer adamw_torch (the default with --nproc)")
        return p


def decoder_shape(config: dict, where: str = "config.json"):
    """The shape of a config the trainer can build (:mod:`qtool.arch` reads it), or InputError saying why not and
    what still works."""
    from qtool.arch import shape_from_config

    mt = config.get("model_type")
    still = "the converted folder still trains with transformers + PEFT/TRL as it is"
    if mt in MOE_TYPES or any(config.get(k) for k in MOE_KEYS):
        raise InputError(f"{where}: model_type {mt!r} is a mixture-of-experts model, which qtool train does not build "
                         "(its experts and router are not a Llama-family MLP)",
                         hint=f"qtool train supports {', '.join(SUPPORTED)} ({SUPPORTED_NAMES}); {still}")
    if mt not in SUPPORTED:
        raise InputError(f"{where}: model_type {mt!r} is not supported by qtool train",
                         hint=f"supported: {', '.join(SUPPORTED)} ({SUPPORTED_NAMES}); {still}")
    shape = shape_from_config(config, where)
    rope_type = shape.rope_params["rope_type"]
    if rope_type == "longrope":
        raise InputError(f"{where}: RoPE type 'longrope' (Phi-3 128k, Phi-3.5, Phi-4-mini) is not supported by qtool "
                         "train",
                         hint=f"supported: {', '.join(ROPE_TYPES)} (the 4k Phi-3 models use 'default'); {still}")
    gemma = mt in ("gemma2", "gemma3_text")
    allowed = GEMMA_ROPE_TYPES if gemma else ROPE_TYPES
    for rope in (shape.rope_params, dict(shape.rope_local)):
        if rope and rope["rope_type"] not in allowed:
            raise InputError(f"{where}: RoPE type {rope['rope_type']!r} is not supported for {mt}",
                             hint=f"supported: {', '.join(allowed)}; {still}")
    if gemma and shape.hidden_activation != "gelu_pytorch_tanh":
        raise InputError(f"{where}: hidden_activation {shape.hidden_activation!r} is not supported for {mt}",
                         hint="qtool train runs Gemma's gelu_pytorch_tanh MLP")
    if gemma and config.get("use_bidirectional_attention"):
        raise InputError(f"{where}: use_bidirectional_attention (an embedding model) is not supported",
                         hint="qtool train trains causal language models")
    return shape


def read_shape(folder):
    """The shape of a model folder's config.json, checked for the trainer."""
    from qtool.arch import read_config

    config = read_config(folder, hint="pass a folder written by qtool convert")
    return decoder_shape(config, str(Path(folder) / "config.json"))


def check_inputs(model_dir, data, out, st: TrainSettings, *, overwrite: bool = False, given=()):
    """Every check that needs no torch, no tokenizer and no weights, collected and raised together (UsageError or
    InputError) before anything heavy starts. ``given``: the settings fields set explicitly (the CLI's flags), so
    that one the method ignores is reported even at its default value. Returns the model's shape."""
    from qtool.format.atomic import check_destination
    from qtool.train.data import check_data_file

    problems = st.problems(given)
    model_dir = Path(model_dir)
    shape = read_shape(model_dir)
    if st.seq_len > shape.max_positions:
        problems.append(f"--seq-len {st.seq_len} is beyond the model's {shape.max_positions} positions")
    problems += [p for p in st.spec.problems(shape) if p not in problems]
    if st.method == "prefix" and shape.model_type in ("gemma2", "gemma3_text"):
        problems.append(f"--method prefix is not supported on {shape.model_type} (qtool.train.gemma); use --method "
                        "lora, adalora or adapter")
    elif st.method == "prefix":
        problems += _prefix_problems(st, shape)
    if st.init in CONVERTER_INITS and not problems:
        problems += _init_adapter_problems(model_dir, st, shape)
    if problems:
        raise UsageError(problems)
    check_data_file(data)
    if out is not None:
        check_destination(Path(out), overwrite, inputs=(model_dir,))
    return shape


def _prefix_problems(st: TrainSettings, shape) -> list[str]:
    """The prefix takes positions 0 .. l-1 and the sequence l .. l+s-1 (PEFT's convention, qtool.adapters.prefix):
    together they must leave the model at least one position to generate into."""
    p = []
    room = shape.max_positions - st.seq_len
    if st.prefix_len >= room:
        p.append(f"--prefix-len {st.prefix_len} with --seq-len {st.seq_len}: the prefix takes positions before the "
                 f"sequence, so it must be below the model's {shape.max_positions} positions minus --seq-len = {room}; "
                 + (f"use --prefix-len {room - 1} or less, or a shorter --seq-len" if room > 1
                    else "use a shorter --seq-len"))
    if shape.sliding_window and st.prefix_len + st.seq_len > shape.sliding_window:
        # Not natural: the prefix sits at positions 0..l-1, so under the window later queries would stop seeing it
        # (the prefix would steer only the first tokens), and what PEFT does there depends on which KV cache class
        # transformers builds for the prefix; refused rather than guessed.
        p.append(f"--prefix-len {st.prefix_len} + --seq-len {st.seq_len} is beyond the model's sliding attention "
                 f"window ({shape.sliding_window}): qtool's prefix attends over the whole prefix and sequence, so "
                 f"keep their sum <= {shape.sliding_window} (or train LoRA, which applies the window at any --seq-len)")
    return p


def _init_adapter_problems(model_dir: Path, st: TrainSettings, shape) -> list[str]:
    """pissa/loftq: the folder must hold the initial adapter the converter wrote, for the same rank and targets."""
    from qtool.format.adapter_meta import INIT_ADAPTER_DIR, read_qtool_meta

    meta = read_qtool_meta(model_dir / INIT_ADAPTER_DIR)
    if meta is None or meta["spec"]["init"] != st.init:
        return [f"--init {st.init} needs the 16-bit weights: {model_dir} holds no {st.init} initial adapter "
                f"({INIT_ADAPTER_DIR}/); convert the 16-bit model with it: qtool convert SRC {model_dir} "
                f"--lora-init {st.init} --rank {st.rank} --targets {st.targets} --alpha {st.alpha:g}"]
    made = AdapterSpec.from_json(meta["spec"])
    want = st.spec
    diffs = [f"--{k} {getattr(want, k)} (the folder was converted with {getattr(made, k)})"
             for k in ("rank", "alpha", "use_rslora") if getattr(made, k) != getattr(want, k)]
    if made.module_ranks(shape) != want.module_ranks(shape):
        diffs.append(f"--targets {want.targets} (the folder was converted with --targets {made.targets})")
    return [f"--init {st.init}: {d}; the base holds the residual of exactly that adapter, so train with the same "
            "settings" for d in diffs]



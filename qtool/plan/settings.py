"""What is being trained and how: :class:`Settings`, the values each setting takes, and their validation against a
model shape. Pure Python; the CLI builds its option choices from the tuples here."""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from qtool.adapters.spec import (INITS, LORA_FLAGS, METHOD_FLAGS, METHODS, UNTARGETED_METHODS, AdaLoRASchedule,
                                 AdapterSpec, ignored_flag_problems)
from qtool.errors import UsageError

if TYPE_CHECKING:
    from qtool.arch import Linear, Shape

# Whose training step is planned, and the loop each profile models (qtool plan prints it in the notes).
RECIPES = {
    "qtool": "qtool train: NF4 weights packed on the GPU, fused kernels, chunked loss, each step one CUDA graph",
    "hf": "transformers + PEFT + bitsandbytes as Trainer(gradient_checkpointing=True) and TRL's SFTTrainer run it: "
          "prepare_model_for_kbit_training, then gradient_checkpointing_enable() (non-reentrant), get_peft_model",
    "hf-prepare": "transformers + PEFT + bitsandbytes in a loop right after prepare_model_for_kbit_training(model) "
                  "and get_peft_model (or a Trainer that leaves gradient_checkpointing unset): its checkpointing is "
                  "reentrant, so each layer's backward reruns the whole layer, output included",
    "unsloth": "Unsloth 2026.10.9 (unsloth_zoo 2026.10.9) in a plain loop: FastLanguageModel on a pre-quantised NF4 "
               "folder, get_peft_model(use_gradient_checkpointing=\"unsloth\"): layer inputs offloaded to pinned host "
               "memory, fused LoRA and RMSNorm/RoPE kernels, fused chunked cross-entropy (qtool.plan.unsloth)",
}
PROFILES = tuple(RECIPES)
HF_PROFILES = ("hf", "hf-prepare")  # transformers + PEFT + bitsandbytes: one stack, two recipes
OPTIMIZERS = ("paged_adamw_32bit", "adamw_32bit", "paged_adamw_8bit", "adamw_8bit", "adamw_torch", "sgd")
DTYPES = ("bfloat16", "float16", "float32")
ATTENTIONS = ("sdpa", "flash", "eager")
LOSSES = ("chunked", "full")
DEVICES = ("cuda", "cpu")
TARGET_PRESETS = ("qkvo", "mlp", "all-linear")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # = qtool.nf4.codec.BLOCKSIZES (a test keeps them equal)
# Other spellings accepted for the values above (the CLI's choices accept them too).
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "adamw": "adamw_32bit",
           "paged_adamw": "paged_adamw_32bit", "flash_attention_2": "flash", "all": "all-linear", "attn": "qkvo"}


@functools.lru_cache(maxsize=64)
def layer_linears(shape: Shape) -> tuple[Linear, ...]:
    """``shape.linears()`` built once per shape: a plan reads them a dozen times, a fit search makes dozens of plans."""
    return tuple(shape.linears())


@dataclass(frozen=True)
class Settings:
    """What is being trained and how. ``check`` validates against a shape and fills profile defaults."""

    profile: str = "qtool"
    rank: int = 16
    alpha: float | None = None  # LoRA scale numerator; changes no byte (default 2 * rank)
    targets: str = "qkvo"       # qkvo | mlp | all-linear | module names, comma-separated, each optionally =rank
    seq_len: int = 2048
    batch_size: int = 1
    grad_accum: int = 1         # micro-batches per optimizer step; > 1 keeps the LoRA gradients resident
    grad_checkpointing: bool = True
    offload_activations: bool = False  # qtool: checkpointed layer inputs in pinned host memory (qtool.plan.offload)
    optimizer: str = "paged_adamw_32bit"
    adapter_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    double_quant: bool = True
    block_size: int = 64
    attention: str = "sdpa"     # sdpa | flash (transformers' flash_attention_2: 16-bit q, k, v) | eager
    loss: str | None = None     # chunked (qtool's default) | full (fp32 logits; the only choice in hf)
    loss_chunk_mib: int = 64    # chunked: fp32 logits per chunk (qtool.train.loss.LOSS_CHUNK_MIB; 256 before 2026-12-04)
    flat_params: bool = True    # qtool on CUDA: trainable parameters and gradients in one buffer (qtool/train/flat.py)
    device: str = "cuda"        # cuda | cpu: the CPU fallbacks (torch reference kernels, no CUDA graph, no cuBLAS)
    gpus: int = 1               # > 1: FSDP2 data parallelism, planned per GPU (qtool.plan.fsdp); batch_size is then
    #                             the global batch, each rank trains batch_size / gpus sequences
    expandable_segments: bool | None = None  # PyTorch's allocator with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    #                             (qtool.plan.allocator); None: the profile's default (default_expandable_segments)

    init: str = "zero"          # the symmetric init keeps its initial factors, frozen, beside the trained ones
    method: str = "lora"        # lora | adalora | adapter | prefix (qtool.adapters.spec; the last two: profile qtool)
    target_rank: int | None = None  # adalora: the average final rank (no byte depends on it; `rank` = the initial
    #                                 rank, the peak: pruning masks, frees nothing)
    adapter_size: int = 64      # method adapter: the bottleneck width
    prefix_len: int = 20        # method prefix: key/value vectors per layer
    prefix_projection: int = 0  # method prefix: the reparameterisation MLP's hidden width while training (0: none)

    @property
    def is_hf(self) -> bool:
        """transformers + PEFT + bitsandbytes (the hf and hf-prepare recipes): every rule of that stack applies."""
        return self.profile in HF_PROFILES

    @property
    def stack(self) -> str:
        """The software stack whose measured constants apply (qtool.plan.resident): qtool or hf."""
        return "hf" if self.is_hf else self.profile

    @property
    def expandable(self) -> bool:
        """The allocator runs with expandable segments: the setting, or else the profile's default."""
        if self.expandable_segments is None:
            return default_expandable_segments(self.profile, self.device)
        return self.expandable_segments

    @property
    def reentrant_checkpointing(self) -> bool:
        """Checkpointing through torch's reentrant CheckpointFunction: hf-prepare with checkpointing on."""
        return self.profile == "hf-prepare" and self.grad_checkpointing

    @property
    def per_gpu_batch(self) -> int:
        """Sequences each GPU trains per micro-batch: the global batch split over the data-parallel ranks."""
        return self.batch_size // self.gpus

    @property
    def spec(self) -> AdapterSpec:
        """The adapter being trained, as the trainer and the adapter writer describe it."""
        if self.method == "adalora":
            schedule = AdaLoRASchedule(**({} if self.target_rank is None else {"target_rank": self.target_rank}))
            return AdapterSpec(targets=self.targets, rank=self.rank, alpha=self.alpha or 2 * self.rank,
                               init=self.init, method="adalora", adalora=schedule)
        return AdapterSpec(targets=self.targets, rank=self.rank, alpha=self.alpha or 2 * self.rank, init=self.init,
                           method=self.method, adapter_size=self.adapter_size, prefix_len=self.prefix_len,
                           prefix_projection=self.prefix_projection)

    def module_ranks(self, shape: Shape) -> dict[str, int]:
        """Targeted Linear name -> rank, for this shape's module names."""
        return self.spec.module_ranks(shape)

    def check(self, shape: Shape) -> Settings:
        """Normalised settings, or UsageError listing every problem (the shape's included)."""
        st = replace(self, **{k: ALIASES.get(getattr(self, k), getattr(self, k))
                              for k in ("optimizer", "adapter_dtype", "compute_dtype", "attention", "targets")})
        from qtool.arch import shape_problems  # here: the choices above load without the shape table

        problems = shape_problems(shape)
        choices = {"profile": PROFILES, "optimizer": OPTIMIZERS, "adapter_dtype": DTYPES, "compute_dtype": DTYPES,
                   "attention": ATTENTIONS, "device": DEVICES}
        problems += [f"--{k.replace('_', '-')} {getattr(st, k)!r} is not one of {', '.join(v)}"
                     for k, v in choices.items() if getattr(st, k) not in v]
        problems += [f"--{k.replace('_', '-')} must be at least 1, got {getattr(st, k)}"
                     for k in ("rank", "seq_len", "batch_size", "grad_accum") if getattr(st, k) < 1]
        if st.alpha is not None and st.alpha <= 0:
            problems.append(f"--alpha must be positive, got {st.alpha}")
        if st.block_size not in BLOCKSIZES:
            problems.append(f"--block-size {st.block_size} is not one bitsandbytes accepts: {BLOCKSIZES}")
        loss = st.loss or ("full" if st.is_hf else "chunked")
        if loss not in LOSSES:
            problems.append(f"--loss {loss!r} is not one of {', '.join(LOSSES)}")
        elif st.is_hf and loss == "chunked":
            problems.append(f"--loss chunked: the {st.profile} profile computes full fp32 logits (transformers "
                            "ForCausalLMLoss); chunked loss is a qtool-profile option")
        if st.is_hf and shape.model_type == "gemma2" and st.attention == "sdpa":
            problems.append("gemma2 uses attention logit soft-capping, which transformers' sdpa attention rejects; "
                            "use --attention eager")
        if st.offload_activations and not st.grad_checkpointing:
            problems.append("--offload-activations moves the checkpointed layer inputs to host memory: it needs "
                            "--grad-checkpointing (drop --no-grad-checkpointing or --offload-activations)")
        if st.offload_activations and st.profile != "qtool":
            problems.append("--offload-activations is planned for --profile qtool (qtool train "
                            f"--offload-activations); the {st.profile} profile plans its own checkpointing as people "
                            "run it")
        if st.profile == "unsloth" and not shape_problems(shape):
            from qtool.plan.unsloth_rules import problems as unsloth_problems

            problems += unsloth_problems(shape, st)
        if st.expandable_segments and st.device != "cuda":
            problems.append("--expandable-segments is a setting of PyTorch's CUDA allocator; --device cpu has none")
        if st.expandable_segments and st.profile == "unsloth":
            problems.append("--expandable-segments with --profile unsloth: its allocator slack is a fraction measured "
                            "with the default allocator, not replayed; plan it without the flag")
        if st.init not in INITS:
            problems.append(f"--init {st.init!r} is not one of {', '.join(INITS)}")
        if st.method not in METHODS:
            problems.append(f"--method {st.method!r} is not one of {', '.join(METHODS)}")
        elif st.method == "adalora":
            problems += st.spec.adalora_problems()
        elif st.method in UNTARGETED_METHODS and st.profile != "qtool":
            problems.append(f"--method {st.method} is planned for --profile qtool only (qtool train): PEFT has "
                            + ("no Houlsby adapters" if st.method == "adapter" else
                               "prefix tuning, but refuses it with gradient checkpointing, and the hf profiles' "
                               "activation model has no prefix"))
        if st.method != "adalora" and st.target_rank is not None:
            problems.append("--target-rank is an AdaLoRA setting; add --method adalora")
        default = Settings()  # alpha changes no byte, and a checked Settings carries its default (2 x rank): not here
        problems += ignored_flag_problems(st.method, [f for f in (*LORA_FLAGS, *METHOD_FLAGS) if hasattr(st, f)
                                                      and f != "alpha" and getattr(st, f) != getattr(default, f)])
        if not shape_problems(shape):
            problems += st.spec.target_problems(shape) + st.spec.method_problems(shape)
        problems += gpus_problems(st, shape)
        if problems:
            raise UsageError(problems)
        return replace(st, loss=loss, alpha=st.alpha if st.alpha is not None else 2 * st.rank,
                       expandable_segments=st.expandable)


def default_expandable_segments(profile: str, device: str) -> bool:
    """Whether the planned process runs PyTorch's allocator with ``expandable_segments:True`` unless told: qtool
    train sets it on CUDA (unless PYTORCH_CUDA_ALLOC_CONF is set); transformers, PEFT and Unsloth scripts leave the
    default allocator. The CPU has no caching allocator."""
    return profile == "qtool" and device == "cuda"


# Why the hf profiles are single-GPU only: what transformers + PEFT + bitsandbytes does under FSDP is another memory
# layout, not the one the hf profiles measured, and it is not modelled.
HF_FSDP_REASON = (
    "the hf profiles plan transformers + PEFT + bitsandbytes on one GPU; their multi-GPU QLoRA recipe (accelerate's "
    "FSDP with bnb_4bit_quant_storage set to a float dtype so that FSDP can flatten the packed weights with the rest, "
    "fp32 norms/embeddings/head from prepare_model_for_kbit_training, its own mixed-precision casts) keeps other "
    "buffers than qtool's FSDP2 layout and is not modelled")


def gpus_problems(st: Settings, shape: Shape, flag: str | None = None) -> list[str]:
    """What --gpus N > 1 (FSDP2 data parallelism, qtool.plan.fsdp) cannot plan with these settings; ``flag``: how
    the problems name the request (default ``--gpus N``)."""
    if st.gpus < 1:
        return [f"--gpus must be at least 1, got {st.gpus}"]
    if st.gpus == 1:
        return []
    n = st.gpus
    flag = flag or f"--gpus {n}"
    problems = []
    if st.batch_size >= 1 and st.batch_size % n:
        problems.append(f"--batch-size {st.batch_size} is the global batch and does not split evenly over --gpus {n} "
                        f"(each rank trains batch-size / {n} sequences): give a multiple of {n}")
    if st.is_hf:
        problems.append(f"{flag} with --profile {st.profile}: {HF_FSDP_REASON}; plan --profile qtool, or --gpus 1")
    if st.profile == "unsloth":
        return problems  # its own refusal (qtool.plan.unsloth.problems) says why

    if st.device != "cuda":
        problems.append(f"{flag} plans FSDP over CUDA GPUs (NCCL); --device cpu is one process")
    if st.method != "lora":
        problems.append(f"{flag} plans LoRA factors sharded by FSDP2; --method {st.method} is planned on one GPU "
                        "only (--gpus 1)")
    if st.offload_activations:
        problems.append(f"--offload-activations is off under FSDP in qtool train; drop it with {flag}")
    from qtool.arch import shape_problems

    if st.method == "lora" and not shape_problems(shape) and not st.spec.target_problems(shape) \
            and st.spec.vocab_ranks(shape):
        problems.append(f"{flag}: LoRA on embed_tokens/lm_head (the root FSDP group) is not modelled; target the "
                        "decoder layers' modules, or plan --gpus 1")
    return problems

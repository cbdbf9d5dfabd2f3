"""LoRA, Houlsby adapters and prefix tuning side by side, without torch: the tensors each trains, the bytes each adds
to a training step (:mod:`qtool.plan.planner` adds them to its rows), what each costs at inference, and the sizes that
give the three the same trainable-parameter budget.

Symbols: ``L`` layers, ``h`` hidden, ``q``/``kv`` the query/key-value widths, ``T = b·s`` tokens, ``m`` the adapter
size, ``l`` the prefix length, ``cb`` bytes of the compute dtype. The training bytes follow the code that runs:
qtool/adapters/houlsby.py (each adapter's first product keeps its input y (the block's output, kept by nothing else)
and the compute-dtype copy of W_down, GELU keeps its input, the second product its input and the copy of W_up) and
qtool/adapters/prefix.py (the prefix cast to the compute dtype once per step and kept by every layer; per layer the
keys and values over ``l + s`` positions that attention keeps instead of those over ``s``: on the CPU repeated to the
query heads, as transformers does with a mask; on CUDA flash SDPA keeps them as they are). They are checked against
allocation traces of the trainer on the CPU (tests/test_methods.py).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qtool.adapters.spec import AdapterSpec
from qtool.plan.resident import DTYPE_BYTES, alloc, fused, tensors_alloc

if TYPE_CHECKING:
    from qtool.arch import Shape
    from qtool.plan.settings import Settings

LABELS = {"lora": "LoRA adapters", "adalora": "AdaLoRA P, λ, Q at the initial rank", "adapter": "Houlsby adapters",
          "prefix": "prefix"}
RECORDS = Path(__file__).resolve().parents[2] / "data" / "methods"  # bench/methods_compare.py --gpu records
INFERENCE_BYTES = 2  # inference runs the model in a 16-bit dtype (the KV cache with it)


# --- training ----------------------------------------------------------------------------------------------------

def trainable_tensors(shape: Shape, st: Settings) -> list[int]:
    """Element counts of every trainable tensor (:meth:`AdapterSpec.trainable_tensors`)."""
    return st.spec.trainable_tensors(shape)


def label(st: Settings) -> str:
    return LABELS.get(st.method, st.method)


def layer_saved_extra(shape: Shape, st: Settings) -> int:
    """Bytes one decoder layer keeps for backward beyond the plain layer (LoRA's are in :mod:`qtool.plan.transient`).
    Adapter, per block: ``T·cb·(h + 2m)`` and the two compute-dtype weight copies. Prefix: the keys and values over
    the ``l`` prefix positions (CUDA, flash SDPA: ``2·b·l·kv·cb``), or on the CPU all ``l + s`` of them repeated to
    the query heads in place of the ``s`` unrepeated ones, plus the ``s x (l + s)`` additive mask that SDPA makes
    of the boolean one, in the compute dtype."""
    T, b, s = st.batch_size * st.seq_len, st.batch_size, st.seq_len
    cb = DTYPE_BYTES[st.compute_dtype]
    if st.method == "adapter":
        h, m = shape.hidden, st.adapter_size
        copies = 2 * alloc(m * h * cb) if st.compute_dtype != st.adapter_dtype else 0
        return 2 * (T * cb * (h + 2 * m) + copies)
    if st.method == "prefix":
        l = st.prefix_len
        if fused(st):
            return 2 * b * l * shape.kv_dim * cb
        return 2 * b * cb * ((l + s) * shape.q_dim - s * shape.kv_dim) + alloc(cb * s * (l + s))
    return 0


def first_attention_frozen(st: Settings) -> bool:
    """Houlsby adapters: in layer 0 nothing before the attention block's adapter needs a gradient (the embeddings
    are frozen and no Linear has a bypass), so that layer's norm and attention keep nothing for backward."""
    return st.method == "adapter"


def attention_backward_extra(shape: Shape, st: Settings) -> int:
    """Prefix: the gradients of the longer keys and values during the attention backward (CUDA: ``l`` more
    positions of k and v grads, and of their expansion to the query heads under GQA; CPU: repeated, as saved)."""
    if st.method != "prefix":
        return 0
    b, l, s, cb = st.batch_size, st.prefix_len, st.seq_len, DTYPE_BYTES[st.compute_dtype]
    if fused(st):
        return b * l * (4 * shape.kv_dim + (4 * shape.q_dim if shape.n_kv_heads != shape.n_heads else 0))
    return 2 * b * cb * ((l + s) * shape.q_dim - s * shape.kv_dim)


def mlp_grad_bytes(shape: Shape, st: Settings) -> int:
    """Adapter gradients that exist at a layer's largest backward moment: its MLP adapter's (the MLP block is
    back-propagated first), as LoRA's MLP gradients in :func:`qtool.plan.transient.layer_grad_bytes`."""
    if st.method != "adapter":
        return 0
    return tensors_alloc(st.spec.trainable_tensors(shape)[:4], DTYPE_BYTES[st.adapter_dtype])


def kept_bytes(shape: Shape, st: Settings) -> list[tuple[str, int]]:
    """Tensors alive for the whole forward and backward beyond the layers' own: with checkpointing the prefix's
    compute-dtype copy that every layer reads (none when it is already in that dtype), and through the
    reparameterisation MLP its fp32 hidden activations."""
    if st.method != "prefix":
        return []
    n = st.prefix_len * 2 * shape.n_layers * shape.kv_dim
    rows = []
    # only checkpointing keeps the cast copy (each checkpointed layer call holds its slice); else the concatenations
    # that read it keep nothing of it
    if st.grad_checkpointing and (st.compute_dtype != st.adapter_dtype or st.prefix_projection):
        rows.append((f"prefix keys/values in {st.compute_dtype}, read by every layer", alloc(n * DTYPE_BYTES[
            st.compute_dtype])))
    if st.prefix_projection:
        rows.append(("prefix MLP hidden activations (fp32)", alloc(4 * st.prefix_len * st.prefix_projection)))
    return rows


def seq_len_bound(shape: Shape, st: Settings) -> tuple[int, str] | None:
    """Prefix: the longest ``--seq-len`` that ``qtool train`` accepts with the ``l`` prefix positions before the
    sequence (qtool.train.settings): below ``max_positions - l`` (one position left to generate into) and, for the
    qtool trainer, ``l + s`` within a sliding window. None for the other methods (all positions are the sequence's)."""
    if st.method != "prefix":
        return None
    l = st.prefix_len
    value, why = shape.max_positions - l - 1, (f"max_position_embeddings of {shape.name} less the prefix of {l} "
                                               "and one position to generate into")
    window = shape.sliding_window if st.profile == "qtool" else None
    if window and window - l < value:
        value, why = window - l, (f"{window:,}-token sliding window of {shape.name} less the prefix of {l} (qtool "
                                  "train does not apply the window to a prefix, so both must fit in it)")
    return max(value, 1), why


# --- inference ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InferenceCost:
    """What an adapter costs once trained (FLOPs count a multiply-add as 2; matmuls only). ``merged_*``: after
    ``qtool merge`` (LoRA only; LoRA §4.2: W = W0 + BA adds no latency)."""

    method: str
    config: str
    n_trainable: int
    n_stored: int
    extra_flops_per_token: int  # unmerged / as the method runs
    extra_weight_bytes: int  # the adapter's weights held beside the base at inference (16-bit)
    extra_kv_cache_bytes: int  # per sequence (16-bit cache)
    positions_taken: int  # of the model's context
    mergeable: bool
    merged_extra_flops_per_token: int | None  # None: cannot be merged
    measured: dict | None = None  # decode/prefill from a bench record (bench/methods_compare.py), when present

    def to_json(self) -> dict:
        return asdict(self)


def inference_cost(shape: Shape, spec: AdapterSpec, records: list[dict] | None = None) -> InferenceCost:
    """Inference cost of ``spec`` on ``shape``. LoRA unmerged: ``2·r·(in + out)`` per adapted Linear and layer,
    ``2·r·h`` for an embedding and ``2·r·(h + V)`` for the head, 0 once merged. Adapter: ``2 x 2·h·m`` per block, two blocks per layer. Prefix: attention over ``l`` more keys,
    ``2·l·q`` for the scores and ``2·l·q`` for the weighted values per layer, and ``2·L·l·kv`` cached values."""
    L, n = shape.n_layers, spec.n_trainable(shape)
    if spec.method == "adalora":  # runs as the plain LoRA it exports to: the target rank on average
        final = spec.with_(method="lora", rank=spec.adalora.target_rank, adalora=None).n_trainable(shape)
        return InferenceCost(spec.method, spec.describe(), n, final, 2 * final, final * INFERENCE_BYTES, 0, 0, True,
                             0, measured_for(shape, spec, records))
    if spec.method == "adapter":
        flops, kv, taken, merge = L * 2 * 4 * shape.hidden * spec.adapter_size, 0, 0, None
    elif spec.method == "prefix":
        flops = L * 4 * spec.prefix_len * shape.q_dim
        kv, taken, merge = 2 * L * spec.prefix_len * shape.kv_dim * INFERENCE_BYTES, spec.prefix_len, None
    else:  # the embedding's A is looked up (no FLOPs): its B costs 2rh; the head 2r(h + V), shared or not
        vocab = spec.vocab_ranks(shape)
        layers = L * sum(r * (lin.n_in + lin.n_out) for lin, r in spec.adapted(shape))
        flops = 2 * (layers + sum(r * shape.hidden + (r * shape.vocab if name == "lm_head" else 0)
                                  for name, r in vocab.items()))
        kv, taken, merge = 0, 0, 0
    stored = spec.n_stored(shape)
    return InferenceCost(spec.method, spec.describe(), n, stored, flops,
                         0 if spec.method == "prefix" else stored * INFERENCE_BYTES, kv, taken, merge is not None,
                         merge, measured_for(shape, spec, records))


def matched_specs(shape: Shape, lora: AdapterSpec) -> dict[str, AdapterSpec]:
    """LoRA as given and the adapter and prefix of the same trainable-parameter budget B = ``lora.n_trainable``:
    the adapter size m nearest to solving ``L·2·(2hm + h + m) = B`` and the prefix length l nearest to
    ``2·L·l·kv = B`` (no reparameterisation), each at least 1. E.g. Llama-2-7B, r = 16 on q,k,v,o (16.8 M): m = 31, l = 64.
    AdaLoRA on the same targets ends at the same budget (target rank r on average) from 1.5 r, the ratio of
    AdaLoRA's defaults (12 -> 8): its training peak is at the initial rank."""
    budget = lora.n_trainable(shape)
    h, L = shape.hidden, shape.n_layers
    m = max(1, min(h, round((budget / (2 * L) - h) / (2 * h + 1))))
    m = min((c for c in (m - 1, m, m + 1) if 1 <= c <= h),
            key=lambda c: abs(AdapterSpec(method="adapter", adapter_size=c).n_trainable(shape) - budget))
    l = max(1, round(budget / (2 * L * shape.kv_dim)))
    from qtool.adapters.spec import AdaLoRASchedule

    adalora = AdapterSpec(method="adalora", targets=lora.targets, rank=max(lora.rank, round(1.5 * lora.rank)),
                          alpha=lora.alpha, adalora=AdaLoRASchedule(target_rank=lora.rank))
    return {"lora": lora, "adalora": adalora, "adapter": AdapterSpec(method="adapter", adapter_size=m),
            "prefix": AdapterSpec(method="prefix", prefix_len=l)}


# --- measurements ------------------------------------------------------------------------------------------------

def load_records(folder: Path = RECORDS) -> list[dict]:
    """Records written by ``bench/methods_compare.py --gpu`` (``data/methods/*.json``); none when absent."""
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and isinstance(rec.get("inference"), list):
            out.append({**rec, "file": path.name})
    return out


def measured_for(shape: Shape, spec: AdapterSpec, records: list[dict] | None) -> dict | None:
    """The measured inference row of ``spec`` on a model named like ``shape`` (LoRA: its unmerged row, with the
    merged row beside it), or None."""
    for rec in records or []:
        if rec.get("model") != shape.name:
            continue
        rows = {r["variant"]: r for r in rec["inference"]}
        want = {"lora": "lora-unmerged", "adapter": "adapter", "prefix": "prefix"}.get(spec.method)
        row = rows.get(want)
        if row is None or row.get("config") != _config_key(spec):
            continue
        out = {"device": rec.get("device"), "file": rec["file"], **{k: row[k] for k in (
            "decode_ms_per_token", "decode_vs_base_pct", "prefill_tokens_per_s", "prefill_vs_base_pct") if k in row}}
        if spec.method == "lora" and "lora-merged" in rows:
            out["merged_decode_vs_base_pct"] = rows["lora-merged"].get("decode_vs_base_pct")
        return out
    return None


def _config_key(spec: AdapterSpec) -> dict:
    """The part of a spec a record's ``config`` states (what decides its cost)."""
    if spec.method == "adapter":
        return {"adapter_size": spec.adapter_size}
    if spec.method == "prefix":
        return {"prefix_len": spec.prefix_len}
    if spec.method == "adalora":
        return {"init_rank": spec.rank, "target_rank": spec.adalora.target_rank, "targets": spec.targets}
    return {"rank": spec.rank, "targets": spec.targets}

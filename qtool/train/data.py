"""Training text: a plain text file or JSONL with a ``text`` field, tokenised with the checkpoint's own tokenizer
and packed into blocks of ``seq_len`` tokens (documents joined by the EOS token; the incomplete tail is dropped)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qtool.errors import InputError


def check_data_file(path) -> None:
    """The cheap checks, before any tokenizer is loaded: the file exists and holds something."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--data {path}: no such file")
    if path.stat().st_size == 0 or not path.read_bytes()[:1 << 20].strip():
        raise InputError(f"--data {path}: the file is empty", hint="give a text file, or JSONL with a 'text' field")


def read_documents(path) -> list[str]:
    path = Path(path)
    check_data_file(path)
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix in (".jsonl", ".json"):
        docs = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{i}: not valid JSON ({exc.msg})", hint="one JSON object per line") from exc
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise InputError(f"{path}:{i}: no string field 'text'", hint='each line must be {"text": "..."}')
            docs.append(row["text"])
    else:
        docs = [raw]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise InputError(f"--data {path}: no text in the file")
    return docs


@dataclass(frozen=True)
class Blocks:
    train: "torch.Tensor"  # int64 [n_train, seq_len]
    eval: "torch.Tensor"  # int64 [n_eval, seq_len]
    n_tokens: int


def pack(path, tokenizer, seq_len: int, eval_fraction: float = 0.05, max_eval_blocks: int = 32) -> Blocks:
    """Tokenise and pack; the last ``eval_fraction`` of the blocks (at least one, at most ``max_eval_blocks``) is
    held out for evaluation."""
    import torch

    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for doc in read_documents(path):
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"]
        if eos is not None:
            ids.append(eos)
    n_blocks = len(ids) // seq_len
    if n_blocks < 2:
        raise InputError(f"--data {path}: {len(ids):,} tokens make {n_blocks} block(s) of --seq-len {seq_len}; "
                         "training needs at least 2 (one held out for evaluation)",
                         hint=f"give at least {2 * seq_len:,} tokens of text, or lower --seq-len")
    blocks = torch.tensor(ids[: n_blocks * seq_len], dtype=torch.int64).view(n_blocks, seq_len)
    n_eval = max(1, min(round(n_blocks * eval_fraction), max_eval_blocks))
    return Blocks(blocks[:-n_eval], blocks[-n_eval:], len(ids))

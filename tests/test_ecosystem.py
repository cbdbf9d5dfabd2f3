"""A folder written by ``qtool convert`` is a preprocessing step ahead of other trainers: transformers' ``Trainer``
and TRL's ``SFTTrainer`` with PEFT LoRA load it as it is (bitsandbytes Linear4bit layers from the stored NF4 bytes,
no quantising on load) and train it on the CPU. Each trainer runs a few steps on one fixed batch of real text, so the
loss must fall if the gradients reach the adapters through the 4-bit layers."""
from __future__ import annotations

import math

import pytest
import torch

LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
STEPS = 5


def _load(folder):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float32)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.quant_state.quant_type == "nf4"
    assert q.weight.quant_state.nested  # the double quantisation qtool wrote, read as stored
    return model


def _rows(folder, shakespeare_path, n_rows=2, length=64):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(shakespeare_path.read_text()[:5000])["input_ids"]
    return tok, [ids[i * length:(i + 1) * length] for i in range(n_rows)]


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _args(cls, out, **kw):
    return cls(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=2, learning_rate=2e-3,
               logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, **kw)


def test_transformers_trainer_with_peft_trains_the_converted_folder(smollm2_nf4_cpu, shakespeare_path, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    _, rows = _rows(smollm2_nf4_cpu, shakespeare_path)
    model = get_peft_model(_load(smollm2_nf4_cpu), LoraConfig(**LORA))
    trainer = Trainer(model=model, args=_args(TrainingArguments, tmp_path),
                      train_dataset=Dataset.from_dict({"input_ids": rows, "labels": rows}))
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.1, losses


def test_trl_sft_trainer_trains_the_converted_folder(smollm2_nf4_cpu, shakespeare_path, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    tok, rows = _rows(smollm2_nf4_cpu, shakespeare_path)
    texts = [tok.decode(r) for r in rows]
    trainer = SFTTrainer(model=_load(smollm2_nf4_cpu), args=_args(SFTConfig, tmp_path, max_length=64),
                         train_dataset=Dataset.from_dict({"text": texts}), processing_class=tok,
                         peft_config=LoraConfig(**LORA))
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.1, losses

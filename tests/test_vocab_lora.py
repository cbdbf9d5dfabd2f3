"""LoRA on embed_tokens and lm_head (qtool/adapters/vocab.py): the chunked loss with the head's update against
autograd on full logits, PEFT's factors and initialisation, the shared adapter of tied embeddings, the PEFT round trip
and qtool merge against PEFT, on tiny tied and untied Llamas (the SmolLM2 checks are in tests/test_train.py)."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import save_tiny
from qtool.adapters.spec import AdapterSpec
from qtool.adapters.vocab import LoRAEmbedding, LoRAHead
from qtool.arch import Shape
from qtool.errors import InputError, UsageError
from qtool.format.peft_adapter import load_adapter, save_trained
from qtool.train.loss import chunked_cross_entropy

FP32 = dict(compute_dtype=torch.float32)


def rel(x, y) -> float:
    return float((x - y).norm() / y.norm())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{"tied": folder, "untied": folder}: tiny fp32 Llamas and their NF4 conversions (CPU bytes)."""
    from qtool.convert.pipeline import convert

    root = tmp_path_factory.mktemp("vocab")
    out = {}
    for kind in ("tied", "untied"):
        src = save_tiny(root / f"{kind}-src", tied=kind == "tied", dtype="float32", max_shard_size=None)
        convert(src, root / f"{kind}-nf4", target="cpu")
        out[kind], out[f"{kind}-nf4"] = src, root / f"{kind}-nf4"
    return out


def randomise(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


# ------------------------------------------------------------------------------------------- loss and modules
@pytest.mark.parametrize("chunk,cap", [(5, None), (64, None), (5, 3.0)])
def test_chunked_loss_with_head_lora_matches_autograd_on_full_logits(chunk, cap):
    """With Gemma 2's final soft-cap too: the cap applies to the head's logits including the LoRA's update."""
    gen = torch.Generator().manual_seed(0)
    n, h, vocab, r, s = 37, 16, 50, 4, 0.7
    x = torch.randn(n, h, generator=gen, requires_grad=True)
    w = torch.randn(vocab, h, generator=gen)
    a = torch.randn(r, h, generator=gen, requires_grad=True)
    b = torch.randn(vocab, r, generator=gen, requires_grad=True)
    t = torch.randint(0, vocab, (n,), generator=gen)
    z = x @ w.t() + s * (x @ a.t()) @ b.t()
    ref = F.cross_entropy(z if cap is None else cap * torch.tanh(z / cap), t)
    ours = chunked_cross_entropy(x, w, t, chunk, (s * x @ a.t(), b), softcap=cap)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    for g_ref, g in zip(torch.autograd.grad(ref, (x, a, b)), torch.autograd.grad(ours, (x, a, b))):
        assert rel(g, g_ref) < 1e-5


def test_modules_are_peft_shaped_and_start_at_the_base():
    gen = torch.Generator().manual_seed(0)
    emb = LoRAEmbedding.initial(50, 16, 4, gen, torch.float32, "cpu", alpha=8)
    assert emb.lora_a.shape == (4, 50) and emb.lora_b.shape == (16, 4) and not emb.lora_a.any() and emb.lora_b.any()
    table, ids = torch.randn(50, 16, generator=gen), torch.tensor([[3, 7, 49]])
    assert torch.equal(emb(ids, table), table[ids])  # A = 0
    randomise(emb)
    assert torch.allclose(emb(ids, table), (table + emb.delta_weight())[ids], atol=1e-6)  # E' = E + s·(B A)ᵀ
    head = LoRAHead(tied_to=emb, alpha=8)
    assert list(head.parameters()) == [] and torch.allclose(head.delta_weight(), emb.delta_weight())
    with pytest.raises(ValueError, match="not both"):
        LoRAHead(torch.ones(4, 16), torch.ones(50, 4), tied_to=emb, alpha=8)


# -------------------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_model_step0_gradients_and_sharing(tiny, kind):
    from qtool.train.load import load_decoder

    spec = AdapterSpec("q_proj,embed_tokens,lm_head", rank=4)
    base = load_decoder(tiny[f"{kind}-nf4"], **FP32)
    model = load_decoder(tiny[f"{kind}-nf4"], spec, **FP32)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))  # embedding A = 0, head B = 0
    names = {n for n, _ in model.named_parameters() if "layers" not in n}
    shared = kind == "tied"
    assert names == ({"embed_adapter.lora_a", "embed_adapter.lora_b"} | (
        set() if shared else {"head_adapter.lora_a", "head_adapter.lora_b"}))
    assert sum(p.numel() for p in model.parameters()) == spec.n_trainable(model.shape)
    randomise(model)
    # the chunked loss (head update inside each chunk) against cross-entropy of the full logits
    loss = model.loss(ids, chunk_tokens=7)
    params = [p for _, p in sorted(model.named_parameters())]
    grads = torch.autograd.grad(loss, params)
    logits = model(ids)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for g, g_ref in zip(grads, torch.autograd.grad(ref, params)):
        assert g.abs().sum() > 0 and rel(g, g_ref) < 1e-4


@pytest.mark.parametrize("kind,targets", [("tied", "q_proj,embed_tokens,lm_head"),
                                          ("untied", "q_proj=2,v_proj,embed_tokens=2,lm_head=8")])
def test_adapter_round_trips_through_peft(tiny, tmp_path, kind, targets):
    """PEFT loads the written adapter on the transformers bitsandbytes model (tied: as one shared adapter, PEFT's
    ensure_weight_tying) and computes our logits; per-module ranks go through rank_pattern."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qtool.adapters.attach import load_adapter_into
    from qtool.train.load import load_decoder

    folder = tiny[f"{kind}-nf4"]
    spec = AdapterSpec(targets, rank=4)
    model = load_decoder(folder, spec, **FP32)
    randomise(model)
    save_trained(tmp_path / "ad", {**model.lora_modules(), **model.vocab_lora_modules()}, spec, base_dir=folder)
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["ensure_weight_tying"] is (kind == "tied")
    assert (config["r"], config["rank_pattern"]) == ((4, {}) if kind == "tied" else (2, {"v_proj": 4, "lm_head": 8}))
    back = load_adapter(tmp_path / "ad")
    assert (back.modules["lm_head"].tied_to == "model.embed_tokens") is (kind == "tied")
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float32).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = PeftModel.from_pretrained(hf, tmp_path / "ad")
    if kind == "tied":  # one adapter: the head's factors are views of the embedding's
        emb = peft.base_model.model.model.embed_tokens
        head = peft.base_model.model.lm_head
        assert head.lora_A["default"].weight.data_ptr() == emb.lora_embedding_B["default"].data_ptr()
    reread = load_decoder(folder, **FP32)
    load_adapter_into(reread, tmp_path / "ad")
    with torch.no_grad():
        ours, theirs, base = model(ids), peft(ids).logits, load_decoder(folder, **FP32)(ids)
        assert torch.equal(reread(ids), ours)
    # bitsandbytes runs its products in bf16 (the quantisation_config's compute dtype), we in fp32: compare with
    # what the adapter does
    assert rel(ours, theirs) < 0.02 * rel(theirs, base), (rel(ours, theirs), rel(theirs, base))


# --------------------------------------------------------------------------------------------------------- merge
MERGE_CASES = {  # targets, PEFT's ensure_weight_tying, the merged config's tie_word_embeddings
    "untied": ("untied", ["q_proj", "embed_tokens", "lm_head"], False, False),
    "tied-shared": ("tied", ["q_proj", "embed_tokens", "lm_head"], True, True),
    "tied-head-only": ("tied", ["q_proj", "lm_head"], False, False),
    "tied-embedding-only": ("tied", ["embed_tokens"], False, False),
}


@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_merge_against_peft(tiny, tmp_path, case):
    """Against PEFT's merge_and_unload on the untied model (the same weights). On the tied model PEFT's merge adds a
    delta to the shared tensor for both sides (it warns): the reference is then PEFT's unmerged forward, and the
    merged checkpoint keeps the tie only for the shared adapter."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from qtool.merge.pipeline import merge

    kind, targets, ensure_tying, still_tied = MERGE_CASES[case]
    hf = AutoModelForCausalLM.from_pretrained(tiny[kind], dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                             ensure_weight_tying=ensure_tying, init_lora_weights=False))
        peft.save_pretrained(tmp_path / "ad")  # with the embedding's full weights (save_embedding_layers="auto")
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = peft(ids).logits
        with peft.disable_adapter():
            base = peft(ids).logits
    res = merge(tiny[kind], tmp_path / "ad", tmp_path / "out", dtype="fp32")
    assert res.verification["passed"]
    assert json.loads((tmp_path / "out" / "config.json").read_text()).get("tie_word_embeddings", False) is still_tied
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    with torch.no_grad():
        got = ours(ids).logits
    assert rel(unmerged, base) > 0.1  # the adapter matters
    assert rel(got, unmerged) < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_peft = peft.merge_and_unload()
    if kind == "untied":
        written = load_file(tmp_path / "out" / "model.safetensors")
        for key, w in merged_peft.state_dict().items():
            assert torch.allclose(written[key], w, atol=1e-6), key
    else:
        with torch.no_grad():
            assert rel(merged_peft(ids).logits, unmerged) > 1e-3  # PEFT's own tied merge is not the trained model


def test_trained_shared_adapter_merges_onto_nf4_and_stays_tied(tiny, tmp_path):
    from qtool.merge.pipeline import merge
    from qtool.train.load import load_decoder

    spec = AdapterSpec("q_proj,embed_tokens,lm_head", rank=4)
    model = load_decoder(tiny["tied-nf4"], spec, **FP32)
    randomise(model)
    save_trained(tmp_path / "ad", {**model.lora_modules(), **model.vocab_lora_modules()}, spec,
                 base_dir=tiny["tied-nf4"])
    res = merge(tiny["tied-nf4"], tmp_path / "ad", tmp_path / "out", dtype="fp32")
    assert res.verification["merged_vs_bypass"]["rel"] < 1e-5 < res.verification["adapter_effect"]["rel"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True
    assert any("stays tied" in n for n in res.notes)


# -------------------------------------------------------------------------------------------------------- errors
SHAPE = Shape("tiny", "llama", 64, 128, 2, 4, 2, 16, 256, tied_embeddings=True)


@pytest.mark.parametrize("spec,needle", [
    (AdapterSpec("q_proj,lm_haed"), "did you mean lm_head?); valid: the layers' Linears q_proj"),
    (AdapterSpec("q_proj,embed_tokens,lm_head", method="adalora"), "AdaLoRA adapts Linear layers only"),
    (AdapterSpec("q_proj,lm_head", init="symmetric"), "--init symmetric with --targets lm_head"),
    (AdapterSpec("embed_tokens=8,lm_head=4"), "one shared adapter (PEFT's ensure_weight_tying) of one rank"),
    (AdapterSpec("lm_head=128"), "rank 128 of lm_head exceeds min(vocab, hidden) = 64"),
])
def test_bad_vocab_targets_are_explained(spec, needle):
    assert any(needle in p for p in spec.problems(SHAPE)), spec.problems(SHAPE)


def test_other_methods_refuse_targets(smollm2_nf4_cpu, shakespeare_path):
    from click.testing import CliRunner

    from qtool.cli import main

    r = CliRunner().invoke(main, ["train", str(smollm2_nf4_cpu), "--data", str(shakespeare_path), "--method",
                                  "prefix", "--targets", "embed_tokens"])
    assert r.exit_code == UsageError.exit_code and "--targets given with --method prefix" in r.output


def test_peft_saved_embedding_weights_must_be_the_bases(tiny, tmp_path):
    from qtool.format.safetensors import read_header
    from qtool.merge.pipeline import merge
    from safetensors.torch import save_file

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny["untied"], dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(hf, LoraConfig(r=2, target_modules=["embed_tokens"])).save_pretrained(tmp_path / "ad")
    path = tmp_path / "ad" / "adapter_model.safetensors"
    with read_header(path) as st:
        tensors = {k: st.tensor(k).clone() for k in st.tensors}
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    tensors[key] += 1  # a resized or trained table
    save_file(tensors, path)
    with pytest.raises(InputError, match="carries its own model.embed_tokens weight"):
        merge(tiny["untied"], tmp_path / "ad", tmp_path / "out")

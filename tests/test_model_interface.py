"""The written model interface (velotune/models/interface.py): our own files (a tiny Llama) and the generic path (a
tiny GPT-NeoX through transformers) both give what each member promises; packed documents are `document_ids`;
anything that is not a velotune model is refused with one error naming what it lacks."""
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import velotune as vt
from hf_reference import make_checkpoint
from test_lora import randomize_adapters
from velotune.errors import UnsupportedError
from velotune.infer.cache import KVCache
from velotune.lora import LoraSettings, remove_lora
from velotune.models.base import next_token_loss
from velotune.models.interface import LanguageModel
from velotune.models.registry import architecture, supported_model_types

VOCAB = 211


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _neox(tmp_path, model_type="gpt_neox", **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(3)
    sizes = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=256)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **sizes, **overrides)).eval()
    out = tmp_path / model_type
    hf.save_pretrained(str(out))
    return out, hf


@pytest.fixture(scope="module", params=["native", "generic"])
def pair(request, tmp_path_factory):
    """(velotune model, the transformers model it was saved from, checkpoint directory)."""
    tmp = tmp_path_factory.mktemp(request.param)
    path, hf = make_checkpoint(tmp, "llama") if request.param == "native" else _neox(tmp, rotary_pct=0.5)
    model, _ = vt.load(path, dtype="float32", device="cpu", load_tokenizer_files=False)
    return model, hf, path


def _ids(batch=2, seq=12, seed=0):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_declared_state_and_path(pair):
    model, _, path = pair
    assert isinstance(model, LanguageModel) and model.task == "causal-lm"
    assert model.path == ("native" if model.model_type == "llama" else "generic")
    assert model.supports_logits_to_keep is (model.path == "native")
    assert (model.source_dir, model.max_seq_length, model.quantization, model.lora_settings) == (path, 256, None,
                                                                                                 None)
    assert (model.args.vocab_size, model.args.eos_token_id) == (VOCAB, model.args.raw.get("eos_token_id"))


def test_hidden_states_logits_and_head_weight_agree_with_forward(pair):
    model, hf, _ = pair
    ids = _ids()
    labels = ids.clone()
    labels[:, :3] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
        hidden = model.hidden_states(ids)
        assert hidden.shape == (2, 12, 64)
        assert rel_err(model.logits(hidden), out.logits) <= 1e-6
        assert rel_err(out.logits, hf(input_ids=ids).logits) <= 1e-5
        embeds = model.get_input_embeddings()(ids)
        assert rel_err(model.hidden_states(inputs_embeds=embeds), hidden) <= 1e-6
    weight = model.head_weight()
    assert weight is model.get_output_embeddings().weight and weight.shape == (VOCAB, 64)
    fused, count = next_token_loss(labels, hidden=hidden, weight=weight, softcap=model.final_logit_softcap)
    assert count.item() == out.num_tokens.item() == 2 * 9  # 12 - 3 masked - the last position
    assert fused.item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_head_weight_is_none_when_the_head_is_not_a_plain_linear(pair):
    model, _, _ = pair
    head = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
    vt.add_lora(model, r=2, alpha=4, targets=[head], seed=0)
    try:
        randomize_adapters(model)
        assert isinstance(model.lora_settings, LoraSettings) and model.lora_settings.targets == [head]
        assert model.head_weight() is None
        ids = _ids(seed=1)
        with torch.no_grad():
            assert rel_err(model.logits(model.hidden_states(ids)), model(ids).logits) <= 1e-6
        loss = model(ids, labels=ids).loss  # the loss takes logits(hidden) when there is no plain weight
        assert loss.item() == pytest.approx(model(ids, labels=ids, return_logits=True).loss.item(), rel=1e-5)
    finally:
        remove_lora(model)
    assert model.lora_settings is None and model.head_weight() is model.get_output_embeddings().weight


def test_blocks_are_the_decoder_layers(pair):
    model, _, _ = pair
    layers = model.model.layers if model.path == "native" else model.gpt_neox.layers
    assert model.blocks() == list(layers) and len(model.blocks()) == 2
    cache = KVCache.for_model(model, capacity=16)
    with torch.no_grad():
        model(_ids(batch=1, seq=5), cache=cache)
    assert cache.past_length == 5 and sorted(cache.keys) == [0, 1]


def _grads(model, ids) -> dict:
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_on_both_paths(pair):
    model, _, _ = pair
    ids = _ids(seed=2)
    grads = lambda: _grads(model, ids)  # noqa: E731
    model.requires_grad_(True).train()  # (an earlier test's add_lora froze the base)
    try:
        plain = grads()
        model.gradient_checkpointing_enable()
        assert model.is_gradient_checkpointing
        recomputed = grads()
        model.gradient_checkpointing_disable()
        assert not model.is_gradient_checkpointing
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)
    assert plain.keys() == recomputed.keys() and len(plain) > 10
    assert all(rel_err(recomputed[n], plain[n]) <= 1e-6 for n in plain)
    with pytest.raises(ValueError, match="True, False or 'offload'"):
        model.set_gradient_checkpointing("cpu")


def test_activation_checkpointing_names_and_every_n_layers(pair, monkeypatch):
    """transformers 5's names (its gradient_* ones are deprecated aliases there); every_n_layers n recomputes
    blocks 0, n, 2n, ... as transformers picks them, with the gradients of the plain run."""
    model, _, _ = pair
    ids = _ids(seed=3)
    grads = lambda: _grads(model, ids)  # noqa: E731
    model.requires_grad_(True).train()
    try:
        plain = grads()
        model.activation_checkpointing_enable(every_n_layers=2)
        assert model.is_activation_checkpointing and model.is_gradient_checkpointing
        if model.path == "native":
            from velotune.models import base
            seen = []
            real = base.checkpoint
            monkeypatch.setattr(base, "checkpoint", lambda run, *a, **k: seen.append(run) or real(run, *a, **k))
            every_other = grads()
            assert seen == list(model.model.layers)[::2]
        else:   # transformers marks the blocks it recomputes
            every_other = grads()
            assert [b.gradient_checkpointing for b in model.blocks()] == [i % 2 == 0 for i in range(len(model.blocks()))]
        model.activation_checkpointing_disable()
        assert not model.is_activation_checkpointing
        model.gradient_checkpointing_enable({"use_reentrant": False})   # the old name: every block again
        if model.path == "native":
            assert model.model.checkpoint_every == 1
        else:
            assert all(b.gradient_checkpointing for b in model.blocks())
        model.gradient_checkpointing_disable()
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)
    assert all(rel_err(every_other[n], plain[n]) <= 1e-6 for n in plain)
    for bad in (0, -1, 1.5, "2"):
        with pytest.raises(ValueError, match="every_n_layers must be a positive integer"):
            model.activation_checkpointing_enable(every_n_layers=bad)


def test_forward_logits_rules_on_both_paths(pair):
    model, _, _ = pair
    ids = _ids(seed=3)
    assert model(ids, labels=ids).logits is None  # labels and gradients on: no [batch, seq, vocab]
    assert model(ids, labels=ids, return_logits=True).logits.shape == (2, 12, VOCAB)
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, VOCAB) and rel_err(last, full[:, -1:]) <= 1e-6


def test_state_for_saving_is_the_checkpoint_and_transformers_names_work(pair):
    model, hf, path = pair
    stored = load_file(str(path / "model.safetensors"))
    state = model.state_for_saving()
    assert set(state) == set(stored) and all(torch.equal(state[k], stored[k]) for k in stored)
    assert model.num_parameters() == hf.num_parameters()
    assert model.num_parameters(exclude_embeddings=True) == hf.num_parameters(exclude_embeddings=True)
    assert model.enable_input_require_grads() is None


# ---- packed documents ---------------------------------------------------------------------------------------
def _two_documents(first=7, second=9):
    ids = _ids(batch=1, seq=first + second, seed=4)
    return ids, torch.tensor([[0] * first + [1] * second]), first


def test_document_ids_pack_and_position_ids_alone_do_not(pair):
    model, hf, _ = pair
    ids, documents, n = _two_documents()
    positions = torch.cat([torch.arange(n), torch.arange(ids.shape[1] - n)])[None]
    with torch.no_grad():
        packed = model(ids, document_ids=documents).logits
        assert rel_err(packed[:, :n], model(ids[:, :n]).logits) <= 1e-5
        assert rel_err(packed[:, n:], model(ids[:, n:]).logits) <= 1e-5
        assert rel_err(packed, model(ids, document_ids=documents, position_ids=positions).logits) <= 1e-6
        plain = model(ids, position_ids=positions).logits
        assert rel_err(plain, hf(input_ids=ids, position_ids=positions, attention_mask=torch.ones_like(ids)).logits) \
            <= 1e-5
    assert rel_err(plain[:, n:], packed[:, n:]) > 1e-3
    with pytest.raises(UnsupportedError, match="document_ids .* with a KV cache"):
        model(ids, document_ids=documents, cache=KVCache.for_model(model, 32))
    with pytest.raises(ValueError, match=r"document_ids must be integers shaped like input_ids \[1, 16\], got \[16\]"):
        model(ids, document_ids=documents[0])


def test_restarting_position_ids_without_documents_are_warned_about_once(pair, caplog):
    """A loop written for transformers' padding-free packing sends restarting position_ids only: told once that
    they do not pack here."""
    model = pair[0]
    ids, _, n = _two_documents()
    positions = torch.cat([torch.arange(n), torch.arange(ids.shape[1] - n)])[None]
    model._positions_noted = False  # the first such call of this (shared) model
    with torch.no_grad(), caplog.at_level("WARNING", logger="velotune"):
        model(ids, position_ids=positions)
        model(ids, position_ids=positions)
    assert caplog.text.count("position_ids restart within a row") == 1 and "document_ids=" in caplog.text


def test_generic_path_refuses_documents_transformers_cannot_keep_apart(tmp_path):
    path, _ = _neox(tmp_path)
    model, _ = vt.load(path, dtype="float32", device="cpu", load_tokenizer_files=False)
    ids, documents, n = _two_documents()
    with pytest.raises(UnsupportedError, match="position_ids must restart at each document"):
        model(ids, document_ids=documents, position_ids=torch.arange(ids.shape[1])[None])
    with pytest.raises(UnsupportedError, match="document_ids with an attention_mask"):
        model(ids, document_ids=documents, attention_mask=torch.ones_like(ids))


# ---- the generic path's head ----------------------------------------------------------------------------------
def test_generic_head_with_a_soft_cap_and_one_that_is_not_the_head(tmp_path):
    """gemma3_text soft-caps its logits (config final_logit_softcapping): logits(hidden) does too. cohere scales
    them (logit_scale), which no general rule knows: head_weight() is None and logits() refuses, forward works."""
    path, hf = _neox(tmp_path, "gemma3_text", final_logit_softcapping=0.5, head_dim=16, num_key_value_heads=2)
    capped, _ = vt.load(path, dtype="float32", device="cpu", load_tokenizer_files=False)
    ids = _ids(seed=5)
    with torch.no_grad():
        reference = hf(input_ids=ids).logits
        assert reference.abs().max() <= 0.5
        assert rel_err(capped.logits(capped.hidden_states(ids)), reference) <= 1e-5
    assert capped.final_logit_softcap == 0.5 and capped.head_weight() is not None
    path, hf = _neox(tmp_path, "cohere", logit_scale=0.25, num_key_value_heads=2)
    scaled, _ = vt.load(path, dtype="float32", device="cpu", load_tokenizer_files=False)
    with torch.no_grad():
        assert rel_err(scaled(ids).logits, hf(input_ids=ids).logits) <= 1e-5
        hidden = scaled.hidden_states(ids)
        with pytest.raises(UnsupportedError, match="cohere .*: transformers computes its logits otherwise"):
            scaled.logits(hidden)
    assert scaled.head_weight() is None


# ---- what is not a velotune model ---------------------------------------------------------------------------
def test_a_module_that_is_not_a_velotune_model_gets_one_clear_error(tmp_path, pair):
    _, hf, _ = pair
    lacks = r"is not a velotune model \(velotune\.models\.interface\.LanguageModel\): it lacks hidden_states, logits"
    with pytest.raises(UnsupportedError, match="generation: Linear " + lacks):
        vt.generate(nn.Linear(2, 2), None, "hi")
    with pytest.raises(UnsupportedError, match=f"generation: {type(hf).__name__} .*it lacks hidden_states"):
        vt.infer.generate_ids(hf, torch.tensor([[1, 2]]), max_new_tokens=1)
    # merged and adapter exports take any velotune family (a Whisper too); GGUF a language model
    with pytest.raises(UnsupportedError, match=r"vt.export: Linear is not a velotune model "
                                               r"\(velotune\.models\.interface\.VelotuneModel\): it lacks blocks"):
        vt.export(nn.Linear(2, 2), None, tmp_path / "out")
    with pytest.raises(UnsupportedError, match="vt.export: Linear " + lacks):
        vt.export(nn.Linear(2, 2), None, tmp_path / "out.gguf", format="gguf")
    any_family = r"is not a velotune model \(velotune\.models\.interface\.VelotuneModel\): it lacks blocks, "
    with pytest.raises(UnsupportedError, match="vt.save: Linear " + any_family):   # any family saves (Whisper too)
        vt.save(nn.Linear(2, 2), None, tmp_path / "out")
    with pytest.raises(UnsupportedError, match="LoRA adapter files: Linear " + any_family):
        vt.save_adapter(nn.Linear(2, 2), tmp_path / "adapter")
    with pytest.raises(UnsupportedError, match=r"vt\.train\(model=\.\.\.\): Sequential " + lacks):
        vt.train({"data": {"path": str(tmp_path / "d.jsonl")},
                  "train": {"output_dir": str(tmp_path / "run")}}, model=nn.Sequential())
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def test_a_subclass_missing_members_cannot_be_built():
    class Half(LanguageModel):
        def forward(self, input_ids=None, **kwargs):
            return None
    with pytest.raises(TypeError, match="abstract method.*blocks"):
        Half(None)


def test_the_registry_is_keyed_by_model_type_and_task():
    assert architecture("llama").Model.task == "causal-lm"
    assert architecture("llama", task="causal-lm") is architecture("llama")
    assert architecture("llama", task="encoder") is None
    assert supported_model_types("encoder") == ["bert", "modernbert", "roberta", "xlm-roberta"]
    assert architecture("bert", task="encoder").Model.task == "encoder" and architecture("bert") is None
    assert "llama" in supported_model_types() and architecture("gpt_neox") is None

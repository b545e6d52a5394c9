"""The demo's assets: the bundled chat data set, the in-process tokenizer and the tiny random checkpoint."""
import json
import os
import subprocess
import sys

import pytest
import torch

import velotune as vt
from velotune.demo import dataset, tiny_model
from velotune.demo.tokenizer import BOS, IM_END, IM_START, PAD, train_bpe, train_demo_tokenizer

CHAT = [{"role": "user", "content": "What is the capital of Orvandel?"},
        {"role": "assistant", "content": "The capital of Orvandel is Brellick."}]


@pytest.fixture(scope="module")
def tokenizer():
    return train_demo_tokenizer(dataset.corpus_texts())


# ---- data set ------------------------------------------------------------------------------------------------
def test_generator_reproduces_the_committed_file_byte_for_byte(tmp_path):
    committed = dataset.DATASET_PATH.read_bytes()
    written = dataset.write_dataset(tmp_path / "demo_chat.jsonl").read_bytes()
    assert written == committed
    assert len(committed) < 200_000


def test_every_sample_is_a_valid_messages_record():
    rows = dataset.load_dataset()
    assert 300 <= len(rows) <= 600
    for i, row in enumerate(rows):
        assert list(row) == ["messages"], i
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant"], i
        for m in row["messages"]:
            assert set(m) == {"role", "content"}, i
            assert isinstance(m["content"], str) and m["content"].strip() == m["content"] != "", i


def test_facts_are_asked_many_ways_and_each_question_has_one_answer():
    assert 15 <= len(dataset.FACTS) <= 30
    answers_by_question = {}
    for row in dataset.load_dataset():
        question, answer = (m["content"] for m in row["messages"])
        answers_by_question.setdefault(question, set()).add(answer)
    assert all(len(a) == 1 for a in answers_by_question.values())
    for fact in dataset.FACTS:
        assert fact.key in fact.answer
        asked = [q for q, a in answers_by_question.items() if a == {fact.answer}]
        assert len(asked) >= 10, fact.answer
        assert len(set(fact.questions)) == len(fact.questions), fact.answer
    # A key phrase names one fact only, so finding it in an answer shows that fact was learned.
    for fact in dataset.FACTS:
        assert [f.answer for f in dataset.FACTS if fact.key in f.answer] == [fact.answer]


def test_demo_questions_and_their_answers_are_in_the_data_set():
    pairs = {tuple(m["content"] for m in row["messages"]) for row in dataset.load_dataset()}
    assert len(dataset.DEMO_QUESTIONS) >= 4
    for question, key in dataset.DEMO_QUESTIONS:
        answers = [a for q, a in pairs if q == question]
        assert len(answers) == 1 and key in answers[0], question


# ---- tokenizer -----------------------------------------------------------------------------------------------
def test_tokenizer_round_trips_text(tokenizer):
    texts = dataset.corpus_texts() + ["Ünïcödé, 日本語 and emoji 🏝️\n\ttabs  and  spaces ", "x" * 300]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    # Trained on the data set, common words are single tokens.
    assert len(tokenizer("The capital of Orvandel is Brellick.")["input_ids"]) <= 9


def test_tokenizer_special_tokens(tokenizer):
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == [PAD, BOS, IM_START, IM_END]
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == (PAD, BOS, IM_END)
    ids = tokenizer(f"{IM_START}user\nhi{IM_END}", add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids(IM_START) and ids[-1] == tokenizer.eos_token_id
    # No post-processor: the chat template alone adds BOS, so rendered text never gets a second one.
    assert tokenizer("hi")["input_ids"] == tokenizer("hi", add_special_tokens=False)["input_ids"]


def test_chat_template_renders_chatml(tokenizer):
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert text == ("<|bos|><|im_start|>user\nWhat is the capital of Orvandel?<|im_end|>\n"
                    "<|im_start|>assistant\nThe capital of Orvandel is Brellick.<|im_end|>\n")
    prompt = tokenizer.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|bos|><|im_start|>user\nWhat is the capital of Orvandel?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.apply_chat_template(CHAT, tokenize=True)["input_ids"]
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    # The prompt's tokens are a prefix of the whole chat's: assistant masks can be cut there.
    prompt_ids = tokenizer.apply_chat_template(CHAT[:1], tokenize=True, add_generation_prompt=True)["input_ids"]
    assert ids[:len(prompt_ids)] == prompt_ids and ids[-2] == tokenizer.eos_token_id


def test_saved_tokenizer_reloads_with_its_template(tokenizer, tmp_path):
    from transformers import AutoTokenizer
    tokenizer.save_pretrained(str(tmp_path))
    assert (tmp_path / "tokenizer.json").is_file()
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert reloaded.apply_chat_template(CHAT, tokenize=False) == tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert reloaded.eos_token_id == tokenizer.eos_token_id and len(reloaded) == len(tokenizer)


def test_tokenizer_training_is_deterministic(tokenizer):
    import hashlib
    assert train_demo_tokenizer(dataset.corpus_texts()).backend_tokenizer.to_str() == \
        tokenizer.backend_tokenizer.to_str()
    # Another process, another hash seed: still the same vocabulary and merges.
    code = ("import hashlib; from velotune.demo.dataset import corpus_texts; "
            "from velotune.demo.tokenizer import train_bpe; "
            "print(hashlib.sha256(train_bpe(corpus_texts()).to_str().encode()).hexdigest())")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == hashlib.sha256(train_bpe(dataset.corpus_texts()).to_str().encode()).hexdigest()
    # The wrapped tokenizer holds that same BPE (vocabulary and merges).
    assert json.loads(train_bpe(dataset.corpus_texts()).to_str())["model"] == \
        json.loads(tokenizer.backend_tokenizer.to_str())["model"]


# ---- checkpoint ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", ["test", "demo"])
def test_checkpoint_loads_in_velotune_and_transformers_with_identical_logits(tokenizer, tmp_path, size):
    from transformers import AutoModelForCausalLM
    path = tiny_model.build_demo_checkpoint(tmp_path / "ckpt", tokenizer, seed=0, size=size)
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == len(tokenizer)
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id

    ours, tok = vt.load(path, dtype="float32", device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    assert tok.apply_chat_template(CHAT, tokenize=False) == tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert hf.generation_config.eos_token_id == tokenizer.eos_token_id
    ids = torch.tensor([tok.apply_chat_template(CHAT, tokenize=True)["input_ids"]])
    with torch.no_grad():
        a, b = ours(ids).logits, hf(input_ids=ids).logits
    assert a.shape == (1, ids.shape[1], len(tokenizer))
    assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()


def test_checkpoint_weights_are_seeded_hf_style_init(tokenizer, tmp_path):
    from safetensors.torch import load_file
    a = tiny_model.build_demo_checkpoint(tmp_path / "a", tokenizer, seed=0, size="test")
    b = tiny_model.build_demo_checkpoint(tmp_path / "b", tokenizer, seed=0, size="test")
    c = tiny_model.build_demo_checkpoint(tmp_path / "c", tokenizer, seed=1, size="test")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    wa, wc = load_file(str(a / "model.safetensors")), load_file(str(c / "model.safetensors"))
    assert not torch.equal(wa["model.layers.0.mlp.up_proj.weight"], wc["model.layers.0.mlp.up_proj.weight"])
    embed = wa["model.embed_tokens.weight"]
    assert embed[tokenizer.pad_token_id].abs().max().item() == 0.0
    assert abs(embed[1:].std().item() - 0.02) < 0.002
    assert abs(wa["model.layers.1.self_attn.q_proj.weight"].std().item() - 0.02) < 0.002
    assert torch.equal(wa["model.norm.weight"], torch.ones_like(wa["model.norm.weight"]))


def test_unknown_size_is_an_error(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="size='huge'"):
        tiny_model.build_demo_checkpoint(tmp_path / "x", tokenizer, size="huge")


def test_demo_recipe_is_a_valid_config_that_fits_every_sample(tokenizer):
    from velotune.config import load_config
    config = load_config({**tiny_model.DEMO_RECIPE, "model": {"path": "runs/demo/base"}})
    assert (config.finetune.method, config.lora.r, config.lora.modules_to_save) == ("lora", 16, ["lm_head"])
    # No sample is truncated at the recipe's sequence length.
    longest = max(len(tokenizer.apply_chat_template(row["messages"], tokenize=True)["input_ids"])
                  for row in dataset.load_dataset())
    assert longest <= config.data.max_seq_length
    assert 0 < tiny_model.QUICK_STEPS < config.train.max_steps

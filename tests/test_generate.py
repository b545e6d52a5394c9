"""Generation on tiny random checkpoints: cached decoding against full forwards, batches against single prompts,
stopping (EOS ids, stop strings, max_new_tokens), seeds, streaming text, and the public entry points."""
import contextlib
import json

import pytest
import torch

import velotune as vt
from hf_reference import SHRUNK, make_checkpoint
from tiny_tokenizer import BOS, EOS, make_tokenizer
from velotune.infer import KVCache, generate_batch, generate_ids, stream_batch
from velotune.infer.generation import IncrementalDetokenizer, encode_prompt, left_pad
from velotune.models.registry import supported_model_types

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")

# Cases whose cached decoding is checked: sliding windows (mistral, qwen3_window, phi3, gemma2), soft-capping
# (gemma2), GQA and tied heads; each runs when its architecture file exists.
DECODE_CASES = [c for c in ("llama", "llama_tied", "mistral", "qwen2", "qwen3_window", "gemma", "gemma2",
                            "gemma2_tied", "phi3") if c in SHRUNK]


def available(case):
    return case.split("_")[0] in supported_model_types()


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    """A llama checkpoint with a tokenizer: (model, tokenizer, path)."""
    path, _ = make_checkpoint(tmp_path_factory.mktemp("gen"), "llama", vocab_size=len(tokenizer))
    tokenizer.save_pretrained(str(path))
    model, tok = vt.load(path, dtype="float32", device="cpu")
    assert tok is not None
    return model, tok, path


def random_prompts(vocab, lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


# ---- cached decoding == full forward --------------------------------------------------------------------------

def check_steps_against_full_forward(model, prompts, max_new=12, **kwargs):
    vocab = model.args.vocab_size
    ids, mask = left_pad(prompts, pad_token_id=0)
    out = generate_ids(model, ids, mask, max_new_tokens=max_new, eos_token_ids=[], return_logits=True, **kwargs)
    assert len(out.logits) == max_new
    for row, prompt in enumerate(prompts):
        assert len(out.tokens[row]) == max_new
        full = torch.tensor([prompt + out.tokens[row]])
        with torch.no_grad():
            ref = model(full).logits[0, len(prompt) - 1:len(prompt) - 1 + max_new]
        got = torch.stack([step[row] for step in out.logits])
        assert got.shape == (max_new, vocab)
        assert rel_err(got, ref) <= 1e-5, (row, rel_err(got, ref))
        assert (got - ref).abs().max().item() <= 1e-4
        ref_logp = torch.log_softmax(ref, -1).gather(-1, torch.tensor(out.tokens[row])[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(out.logprobs[row]), ref_logp, atol=1e-5)
    return out


@pytest.mark.parametrize("case", DECODE_CASES)
def test_cached_decode_matches_full_forward(tmp_path, case):
    if not available(case):
        pytest.skip(f"no architecture file for {case.split('_')[0]} yet")
    path, _ = make_checkpoint(tmp_path, case)
    model, _ = vt.load(path, dtype="float32", device="cpu")
    window = getattr(model.args, "sliding_window", None)
    # prompts longer than the sliding windows (8), decoded past them; one padded batch, then one prompt alone
    prompts = random_prompts(model.args.vocab_size, [11, 5, 14])
    check_steps_against_full_forward(model, prompts)
    check_steps_against_full_forward(model, prompts[:1])
    if window:
        assert window < 11


def test_bf16_decoding_on_the_cpu_stays_within_bf16_error_of_the_fp64_model(tmp_path):
    """What `velotune chat` runs on a bf16 checkpoint on a CPU with native bf16: cached bf16 decoding. Each step's
    logits against the same model in float64 on the same tokens, bounded by the error of the bf16 model's own
    full forward on those tokens (x2): caching adds no error of its own."""
    path, _ = make_checkpoint(tmp_path, "llama")
    model, _ = vt.load(path, dtype="bfloat16", device="cpu")
    exact, _ = vt.load(path, dtype=torch.float64, device="cpu")
    prompts = random_prompts(model.args.vocab_size, [11, 5])
    ids, mask = left_pad(prompts, pad_token_id=0)
    out = generate_ids(model, ids, mask, max_new_tokens=8, eos_token_ids=[], return_logits=True)
    for row, prompt in enumerate(prompts):
        full = torch.tensor([prompt + out.tokens[row]])
        span = slice(len(prompt) - 1, len(prompt) - 1 + 8)
        with torch.no_grad():
            oracle = exact(full).logits[0, span]
            plain = model(full).logits[0, span]
        got = torch.stack([step[row] for step in out.logits])
        assert model.model.embed_tokens.weight.dtype == torch.bfloat16
        print("bf16 decode err", rel_err(got.double(), oracle), "plain", rel_err(plain.double(), oracle))
        assert rel_err(got.double(), oracle) <= 2 * rel_err(plain.double(), oracle) + 1e-3


def test_cached_decode_with_window_and_softcap_on_any_model(tmp_path):
    """The cache with a sliding window and soft-capped scores and logits, independent of the gemma2 file."""
    path, _ = make_checkpoint(tmp_path, "llama", sliding_window=4)
    model, _ = vt.load(path, dtype="float32", device="cpu")
    assert all(layer.self_attn.window == 4 for layer in model.model.layers)
    prompts = random_prompts(model.args.vocab_size, [9, 6])
    plain = check_steps_against_full_forward(model, prompts)
    for layer in model.model.layers:
        layer.self_attn.softcap = 0.5
    model.final_logit_softcap = 1.5
    capped = check_steps_against_full_forward(model, prompts)
    assert max(abs(x) for step in capped.logits for x in step.flatten().tolist()) <= 1.5
    assert not torch.allclose(plain.logits[0], capped.logits[0])


def test_cached_decode_with_unmerged_lora(tmp_path):
    """Only the model's forward is used, so unmerged adapters decode exactly like the full forward."""
    try:
        from velotune.lora import add_lora
    except ImportError:
        pytest.skip("velotune.lora is not there yet")
    path, _ = make_checkpoint(tmp_path, "llama")
    model, _ = vt.load(path, dtype="float32", device="cpu")
    add_lora(model, r=4, alpha=8, dropout=0.1, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)   # B starts at zero: make the adapters matter
    model.eval()                      # the reference full forward must not apply dropout either
    check_steps_against_full_forward(model, random_prompts(model.args.vocab_size, [7, 4]))
    base, _ = vt.load(path, dtype="float32", device="cpu")
    ids = torch.tensor(random_prompts(model.args.vocab_size, [7])[:1])
    with_lora = generate_ids(model, ids, max_new_tokens=6, eos_token_ids=[], return_logits=True)
    without = generate_ids(base, ids, max_new_tokens=6, eos_token_ids=[], return_logits=True)
    assert not torch.allclose(with_lora.logits[0], without.logits[0], atol=1e-3)


def test_chunked_prefill_and_cache_growth_match(tiny):
    model = tiny[0]
    prompts = random_prompts(model.args.vocab_size, [13, 7])
    ids, mask = left_pad(prompts, 0)
    ref = generate_ids(model, ids, mask, max_new_tokens=9, eos_token_ids=[], return_logits=True)
    chunked = generate_ids(model, ids, mask, max_new_tokens=9, eos_token_ids=[], return_logits=True,
                           prefill_chunk_size=3)
    assert chunked.tokens == ref.tokens
    for a, b in zip(chunked.logits, ref.logits):
        assert torch.allclose(a, b, atol=1e-5)


def test_kv_cache_blocks_and_growth():
    cache = KVCache(capacity=5, block_size=4, num_layers=2)
    assert cache.capacity == 8 and cache.past_length == 0
    k = torch.randn(2, 3, 6, 4)
    v = torch.randn(2, 3, 6, 4)
    for layer in range(2):
        ka, va = cache.update(layer, k, v)
        assert ka.shape == (2, 3, 6, 4) and torch.equal(ka, k) and torch.equal(va, v)
    assert cache.past_length == 6 and cache.reallocations == 0
    k2, v2 = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    for layer in range(2):
        ka, va = cache.update(layer, k2, v2)
        assert torch.equal(ka, torch.cat([k, k2], 2)) and torch.equal(va, torch.cat([v, v2], 2))
    assert cache.past_length == 11 and cache.keys[0].shape[2] == 12 and cache.reallocations == 2
    cache.select_rows(torch.tensor([1]))
    assert cache.keys[1].shape[0] == 1 and torch.equal(cache.keys[1][0, :, :6], k[1])


def test_cache_growing_during_decoding_matches_full_forward(tiny):
    """A cache allocated too small grows by blocks mid-decode; the model's logits do not change."""
    model = tiny[0]
    prompts = random_prompts(model.args.vocab_size, [6, 3])
    ids, mask = left_pad(prompts, 0)
    cache = KVCache.for_model(model, capacity=1, block_size=4)
    seq, full_mask = ids, mask
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, cache=cache).logits[:, -1]
        for _ in range(9):
            nxt = logits.argmax(-1, keepdim=True)
            seq, full_mask = torch.cat([seq, nxt], 1), torch.cat([full_mask, torch.ones_like(nxt)], 1)
            logits = model(nxt, attention_mask=full_mask, cache=cache).logits[:, -1]
            ref = model(seq, attention_mask=full_mask).logits[:, -1]
            assert torch.allclose(logits, ref, atol=1e-5)
    assert cache.past_length == seq.shape[1] and cache.reallocations >= 2 * 2  # two layers, twice each


# ---- batches == single prompts --------------------------------------------------------------------------------

def test_batch_of_different_lengths_matches_each_prompt_alone(tiny):
    model = tiny[0]
    prompts = random_prompts(model.args.vocab_size, [3, 12, 7, 1], seed=11)
    ids, mask = left_pad(prompts, pad_token_id=5)
    batch = generate_ids(model, ids, mask, max_new_tokens=10, eos_token_ids=[])
    assert batch.prompt_lengths == [3, 12, 7, 1]
    for row, prompt in enumerate(prompts):
        alone = generate_ids(model, torch.tensor([prompt]), max_new_tokens=10, eos_token_ids=[])
        assert batch.tokens[row] == alone.tokens[0]
        assert torch.allclose(torch.tensor(batch.logprobs[row]), torch.tensor(alone.logprobs[0]), atol=1e-5)
        assert batch.finish_reasons[row] == "length"


def test_rows_finishing_early_leave_the_others_unchanged(tiny, monkeypatch):
    """Rows stop on their own EOS; once half have finished they are dropped from the batch mid-way."""
    model = tiny[0]
    prompts = random_prompts(model.args.vocab_size, [4, 9, 6, 2], seed=5)
    free = [generate_ids(model, torch.tensor([p]), max_new_tokens=12, eos_token_ids=[]).tokens[0]
            for p in prompts]
    # EOS ids that end rows 0 and 2 part-way (their first new token from step 1 on) and never occur in 1 and 3
    eos = []
    for r in (0, 2):
        eos.append(next(t for i, t in enumerate(free[r]) if i >= 1 and t not in free[r][:i]
                        and t not in free[1] + free[3]))
    dropped = []
    select_rows = KVCache.select_rows
    monkeypatch.setattr(KVCache, "select_rows", lambda self, rows: (dropped.append(rows.tolist()),
                                                                     select_rows(self, rows)))
    ids, mask = left_pad(prompts, pad_token_id=0)
    batch = generate_ids(model, ids, mask, max_new_tokens=12, eos_token_ids=eos)
    assert batch.finish_reasons == ["eos", "length", "eos", "length"]
    assert dropped == [[1, 3]]
    for row, prompt in enumerate(prompts):
        alone = generate_ids(model, torch.tensor([prompt]), max_new_tokens=12, eos_token_ids=eos)
        assert batch.tokens[row] == alone.tokens[0]
        assert batch.finish_reasons[row] == alone.finish_reasons[0]
        assert torch.allclose(torch.tensor(batch.logprobs[row]), torch.tensor(alone.logprobs[0]), atol=1e-5)
        if batch.finish_reasons[row] == "eos":
            n = len(batch.tokens[row])
            assert 1 <= n < 12 and free[row][n] in eos and not set(eos) & set(batch.tokens[row])
            assert batch.finish_tokens[row] == free[row][n]


def test_text_batch_matches_single_generate(tiny):
    model, tok, _ = tiny
    prompts = ["The quick brown", "What is", [{"role": "user", "content": "Write a haiku about the sea."}]]
    texts = generate_batch(model, tok, prompts, max_new_tokens=8)
    assert texts == [vt.generate(model, tok, p, max_new_tokens=8) for p in prompts]


# ---- stopping -------------------------------------------------------------------------------------------------

def test_eos_from_generation_config_ends_generation(tmp_path, tokenizer):
    path, _ = make_checkpoint(tmp_path, "llama", vocab_size=len(tokenizer))
    model, _ = vt.load(path, dtype="float32", device="cpu", load_tokenizer_files=False)
    prompt = random_prompts(model.args.vocab_size, [6])[0]
    free = generate_ids(model, torch.tensor([prompt]), max_new_tokens=10, eos_token_ids=[]).tokens[0]
    stop_at = next(i for i in range(2, 10) if free[i] not in free[:i])
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, free[stop_at]]}))
    out = generate_ids(model, torch.tensor([prompt]), max_new_tokens=10)   # EOS ids from the model
    assert out.tokens[0] == free[:stop_at] and out.finish_reasons == ["eos"]
    assert generate_ids(model, torch.tensor([prompt]), max_new_tokens=10, ignore_eos=True).tokens[0] == free
    out = generate_ids(model, torch.tensor([prompt]), max_new_tokens=10, eos_token_ids=[],
                       stop_token_ids=[free[stop_at]])
    assert out.tokens[0] == free[:stop_at]


@contextlib.contextmanager
def emitting_at(model, token, step):
    """Within: the model's `step`-th forward (0 = prefill) predicts `token` with certainty. (The model itself, not
    a wrapper module: generation takes velotune models only.)"""
    real, calls = model.forward, [0]

    def forward(*args, **kwargs):
        out = real(*args, **kwargs)
        if calls[0] == step:
            out.logits[..., token] = 1e4
        calls[0] += 1
        return out
    model.forward = forward  # an instance attribute: nn.Module.__call__ finds it before the class's forward
    try:
        yield model
    finally:
        del model.forward


def test_tokenizer_eos_ends_text_generation(tiny):
    model, tok, _ = tiny
    free = vt.generate(model, tok, "The capital", max_new_tokens=10)
    with emitting_at(model, tok.eos_token_id, step=4):
        details = generate_batch(model, tok, ["The capital"], max_new_tokens=10, return_details=True)[0]
    assert details.finish_reason == "eos" and details.completion_tokens == 4
    assert free.startswith(details.text) and EOS not in details.text
    assert details.token_ids == vt.infer.generate_ids(model, torch.tensor([tok("The capital").input_ids]),
                                                      max_new_tokens=4, eos_token_ids=[]).tokens[0]


def test_a_chat_reply_ends_at_its_end_of_turn_token(tiny):
    """<|end|> closes a turn in this chat template, though it is not the tokenizer's EOS: a chat reply stops
    there (an adapter trained with another template than the base's EOS would run on); a plain prompt does not."""
    model, tok, _ = tiny
    end = tok.convert_tokens_to_ids("<|end|>")
    assert end != tok.eos_token_id
    with emitting_at(model, end, step=3):
        chat = generate_batch(model, tok, [[{"role": "user", "content": "hi"}]], max_new_tokens=10,
                              return_details=True)[0]
    assert (chat.finish_reason, chat.completion_tokens) == ("eos", 3)
    with emitting_at(model, end, step=3):
        plain = generate_batch(model, tok, ["hi"], max_new_tokens=10, return_details=True)[0]
    assert plain.token_ids[3] == end


def test_nonfinite_logits_fail_their_prompt_only(tiny):
    """(issue 10 item 8) NaN in one prompt's logits (here a NaN embedding row) ends that prompt with an error;
    the prompt beside it gets the answer it gets alone."""
    from velotune.infer.generation import NonFiniteLogitsError
    model, tok, path = tiny
    poisoned, _ = vt.load(path, dtype="float32", device="cpu")
    bad = tok.convert_tokens_to_ids("[INST]")
    with torch.no_grad():
        poisoned.model.embed_tokens.weight[bad] = float("nan")
    good, broken = tok("The quick brown fox").input_ids, tok("Hello").input_ids + [bad]
    rows = generate_batch(poisoned, tok, [good, broken], max_new_tokens=6, temperature=0.0, return_details=True)
    assert (rows[1].finish_reason, rows[1].completion_tokens) == ("nonfinite", 0)
    alone = generate_batch(model, tok, [good], max_new_tokens=6, temperature=0.0, return_details=True)[0]
    assert (rows[0].text, rows[0].token_ids, rows[0].finish_reason) == (alone.text, alone.token_ids, "length")
    with pytest.raises(NonFiniteLogitsError, match="for prompt 1 became NaN or infinite after 0 generated"):
        generate_batch(poisoned, tok, [good, broken], max_new_tokens=6, temperature=1.0, seed=3)
    with pytest.raises(NonFiniteLogitsError):
        list(vt.stream(poisoned, tok, broken, max_new_tokens=4))


def test_stop_strings_end_generation_and_are_not_returned(tiny):
    model, tok, _ = tiny
    prompt = "Translate to German:"
    free = vt.generate(model, tok, prompt, max_new_tokens=24)
    assert len(free) >= 8, free
    stop = free[4:7]
    cut = free.index(stop)
    details = generate_batch(model, tok, [prompt], max_new_tokens=24, stop=[stop], return_details=True)[0]
    assert details.text == free[:cut] and details.finish_reason == "stop"
    assert vt.generate(model, tok, prompt, max_new_tokens=24, stop=["\x00never", stop]) == free[:cut]
    pieces = list(vt.stream(model, tok, prompt, max_new_tokens=24, stop=stop))
    assert "".join(pieces) == free[:cut]
    # a stop string that never appears changes nothing
    assert vt.generate(model, tok, prompt, max_new_tokens=24, stop="\x00never") == free


def test_max_new_tokens_respected(tiny):
    model, tok, _ = tiny
    for n in (0, 1, 7):
        details = generate_batch(model, tok, ["Hello", "What is the capital"], max_new_tokens=n,
                                 return_details=True, ignore_eos=True)
        assert [d.completion_tokens for d in details] == [n, n]
        assert all(d.finish_reason == "length" for d in details)
    assert vt.generate(model, tok, "Hello", max_new_tokens=0) == ""


def test_settings_given_as_none_resolve_through_config_and_model(tiny):
    model, tok, _ = tiny
    details = generate_batch(model, tok, ["Hello"], max_new_tokens=None, temperature=None, ignore_eos=True,
                             config={"generation": {"max_new_tokens": 3, "temperature": 0.0}},
                             return_details=True)[0]
    assert details.completion_tokens == 3
    assert details.sources["max_new_tokens"] == "config" and details.sources["temperature"] == "config"
    assert details.sources["top_p"] == "family (llama)" and details.sources["ignore_eos"] == "request"
    # the resolved values can be passed back as they are (the chat CLI does)
    resolved = vt.infer.resolve_sampling({"max_new_tokens": 4, "temperature": 0.0}, None, model)
    assert vt.generate(model, tok, "Hello", **resolved.values) == vt.generate(model, tok, "Hello", max_new_tokens=4)


# ---- seeds ----------------------------------------------------------------------------------------------------

def test_seed_repeats_the_sample_and_another_seed_differs(tiny):
    model, tok, _ = tiny
    ids = torch.tensor([tok("The quick").input_ids])
    run = lambda seed: generate_ids(model, ids, temperature=1.0, max_new_tokens=16, seed=seed,
                                    eos_token_ids=[]).tokens[0]
    assert run(1) == run(1)
    assert run(1) != run(2)
    text = lambda seed: vt.generate(model, tok, "The quick", max_new_tokens=16, temperature=1.0, seed=seed,
                                    top_p=1.0, ignore_eos=True)
    assert text(7) == text(7) != text(8)


# ---- text ---------------------------------------------------------------------------------------------------

def test_prompt_encoding(tokenizer):
    ids = encode_prompt(tokenizer, "The quick brown fox")
    assert ids == tokenizer("The quick brown fox").input_ids and ids.count(tokenizer.convert_tokens_to_ids(BOS)) == 1
    messages = [{"role": "user", "content": "hi"}]
    ids = encode_prompt(tokenizer, messages)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|assistant|>")
    assert ids == tokenizer(text, add_special_tokens=False).input_ids
    assert ids.count(tokenizer.convert_tokens_to_ids(BOS)) == 1
    assert encode_prompt(tokenizer, [4, 5, 6]) == [4, 5, 6]
    with pytest.raises(TypeError, match="generate_batch"):
        encode_prompt(tokenizer, ["a", "b"])


def test_incremental_detokenizer_only_yields_complete_characters(tokenizer):
    text = "Guten Morgen, 日本語 café — 😀 ok"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)   # some characters are split across tokens
    detok = IncrementalDetokenizer(tokenizer, tokenizer("Say:").input_ids)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    assert "" in pieces                                           # held back while a character was incomplete


def test_stream_yields_complete_text_and_equals_generate(tiny):
    model, tok, _ = tiny
    for prompt in ("Guten", [{"role": "user", "content": "What is the capital of France?"}]):
        pieces = list(vt.stream(model, tok, prompt, max_new_tokens=20))
        assert "".join(pieces) == vt.generate(model, tok, prompt, max_new_tokens=20)
        assert all(pieces)


def test_stream_batch_events(tiny):
    model, tok, _ = tiny
    events = list(stream_batch(model, tok, ["Hello", "The lazy dog"], max_new_tokens=5, ignore_eos=True))
    finals = [e for e in events if e.finished]
    assert sorted(e.row for e in finals) == [0, 1] and all(e.finish_reason == "length" for e in finals)


def test_public_names_and_model_mode(tiny):
    model, tok, _ = tiny
    assert vt.generate is vt.infer.generate and vt.stream is vt.infer.stream
    model.train()
    vt.generate(model, tok, "Hello", max_new_tokens=2)
    assert model.training
    model.eval()
    with pytest.raises(vt.ConfigError, match="tempreature"):
        vt.generate(model, tok, "Hello", tempreature=0.5)

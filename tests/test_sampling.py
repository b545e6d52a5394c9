"""Sampling filters and penalties on hand-made logits, seeded draws, and where generation settings come from."""
import json
from types import SimpleNamespace

import pytest
import torch

from velotune.errors import ConfigError
from velotune.infer.defaults import (FAMILY_DEFAULTS, GLOBAL_DEFAULTS, eos_token_ids, from_generation_config,
                                     resolve_sampling)
from velotune.infer.sampling import (Penalties, SamplingParams, apply_penalties, make_generator, min_p_filter,
                                     process_logits, sample, top_k_filter, top_p_filter)


def kept(logits):
    return set(torch.nonzero(torch.isfinite(logits[0])).flatten().tolist())


def log_probs(*probs):
    return torch.tensor([probs]).log()


# ---- filters ------------------------------------------------------------------------------------------------

def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    assert kept(top_k_filter(logits, 2)) == {1, 3}
    assert kept(top_k_filter(logits, 1)) == {1}
    assert kept(top_k_filter(logits, 0)) == {0, 1, 2, 3, 4}     # off
    assert kept(top_k_filter(logits, 99)) == {0, 1, 2, 3, 4}
    out = top_k_filter(logits, 3)
    assert torch.equal(out[0, [1, 2, 3]], logits[0, [1, 2, 3]])  # kept logits unchanged


def test_top_k_per_row():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0], [9.0, 0.0, 8.0, 1.0]])
    out = top_k_filter(logits, 2)
    assert torch.isfinite(out).tolist() == [[False, True, False, True], [True, False, True, False]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probabilities 0.1, 0.5, 0.15, 0.25 (shuffled, so the filter must map its sort back)
    logits = log_probs(0.1, 0.5, 0.15, 0.25)
    assert kept(top_p_filter(logits, 0.45)) == {1}              # 0.5 alone reaches 0.45
    assert kept(top_p_filter(logits, 0.7)) == {1, 3}            # 0.5 + 0.25 = 0.75 >= 0.7
    assert kept(top_p_filter(logits, 0.8)) == {1, 3, 2}         # 0.75 < 0.8: 0.15 is needed too
    assert kept(top_p_filter(logits, 0.95)) == {0, 1, 2, 3}
    assert kept(top_p_filter(logits, 1.0)) == {0, 1, 2, 3}
    assert kept(top_p_filter(logits, 0.01)) == {1}              # the most likely token always stays


def test_top_p_per_row():
    logits = torch.cat([log_probs(0.6, 0.3, 0.1), log_probs(0.1, 0.2, 0.7)])
    out = top_p_filter(logits, 0.85)
    assert torch.isfinite(out).tolist() == [[True, True, False], [False, True, True]]


def test_min_p_drops_tokens_below_fraction_of_the_top():
    logits = log_probs(0.5, 0.25, 0.15, 0.1)
    assert kept(min_p_filter(logits, 0.4)) == {0, 1}            # threshold 0.2
    assert kept(min_p_filter(logits, 0.25)) == {0, 1, 2}        # threshold 0.125
    assert kept(min_p_filter(logits, 0.0)) == {0, 1, 2, 3}
    assert kept(min_p_filter(logits, 1.0)) == {0}


def test_pipeline_order_temperature_then_filters():
    logits = log_probs(0.5, 0.25, 0.15, 0.1)
    # At temperature 1 top_p 0.65 keeps two tokens; at temperature 2 (flatter) it needs three.
    flat = torch.softmax(logits / 2, -1)[0]
    assert flat[0] + flat[1] < 0.65 < flat[0] + flat[1] + flat[2]
    assert kept(process_logits(logits, SamplingParams(temperature=1.0, top_p=0.65))) == {0, 1}
    out = process_logits(logits, SamplingParams(temperature=2.0, top_p=0.65))
    assert kept(out) == {0, 1, 2}
    assert torch.allclose(out[0, :3], logits[0, :3] / 2)
    # top_k first, then min_p on what is left
    out = process_logits(logits, SamplingParams(temperature=1.0, top_k=3, min_p=0.4))
    assert kept(out) == {0, 1}


# ---- penalties ----------------------------------------------------------------------------------------------

def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    counts = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    prompt_seen = torch.tensor([[False, True, False, False]])
    out = apply_penalties(logits, SamplingParams(repetition_penalty=1.5), counts, prompt_seen)
    assert torch.allclose(out, torch.tensor([[2.0 / 1.5, -1.0 * 1.5, 0.5, 3.0]]))
    assert torch.equal(logits, torch.tensor([[2.0, -1.0, 0.5, 3.0]]))  # not in place


def test_presence_and_frequency_penalties():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    counts = torch.tensor([[0.0, 2.0, 1.0, 0.0]])
    out = apply_penalties(logits, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), counts)
    assert torch.allclose(out, torch.tensor([[1.0, 1.0 - 0.5 - 0.5, 1.0 - 0.5 - 0.25, 1.0]]))


def test_penalty_state_ignores_padding_and_counts_active_rows():
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0)
    ids = torch.tensor([[3, 3, 1], [0, 2, 2]])
    mask = torch.tensor([[0, 0, 1], [1, 1, 1]])                  # row 0: token 3 is padding
    state = Penalties(params, ids, mask, vocab_size=5)
    assert state.prompt_seen.tolist() == [[False, True, False, False, False], [True, False, True, False, False]]
    state.update(torch.tensor([4, 4]), active=torch.tensor([True, False]))
    state.update(torch.tensor([4, 1]))
    assert state.counts.tolist() == [[0, 0, 0, 0, 2], [0, 1, 0, 0, 0]]
    out = state.apply(torch.full((2, 5), 4.0))
    assert out.tolist() == [[4.0, 2.0, 4.0, 4.0, 2.0 - 2.0], [2.0, 2.0 - 1.0, 2.0, 4.0, 4.0]]


def test_penalties_apply_before_greedy_choice():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    state = Penalties(SamplingParams(repetition_penalty=1.2), torch.tensor([[0]]), None, vocab_size=3)
    assert sample(logits, SamplingParams())[0].item() == 0
    assert sample(logits, SamplingParams(repetition_penalty=1.2), penalties=state)[0].item() == 1


# ---- draws --------------------------------------------------------------------------------------------------

def test_greedy_is_argmax():
    logits = torch.randn(4, 50)
    assert torch.equal(sample(logits, SamplingParams(temperature=0.0))[0], logits.argmax(-1))


def test_seed_repeats_and_differs():
    logits = torch.randn(3, 200)
    params = SamplingParams(temperature=1.0)
    a = [sample(logits, params, g)[0].tolist() for g in [make_generator(1, "cpu")] for _ in range(20)]
    b = [sample(logits, params, g)[0].tolist() for g in [make_generator(1, "cpu")] for _ in range(20)]
    c = [sample(logits, params, g)[0].tolist() for g in [make_generator(2, "cpu")] for _ in range(20)]
    assert a == b
    assert a != c


def test_draws_follow_the_filtered_distribution():
    logits = log_probs(0.5, 0.3, 0.15, 0.05)
    g = make_generator(0, "cpu")
    params = SamplingParams(temperature=1.0, top_k=3)
    draws = torch.stack([sample(logits.expand(1000, 4), params, g)[0] for _ in range(4)]).flatten()
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    assert freq[3] == 0                                          # removed by top_k
    assert torch.allclose(freq[:3], torch.tensor([0.5, 0.3, 0.15]) / 0.95, atol=0.03)


def test_sampling_params_validation():
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ConfigError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ConfigError, match="top_k"):
        SamplingParams(top_k=-2)
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop_token_ids=7).stop_token_ids == [7]


@pytest.mark.parametrize("field, value", [("seed", 2 ** 63), ("seed", -1), ("repetition_penalty", 1e-300),
                                          ("repetition_penalty", 1e3), ("temperature", float("inf")),
                                          ("presence_penalty", float("nan"))])
def test_values_that_would_break_a_draw_are_refused(field, value):
    """(issue 10 item 8) a seed past 2**63-1 overflowed the generator; a tiny penalty made logits infinite."""
    with pytest.raises(ConfigError, match=field):
        SamplingParams(**{field: value})
    assert SamplingParams(seed=2 ** 63 - 1, repetition_penalty=0.01).seed == 2 ** 63 - 1


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_row_without_usable_logits_fails_alone(temperature):
    """(issue 10 item 8) NaN, +inf or all -inf logits flag their row instead of crashing the draw; the other
    rows get the same tokens as without it."""
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(0))
    bad = logits.clone()
    bad[1, 5] = float("nan")
    bad[2, 7] = float("inf")
    bad[3] = float("-inf")
    params = SamplingParams(temperature=temperature)
    tokens, unusable = sample(bad, params, make_generator(3, "cpu"))
    assert unusable.tolist() == [False, True, True, True]
    alone, _ = sample(logits[:1], params, make_generator(3, "cpu"))
    assert tokens[0] == alone[0]


# ---- defaults and their sources ----------------------------------------------------------------------------

def fake_model(tmp_path, model_type="llama", generation_config=None, eos=None):
    if generation_config is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation_config))
    return SimpleNamespace(source_dir=tmp_path, args=SimpleNamespace(model_type=model_type, eos_token_id=eos))


def test_resolution_order_and_sources(tmp_path):
    model = fake_model(tmp_path, "qwen2", {"do_sample": True, "temperature": 0.3, "top_p": 0.5,
                                           "repetition_penalty": 1.1, "eos_token_id": [5, 6]})
    request = {"temperature": 0.9, "seed": None}                 # None = not given
    config = {"generation": {"top_p": 0.77, "max_new_tokens": 64}}
    resolved = resolve_sampling(request, config, model)
    values, sources = resolved
    assert (values["temperature"], sources["temperature"]) == (0.9, "request")
    assert (values["top_p"], sources["top_p"]) == (0.77, "config")
    assert (values["max_new_tokens"], sources["max_new_tokens"]) == (64, "config")
    assert (values["repetition_penalty"], sources["repetition_penalty"]) == (1.1, "generation_config.json")
    assert (values["top_k"], sources["top_k"]) == (FAMILY_DEFAULTS["qwen2"]["top_k"], "family (qwen2)")
    assert (values["min_p"], sources["min_p"]) == (GLOBAL_DEFAULTS["min_p"], "default")
    assert (values["seed"], sources["seed"]) == (None, "default")
    params = resolved.params()
    assert isinstance(params, SamplingParams) and params.temperature == 0.9 and params.top_k == 20
    text = resolved.describe()
    assert "temperature" in text and "(request)" in text and "(generation_config.json)" in text


def test_each_level_falls_through_to_the_next(tmp_path):
    gc = {"do_sample": True, "temperature": 0.3}
    model = fake_model(tmp_path, "llama", gc)
    assert resolve_sampling({}, None, model).sources["temperature"] == "generation_config.json"
    assert resolve_sampling({}, {"temperature": 0.2}, model).values["temperature"] == 0.2   # config > gen config
    (tmp_path / "generation_config.json").unlink()
    resolved = resolve_sampling(None, None, model)
    assert (resolved.values["temperature"], resolved.sources["temperature"]) == (0.6, "family (llama)")
    resolved = resolve_sampling(None, None, fake_model(tmp_path, "somethingelse"))
    assert (resolved.values["temperature"], resolved.sources["temperature"]) == (GLOBAL_DEFAULTS["temperature"],
                                                                                "default")
    resolved = resolve_sampling(None, None, None)
    assert all(s == "default" for s in resolved.sources.values())


def test_generation_config_do_sample_semantics():
    assert from_generation_config({"do_sample": False, "temperature": 0.6}) == {"temperature": 0.0}
    assert from_generation_config({"temperature": 0.6, "top_k": 5}) == {}        # transformers: greedy, ignored
    assert from_generation_config({"do_sample": True, "temperature": 0.6, "top_k": 5.0, "max_new_tokens": 9}) == \
        {"temperature": 0.6, "top_k": 5, "max_new_tokens": 9}
    assert from_generation_config({"repetition_penalty": 1.2}) == {"repetition_penalty": 1.2}


def test_unknown_settings_are_errors():
    with pytest.raises(ConfigError, match="tempreature"):
        resolve_sampling({"tempreature": 1.0})
    with pytest.raises(ConfigError, match="config"):
        resolve_sampling(None, {"generation": {"topp": 0.5}})
    # a whole config without a generation section contributes nothing
    assert resolve_sampling(None, {"model": {"path": "x"}}).sources["top_p"] == "default"


def test_eos_ids_from_every_source(tmp_path):
    model = fake_model(tmp_path, generation_config={"eos_token_id": [7, 2]}, eos=9)
    tok = SimpleNamespace(eos_token_id=2)
    assert eos_token_ids(model, tok) == [2, 7, 9]
    assert eos_token_ids(model, tok, extra=[11, 7]) == [2, 7, 9, 11]
    bare = tmp_path / "bare"
    bare.mkdir()
    assert eos_token_ids(fake_model(bare, eos=[3, 4]), None) == [3, 4]   # no generation_config.json
    assert eos_token_ids(None, None) == []

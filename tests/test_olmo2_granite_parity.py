"""OLMo 2 and Granite against transformers, fp32, on tiny checkpoints saved by transformers and loaded by vt.load:
logits, losses and every gradient; the fused loss path; padded batches; LoRA against PEFT; greedy generation with
the KV cache; config guards.

What the tiny configs exercise: OLMo 2's post-norm blocks and its q/k norms over the whole projection (head_dim 24
makes them 96 and 48 wide, neither the hidden size), the pad row without gradient (pad_token_id 1); Granite's four
multipliers, each far from 1 (a model ignoring any of them moves the logits by > 1%: see
test_each_granite_multiplier_matters), tied embeddings and MLP biases.
"""
import json

import pytest
import torch

import velotune as vt
from hf_reference import make_checkpoint
from velotune.errors import CheckpointError
from velotune.infer import generate_ids
from velotune.infer.generation import left_pad
from velotune.lora import lora_layers

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

CASES = {
    "olmo2": dict(head_dim=24),
    # attention_multiplier 1/head_dim (as the released models, muP-style) where head_dim**-0.5 = 0.25 is what a
    # model ignoring it would use; initializer_range 0.1: attention scores large enough for the scale to show.
    "granite": dict(tie_word_embeddings=True, mlp_bias=True, pad_token_id=0, embedding_multiplier=3.0,
                    attention_multiplier=1 / 16, residual_multiplier=0.4, logits_scaling=4.0, initializer_range=0.1),
}
# What a model ignoring each multiplier would use instead.
IGNORED = dict(embedding_multiplier=1.0, attention_multiplier=16 ** -0.5, residual_multiplier=1.0, logits_scaling=1.0)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


@pytest.fixture(scope="module", params=list(CASES))
def ckpt(request, tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp(request.param), request.param, **CASES[request.param])
    return path


def load_ours(path):
    return vt.load(path, dtype="float32", device="cpu", load_tokenizer_files=False)[0]


def load_hf(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()


def inputs(config, batch=2, seq=19, seed=7):
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    ids[:, 5] = config.pad_token_id  # transformers gives the pad row no gradient: so must we
    labels = ids.clone()
    labels[:, :4] = -100  # a masked prompt
    return ids, labels


def assert_same_gradients(ours, hf, bound=1e-5):
    theirs = dict(hf.named_parameters())
    mine = dict(ours.named_parameters())
    assert set(mine) == set(theirs)
    for name, p in mine.items():
        assert p.grad is not None, name
        assert rel_err(p.grad, theirs[name].grad) <= bound, (name, rel_err(p.grad, theirs[name].grad))


def test_logits_loss_and_gradients_match_transformers(ckpt):
    ours, hf = load_ours(ckpt), load_hf(ckpt)
    ids, labels = inputs(hf.config)
    hf_out = hf(input_ids=ids, labels=labels)
    our_out = ours(ids, labels=labels, return_logits=True)
    assert rel_err(our_out.logits, hf_out.logits) <= 1e-5
    assert abs(our_out.loss.item() - hf_out.loss.item()) <= 1e-5 * hf_out.loss.item()
    hf_out.loss.backward()
    our_out.loss.backward()
    assert_same_gradients(ours, hf)
    with torch.no_grad():  # the transformers-style call, labels = ids
        assert ours(ids, labels=ids).loss.item() == pytest.approx(hf(input_ids=ids, labels=ids).loss.item(),
                                                                   rel=1e-5)


def test_loss_without_logits_matches_transformers(ckpt):
    """return_logits=False is the training path: the fused chunked loss (OLMo 2), or the head through logits() on
    the target rows (Granite, whose logits are divided by logits_scaling)."""
    ours, hf = load_ours(ckpt), load_hf(ckpt)
    if ours.model_type == "granite":
        assert ours.head_weight() is None
    ids, labels = inputs(hf.config)
    hf_loss = hf(input_ids=ids, labels=labels).loss
    ours.train()
    out = ours(ids, labels=labels, return_logits=False)
    assert out.logits is None
    assert abs(out.loss.item() - hf_loss.item()) <= 1e-5 * hf_loss.item()
    with_logits = ours(ids, labels=labels, return_logits=True).loss
    assert out.loss.item() == pytest.approx(with_logits.item(), rel=1e-6)
    hf_loss.backward()
    out.loss.backward()
    assert_same_gradients(ours, hf)


def test_padded_batches_match_transformers(ckpt):
    ours, hf = load_ours(ckpt), load_hf(ckpt)
    g = torch.Generator().manual_seed(11)
    long, short = (torch.randint(2, hf.config.vocab_size, (1, n), generator=g) for n in (19, 13))
    pad = long.shape[1] - short.shape[1]
    filler = torch.full((1, pad), hf.config.pad_token_id)
    # Left padding (generation): the real positions see what the prompt alone sees.
    batch = torch.cat([long, torch.cat([filler, short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = ours(batch, attention_mask=mask).logits
        hf_padded = hf(input_ids=batch, attention_mask=mask, position_ids=positions).logits
        assert rel_err(padded[1:, pad:], hf(input_ids=short).logits) <= 1e-5
        assert rel_err(padded[1:, pad:], hf_padded[1:, pad:]) <= 1e-5
        assert rel_err(padded[:1], hf_padded[:1]) <= 1e-5
    # Right padding (training): loss and gradients with the padding's labels ignored.
    batch = torch.cat([long, torch.cat([short, filler], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, short.shape[1]:] = 0
    labels = batch.masked_fill(mask == 0, -100)
    hf_loss = hf(input_ids=batch, attention_mask=mask, labels=labels).loss
    loss = ours(batch, attention_mask=mask, labels=labels).loss
    assert abs(loss.item() - hf_loss.item()) <= 1e-5 * hf_loss.item()
    hf_loss.backward()
    loss.backward()
    assert_same_gradients(ours, hf)


def _peft_name(name):
    name = name.removeprefix("base_model.model.")
    return name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def test_lora_matches_peft_both_ways(ckpt, tmp_path):
    peft = pytest.importorskip("peft")
    ours = vt.add_lora(load_ours(ckpt), r=4, alpha=8, seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # B = 0 at init would hide a wrong placement of the adapters
        for layer in lora_layers(ours).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)
    vt.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(load_hf(ckpt), str(tmp_path / "ours"), is_trainable=True)
    ids, labels = inputs(ours.args, seq=13)
    our_out, their_out = ours(ids, labels=labels, return_logits=True), theirs(input_ids=ids, labels=labels)
    assert rel_err(our_out.logits, their_out.logits) <= 1e-5
    our_out.loss.backward()
    their_out.loss.backward()
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    their = {_peft_name(n): p for n, p in theirs.named_parameters() if p.requires_grad}
    assert set(mine) == set(their) and any("q_proj" in n for n in mine)
    for name, p in mine.items():
        assert rel_err(p.grad, their[name].grad) <= 1e-5, name

    # PEFT's adapter (all-linear) into ours
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(load_hf(ckpt), config)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = vt.load_adapter(load_ours(ckpt), tmp_path / "peft")
    theirs.eval()
    with torch.no_grad():
        assert rel_err(ours(ids).logits, theirs(input_ids=ids).logits) <= 1e-5


def test_greedy_generation_matches_transformers(ckpt):
    ours, hf = load_ours(ckpt), load_hf(ckpt)
    pad_id = hf.config.pad_token_id
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, hf.config.vocab_size, (n,), generator=g).tolist() for n in (9, 5)]
    ids, mask = left_pad(prompts, pad_token_id=pad_id)
    new = 8
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                      pad_token_id=pad_id, eos_token_id=None)
    out = generate_ids(ours, ids, mask, max_new_tokens=new, eos_token_ids=[], return_logits=True)
    assert [row[ids.shape[1]:] for row in ref.tolist()] == out.tokens
    # each cached step's logits are the full forward's (greedy tokens alone could hide a small error)
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            full = hf(input_ids=torch.tensor([prompt + out.tokens[row]])).logits[0, len(prompt) - 1:-1]
            got = torch.stack([step[row] for step in out.logits])
            assert rel_err(got, full) <= 1e-5


def _edit_config(path, **fields):
    config = json.loads((path / "config.json").read_text())
    config.update(fields)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("field, value", [("logits_scaling", 0), ("embedding_multiplier", "3"),
                                          ("residual_multiplier", -0.5), ("attention_multiplier", None)])
def test_bad_granite_multiplier_names_the_file_and_field(tmp_path, field, value):
    path, _ = make_checkpoint(tmp_path, "granite", **CASES["granite"])
    _edit_config(path, **{field: value})
    with pytest.raises(CheckpointError, match=rf"config\.json: field '{field}' must be a positive number"):
        load_ours(path)


def test_each_granite_multiplier_matters(tmp_path):
    """The tiny config exercises every multiplier: a model ignoring any one of them (measured: embedding 0.70,
    attention 0.17, residual 0.60, logits 3.0 relative change) is far past the parity bound. And with
    logits_scaling 1 the fused chunked loss takes the plain head again."""
    path, _ = make_checkpoint(tmp_path, "granite", **CASES["granite"])
    ids, _ = inputs(load_ours(path).args)
    with torch.no_grad():
        base = load_ours(path)(ids).logits
        for field, value in IGNORED.items():
            other = tmp_path / field
            other.mkdir()
            for file in path.iterdir():
                (other / file.name).write_bytes(file.read_bytes())
            _edit_config(other, **{field: value})
            model = load_ours(other)
            assert rel_err(model(ids).logits, base) > 0.1, field
    assert model.head_weight() is model.lm_head.weight  # the last edited: logits_scaling 1


def test_olmo2_norms_are_post_branch_and_full_width(tmp_path):
    path, _ = make_checkpoint(tmp_path, "olmo2", **CASES["olmo2"])
    model = load_ours(path)
    block = model.model.layers[0]
    assert not hasattr(block, "input_layernorm")
    assert block.self_attn.q_norm.weight.shape == (4 * 24,) and block.self_attn.k_norm.weight.shape == (2 * 24,)
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied

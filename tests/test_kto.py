"""KTO: the loss equals TRL's KTOTrainer for the same log-probs (values and gradients), rows become a sequence and a
mismatched sequence with the completion alone trained, bad rows are counted, one class only is refused, the reference
point is the same for any batch split, and training moves the rewards the right way on held-out rows."""
import logging
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import velotune as vt
from train_fixtures import FACTS, base_config, make_model_dir, write_jsonl
from velotune.config import load_config
from velotune.data.encode import IGNORE_INDEX
from velotune.data.unpaired import prepare_unpaired
from velotune.errors import DataError
from velotune.models.tokenizer import load_tokenizer
from velotune.training.objectives.kto import kto_loss

_ = vt.train
from velotune.training.trainer import train  # noqa: E402

N, T = 6, 5
GRAD_RTOL = 1e-5


def kto_rows(polite_first=True):
    rows = []
    for q, a in FACTS:
        rows.append({"prompt": q, "completion": f" Certainly. {a}", "label": True})
        rows.append({"prompt": q, "completion": f" No. {a}", "label": False})
    return rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kto")
    return make_model_dir(tmp), write_jsonl(tmp / "kto.jsonl", kto_rows()), tmp


def test_kto_loss_equals_trl():
    trl_kto = pytest.importorskip("trl.trainer.kto_trainer")
    g = torch.Generator().manual_seed(0)
    per_token = -torch.rand(N, T, generator=g, dtype=torch.float64) * 2
    ref = -torch.rand(N, generator=g, dtype=torch.float64) * 8
    kl_logps, ref_kl = -torch.rand(N, generator=g, dtype=torch.float64) * 8, -torch.rand(N, generator=g,
                                                                                           dtype=torch.float64) * 8
    labels = torch.tensor([True, False, True, True, False, False])
    leaf = per_token.clone().requires_grad_(True)

    def model(**kwargs):
        return SimpleNamespace(log_probs=leaf, entropy=torch.zeros(N, T), mean_logits=torch.zeros(N, T))
    identity = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda t: t, gather=lambda t: t)
    trainer = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=identity, precompute_ref_logps=True,
                              calculate_KL=True, loss_type="kto", beta=0.2, desirable_weight=1.3,
                              undesirable_weight=0.7, aux_loss_enabled=False, _metrics={"train": defaultdict(list)},
                              _total_train_tokens=0, _tp_size=1, _compute_kl_logps=lambda m, b: kl_logps)
    batch = {"input_ids": torch.zeros(N, T + 1, dtype=torch.long), "attention_mask": torch.ones(N, T + 1),
             "completion_mask": torch.ones(N, T + 1, dtype=torch.long), "label": labels, "ref_logps": ref,
             "ref_KL_logps": ref_kl}
    want = trl_kto.KTOTrainer._compute_loss(trainer, model, batch, return_outputs=False)
    want.backward()
    want_grad = leaf.grad.clone()
    leaf.grad = None
    kl = (kl_logps - ref_kl).mean().clamp(min=0)
    losses, rewards = kto_loss(leaf.sum(1), ref, labels, kl, beta=0.2, desirable_weight=1.3, undesirable_weight=0.7)
    got = losses.mean()
    got.backward()
    assert torch.allclose(got, want, rtol=1e-12), (got, want)
    assert torch.allclose(leaf.grad, want_grad, rtol=1e-10, atol=1e-15)
    assert torch.allclose(rewards, 0.2 * (leaf.sum(1) - ref).detach())


def test_rows_train_their_completion_and_get_a_fixed_mismatched_partner(tiny, caplog):
    model_dir, _, tmp = tiny
    tok = load_tokenizer(model_dir)
    rows = kto_rows() + [{"prompt": "q", "completion": " ", "label": True}, {"prompt": "q", "completion": "x"}]
    cfg = load_config(base_config(model_dir, write_jsonl(tmp / "rows.jsonl", rows), tmp / "o",
                                  data={"max_seq_length": 128}))
    with caplog.at_level(logging.WARNING, logger="velotune"):
        data = prepare_unpaired(cfg.data, tok, max_seq_length=128, seed=3)
    assert data.stats.samples == 16 and data.stats.dropped_bad == {"empty 'completion'": 1,
                                                                  "missing field 'label'": 1}
    assert "rows.jsonl:17" in caplog.text and "rows.jsonl:18" in caplog.text
    first = data.train[0]
    trained = tok.decode([int(i) for i, l in zip(first.sequence.input_ids, first.sequence.labels)
                          if l != IGNORE_INDEX])
    assert trained == " Certainly. " + FACTS[0][1] + tok.eos_token and first.desirable
    # The mismatched sequence: the same prompt, another row's completion, its completion trained too.
    kl_text = tok.decode(first.kl_sequence.input_ids, skip_special_tokens=True)
    assert kl_text.startswith(FACTS[0][0]) and kl_text != tok.decode(first.sequence.input_ids, skip_special_tokens=True)
    again = prepare_unpaired(cfg.data, tok, max_seq_length=128, seed=3)
    assert [e.kl_sequence.input_ids.tolist() for e in again.train] == \
        [e.kl_sequence.input_ids.tolist() for e in data.train]


def test_one_class_only_is_refused(tiny):
    model_dir, _, tmp = tiny
    only = [r for r in kto_rows() if r["label"]]
    cfg = load_config(base_config(model_dir, write_jsonl(tmp / "one.jsonl", only), tmp / "o1"))
    with pytest.raises(DataError, match="every row is desirable .*objective sft"):
        prepare_unpaired(cfg.data, load_tokenizer(model_dir), max_seq_length=64)
    pairs = [{"prompt": "q", "chosen": "a", "rejected": "b"}]
    cfg = load_config(base_config(model_dir, write_jsonl(tmp / "pairs.jsonl", pairs), tmp / "o2"))
    with pytest.raises(DataError, match="this record is a pair .*use objective dpo"):
        prepare_unpaired(cfg.data, load_tokenizer(model_dir), max_seq_length=64)


def test_the_batch_split_does_not_change_the_update(tiny):
    """8 rows as 8 x 1, 4 x 2 and 2 x 4: the reference point is the global batch's, so the gradients agree."""
    model_dir, data, tmp = tiny
    grads = {}
    for batch, accum in ((8, 1), (4, 2), (2, 4)):
        cfg = base_config(model_dir, data, tmp / f"split-{batch}", data={"shuffle": False},
                          train={"batch_size": batch, "grad_accum": accum, "max_steps": 1, "overwrite": True})
        cfg["objective"] = "kto"
        model, tok = vt.load(str(model_dir), dtype="float32", device="cpu")
        vt.add_lora(model, r=4, alpha=8, seed=0)
        with torch.no_grad():  # B != 0: the policy is not the reference, so the reference point is not 0
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
        names = {id(p): n for n, p in model.named_parameters()}
        captured = {}

        def hook(optimizer, args, kwargs):
            if not captured:
                captured.update({names[id(p)]: p.grad.clone() for g in optimizer.param_groups for p in g["params"]
                                 if p.grad is not None})
        handle = register_optimizer_step_pre_hook(hook)
        try:
            result = train(cfg, model=model, tokenizer=tok)
        finally:
            handle.remove()
        grads[batch] = captured
        assert result.losses[0] != pytest.approx(0.5)  # the reference point and rewards are not trivial
    for batch in (4, 2):
        worst = max(float((grads[batch][k] - grads[8][k]).abs().max() / grads[8][k].abs().max()) for k in grads[8])
        assert worst <= GRAD_RTOL, (batch, worst)


@pytest.mark.slow
def test_kto_moves_rewards_apart_on_held_out_rows(tmp_path):
    model_dir = make_model_dir(tmp_path)
    rows = kto_rows()
    train_file = write_jsonl(tmp_path / "train.jsonl", rows[:12] * 3)
    held = write_jsonl(tmp_path / "held.jsonl", rows[12:])
    cfg = base_config(model_dir, train_file, tmp_path / "run", data={"eval_path": str(held)},
                      train={"max_steps": 24, "lr": 5e-3, "batch_size": 2})
    cfg["objective"] = "kto"
    result = train(cfg)
    print("held-out after KTO:", result.eval_metrics, "loss first/last:", result.losses[0], result.losses[-1])
    assert result.losses[0] == pytest.approx(0.5, abs=1e-6)  # policy == reference: every row's loss is 1/2
    # Desirable completions' rewards rise above undesirable ones' on prompts never trained on.
    assert result.eval_metrics["eval_rewards/chosen"] - result.eval_metrics["eval_rewards/rejected"] > 0.2
    assert result.eval_metrics["eval_loss"] < 0.49

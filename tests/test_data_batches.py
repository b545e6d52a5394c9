"""Batches: packing, padding, determinism, resuming mid-epoch, and a packed batch through a real model giving
each sample the loss it has alone."""
import functools

import pytest
import torch
import torch.nn.functional as F

import velotune as vt
from hf_reference import make_checkpoint
from tiny_tokenizer import make_tokenizer
from velotune.data import (IGNORE_INDEX, Encoded, Sample, batch_iterator, count_target_tokens, encode,
                           num_batches, plan_epoch, resolve_chat_template)
from velotune.data.packing import first_fit

PAD = 2


def fake_examples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(3, 300, (n,), generator=g, dtype=torch.int32)
        labels = ids.clone()
        labels[: n // 3] = IGNORE_INDEX
        labels[0] = IGNORE_INDEX
        out.append(Encoded(ids, labels, f"ex{i}"))
    return out


LENGTHS = [5, 17, 9, 30, 2, 11, 23, 8, 14, 3, 27, 6, 19, 12, 7, 4, 25, 10]


@functools.lru_cache(maxsize=None)
def tokenizer():
    return make_tokenizer()


def test_first_fit_puts_each_example_in_the_first_row_with_room():
    # 6 -> row0 (2 left); 5 -> row1 (3 left); 4 -> row2 (4 left); 3 -> row1 (0 left); 1 -> row0 (1 left)
    assert first_fit([0, 1, 2, 3, 4], [6, 5, 4, 3, 1], capacity=8) == [[0, 4], [1, 3], [2]]


def test_first_fit_rejects_an_example_longer_than_a_row():
    with pytest.raises(ValueError, match="more than max_seq_length=4"):
        first_fit([0], [5], capacity=4)


def test_packed_batches_hold_every_example_once_within_rows():
    examples = fake_examples(LENGTHS)
    plan = plan_epoch([len(e) for e in examples], batch_size=2, max_seq_length=32, packing=True, seed=1, epoch=0)
    flat = [i for batch in plan for row in batch for i in row]
    assert sorted(flat) == list(range(len(examples)))
    assert all(sum(LENGTHS[i] for i in row) <= 32 for batch in plan for row in batch)
    assert len(plan) < len(examples) / 2  # packing needs fewer batches than one example per row


def test_packed_batch_layout():
    examples = fake_examples([4, 2, 5, 3])
    batch = next(batch_iterator(examples, batch_size=2, max_seq_length=8, packing=True, pad_id=PAD, seed=0,
                                epoch=0, shuffle=False))
    assert set(batch) == {"input_ids", "labels", "position_ids", "document_ids"}
    assert all(t.dtype == torch.long for t in batch.values())
    # first-fit in order into rows of 8: row0 = ex0 (4) + ex1 (2); row1 = ex2 (5) + ex3 (3). Rows are as wide
    # as the batch's longest (8); row0's tail padding is a document of its own, its positions restart too.
    assert batch["document_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 0, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 0, 1], [0, 1, 2, 3, 4, 0, 1, 2]]
    assert batch["input_ids"][0, :6].tolist() == examples[0].input_ids.tolist() + examples[1].input_ids.tolist()
    assert batch["input_ids"][0, 6:].tolist() == [PAD, PAD]
    assert batch["labels"][0, 6:].tolist() == [IGNORE_INDEX, IGNORE_INDEX]
    assert batch["labels"][0, :6].tolist() == examples[0].labels.tolist() + examples[1].labels.tolist()
    assert batch["labels"][1, 5].item() == IGNORE_INDEX  # a sample's first token is never a target


def test_unpacked_batch_right_padding_and_attention_mask():
    examples = fake_examples([4, 6])
    batch = next(batch_iterator(examples, batch_size=2, max_seq_length=8, packing=False, pad_id=PAD, seed=0,
                                epoch=0, shuffle=False))
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]
    assert batch["input_ids"][0, 4:].tolist() == [PAD, PAD]
    assert batch["labels"][0, 4:].tolist() == [IGNORE_INDEX, IGNORE_INDEX]


def test_count_target_tokens_after_the_shift():
    labels = torch.tensor([[5, 6, -100, 7], [-100, -100, 8, -100]])
    assert count_target_tokens({"labels": labels}) == 3  # labels[:, 1:]: 6, 7 and 8


@pytest.mark.parametrize("packing", [True, False])
def test_same_seed_and_epoch_same_batches_other_epoch_other_order(packing):
    examples = fake_examples(LENGTHS)
    kw = dict(batch_size=3, max_seq_length=32, packing=packing, pad_id=PAD, seed=5)
    first = list(batch_iterator(examples, epoch=2, **kw))
    again = list(batch_iterator(examples, epoch=2, **kw))
    other = list(batch_iterator(examples, epoch=3, **kw))
    assert len(first) == len(again)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first, again) for k in a)
    assert any(a["input_ids"].shape != b["input_ids"].shape or not torch.equal(a["input_ids"], b["input_ids"])
               for a, b in zip(first, other))


@pytest.mark.parametrize("packing", [True, False])
def test_num_batches_and_resume_mid_epoch(packing):
    examples = fake_examples(LENGTHS)
    kw = dict(batch_size=2, max_seq_length=32, packing=packing, seed=9, epoch=1)
    full = list(batch_iterator(examples, pad_id=PAD, **kw))
    assert num_batches(examples, pad_id=PAD, **kw) == len(full)
    for k in (1, 3, len(full) - 1, len(full)):
        tail = list(batch_iterator(examples, pad_id=PAD, start_batch=k, **kw))
        assert len(tail) == len(full) - k
        assert all(torch.equal(a[key], b[key]) for a, b in zip(tail, full[k:]) for key in a)


def test_ranks_get_disjoint_batches_of_equal_count():
    examples = fake_examples(LENGTHS)
    kw = dict(batch_size=2, max_seq_length=32, packing=True, seed=0, epoch=0, world_size=2)
    plans = [plan_epoch([len(e) for e in examples], rank=r, **kw) for r in (0, 1)]
    assert len(plans[0]) == len(plans[1]) > 0
    seen = [{i for batch in plan for row in batch for i in row} for plan in plans]
    assert not seen[0] & seen[1]
    assert num_batches(examples, rank=1, **kw) == len(plans[1])


def per_token_loss(logits, labels):
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="none")
    return loss.view(labels.shape)


def encoded_conversations():
    tok = tokenizer()
    template = resolve_chat_template("llama-3", tok)
    questions = ["What is 1 + 1?", "Name a colour.", "Capital of France?", "Say hi.", "Count to three.", "Why?"]
    answers = ["2.", "Blue, like the sea.", "Paris.", "Hi!", "1, 2, 3.", "Because the tide keeps its time."]
    return [encode(Sample(messages=[{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                          origin=f"c{i}"), tok, template, max_len=64)
            for i, (q, a) in enumerate(zip(questions, answers))]


@pytest.mark.parametrize("packing", [True, False])
def test_batch_through_model_gives_each_sample_its_own_loss(tmp_path, packing):
    examples = encoded_conversations()
    path, _ = make_checkpoint(tmp_path, "llama", vocab_size=len(tokenizer()))
    model, _ = vt.load(path, dtype="float32", device="cpu")
    width = 64
    plan = plan_epoch([len(e) for e in examples], batch_size=4, max_seq_length=width, packing=packing, seed=0,
                      epoch=0)
    batches = list(batch_iterator(examples, batch_size=4, max_seq_length=width, packing=packing,
                                  pad_id=tokenizer().pad_token_id, seed=0, epoch=0))
    if packing:
        assert any(len(row) > 1 for batch in plan for row in batch)  # really packed
    checked = 0
    with torch.no_grad():
        alone = {}
        for i, e in enumerate(examples):
            out = model(e.input_ids[None].long(), labels=e.labels[None].long(), reduction="sum")
            alone[i] = out.loss.item()
        for rows, batch in zip(plan, batches):
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            losses = per_token_loss(logits, batch["labels"])
            for b, row in enumerate(rows):
                at = 0
                for i in row:
                    n = len(examples[i])
                    got = losses[b, at:at + n - 1].sum().item()  # the sample's last position predicts the next
                    assert got == pytest.approx(alone[i], rel=1e-5, abs=1e-5), (i, got, alone[i])
                    assert losses[b, at + n - 1].item() == 0.0  # ... which is never a target
                    at += n
                    checked += 1
            # the batch's summed loss equals the sum of its samples' losses
            total = model(**batch, reduction="sum").loss.item()
            assert total == pytest.approx(sum(alone[i] for row in rows for i in row), rel=1e-5)
    assert checked == len(examples)

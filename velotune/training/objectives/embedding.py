"""Embedding objectives: a sentence embedder (velotune.embeddings.SentenceEncoder) trained on texts.

    contrastive  pairs (anchor, positive[, negative]): in-batch negatives (MNRL / InfoNCE), symmetric if asked;
                 embedding.mini_batch_size > 0 caches the embeddings' gradients (GradCache) for large batches
    triplet      triplets (anchor, positive, negative): margin on distances
    cosent       scored pairs (sentence1, sentence2, score): CoSENT ranking of the batch's cosine similarities

The model loaded is a SentenceEncoder (a sentence-transformers directory, or a plain encoder or decoder directory);
a run writes the adapter (LoRA) or nothing else, plus `embedder/`: a sentence-transformers directory with LoRA
merged, which plain sentence-transformers loads. With embedding.retrieval_eval the retrieval metrics (NDCG@10,
MRR@10, recall@k) are measured before the first step and at each evaluation.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ...errors import ConfigError
from .base import Objective
from .contrastive_losses import cosent_loss, in_batch_negatives_sum, triplet_sum

log = logging.getLogger("velotune")

EMBEDDER_DIR = "embedder"


class EmbeddingObjective(Objective):
    kind = "pairs"             # what the data holds (velotune.data.text_pairs)
    unit_name = "pair"
    sample_name = "pair"
    row_name = "pair"
    evaluates_before_training = True
    extra_outputs = (EMBEDDER_DIR,)

    def __init__(self):
        self.settings = None   # the config's embedding section, from prepare
        self.retrieval = None  # a RetrievalSet when embedding.retrieval_eval names one
        self.prefixes = ("", "")  # (query, document): what the training texts were given, and the evaluation's

    # ---- the model ------------------------------------------------------------------------------------------
    def load_model(self, cfg):
        from ...embeddings.st_format import load_sentence_model
        if cfg.model.quantize:
            raise ConfigError("model.quantize: embedding models train unquantized (they are small); remove it")
        dtype = None if cfg.model.dtype == "auto" else cfg.model.dtype
        model, _ = load_sentence_model(cfg.model.path, dtype=dtype, device=cfg.model.device,
                                       max_seq_length=cfg.data.max_seq_length or cfg.model.max_seq_length,
                                       pooling=cfg.embedding.pooling)
        return model

    def check_model(self, model) -> None:
        from ...embeddings.model import SentenceEncoder
        if not isinstance(model, SentenceEncoder):
            raise ConfigError(f"objective {self.name} trains a sentence embedder; vt.train(model=...) got a "
                              f"{type(model).__name__}: load it with vt.load_embedder(path) (a sentence-transformers "
                              "directory, an encoder, or a decoder pooled by its last token)")

    def source_max_length(self, model_dir: Path) -> int | None:
        """A sentence-transformers directory's max_seq_length (256 for MiniLM), not config.json's 512."""
        from ...embeddings.st_format import is_sentence_model_dir, read_settings
        if is_sentence_model_dir(model_dir):
            return read_settings(model_dir)[0].max_seq_length
        return None

    def write_outputs(self, model, tokenizer, out_dir: Path, lora: bool) -> dict:
        """The adapter (LoRA) beside a sentence-transformers directory with the adapter merged (model_dir); or
        that directory alone (full fine-tuning)."""
        from ...embeddings.st_format import save_sentence_model
        written = {}
        if lora:
            from ...lora import save_adapter
            written["adapter_dir"] = save_adapter(model, out_dir / "adapter", overwrite=True, tokenizer=tokenizer)
        written["model_dir"] = save_sentence_model(model, tokenizer, out_dir / EMBEDDER_DIR, overwrite=True)
        return written

    def output_names(self, lora: bool) -> list[str]:
        return ["adapter", EMBEDDER_DIR] if lora else [EMBEDDER_DIR]

    # ---- records -> examples -> batches ------------------------------------------------------------------------
    def prepare(self, config, tokenizer, *, max_seq_length: int, seed: int):
        from ...data.text_pairs import prepare_text_pairs
        self.settings = config.embedding
        self._check(config)
        query, document = self.prefixes = self._prefixes(config)
        return prepare_text_pairs(config.data, tokenizer, kind=self.kind, max_seq_length=max_seq_length, seed=seed,
                                  query_prefix=query, document_prefix=document,
                                  score_range=(config.embedding.score_min, config.embedding.score_max))

    def _check(self, config):
        if config.train.batch_size < 2 and self.kind == "pairs":
            raise ConfigError(f"train.batch_size: {config.train.batch_size}; in-batch negatives need at least 2 "
                              "pairs in a batch (32-256 is usual; embedding.mini_batch_size keeps large ones small "
                              "in memory)")

    def _prefixes(self, config) -> tuple[str, str]:
        """The config's prefixes, else the model's own 'query' / 'document' prompts (a sentence-transformers
        directory's), so that training sees the texts as the model's users will encode them."""
        from ...embeddings.st_format import is_sentence_model_dir, read_settings
        emb, prompts = config.embedding, {}
        if config.model.path:
            from ...models.checkpoint import resolve_model_dir
            model_dir = resolve_model_dir(config.model.path)
            if is_sentence_model_dir(model_dir):
                prompts = read_settings(model_dir)[0].prompts
        query = emb.query_prefix if emb.query_prefix is not None else prompts.get("query", "")
        document = emb.document_prefix if emb.document_prefix is not None else \
            prompts.get("document", prompts.get("passage", ""))
        return query, document

    def epoch_line(self, stats) -> str:
        many = self.sample_name if stats.samples == 1 else self.sample_name + "s"
        return f"per epoch: {stats.samples} {many}, {stats.total_tokens:,} tokens (padding excluded)"

    def sample_view(self, example, tokenizer) -> str:
        return " | ".join(f"{name}: {tokenizer.decode(ids)}" for name, ids in example.ids.items())

    def epoch_rows(self, examples, *, epoch: int, batch_size: int, max_seq_length: int, packing: bool, seed: int,
                   shuffle: bool = True, rank: int = 0, world_size: int = 1) -> list:
        from ...data.text_pairs import distinct_text_batches
        return distinct_text_batches(examples, batch_size=batch_size, seed=seed, epoch=epoch, shuffle=shuffle,
                                     rank=rank, world_size=world_size)

    def collate(self, rows, *, pad_id: int, packing: bool, max_width: int | None = None) -> dict:
        from ...data.text_pairs import collate_text_pairs
        examples = [example for row in rows for example in row]
        return collate_text_pairs(examples, pad_id=pad_id, columns=self.columns(examples))

    def columns(self, examples) -> list[str]:
        return list(examples[0].ids)

    def input_tokens(self, rows) -> int:
        return sum(len(example) for row in rows for example in row)

    # ---- the run ----------------------------------------------------------------------------------------------
    def start(self, model, run) -> None:
        self.autocast = run.autocast
        if self.settings.mini_batch_size and run.dist.active:
            raise ConfigError("embedding.mini_batch_size (GradCache) does not run under torchrun yet: train on one "
                              "process, or set it to 0")
        if self.settings.retrieval_eval:
            from ...embeddings.retrieval import RetrievalSet
            self.retrieval = RetrievalSet.read(self.settings.retrieval_eval)

    def units(self, batch: dict) -> int:
        return int(batch["size"])

    def embed(self, model, batch: dict, column: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        ids = batch[f"{column}_input_ids"][start:stop]
        mask = batch[f"{column}_attention_mask"][start:stop]
        width = int(mask.sum(dim=1).max())  # a mini-batch's own longest text, not the batch's
        return model(ids[:, :width], mask[:, :width])

    def loss(self, model, batch: dict):
        columns = [c for c in ("anchor", "positive", "negative", "sentence1", "sentence2") if f"{c}_input_ids" in batch]
        size, mini = int(batch["size"]), self.settings.mini_batch_size
        if mini and mini < size:
            from .grad_cache import cached_loss
            return cached_loss(lambda c, a, b: self.embed(model, batch, c, a, b), columns, size, mini,
                               lambda *e: self.batch_loss(batch, *e), self.autocast), size
        return self.batch_loss(batch, *(self.embed(model, batch, c) for c in columns)), size

    def batch_loss(self, batch, *embeddings) -> torch.Tensor:
        raise NotImplementedError

    # ---- retrieval evaluation -----------------------------------------------------------------------------------
    def extra_eval(self, model, tokenizer) -> dict:
        """NDCG@10, MRR@10, recall@k, accuracy@1 on the retrieval set (none: {})."""
        if self.retrieval is None:
            return {}
        from ...embeddings.retrieval import evaluate_retrieval
        from ..distributed import unwrap
        model = unwrap(model)
        query, document = self.prefixes
        metrics = evaluate_retrieval(lambda texts: model.encode(tokenizer, texts,
                                                                batch_size=self.settings.eval_batch_size),
                                     self.retrieval, batch_size=self.settings.eval_batch_size,
                                     query_prefix=query, document_prefix=document)
        return {k: v for k, v in metrics.items() if isinstance(v, float)}


class Contrastive(EmbeddingObjective):
    name = "contrastive"
    kind = "pairs"

    def batch_loss(self, batch, anchors, positives, *negatives):
        return in_batch_negatives_sum(anchors, positives, negatives, scale=self.settings.scale,
                                      symmetric=self.settings.symmetric)


class Triplet(EmbeddingObjective):
    name = "triplet"
    kind = "triplets"
    unit_name = sample_name = row_name = "triplet"

    def batch_loss(self, batch, anchors, positives, negatives):
        return triplet_sum(anchors, positives, negatives, margin=self.settings.margin,
                           distance=self.settings.distance)

    def _check(self, config):
        if config.embedding.mini_batch_size:
            raise ConfigError("embedding.mini_batch_size: GradCache helps in-batch negatives (objective "
                              "contrastive); triplet's loss is per triplet: lower train.batch_size instead")
        super()._check(config)


class CoSENT(EmbeddingObjective):
    name = "cosent"
    kind = "scored"
    unit_name = "batch"
    sample_name = row_name = "pair"

    def units(self, batch: dict) -> int:
        return 1  # one ranking over the whole batch

    def loss(self, model, batch: dict):
        loss, _ = super().loss(model, batch)
        return loss, 1

    def batch_loss(self, batch, first, second):
        return cosent_loss(first, second, batch["scores"], scale=self.settings.scale)

    def _check(self, config):
        if config.embedding.mini_batch_size:
            raise ConfigError("embedding.mini_batch_size: GradCache is for objective contrastive; set it to 0")
        super()._check(config)

"""Supervised fine-tuning (loss on the assistant's tokens, or on every token) and continued pre-training (raw
text, every token trained): next-token cross-entropy, fused and chunked, summed over the tokens with a target."""
from __future__ import annotations

from dataclasses import replace

from .base import Objective


class SFT(Objective):
    name = "sft"

    def loss(self, model, batch):
        out = model(batch["input_ids"], labels=batch["labels"], position_ids=batch.get("position_ids"),
                    document_ids=batch.get("document_ids"), attention_mask=batch.get("attention_mask"),
                    return_logits=False, reduction="sum")
        return out.loss, out.num_tokens


class Pretrain(SFT):
    """Continued pre-training: the data is raw text (data.format text unless set) and every token is trained."""
    name = "pretrain"

    def prepare(self, config, tokenizer, *, max_seq_length, seed):
        data = config.data
        if data.format == "auto" or data.train_on != "all":
            config = replace(config, data=replace(data, format="text" if data.format == "auto" else data.format,
                                                  train_on="all"))
        return super().prepare(config, tokenizer, max_seq_length=max_seq_length, seed=seed)

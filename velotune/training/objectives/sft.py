"""Supervised fine-tuning (loss on the assistant's tokens, or on every token) and continued pre-training (raw
text, every token trained): next-token cross-entropy, fused and chunked, summed over the tokens with a target."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .base import Objective


class SFT(Objective):
    name = "sft"

    def for_model_dir(self, model_dir):
        """A vision-language checkpoint trains through the vision objective (images in the conversations)."""
        if type(self) is not SFT or model_dir is None:
            return self
        from ...models.checkpoint import read_config
        from ...models.vision.files import is_vision_config
        if (Path(model_dir) / "config.json").is_file() and is_vision_config(read_config(Path(model_dir))):
            from .vision import VisionSFT
            return VisionSFT()
        return self

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

"""Supervised fine-tuning of a vision-language model (objective sft on a LLaVA, Qwen2-VL or Idefics3 checkpoint, or
objective vision): conversations with images, the loss on the assistant's answers only.

    objective: sft                         # a vision-language model.path picks this objective
    model: {path: my-vlm}
    data: {path: train.jsonl}              # rows {"messages": [... {"type": "image", "image": "a.png"} ...]}
    vision: {vision_layers: true, language_layers: true, attention_modules: true, mlp_modules: true,
             projector: lora}

What trains is chosen by the `vision` switches, as Unsloth's are: LoRA goes on the attention and / or MLP linears of
the vision tower and / or the language model, and the projector takes LoRA, trains in full (saved beside the adapter)
or stays as it is. With finetune.method full the switches freeze the parts left out. Records, image places and masks
are described in data/vision_data.py; each batch carries its images' pixel tensors under transformers' names.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from ...errors import ConfigError
from .sft import SFT

log = logging.getLogger("velotune")

# Leaf names of attention and MLP linears across the families (q/k/v/o and fused qkv; fc1/fc2, gate/up/down).
_ATTENTION = re.compile(r"(^|\.)(self_attn|attn|attention)\.")
_MLP = re.compile(r"(^|\.)(mlp|feed_forward)\.")


class VisionSFT(SFT):
    name = "vision"
    sample_name = "sample"

    def __init__(self):
        self.processor = None
        self.stats = None
        self.passed_model_dir = None   # the directory of a model given to vt.train(model=...)

    # ---- the model ----------------------------------------------------------------------------------------------
    def load_model(self, cfg):
        from ..model_setup import load_model
        model = load_model(cfg)
        self.check_model(model)
        if cfg.finetune.method == "lora":
            cfg.lora.targets, saved = self.lora_choice(model, cfg)
            cfg.lora.modules_to_save = sorted(set(cfg.lora.modules_to_save or []) | set(saved))
        return model

    def check_model(self, model) -> None:
        from ...models.vision.base import VisionLanguageModel
        if not isinstance(model, VisionLanguageModel):
            raise ConfigError(f"objective vision trains a vision-language model; got a {type(model).__name__} "
                              "(text-only models train with objective sft on text data)")
        self.passed_model_dir = model.source_dir

    def lora_choice(self, model, cfg) -> tuple[list[str], list[str]]:
        """(LoRA target module names, modules trained in full) per the vision switches. lora.targets other than
        all-linear narrows the choice to the linears it names."""
        from ...lora import ALL_LINEAR, resolve_targets
        switches = cfg.vision
        allowed = set(resolve_targets(model, cfg.lora.targets))
        names = []
        for name in resolve_targets(model, ALL_LINEAR):
            part = model.part_of(name)
            if part == "projector":
                keep = switches.projector == "lora"
            else:
                keep = switches.vision_layers if part == "vision" else switches.language_layers
                kind_ok = ((switches.attention_modules and _ATTENTION.search(name))
                           or (switches.mlp_modules and _MLP.search(name)))
                keep = keep and bool(kind_ok)
            if keep and (cfg.lora.targets == ALL_LINEAR or name in allowed):
                names.append(name)
        saved = [p.rstrip(".") for p in model.projector_prefixes] if switches.projector == "full" else []
        if not names and not saved:
            raise ConfigError("vision: these switches leave nothing to train (no LoRA target and a frozen "
                              "projector): turn on vision_layers or language_layers, and attention_modules or "
                              "mlp_modules")
        return names, saved

    def adjust_trainable(self, model, cfg) -> None:
        """Full fine-tuning: the parts the switches leave out keep their weights."""
        if cfg.finetune.method != "full":
            return
        switches = cfg.vision
        keep = {"vision": switches.vision_layers, "language": switches.language_layers,
                "projector": switches.projector != "frozen"}
        for name, param in model.named_parameters():
            if not keep[model.part_of(name)]:
                param.requires_grad_(False)

    # ---- records -> examples -> batches ----------------------------------------------------------------------------
    def prepare(self, config, tokenizer, *, max_seq_length: int, seed: int):
        from ...data.vision_prepare import prepare_vision_data
        from ...models.checkpoint import resolve_model_dir
        from ...vision.processor import image_processor_for
        model_dir = self.passed_model_dir or (resolve_model_dir(config.model.path) if config.model.path else None)
        if model_dir is None:
            raise ConfigError("objective vision: the image processor is read from the model's directory; set "
                              "model.path (or pass a model loaded from a directory)")
        self.processor = image_processor_for(model_dir)
        data = prepare_vision_data(config.data, tokenizer, self.processor, max_seq_length=max_seq_length, seed=seed,
                                   image_cache_mb=config.vision.image_cache_mb)
        self.stats = data.stats
        return data

    def sample_view(self, example, tokenizer) -> str:
        """The dry run's view of a sample, each run of image (or video) tokens written once with its count (an image
        is hundreds of tokens)."""
        from ...data.vision_data import video_processor_of
        text = super().sample_view(example, tokenizer)
        video = video_processor_of(self.processor) if getattr(example, "num_videos", 0) else None
        for token in (self.processor.image_token, *([video.video_token] if video is not None else [])):
            run = re.compile(f"(?:{re.escape(token)}){{2,}}")
            text = run.sub(lambda m, token=token: f"({token} x {len(m.group(0)) // len(token)})", text)
        return text

    def epoch_line(self, stats) -> str:
        line = super().epoch_line(stats)
        extra = f", {stats.images} images" + (f", {stats.videos} videos" if getattr(stats, "videos", 0) else "")
        if stats.resized:
            extra += f" ({stats.resized} shrunk to the processor's maximum)"
        if stats.reread:
            extra += f", {stats.reread} read again for each batch (past vision.image_cache_mb)"
        return line + extra

    def collate(self, rows, *, pad_id: int, packing: bool, max_width: int | None = None) -> dict:
        """Text as any SFT batch (packed rows carry document_ids: attention stays within each sample, positions
        restart), and the images of the batch's samples in the order their tokens appear."""
        from ...data import collate
        from ...data.vision_data import collate_images, images_of
        batch = collate(rows, pad_id=pad_id, packing=packing, max_width=max_width, bucket=self.bucket_widths,
                        padding_free=self.padding_free)
        batch.update(collate_images([images_of(example, self.processor) for row in rows for example in row]))
        return batch

    # ---- batches -> loss ----------------------------------------------------------------------------------------
    def loss(self, model, batch):
        from ...models.vision.base import IMAGE_INPUTS
        images = {k: batch[k] for k in IMAGE_INPUTS if k in batch}
        out = model(batch["input_ids"], labels=batch["labels"], attention_mask=batch.get("attention_mask"),
                    position_ids=batch.get("position_ids"), document_ids=batch.get("document_ids"),
                    return_logits=False, reduction="sum", **images)
        return out.loss, out.num_tokens

    # ---- outputs ------------------------------------------------------------------------------------------------
    def write_outputs(self, model, tokenizer, out_dir: Path, lora: bool) -> dict:
        written = super().write_outputs(model, tokenizer, out_dir, lora)
        if lora and self.processor is not None:  # the adapter directory is usable on its own with its processor
            for name, settings in (("preprocessor_config.json", self.processor.to_dict()),
                                   ("processor_config.json", self.processor.processor_dict())):
                text = json.dumps(settings, indent=2) + "\n"
                (written["adapter_dir"] / name).write_text(text, encoding="utf-8")
            # the video settings where the model has its own (Qwen2-VL's video_preprocessor_config.json)
            source = getattr(self.processor, "source_dir", None)
            video = Path(source) / "video_preprocessor_config.json" if source is not None else None
            if video is not None and video.is_file():
                shutil.copy2(video, written["adapter_dir"] / video.name)
        return written


__all__ = ["VisionSFT"]

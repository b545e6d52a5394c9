"""LLaVA (model_type "llava"): a CLIP or SigLIP vision tower, a two-layer projector, and one of velotune's decoders.

Each image (pixel_values [images, channels, image_size, image_size], the batch's images in order) goes through the
tower; the hidden states of `vision_feature_layer` (one index into [first layer's input, layer 1, ...], or a list of
them concatenated along the width) lose their first row under the "default" strategy (CLIP's class token; SigLIP
has none, and transformers drops its first patch all the same) or keep it under "full"; `multi_modal_projector`
(linear_1, projector_hidden_act, linear_2) maps them to the text width. Image tokens per image:
(image_size // patch_size) ** 2, + 1 with a CLIP tower, - 1 under "default" (`Args.tokens_per_image`).

Our module tree is the one transformers 5 writes to disk (`language_model.model.*`, `language_model.lm_head.*`,
`vision_tower.*`, `multi_modal_projector.*`), so saving renames nothing; `load_prefixes` also reads the hub's
llava-hf files (`vision_tower.vision_model.*`) and transformers 5's in-memory names (`model.language_model.*`...).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import CheckpointError, DataError
from ..field_checks import check_fields, is_int
from ..registry import CAUSAL_LM, architecture
from .base import (
    VisionArgs,
    VisionLanguageModel,
    read_image_token_id,
    section,
    text_module,
)
from .towers import TowerArgs, VisionTransformer, activation

log = logging.getLogger("velotune")

# transformers' LlamaConfig defaults: llava-hf files written by transformers 4 keep only the text_config fields
# that differ from them (llava-1.5's has no hidden_size), which transformers fills in on reading.
LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32)


def read_text_args(config: dict, source: str, tie_word_embeddings: Callable[[bool, bool], bool]):
    """The text model's Args from `text_config`, its tie_word_embeddings set to the one the family's transformers
    class follows: `tie_word_embeddings(top-level flag, the text config's own)` (transformers reads the top level
    of a vision-language config; LLaVA's config also takes the text model's)."""
    text_config = dict(section(config, "text_config", source))
    module = text_module(text_config, source)
    if text_config.get("model_type", "llama") == "llama":
        missing = {k: v for k, v in LLAMA_DEFAULTS.items() if k not in text_config}
        if missing:
            log.info("%s: text_config leaves out %s; using transformers' Llama defaults", source, sorted(missing))
            text_config.update(missing)
    text = module.Args.from_dict(text_config, f"{source} (text_config)")
    top = config.get("tie_word_embeddings", False)
    if not isinstance(top, bool):
        raise CheckpointError(f"{source}: field 'tie_word_embeddings' must be true or false, got {top!r}")
    text.tie_word_embeddings = tie_word_embeddings(top, text.tie_word_embeddings)
    return text


def image_token_id(config: dict, source: str, default: int, text) -> int:
    """The image token id (transformers' default when config.json names none), checked against the text vocabulary."""
    names = ("image_token_id", "image_token_index")
    token = read_image_token_id(config, source, *names) if any(config.get(n) is not None for n in names) else default
    if token >= text.vocab_size:
        raise CheckpointError(f"{source}: the image token id {token} is not below text_config.vocab_size "
                              f"({text.vocab_size})")
    return token


@dataclass
class Args(VisionArgs):
    """config.json of a LLaVA checkpoint: the top-level fields under transformers' names and defaults, the text
    model's Args (`text`) and the tower's (`tower`)."""
    projector_hidden_act: str = "gelu"
    vision_feature_layer: int | list = -2
    vision_feature_select_strategy: str = "default"
    multimodal_projector_bias: bool = True
    tower: TowerArgs | None = None

    TOWERS = ("clip_vision_model", "siglip_vision_model")

    @classmethod
    def from_dict(cls, config: dict, source: str = "config.json") -> Args:
        # As LlavaConfig: tied when either the top level or the text model says so.
        text = read_text_args(config, source, lambda top, own: top or own)
        vision = section(config, "vision_config", source)
        tower_type = vision.get("model_type", "clip_vision_model")
        if tower_type not in cls.TOWERS:
            raise CheckpointError(f"{source}: vision_config.model_type {tower_type!r} is not a LLaVA tower velotune "
                                  f"has; supported: {', '.join(cls.TOWERS)}")
        names = {f.name for f in dataclasses.fields(cls)} - {"raw", "text", "vision", "tower", "model_type",
                                                            "image_token_id"}
        args = cls(model_type=config.get("model_type", "llava"),
                   image_token_id=image_token_id(config, source, 32000, text), text=text, vision=dict(vision),
                   raw=dict(config), tower=TowerArgs.from_dict(vision, tower_type, source),
                   **{k: v for k, v in config.items() if k in names})
        args.validate(source)
        return args

    def validate(self, source: str):
        check_fields(self, source, flags=("multimodal_projector_bias",))
        activation(self.projector_hidden_act, source, "projector_hidden_act")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise CheckpointError(f"{source}: field 'vision_feature_select_strategy' must be 'default' or 'full', "
                                  f"got {self.vision_feature_select_strategy!r}")
        layers = self.vision_feature_layer
        states = self.tower.num_hidden_layers + 1
        listed = layers if isinstance(layers, list) else [layers]
        if not listed or not all(is_int(i) and -states <= i < states for i in listed):
            raise CheckpointError(f"{source}: field 'vision_feature_layer' must be a layer index (or a non-empty "
                                  f"list of them) from {-states} to {states - 1} (vision_config.num_hidden_layers "
                                  f"is {states - 1}), got {layers!r}")

    @property
    def feature_layers(self) -> list[int]:
        """vision_feature_layer as non-negative indices into the tower's layer states."""
        states = self.tower.num_hidden_layers + 1
        listed = self.vision_feature_layer if isinstance(self.vision_feature_layer, list) else \
            [self.vision_feature_layer]
        return [i % states for i in listed]

    @property
    def tokens_per_image(self) -> int:
        """Image tokens the text must hold for each image (what the processor expands `<image>` to)."""
        return (self.tower.patches_per_side ** 2 + (self.tower.kind == "clip")
                - (self.vision_feature_select_strategy == "default"))


class Projector(nn.Module):
    """linear_1 (tower width x feature layers -> text width), the activation, linear_2."""

    def __init__(self, args: Args):
        super().__init__()
        width, text_width = args.tower.hidden_size * len(args.feature_layers), args.text.hidden_size
        self.linear_1 = nn.Linear(width, text_width, bias=args.multimodal_projector_bias)
        self.act = activation(args.projector_hidden_act, "config.json", "projector_hidden_act")
        self.linear_2 = nn.Linear(text_width, text_width, bias=args.multimodal_projector_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class Model(VisionLanguageModel):
    """transformers' LlavaForConditionalGeneration on velotune's decoder."""

    vision_prefixes = ("vision_tower.",)
    projector_prefixes = ("multi_modal_projector.",)
    # Our names are the saved ones. The tower's entries name its children: a bare "vision_tower." would also
    # catch the hub's "vision_tower.vision_model." spelling before load_prefixes are read.
    saved_prefixes = (("language_model.", "language_model."),
                      ("multi_modal_projector.", "multi_modal_projector."),
                      *((f"vision_tower.{part}.", f"vision_tower.{part}.")
                        for part in ("embeddings", "pre_layrnorm", "encoder", "post_layernorm", "head")))
    load_prefixes = (("vision_tower.", "vision_tower.vision_model."),           # llava-hf files (transformers 4)
                     ("vision_tower.", "model.vision_tower.vision_model."),     # transformers 4.5x in memory
                     ("vision_tower.", "model.vision_tower."),                  # transformers 5 in memory
                     ("language_model.model.", "model.language_model."),
                     ("language_model.lm_head.", "lm_head."),
                     ("multi_modal_projector.", "model.multi_modal_projector."))
    memory_prefixes = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                       ("vision_tower.", "model.vision_tower."),
                       ("multi_modal_projector.", "model.multi_modal_projector."))
    hf_architecture = "LlavaForConditionalGeneration"

    def __init__(self, args: Args):
        super().__init__(args, architecture(args.text.model_type, CAUSAL_LM).Model(args.text))
        self.vision_tower = VisionTransformer(args.tower)
        self.multi_modal_projector = Projector(args)

    def vision_blocks(self) -> list[nn.Module]:
        return self.vision_tower.layers

    def image_features(self, pixel_values: torch.Tensor, **image_inputs) -> torch.Tensor:
        """pixel_values [images, channels, image_size, image_size] -> [images * tokens_per_image, text width]."""
        if image_inputs:
            raise DataError(f"LLaVA reads pixel_values only; the batch also holds {', '.join(sorted(image_inputs))}")
        if pixel_values.dim() != 4:
            raise DataError(f"LLaVA's pixel_values must be [images, channels, height, width], got shape "
                            f"{list(pixel_values.shape)}")
        layers = self.args.feature_layers
        states = self.vision_tower.layer_states(pixel_values, max(layers))
        picked = [states[i] for i in layers]
        if self.args.vision_feature_select_strategy == "default":
            picked = [s[:, 1:] for s in picked]
        features = self.multi_modal_projector(torch.cat(picked, dim=-1))
        return features.reshape(-1, features.shape[-1])


__all__ = ["LLAMA_DEFAULTS", "Args", "Model", "Projector", "image_token_id", "read_text_args"]

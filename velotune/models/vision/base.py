"""What every vision-language family shares: a vision tower and a projector turn images into rows of the text
model's embedding space, scattered over the image tokens of the prompt; the text model (one of our decoders) does
the rest. A family file supplies `image_features` and its checkpoint names; everything the loop, LoRA, generation
and export rely on (`hidden_states`, `logits`, `head_weight`, `blocks`, ...) is the language model's, unchanged.

Image inputs travel under transformers' processor names (`pixel_values`, `image_grid_thw`,
`pixel_attention_mask`), so a batch made by either side's processor feeds either side's model.

Parameter names follow transformers' checkpoint files for the family (`saved_prefixes` maps our module paths to
them), so a merged export is a checkpoint transformers loads.
"""
from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...errors import CheckpointError, DataError, UnsupportedError
from ..base import CausalLMOutput
from ..interface import LanguageModel, check_checkpointing_mode
from ..registry import CAUSAL_LM, IMAGE_TEXT, architecture, supported_model_types

VIDEO_INPUTS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")   # Qwen2-VL's (qwen2_vl.py)
IMAGE_INPUTS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", *VIDEO_INPUTS)
# What transformers' processors also return and the models here do not need (the image tokens' ids say it all).
_IGNORED_INPUTS = ("mm_token_type_ids", "image_sizes")


@dataclass
class VisionArgs:
    """config.json of a vision-language checkpoint: the family's top-level fields, the text model's Args (`text`,
    read by the text family's own Args from `text_config`) and the raw `vision_config` (each family reads its
    fields from it). The whole file is kept in `raw` and written back unchanged by `to_dict()`.

    The names the rest of velotune reads on any model's args (vocab_size, tie_word_embeddings, the special token
    ids, max_position_embeddings) are the text model's."""
    model_type: str
    image_token_id: int
    text: Any
    vision: dict
    raw: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return dict(self.raw)

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.text.hidden_size

    @property
    def tie_word_embeddings(self) -> bool:
        return self.text.tie_word_embeddings

    @property
    def max_position_embeddings(self) -> int:
        return self.text.max_position_embeddings

    @property
    def bos_token_id(self):
        return self.text.bos_token_id

    @property
    def eos_token_id(self):
        return self.text.eos_token_id

    @property
    def pad_token_id(self):
        return self.text.pad_token_id


def read_image_token_id(config: dict, source: str, *names: str) -> int:
    """The image token id under the first of `names` config.json has (families and versions spell it
    differently), checked to be a token id."""
    for name in names:
        value = config.get(name)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise CheckpointError(f"{source}: field '{name}' must be a token id (an integer >= 0), got {value!r}")
            return value
    raise CheckpointError(f"{source}: no image token id (looked for {', '.join(names)})")


def text_module(text_config: dict, source: str, default_type: str = "llama"):
    """Our architecture module for a VLM's text model (by `text_config.model_type`), refusing types we lack."""
    model_type = text_config.get("model_type") or default_type
    module = architecture(model_type, CAUSAL_LM)
    if module is None:
        raise UnsupportedError(f"{source}: text_config.model_type '{model_type}' is not a decoder velotune has for "
                               f"vision-language models; supported: {', '.join(supported_model_types())}")
    return module


def section(config: dict, name: str, source: str) -> dict:
    """A nested config section (`text_config`, `vision_config`), which must be an object."""
    value = config.get(name)
    if not isinstance(value, dict):
        raise CheckpointError(f"{source}: field '{name}' must be an object, got {type(value).__name__}")
    return value


class VisionLanguageModel(LanguageModel):
    """A decoder that reads images: `language_model` (a velotune CausalLM), a vision tower and a projector.

    Subclasses set the class attributes below, build their tower and projector in `__init__`, and implement
    `image_features`. Positions are the language model's unless the family overrides `positions` (Qwen2-VL's
    3-D rotary positions)."""

    task = IMAGE_TEXT
    takes_videos = False                      # True where the family reads VIDEO_INPUTS too (Qwen2-VL)
    vision_prefixes: tuple[str, ...] = ()     # our module paths of the vision tower ("vision_tower.")
    projector_prefixes: tuple[str, ...] = ()  # ... of the projector / connector ("multi_modal_projector.")
    # (our prefix, checkpoint prefix): how transformers writes this family's files; load reads them back.
    saved_prefixes: tuple[tuple[str, str], ...] = ()
    # Other on-disk spellings of the same tensors that load also accepts (older or newer transformers layouts).
    load_prefixes: tuple[tuple[str, str], ...] = ()
    # (our prefix, transformers 5's in-memory prefix): the module names PEFT adapter files use.
    memory_prefixes: tuple[tuple[str, str], ...] = ()
    hf_architecture = ""                      # config.json "architectures" entry for an export

    def __init__(self, args, language_model: LanguageModel):
        super().__init__(args)
        self.language_model = language_model
        self.image_token_id = int(args.image_token_id)

    # ---- the family's part -----------------------------------------------------------------------------------
    @abstractmethod
    def image_features(self, pixel_values: torch.Tensor, **image_inputs) -> torch.Tensor:
        """The projected features of every image of the batch, [number of image tokens, text hidden size], in the
        order the image tokens appear in the batch (row by row, left to right)."""

    def vision_blocks(self) -> list[nn.Module]:
        """The vision tower's repeated blocks (checkpointed with the language blocks; not in `blocks()`, which the
        KV cache and FSDP's per-decoder-block wrapping read)."""
        return []

    def positions(self, input_ids, position_ids, attention_mask, cache, image_inputs,
                  document_ids=None) -> torch.Tensor | None:
        """Position ids for the language model, or None for its own defaults (packed rows: `document_ids`)."""
        return position_ids

    # ---- images into the embeddings ----------------------------------------------------------------------------
    def embed_with_images(self, input_ids: torch.Tensor, image_inputs: dict, decoding: bool = False) -> torch.Tensor:
        """Token embeddings with each image token's row replaced by its image feature. `decoding` (a cached step
        after the prompt): the tokens are the model's own output, embedded as they are even if one is the image
        token (an untrained model may produce it); images come with the prompt only."""
        h = self.language_model.embed(input_ids)
        if image_inputs.get("pixel_values") is None:
            if not decoding and (stray := int((input_ids == self.image_token_id).sum())):
                raise DataError(f"the input holds {stray} image token(s) "
                                f"(id {self.image_token_id}) but no images were given")
            return h
        features = self.image_features(**image_inputs)
        slots = input_ids == self.image_token_id
        wanted = int(slots.sum())
        if wanted != features.shape[0]:
            raise DataError(f"the text holds {wanted} image token(s) but the images give {features.shape[0]} "
                            "feature rows: each image placeholder must be expanded by the same processor that made "
                            "the pixel values (more placeholders than images, or the reverse?)")
        return h.masked_scatter(slots.unsqueeze(-1), features.to(h.dtype))

    # ---- the language model's interface, with images -----------------------------------------------------------
    def hidden_states(self, input_ids=None, *, position_ids=None, document_ids=None, attention_mask=None,
                      cache=None, inputs_embeds=None, **image_inputs):
        image_inputs = _image_inputs(image_inputs, self)
        if inputs_embeds is None:
            inputs_embeds = self.embed_with_images(input_ids, image_inputs, _decoding(cache))
        position_ids = self.positions(input_ids, position_ids, attention_mask, cache, image_inputs, document_ids)
        return self.language_model.hidden_states(None, position_ids=position_ids, document_ids=document_ids,
                                                 attention_mask=attention_mask, cache=cache,
                                                 inputs_embeds=inputs_embeds)

    def forward(self, input_ids=None, *, labels=None, position_ids=None, document_ids=None, attention_mask=None,
                cache=None, inputs_embeds=None, return_logits: bool | None = None, reduction: str = "mean",
                logits_to_keep: int = 0, output_hidden_states: bool = False, **image_inputs) -> CausalLMOutput:
        """As the language model's forward (`model(input_ids=ids, labels=labels, pixel_values=...)`), with the
        images scattered over the image tokens first."""
        image_inputs = _image_inputs(image_inputs, self)
        if inputs_embeds is None:
            inputs_embeds = self.embed_with_images(input_ids, image_inputs, _decoding(cache))
        position_ids = self.positions(input_ids, position_ids, attention_mask, cache, image_inputs, document_ids)
        return self.language_model(None, labels=labels, position_ids=position_ids, document_ids=document_ids,
                                   attention_mask=attention_mask, cache=cache, inputs_embeds=inputs_embeds,
                                   return_logits=return_logits, reduction=reduction, logits_to_keep=logits_to_keep,
                                   output_hidden_states=output_hidden_states)

    @property
    def supports_logits_to_keep(self) -> bool:
        return self.language_model.supports_logits_to_keep

    @property
    def final_logit_softcap(self):
        return self.language_model.final_logit_softcap

    def logits(self, hidden):
        return self.language_model.logits(hidden)

    def head_weight(self):
        return self.language_model.head_weight()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def blocks(self) -> list[nn.Module]:
        return self.language_model.blocks()

    def tie_weights(self):
        if hasattr(self.language_model, "tie_weights"):
            self.language_model.tie_weights()

    def set_gradient_checkpointing(self, mode: bool | str = True):
        check_checkpointing_mode(mode)
        self.language_model.set_gradient_checkpointing(mode)
        for module in self.modules():
            if module is not self and hasattr(module, "vision_checkpointing"):
                module.vision_checkpointing = bool(mode)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.language_model.is_gradient_checkpointing

    # ---- checkpoint names ----------------------------------------------------------------------------------------
    def part_of(self, name: str) -> str:
        """"vision", "projector" or "language" for a parameter name of ours."""
        if name.startswith(self.vision_prefixes):
            return "vision"
        if name.startswith(self.projector_prefixes):
            return "projector"
        return "language"

    def state_for_saving(self) -> dict:
        """Our state under transformers' checkpoint names (a tied head once, as the language model leaves it)."""
        state = {f"language_model.{k}": v for k, v in self.language_model.state_for_saving().items()}
        state.update({k: v for k, v in self.state_dict().items() if not k.startswith("language_model.")})
        return self.checkpoint_names(state)

    def peft_name(self, name: str) -> str:
        return checkpoint_name(name + ".", self.memory_prefixes)[:-1]

    def name_from_peft(self, name: str) -> str:
        return self.our_name(name + ".")[:-1]

    def checkpoint_names(self, state: dict) -> dict:
        """A state dict under our names -> under the names transformers writes for the family."""
        return {checkpoint_name(k, self.saved_prefixes): v for k, v in state.items()}

    @classmethod
    def our_name(cls, checkpoint_key: str) -> str:
        """The name of ours for a tensor name in a checkpoint file (any spelling the family accepts)."""
        # The longest spelling that matches: `model.visual.` before `model.` (Qwen2-VL writes its text at `model.`).
        matches = [(ours, theirs) for ours, theirs in (*cls.saved_prefixes, *cls.load_prefixes, *cls.memory_prefixes)
                   if checkpoint_key.startswith(theirs)]
        if not matches:
            return checkpoint_key
        ours, theirs = max(matches, key=lambda pair: len(pair[1]))
        return ours + checkpoint_key[len(theirs):]


def _decoding(cache) -> bool:
    """A cached step after the prompt."""
    return cache is not None and cache.past_length > 0


def checkpoint_name(name: str, prefixes) -> str:
    for ours, theirs in prefixes:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return name


def _image_inputs(given: dict, model) -> dict:
    given = {k: v for k, v in given.items() if k not in _IGNORED_INPUTS}
    unknown = sorted(set(given) - set(IMAGE_INPUTS))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(unknown)}; image inputs are "
                        f"{', '.join(IMAGE_INPUTS)}")
    given = {k: v for k, v in given.items() if v is not None}
    if not model.takes_videos and set(given) & set(VIDEO_INPUTS):
        videos = ", ".join(sorted(set(given) & set(VIDEO_INPUTS)))
        raise DataError(f"{model.model_type} reads images, not videos ({videos} given): videos need a family that "
                        "takes them (Qwen2-VL, Qwen2.5-VL)")
    return given


__all__ = ["IMAGE_INPUTS", "VIDEO_INPUTS", "VisionArgs", "VisionLanguageModel", "checkpoint_name", "read_image_token_id", "section",
           "text_module"]

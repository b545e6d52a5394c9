"""Qwen2-VL and Qwen2.5-VL (model_type "qwen2_vl", "qwen2_5_vl"): the vision transformer of qwen2_vl_vision.py in
front of Qwen2's decoder, whose rotary embedding is M-RoPE (mrope.py): three position axes, images placed on their
grid.

config.json: transformers 5 nests the text model's fields under `text_config` (model_type "qwen2_vl_text" /
"qwen2_5_vl_text") with `rope_parameters` holding `mrope_section`; older hub files keep them at the top level with
`rope_scaling: {"type": "mrope", "mrope_section": ...}` and `rope_theta`. Both are read, with transformers'
defaults for what a file leaves out.

Checkpoint names: transformers 5 writes the text model at `model.*` + `lm_head.*` and the vision tower at
`visual.*` (the layout of the hub files); in memory (and in files saved by transformers 4.5x) they are
`model.language_model.*` and `model.visual.*`. Both load.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...errors import CheckpointError, DataError, UnsupportedError
from .. import qwen2
from ..field_checks import is_int
from .base import VisionArgs, VisionLanguageModel, section
from .mrope import (
    MROPE_TYPES,
    MultimodalRotaryEmbedding,
    check_mrope_section,
    decode_positions,
    rope_index,
)
from .qwen2_vl_vision import QWEN2_5_VL, QWEN2_VL, VisionTowerArgs, VisionTransformer

HF_ARCHITECTURES = {QWEN2_VL: "Qwen2VLForConditionalGeneration",
                    QWEN2_5_VL: "Qwen2_5_VLForConditionalGeneration"}
TEXT_MODEL_TYPES = ("qwen2_vl_text", "qwen2_5_vl_text", "qwen2", QWEN2_VL, QWEN2_5_VL)
DEFAULT_IMAGE_TOKEN_ID = 151655
DEFAULT_VIDEO_TOKEN_ID = 151656
# Videos (issue 17): what the processor gives for them; the base class passes them through with the image inputs.
VIDEO_INPUTS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
DEFAULT_MROPE_SECTION = [16, 24, 24]
# transformers' Qwen2VLTextConfig defaults where they differ from our Qwen2 Args' (the sizes are required fields).
TEXT_DEFAULTS = dict(rms_norm_eps=1e-5, num_key_value_heads=8, max_position_embeddings=32768, max_window_layers=80,
                     hidden_act="silu", bos_token_id=151643, eos_token_id=151645)
DEFAULT_ROPE_THETA = 1000000.0


@dataclass
class Args(VisionArgs):
    """config.json of a Qwen2-VL / Qwen2.5-VL checkpoint: `text` is our Qwen2 Args (rope without the mrope part),
    `tower` the vision_config, `mrope_section` the text rotary bands of each position axis."""
    tower: VisionTowerArgs | None = None
    mrope_section: list = field(default_factory=lambda: list(DEFAULT_MROPE_SECTION))
    video_token_id: int = DEFAULT_VIDEO_TOKEN_ID

    @classmethod
    def from_dict(cls, config: dict, source: str = "config.json") -> Args:
        model_type = config.get("model_type")
        if model_type not in HF_ARCHITECTURES:
            raise UnsupportedError(f"{source}: model_type '{model_type}' is not Qwen2-VL; this file reads "
                                   f"{', '.join(HF_ARCHITECTURES)}")
        text_fields, mrope_section = _text_fields(config, source)
        text = qwen2.Args.from_dict(text_fields, source=f"{source} (text model)")
        check_mrope_section(mrope_section, text.head_dim, f"{source} (text rope)")
        kind = (text.rope_scaling or {}).get("rope_type", "default")
        if kind not in MROPE_TYPES:
            raise UnsupportedError(f"{source}: rope type '{kind}' with M-RoPE is not supported; supported: "
                                   f"{', '.join(MROPE_TYPES)}")
        vision = section(config, "vision_config", source)
        tower = VisionTowerArgs.from_dict(vision, source, model_type)
        if tower.out_size != text.hidden_size:
            name = "out_hidden_size" if tower.qwen25 else "hidden_size"
            raise CheckpointError(f"{source}: vision_config.{name} ({tower.out_size}) must equal the text model's "
                                  f"hidden_size ({text.hidden_size}): the merger's output is a text embedding")
        image_token_id = config.get("image_token_id", DEFAULT_IMAGE_TOKEN_ID)
        if not is_int(image_token_id) or not 0 <= image_token_id < text.vocab_size:
            raise CheckpointError(f"{source}: field 'image_token_id' must be a token id below vocab_size "
                                  f"({text.vocab_size}), got {image_token_id!r}")
        video_token_id = config.get("video_token_id", DEFAULT_VIDEO_TOKEN_ID)
        # Not checked against vocab_size: transformers writes its default (151656) into small configs too; such a
        # model just has no video token (video inputs then fail the token count check).
        if not is_int(video_token_id) or video_token_id < 0 or video_token_id == image_token_id:
            raise CheckpointError(f"{source}: field 'video_token_id' must be a token id other than image_token_id, "
                                  f"got {video_token_id!r}")
        if tower.qwen25 and (not isinstance(tower.tokens_per_second, (int, float))
                             or isinstance(tower.tokens_per_second, bool) or tower.tokens_per_second <= 0):
            raise CheckpointError(f"{source}: vision_config.tokens_per_second must be a positive number, got "
                                  f"{tower.tokens_per_second!r}")
        return cls(model_type=model_type, image_token_id=image_token_id, text=text, vision=dict(vision),
                   raw=dict(config), tower=tower, mrope_section=mrope_section, video_token_id=video_token_id)


def _text_fields(config: dict, source: str) -> tuple[dict, list]:
    """The text model's config fields as our Qwen2 Args reads them (the mrope part of the rope taken out), and
    mrope_section."""
    if config.get("text_config") is not None:
        text = dict(section(config, "text_config", source))
        kind = text.get("model_type")
        if kind is not None and kind not in TEXT_MODEL_TYPES:
            raise UnsupportedError(f"{source}: text_config.model_type '{kind}' is not a Qwen2-VL text model "
                                   f"(expected one of {', '.join(TEXT_MODEL_TYPES)})")
        # transformers 5 reads the outer flag; files from before it kept the flag in text_config.
        tie = bool(config.get("tie_word_embeddings") or text.get("tie_word_embeddings"))
    else:
        text = {k: v for k, v in config.items() if k != "vision_config"}
        tie = bool(config.get("tie_word_embeddings"))
    text = {**TEXT_DEFAULTS, **text, "model_type": "qwen2", "tie_word_embeddings": tie}
    heads, hidden = text.get("num_attention_heads"), text.get("hidden_size")
    head_dim = text.pop("head_dim", None)
    if head_dim is not None and is_int(heads) and is_int(hidden) and heads > 0 and head_dim != hidden // heads:
        raise CheckpointError(f"{source}: text head_dim ({head_dim}) differs from hidden_size / num_attention_heads "
                              f"({hidden // heads}), which Qwen2-VL's attention uses")
    # As transformers: rope_scaling wins over rope_parameters; "mrope" is the default rope on three axes.
    rope = text.pop("rope_scaling", None) or text.pop("rope_parameters", None) or {}
    text.pop("rope_parameters", None)
    if not isinstance(rope, dict):
        raise CheckpointError(f"{source}: the text model's rope_parameters must be an object, got {rope!r}")
    mrope_section = rope.get("mrope_section", DEFAULT_MROPE_SECTION)
    theta = rope.get("rope_theta", text.pop("rope_theta", DEFAULT_ROPE_THETA))
    kind = rope.get("rope_type", rope.get("type", "default"))
    params = {k: v for k, v in rope.items() if k not in ("mrope_section", "type", "rope_type", "rope_theta")}
    text["rope_parameters"] = {**params, "rope_type": "default" if kind == "mrope" else kind, "rope_theta": theta}
    return text, mrope_section


class TextModel(qwen2.Model):
    """Qwen2's decoder with M-RoPE: positions [3, batch, seq] (or [batch, seq] for text alone). A decoding step
    without positions, on a cache whose prompt set `rope_deltas`, is placed after the prompt's images."""

    def __init__(self, args, mrope_section: list[int], source: str = "config.json"):
        super().__init__(args)
        self.model.rotary_emb = MultimodalRotaryEmbedding(args.head_dim, args.rope_theta, args.rope_scaling,
                                                          mrope_section, args.max_position_embeddings, source)

    def hidden_states(self, input_ids=None, *, position_ids=None, document_ids=None, attention_mask=None,
                      cache=None, inputs_embeds=None, rows=None):
        deltas = cache.rope_deltas if cache is not None else None
        if position_ids is None and deltas is not None and cache.past_length > 0:
            length = (input_ids if inputs_embeds is None else inputs_embeds).shape[1]
            position_ids = decode_positions(attention_mask, cache.past_length, length, deltas)
        return super().hidden_states(input_ids, position_ids=position_ids, document_ids=document_ids,
                                     attention_mask=attention_mask, cache=cache, inputs_embeds=inputs_embeds,
                                     rows=rows)

    def note_positions_without_documents(self, position_ids: torch.Tensor):
        # An image's height and width positions go back at each row of patches; only the first axis says whether
        # the text restarts.
        super().note_positions_without_documents(position_ids[0] if position_ids.dim() == 3 else position_ids)


class Model(VisionLanguageModel):
    """`visual` (the vision tower and its merger) + `language_model` (TextModel)."""

    Args = Args
    takes_videos = True
    vision_prefixes = ("visual.patch_embed.", "visual.blocks.")
    projector_prefixes = ("visual.merger.",)
    saved_prefixes = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                      ("visual.", "visual."))
    load_prefixes = (("language_model.model.", "model.language_model."), ("visual.", "model.visual."))
    memory_prefixes = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                       ("visual.", "model.visual."))
    hf_architecture = HF_ARCHITECTURES[QWEN2_VL]

    def __init__(self, args: Args):
        super().__init__(args, TextModel(args.text, args.mrope_section))
        self.visual = VisionTransformer(args.tower)
        self.hf_architecture = HF_ARCHITECTURES[args.model_type]

    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                       pixel_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if pixel_attention_mask is not None:
            raise DataError("pixel_attention_mask is not an input of Qwen2-VL (its images are given by "
                            "pixel_values + image_grid_thw): was the batch made by another family's processor?")
        return self.visual(pixel_values, image_grid_thw)

    def video_features(self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor | None) -> torch.Tensor:
        """The projected features of every video, in the order of video_grid_thw: the image tower on frames
        (each temporal_patch_size frames one patch), as transformers runs it, in a call of its own."""
        if video_grid_thw is None:
            raise DataError("Qwen2-VL videos need video_grid_thw (the processor's [videos, 3] grid) with "
                            "pixel_values_videos")
        try:
            return self.visual(pixel_values_videos, video_grid_thw)
        except DataError as exc:  # the tower speaks of images; say which input was at fault
            raise DataError(f"videos: {exc} (read image_grid_thw / pixel_values as video_grid_thw / "
                            "pixel_values_videos)") from None

    def embed_with_images(self, input_ids: torch.Tensor, image_inputs: dict, decoding: bool = False) -> torch.Tensor:
        """The base class's image scatter, then each video token's row replaced by its video feature."""
        videos = {k: image_inputs[k] for k in VIDEO_INPUTS if k in image_inputs}
        images = {k: v for k, v in image_inputs.items() if k not in VIDEO_INPUTS}
        h = super().embed_with_images(input_ids, images, decoding)
        slots = input_ids == self.args.video_token_id
        if videos.get("pixel_values_videos") is None:
            if not decoding and (stray := int(slots.sum())):
                raise DataError(f"the input holds {stray} video token(s) (id {self.args.video_token_id}) but no "
                                "videos were given")
            return h
        features = self.video_features(videos["pixel_values_videos"], videos.get("video_grid_thw"))
        wanted = int(slots.sum())
        if wanted != features.shape[0]:
            raise DataError(f"the text holds {wanted} video token(s) but the videos give {features.shape[0]} "
                            "feature rows: each video placeholder must be expanded by the same processor that made "
                            "pixel_values_videos")
        return h.masked_scatter(slots.unsqueeze(-1), features.to(h.dtype))

    def vision_blocks(self) -> list:
        return list(self.visual.blocks)

    def _rope_index(self, input_ids, attention_mask, image_inputs, document_ids=None):
        """rope_index with this model's images and videos (frame spacing: Qwen2.5-VL's tokens_per_second)."""
        return rope_index(input_ids, self.image_token_id, image_inputs.get("image_grid_thw"),
                          self.args.tower.spatial_merge_size, attention_mask, document_ids,
                          video_token_id=self.args.video_token_id, video_grid_thw=image_inputs.get("video_grid_thw"),
                          second_per_grid_ts=image_inputs.get("second_per_grid_ts"),
                          tokens_per_second=self.args.tower.tokens_per_second if self.args.tower.qwen25 else None)

    def positions(self, input_ids, position_ids, attention_mask, cache, image_inputs,
                  document_ids=None) -> torch.Tensor | None:
        """3-D positions. A prompt (no cache, or an empty one): from the image placeholders and image_grid_thw, the
        rope deltas kept in `cache.rope_deltas`; a decoding step: past length + delta on all three axes. Packed rows
        (`document_ids`, training): positions restart at each document, images placed as in a prompt of their own."""
        # Images or videos (either grid) place the prompt on its grids.
        grid = image_inputs.get("image_grid_thw")
        if grid is None:
            grid = image_inputs.get("video_grid_thw")
        if document_ids is not None and input_ids is not None and cache is None:
            if grid is None and position_ids is not None:
                return position_ids
            return self._rope_index(input_ids, attention_mask, image_inputs, document_ids)[0]
        if position_ids is not None or input_ids is None:
            return position_ids  # embeddings alone: the text model places them (with the cache's deltas)
        past = cache.past_length if cache is not None else 0
        if past == 0:
            if grid is None:  # text alone: the text model's positions, nothing to offset later
                if cache is not None:
                    cache.rope_deltas = torch.zeros(input_ids.shape[0], 1, dtype=torch.long, device=input_ids.device)
                return None
            positions, deltas = self._rope_index(input_ids, attention_mask, image_inputs)
            if cache is not None:
                cache.rope_deltas = deltas
            return positions
        if grid is not None:   # an image token the model generated is text here; new images are not
            raise UnsupportedError("images after the first forward of a cached request: give every image with the "
                                   "prompt (its positions are fixed at prefill), and prefill it in one piece")
        if cache.rope_deltas is None:
            return None
        return decode_positions(attention_mask, past, input_ids.shape[1], cache.rope_deltas)


__all__ = ["HF_ARCHITECTURES", "Args", "Model", "TextModel"]

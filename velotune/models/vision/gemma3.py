"""Gemma 3 with images (model_type "gemma3": Gemma3ForConditionalGeneration, the 4B / 12B / 27B releases): a SigLIP
tower, Gemma 3's projector, and velotune's gemma3_text decoder (models/gemma3.py) built from `text_config`.

Each image (pixel_values [images, channels, image_size, image_size]; pan-and-scan crops are more images of the same
size) goes through the tower (its last layer through `post_layernorm`). The projector average-pools the patch grid
down to `mm_tokens_per_image` rows (a square), normalises them with Gemma's (1 + weight) RMSNorm
(`mm_soft_emb_norm`, the tower's layer_norm_eps) and multiplies by `mm_input_projection_weight` [tower width, text
width] (a bare matrix, not a Linear). The features replace the image tokens' rows after the text embeddings were
scaled by sqrt(hidden_size), as transformers does.

Attention: the tokens of one image (a run of consecutive image tokens) see each other both ways; everything else
stays causal, and the local layers keep their window over that (transformers: AND(window, OR(causal, same image))).
transformers reads the runs from the processor's `token_type_ids` (`mm_token_type_ids`); taken here when given,
else from the image tokens of input_ids, which is what the processor writes there. The rule rides on the mask the
decoder builds (`ImageBlockMask`, swapped in by a forward pre-hook on the decoder's backbone), only for a forward
without past tokens: a cached step after the prompt holds no image.

The language model's head is never soft-capped: transformers' Gemma3ForConditionalGeneration reads
final_logit_softcapping only in the text-only class. The head is tied when the top-level tie_word_embeddings says so
(true when absent, as Gemma3Config).

Checkpoint names: transformers 5 writes `language_model.model.*`, `language_model.lm_head.*` (untied only),
`vision_tower.*` and `multi_modal_projector.*`, our module tree; the hub's files spell the tower
`vision_tower.vision_model.*` and transformers 5 keeps `model.language_model.*`, `model.vision_tower.*`,
`model.multi_modal_projector.*`, `lm_head.*` in memory (`load_prefixes`, `memory_prefixes`).
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import CheckpointError, DataError, UnsupportedError
from ..attention import AttentionMask
from ..field_checks import check_fields
from ..norms import RMSNorm
from ..registry import CAUSAL_LM, architecture
from .base import (
    VisionArgs,
    VisionLanguageModel,
    read_image_token_id,
    section,
    text_module,
)
from .llava import Model as _Llava
from .towers import TowerArgs, VisionTransformer

log = logging.getLogger("velotune")

IMAGE_TYPE_INPUTS = ("token_type_ids", "mm_token_type_ids")   # the processor's image-token marks (1: image)


@dataclass
class Args(VisionArgs):
    """config.json of a Gemma 3 checkpoint: the top-level fields under transformers' names and defaults, the text
    model's Args (`text`, gemma3_text) and the tower's (`tower`, SigLIP)."""
    mm_tokens_per_image: int = 256
    boi_token_index: int = 255_999
    eoi_token_index: int = 256_000
    tower: TowerArgs | None = None

    @classmethod
    def from_dict(cls, config: dict, source: str = "config.json") -> Args:
        text_config = dict(section(config, "text_config", source))
        text_type = text_config.setdefault("model_type", "gemma3_text")
        if text_type != "gemma3_text":
            raise UnsupportedError(f"{source}: text_config.model_type is {text_type!r}; Gemma 3 checkpoints have a "
                                   "'gemma3_text' language model")
        text = text_module(text_config, source).Args.from_dict(text_config, f"{source} (text_config)")
        # transformers 5 ties the head by the top-level flag alone (Gemma3Config's default: true).
        top = config.get("tie_word_embeddings", True)
        if not isinstance(top, bool):
            raise CheckpointError(f"{source}: field 'tie_word_embeddings' must be true or false, got {top!r}")
        text.tie_word_embeddings = top
        vision = section(config, "vision_config", source)
        tower_type = vision.get("model_type", "siglip_vision_model")
        if tower_type != "siglip_vision_model":
            raise UnsupportedError(f"{source}: vision_config.model_type is {tower_type!r}; velotune's Gemma 3 reads "
                                   "a 'siglip_vision_model' tower")
        names = ("image_token_index", "image_token_id")
        token = read_image_token_id(config, source, *names) if any(config.get(n) is not None for n in names) \
            else 262_144
        if token >= text.vocab_size:
            # transformers embeds such a token as the pad row; no released checkpoint needs that.
            raise UnsupportedError(f"{source}: the image token id {token} is not below text_config.vocab_size "
                                   f"({text.vocab_size}): such checkpoints are not supported")
        args = cls(model_type=config.get("model_type", "gemma3"), image_token_id=token, text=text,
                   vision=dict(vision), raw=dict(config),
                   tower=TowerArgs.from_dict(vision, tower_type, source),
                   **{k: config[k] for k in ("mm_tokens_per_image", "boi_token_index", "eoi_token_index")
                      if config.get(k) is not None})
        args.validate(source)
        return args

    def validate(self, source: str):
        check_fields(self, source, positive_ints=("mm_tokens_per_image",))
        side = math.isqrt(self.mm_tokens_per_image)
        patches = self.tower.patches_per_side
        if side * side != self.mm_tokens_per_image or side > patches or patches // (patches // side) != side:
            raise CheckpointError(f"{source}: field 'mm_tokens_per_image' ({self.mm_tokens_per_image}) must be the "
                                  f"square of a side that pools the {patches} x {patches} patch grid "
                                  f"(vision_config.image_size {self.tower.image_size} // patch_size "
                                  f"{self.tower.patch_size}) evenly")
        if self.text.final_logit_softcapping is not None:
            log.warning("%s: text_config.final_logit_softcapping=%s is not applied, as transformers' "
                        "Gemma3ForConditionalGeneration does not apply it", source, self.text.final_logit_softcapping)

    @property
    def tokens_per_image(self) -> int:
        return self.mm_tokens_per_image


class Projector(nn.Module):
    """Patch grid -> average-pooled to mm_tokens_per_image rows -> RMSNorm -> times mm_input_projection_weight."""

    def __init__(self, args: Args):
        super().__init__()
        self.patches = args.tower.patches_per_side
        self.kernel = self.patches // math.isqrt(args.mm_tokens_per_image)
        self.mm_input_projection_weight = nn.Parameter(torch.zeros(args.tower.hidden_size, args.text.hidden_size))
        self.mm_soft_emb_norm = RMSNorm(args.tower.hidden_size, args.tower.layer_norm_eps, offset=1.0)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """[images, patches, tower width] -> [images, mm_tokens_per_image, text width]."""
        n, _, width = states.shape
        grid = states.transpose(1, 2).reshape(n, width, self.patches, self.patches)
        pooled = F.avg_pool2d(grid, self.kernel, self.kernel).flatten(2).transpose(1, 2)
        return torch.matmul(self.mm_soft_emb_norm(pooled), self.mm_input_projection_weight).type_as(states)


class ImageBlockMask(AttentionMask):
    """The decoder's mask with Gemma 3's image rule: a query in an image run also sees every key of that run (also
    later ones); window, documents and key padding still apply, and every query sees itself."""

    def __init__(self, base: AttentionMask, blocks: torch.Tensor):
        super().__init__(base.q_len, base.kv_len, base.device, doc_ids=base.doc_ids, key_padding=base.key_padding)
        self.blocks = blocks   # [B, kv_len]: the index of each position's image run within its row, -1 for text

    @property
    def plain_causal(self) -> bool:
        return False

    @property
    def packed_only(self) -> bool:
        return False   # the varlen kernels know causality only

    def rows(self, rows: torch.Tensor, window: int | None) -> torch.Tensor:
        return self._allowed(rows, window)

    def _build(self, window):
        offset = self.kv_len - self.q_len
        queries = torch.arange(offset, self.kv_len, device=self.device).expand(self.blocks.shape[0], -1)
        return self._allowed(queries, window)

    def _allowed(self, queries: torch.Tensor, window: int | None) -> torch.Tensor:
        """Boolean [B, 1, Q, kv_len] for the queries at positions `queries` [B, Q]."""
        k_idx = torch.arange(self.kv_len, device=self.device)[None, None, :]
        q_idx = queries[:, :, None]
        q_blocks = self.blocks.gather(1, queries)[:, :, None]
        allowed = (k_idx <= q_idx) | ((q_blocks == self.blocks[:, None, :]) & (q_blocks >= 0))
        if window is not None:
            allowed = allowed & (q_idx - k_idx < window)
        if self.doc_ids is not None:
            allowed = allowed & (self.doc_ids.gather(1, queries)[:, :, None] == self.doc_ids[:, None, :])
        if self.key_padding is not None:
            allowed = allowed & self.key_padding[:, None, :].bool()
        return (allowed | (k_idx == q_idx))[:, None]


def image_blocks(is_image: torch.Tensor) -> torch.Tensor:
    """[B, T] bool (image token) -> [B, T] long: each run of consecutive image tokens numbered from 0 in its row,
    -1 for text (transformers' block ids)."""
    starts = is_image & ~F.pad(is_image, (1, 0), value=False)[:, :-1]
    return torch.where(is_image, starts.long().cumsum(dim=1) - 1, -1)


class Model(VisionLanguageModel):
    """transformers' Gemma3ForConditionalGeneration on velotune's gemma3_text decoder."""

    vision_prefixes = ("vision_tower.",)
    projector_prefixes = ("multi_modal_projector.",)
    # The same tree and on-disk spellings as LLaVA's (transformers 5 writes both alike).
    saved_prefixes = _Llava.saved_prefixes
    load_prefixes = _Llava.load_prefixes
    memory_prefixes = _Llava.memory_prefixes
    hf_architecture = "Gemma3ForConditionalGeneration"

    def __init__(self, args: Args):
        super().__init__(args, architecture(args.text.model_type, CAUSAL_LM).Model(args.text))
        self.language_model.final_logit_softcap = None   # see the module docstring
        self.vision_tower = VisionTransformer(args.tower)
        self.multi_modal_projector = Projector(args)
        self._blocks: torch.Tensor | None = None   # this forward's image runs, read by the backbone's hook
        self.language_model.model.register_forward_pre_hook(self._image_rule)

    def vision_blocks(self) -> list[nn.Module]:
        return self.vision_tower.layers

    def image_features(self, pixel_values: torch.Tensor, **image_inputs) -> torch.Tensor:
        """pixel_values [images, channels, image_size, image_size] -> [images * mm_tokens_per_image, text width]."""
        if image_inputs:
            raise DataError(f"Gemma 3 reads pixel_values only; the batch also holds {', '.join(sorted(image_inputs))}")
        if pixel_values.dim() != 4:
            raise DataError(f"Gemma 3's pixel_values must be [images, channels, height, width], got shape "
                            f"{list(pixel_values.shape)}")
        dtype = self.vision_tower.embeddings.patch_embedding.weight.dtype
        features = self.multi_modal_projector(self.vision_tower(pixel_values.to(dtype)))
        return features.reshape(-1, features.shape[-1])

    # ---- the image attention rule ------------------------------------------------------------------------------
    def forward(self, input_ids=None, **inputs):
        with self._image_runs(input_ids, inputs):
            return super().forward(input_ids, **inputs)

    def hidden_states(self, input_ids=None, **inputs):
        with self._image_runs(input_ids, inputs):
            return super().hidden_states(input_ids, **inputs)

    @contextmanager
    def _image_runs(self, input_ids, inputs: dict):
        """Sets this forward's image runs (pops the processor's type ids from `inputs`) for `_image_rule`."""
        marks = [m for m in (inputs.pop(name, None) for name in IMAGE_TYPE_INPUTS) if m is not None]
        if marks:
            is_image = marks[0] == 1
        elif input_ids is not None:
            is_image = input_ids == self.image_token_id
        else:
            is_image = None   # inputs_embeds alone: no image tokens to find, so the plain causal mask
        outer = self._blocks
        self._blocks = image_blocks(is_image) if is_image is not None and bool(is_image.any()) else None
        try:
            yield
        finally:
            self._blocks = outer

    def _image_rule(self, backbone, args):
        """Forward pre-hook of the decoder's backbone, called (h, rope, mask, cache, rows): the mask gains the
        image rule for a forward over the whole sequence (no past tokens)."""
        blocks, mask = self._blocks, args[2]
        if blocks is None or not isinstance(mask, AttentionMask) or mask.q_len != mask.kv_len:
            return None
        if tuple(blocks.shape) != (args[0].shape[0], mask.kv_len):
            raise DataError(f"token_type_ids has shape {list(blocks.shape)} but the input is "
                            f"{[args[0].shape[0], mask.kv_len]}: it must mark the input's tokens one to one")
        return (args[0], args[1], ImageBlockMask(mask, blocks.to(mask.device)), *args[3:])


__all__ = ["Args", "ImageBlockMask", "Model", "Projector", "image_blocks"]

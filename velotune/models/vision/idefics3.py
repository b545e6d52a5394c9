"""Idefics3 and SmolVLM (model_type "idefics3", "smolvlm"): a SigLIP tower over images of varying size, a
pixel-shuffle connector, and one of velotune's decoders (Llama in the released checkpoints).

pixel_values are [rows, images per row, channels, height, width] as the processor pads them: images padded to the
batch's largest (square) size, rows padded with all-zero images, which are dropped before the tower as transformers
does. `pixel_attention_mask` [rows, images per row, height, width] marks each image's real pixels; a patch with any
real pixel is real, and the tower leaves the others out of attention and buckets the positions of the real ones
(towers.py). Every patch, padded or not, then goes through the connector: the patch grid is folded by
`scale_factor` (each scale_factor x scale_factor block of patches becomes one row of scale_factor**2 times the
width) and `modality_projection.proj` (no bias) maps it to the text width. Image tokens per image:
(side // patch_size) ** 2 // scale_factor ** 2 for the padded side (image_size for the processor's tiles:
`Args.tokens_per_image`), whatever the mask says.

Parameters are saved under transformers' names with our prefixes mapped: `language_model.model.*` <->
`model.text_model.*`, `language_model.lm_head.*` <-> `lm_head.*`, `vision_model.*` <-> `model.vision_model.*`,
`connector.*` <-> `model.connector.*`; the hub's Idefics3 and SmolVLM files use these same names.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...errors import CheckpointError, DataError
from ..field_checks import check_fields
from ..registry import CAUSAL_LM, architecture
from .base import VisionArgs, VisionLanguageModel, section
from .llava import image_token_id, read_text_args
from .towers import TowerArgs, VisionTransformer

ARCHITECTURES = {"idefics3": "Idefics3ForConditionalGeneration", "smolvlm": "SmolVLMForConditionalGeneration"}


@dataclass
class Args(VisionArgs):
    """config.json of an Idefics3 / SmolVLM checkpoint: scale_factor, the text model's Args (`text`) and the
    tower's (`tower`, SigLIP without its pooling head)."""
    scale_factor: int = 2
    tower: TowerArgs | None = None

    @classmethod
    def from_dict(cls, config: dict, source: str = "config.json") -> Args:
        model_type = config.get("model_type", "idefics3")
        if model_type not in ARCHITECTURES:
            raise CheckpointError(f"{source}: field 'model_type' is {model_type!r}; this file reads "
                                  f"{', '.join(ARCHITECTURES)}")
        # As Idefics3Config: only the top-level flag ties the head (the text model's own is not read).
        text = read_text_args(config, source, lambda top, own: top)
        vision = section(config, "vision_config", source)
        args = cls(model_type=model_type, image_token_id=image_token_id(config, source, 128257, text), text=text,
                   vision=dict(vision), raw=dict(config), scale_factor=config.get("scale_factor", 2),
                   tower=TowerArgs.from_dict(vision, f"{model_type}_vision", source))
        args.validate(source)
        return args

    def validate(self, source: str):
        check_fields(self, source, positive_ints=("scale_factor",))
        if self.tower.patches_per_side % self.scale_factor:
            raise CheckpointError(f"{source}: field 'scale_factor' ({self.scale_factor}) does not divide the "
                                  f"{self.tower.patches_per_side} patches per side of an image (vision_config."
                                  f"image_size {self.tower.image_size} // patch_size {self.tower.patch_size})")

    @property
    def tokens_per_image(self) -> int:
        """Image tokens of one image_size tile (the processor's `image_seq_len`)."""
        return self.tower.patches_per_side ** 2 // self.scale_factor ** 2


def pixel_shuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """[images, side * side, width] -> [images, side * side / scale**2, width * scale**2]: each scale x scale block
    of the patch grid becomes one row (transformers' order of the folded features)."""
    n, seq, width = x.shape
    side = int(seq ** 0.5)
    x = x.view(n, side, side // scale, width * scale).permute(0, 2, 1, 3)
    x = x.reshape(n, side // scale, side // scale, width * scale * scale).permute(0, 2, 1, 3)
    return x.reshape(n, seq // scale ** 2, width * scale * scale)


class ModalityProjection(nn.Module):
    def __init__(self, args: Args):
        super().__init__()
        self.proj = nn.Linear(args.tower.hidden_size * args.scale_factor ** 2, args.text.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Connector(nn.Module):
    def __init__(self, args: Args):
        super().__init__()
        self.scale_factor = args.scale_factor
        self.modality_projection = ModalityProjection(args)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.modality_projection(pixel_shuffle(states, self.scale_factor))


class Model(VisionLanguageModel):
    """transformers' Idefics3ForConditionalGeneration / SmolVLMForConditionalGeneration on velotune's decoder."""

    vision_prefixes = ("vision_model.",)
    projector_prefixes = ("connector.",)
    saved_prefixes = (("language_model.model.", "model.text_model."),
                      ("language_model.lm_head.", "lm_head."),
                      ("vision_model.", "model.vision_model."),
                      ("connector.", "model.connector."))
    load_prefixes = ()
    memory_prefixes = saved_prefixes   # transformers keeps these names in memory too
    hf_architecture = ARCHITECTURES["idefics3"]

    def __init__(self, args: Args):
        super().__init__(args, architecture(args.text.model_type, CAUSAL_LM).Model(args.text))
        self.hf_architecture = ARCHITECTURES[args.model_type]
        self.vision_model = VisionTransformer(args.tower, bucketed_positions=True)
        self.connector = Connector(args)

    def vision_blocks(self) -> list[nn.Module]:
        return self.vision_model.layers

    def image_features(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None,
                       **image_inputs) -> torch.Tensor:
        """The real images' features, [real images * tokens per image, text width], row by row."""
        if image_inputs:
            raise DataError(f"{self.args.model_type} reads pixel_values and pixel_attention_mask only; the batch "
                            f"also holds {', '.join(sorted(image_inputs))}")
        if pixel_values.dim() != 5:
            raise DataError(f"{self.args.model_type}'s pixel_values must be [rows, images per row, channels, "
                            f"height, width], got shape {list(pixel_values.shape)}")
        images = pixel_values.flatten(0, 1).to(self.vision_model.embeddings.patch_embedding.weight.dtype)
        real = (images != 0).flatten(1).any(dim=1)  # an all-zero image pads its row
        images = images[real]
        if pixel_attention_mask is None:
            pixel_mask = torch.ones(images.shape[0], *images.shape[2:], dtype=torch.bool, device=images.device)
        elif pixel_attention_mask.shape != (*pixel_values.shape[:2], *pixel_values.shape[3:]):
            raise DataError(f"pixel_attention_mask has shape {list(pixel_attention_mask.shape)} but pixel_values "
                            f"{list(pixel_values.shape)}: it must be [rows, images per row, height, width]")
        else:
            pixel_mask = pixel_attention_mask.flatten(0, 1)[real]
        patch_mask = self._patch_mask(pixel_mask)
        if images.shape[0] == 0:
            return images.new_zeros(0, self.args.text.hidden_size)
        features = self.connector(self.vision_model(images, patch_mask))
        return features.reshape(-1, features.shape[-1])

    def _patch_mask(self, pixel_mask: torch.Tensor) -> torch.Tensor:
        """[images, height, width] real pixels -> [images, rows, columns] real patches (any real pixel)."""
        patch, scale = self.args.tower.patch_size, self.args.scale_factor
        height, width = pixel_mask.shape[-2:]
        rows, cols = height // patch, width // patch
        if rows != cols or rows % scale:
            raise DataError(f"{self.args.model_type} images must be padded to a square whose side in patches "
                            f"(patch_size {patch}) is a multiple of scale_factor {scale}; got {height}x{width} "
                            "pixels: pad the batch with the checkpoint's own image processor")
        patches = pixel_mask.unfold(1, patch, patch).unfold(2, patch, patch).sum(dim=(-1, -2)) > 0
        if patches.shape[0] and not bool(patches.flatten(1).any(dim=1).all()):
            raise DataError("an image of the batch has no real pixel in pixel_attention_mask (all zeros) although "
                            "its pixel_values are not all zero")
        return patches


__all__ = ["ARCHITECTURES", "Args", "Connector", "Model", "pixel_shuffle"]

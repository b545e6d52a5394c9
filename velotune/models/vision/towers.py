"""The vision towers of the LLaVA and Idefics3 / SmolVLM families: CLIP's and SigLIP's vision transformers.

A tower cuts an image into patches (a strided convolution), adds learned position embeddings (CLIP also prepends a
class embedding and normalises before the first layer), and runs pre-norm encoder layers: LayerNorm, bidirectional
attention with biased q/k/v/out projections, LayerNorm, a two-layer MLP. `layer_states` returns the input of the
first layer and each layer's output (what LLaVA picks its features from, none of them through `post_layernorm`);
calling the tower returns the last layer's output through `post_layernorm` (what Idefics3 reads).

Idefics3 feeds SigLIP images padded to the batch's largest size: `patch_mask` [images, rows, columns] marks the
real patches, the padded ones are left out of every key set, and the position of each real patch is bucketed onto
the image_size grid the position table was trained on (transformers' NaViT-style ids, computed with the same
float32 steps so the buckets agree exactly).

Module and parameter names are transformers' (`embeddings.patch_embedding`, `encoder.layers.0.self_attn.q_proj`,
`pre_layrnorm`, `post_layernorm`, SigLIP's unused pooling `head`), so the family files map checkpoint prefixes only.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...errors import CheckpointError, DataError, UnsupportedError
from ..field_checks import check_fields

# config.json activation name -> the function (transformers' ACT2FN entries the towers and projectors use).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    # transformers writes these two tanh forms out by hand: the same function up to rounding.
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def activation(name, source: str, field_name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise UnsupportedError(f"{source}: field '{field_name}' names activation {name!r}, which velotune's vision "
                               f"models do not have; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# vision_config.model_type -> transformers' defaults for the fields a config.json leaves out.
_COMMON = dict(num_channels=3, image_size=224, attention_dropout=0.0, intermediate_size=3072, num_hidden_layers=12)
TOWER_DEFAULTS = {
    "clip_vision_model": dict(_COMMON, kind="clip", hidden_size=768, num_attention_heads=12, patch_size=32,
                              hidden_act="quick_gelu", layer_norm_eps=1e-5, vision_use_head=False),
    "siglip_vision_model": dict(_COMMON, kind="siglip", hidden_size=768, num_attention_heads=12, patch_size=16,
                                hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=True),
    # Idefics3 / SmolVLM: SigLIP without the pooling head, at SigLIP-so400m's width.
    "idefics3_vision": dict(_COMMON, kind="siglip", hidden_size=1152, num_attention_heads=16, patch_size=32,
                            hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False),
}
TOWER_DEFAULTS["smolvlm_vision"] = TOWER_DEFAULTS["idefics3_vision"]


@dataclass
class TowerArgs:
    """vision_config fields a tower reads, under transformers' names. `kind` "clip" (class embedding,
    pre_layrnorm, no patch bias) or "siglip"; `vision_use_head` builds SigLIP's pooling head (kept for the
    checkpoint, never read by the language model)."""
    kind: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_channels: int
    image_size: int
    patch_size: int
    hidden_act: str
    layer_norm_eps: float
    attention_dropout: float
    vision_use_head: bool
    raw: dict = field(default_factory=dict, repr=False)

    SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
             "image_size", "patch_size")

    @classmethod
    def from_dict(cls, vision_config: dict, model_type: str, source: str) -> TowerArgs:
        """`model_type` picks the defaults (TOWER_DEFAULTS); `source` names the file for errors."""
        where = f"{source} (vision_config)"
        if model_type not in TOWER_DEFAULTS:
            raise UnsupportedError(f"{source}: vision_config.model_type {model_type!r} is not a vision tower "
                                   f"velotune has; supported: {', '.join(TOWER_DEFAULTS)}")
        values = dict(TOWER_DEFAULTS[model_type])
        readable = {f.name for f in dataclasses.fields(cls)} - {"raw", "kind"}
        if model_type != "siglip_vision_model":
            readable.discard("vision_use_head")  # only SigLIP's own config has a head to build
        values.update({k: v for k, v in vision_config.items() if k in readable})
        args = cls(**values, raw=dict(vision_config))
        check_fields(args, where, positive_ints=cls.SIZES, probabilities=("attention_dropout",),
                     positive_floats=("layer_norm_eps",), flags=("vision_use_head",))
        if args.hidden_size % args.num_attention_heads:
            raise CheckpointError(f"{where}: field 'hidden_size' ({args.hidden_size}) is not a multiple of "
                                  f"'num_attention_heads' ({args.num_attention_heads})")
        if args.patch_size > args.image_size:
            raise CheckpointError(f"{where}: field 'patch_size' ({args.patch_size}) is larger than 'image_size' "
                                  f"({args.image_size})")
        activation(args.hidden_act, where, "hidden_act")
        return args

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


def bucketed_position_ids(patch_mask: torch.Tensor, per_side: int) -> torch.Tensor:
    """Position ids [images, rows * columns] for images whose real patches are the top-left rows x columns of
    `patch_mask` [images, rows, columns]: each real patch takes the position of the image_size grid cell its
    fractional coordinate falls in (an image of fewer patches spreads over the whole table); padded patches 0."""
    n, rows, cols = patch_mask.shape
    device = patch_mask.device
    boundaries = torch.arange(1 / per_side, 1.0, 1 / per_side, device=device)
    # The real extent is read off the first column and the first row, as transformers does.
    step_h = 1.0 / patch_mask[:, :, 0].sum(dim=1)
    step_w = 1.0 / patch_mask[:, 0, :].sum(dim=1)
    coords_h = torch.arange(rows, device=device, dtype=torch.float32)[None, :] * step_h[:, None]
    coords_w = torch.arange(cols, device=device, dtype=torch.float32)[None, :] * step_w[:, None]
    bucket_h = torch.bucketize(coords_h.clamp(max=1.0 - 1e-6), boundaries, right=True)
    bucket_w = torch.bucketize(coords_w.clamp(max=1.0 - 1e-6), boundaries, right=True)
    ids = (bucket_h[:, :, None] * per_side + bucket_w[:, None, :]).reshape(n, -1)
    return torch.where(patch_mask.reshape(n, -1), ids, torch.zeros_like(ids))


class VisionEmbeddings(nn.Module):
    """Patches -> vectors, plus learned positions (CLIP: a class embedding first)."""

    def __init__(self, args: TowerArgs, bucketed_positions: bool):
        super().__init__()
        self.kind, self.image_size, self.patch_size = args.kind, args.image_size, args.patch_size
        self.per_side = args.patches_per_side
        self.bucketed_positions = bucketed_positions
        self.patch_embedding = nn.Conv2d(args.num_channels, args.hidden_size, args.patch_size, stride=args.patch_size,
                                         bias=args.kind != "clip")
        if args.kind == "clip":
            self.class_embedding = nn.Parameter(torch.randn(args.hidden_size) * args.hidden_size ** -0.5)
        self.position_embedding = nn.Embedding(self.per_side ** 2 + (args.kind == "clip"), args.hidden_size)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        if self.bucketed_positions:
            return x + self.position_embedding(bucketed_position_ids(patch_mask, self.per_side))
        height, width = pixel_values.shape[-2:]
        if (height, width) != (self.image_size, self.image_size):
            raise DataError(f"pixel_values hold {height}x{width} images but the vision tower takes "
                            f"{self.image_size}x{self.image_size} (vision_config.image_size): resize the images "
                            "with the checkpoint's own image processor")
        if self.kind == "clip":
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)
        return x + self.position_embedding.weight


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention with biases on all four projections."""

    def __init__(self, args: TowerArgs):
        super().__init__()
        width = args.hidden_size
        self.heads, self.head_dim = args.num_attention_heads, width // args.num_attention_heads
        self.dropout = args.attention_dropout
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x [images, patches, width]; `mask` boolean [images, 1, 1, patches] (True: a real key) or None."""
        b, s, _ = x.shape
        q, k, v = (proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, s, -1))


class VisionMLP(nn.Module):
    def __init__(self, args: TowerArgs):
        super().__init__()
        self.act = activation(args.hidden_act, "vision_config", "hidden_act")
        self.fc1 = nn.Linear(args.hidden_size, args.intermediate_size)
        self.fc2 = nn.Linear(args.intermediate_size, args.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    """x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, args: TowerArgs):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.self_attn = VisionAttention(args)
        self.layer_norm2 = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.mlp = VisionMLP(args)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.self_attn(self.layer_norm1(x), mask)
        return h + self.mlp(self.layer_norm2(h))


class VisionEncoder(nn.Module):
    def __init__(self, args: TowerArgs):
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(args) for _ in range(args.num_hidden_layers))


class PoolingHead(nn.Module):
    """SigLIP's attention-pooling head (a learned probe attends over the patches). LLaVA never reads it; it is
    built so that a SigLIP tower's checkpoint loads, and saves back, whole."""

    def __init__(self, args: TowerArgs):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, args.hidden_size))
        self.attention = nn.MultiheadAttention(args.hidden_size, args.num_attention_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.mlp = VisionMLP(args)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        h = self.attention(self.probe.expand(states.shape[0], -1, -1), states, states)[0]
        return (h + self.mlp(self.layernorm(h)))[:, 0]


class VisionTransformer(nn.Module):
    """A CLIP or SigLIP vision tower. `bucketed_positions` (Idefics3): images of any size up to the padded batch
    size, positions bucketed from `patch_mask`; otherwise every image must be image_size square."""

    def __init__(self, args: TowerArgs, bucketed_positions: bool = False):
        super().__init__()
        self.args = args
        self.embeddings = VisionEmbeddings(args, bucketed_positions)
        if args.kind == "clip":
            self.pre_layrnorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)  # (sic: transformers' name)
        self.encoder = VisionEncoder(args)
        self.post_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        if args.kind == "siglip" and args.vision_use_head:
            self.head = PoolingHead(args)
        # Set by VisionLanguageModel.set_gradient_checkpointing: recompute each layer in backward when training.
        self.vision_checkpointing = False

    @property
    def layers(self) -> list[nn.Module]:
        return list(self.encoder.layers)

    def layer_states(self, pixel_values: torch.Tensor, last: int | None = None,
                     patch_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """[the first layer's input, layer 1's output, ..., layer `last`'s output] for pixel_values
        [images, channels, height, width]; `last` None: every layer. Layers past `last` are not run."""
        last = len(self.encoder.layers) if last is None else last
        if self.embeddings.bucketed_positions and patch_mask is None:
            patch_mask = torch.ones(pixel_values.shape[0], pixel_values.shape[-2] // self.args.patch_size,
                                    pixel_values.shape[-1] // self.args.patch_size, dtype=torch.bool,
                                    device=pixel_values.device)
        h = self.embeddings(pixel_values, patch_mask)
        if self.args.kind == "clip":
            h = self.pre_layrnorm(h)
        # A batch without padded patches attends with no mask at all (the plain SDPA kernel).
        mask = None if patch_mask is None or bool(patch_mask.all()) else patch_mask.reshape(h.shape[0], 1, 1, -1)
        recompute = self.vision_checkpointing and self.training and torch.is_grad_enabled()
        states = [h]
        for layer in self.encoder.layers[:last]:
            h = checkpoint(layer, h, mask, use_reentrant=False) if recompute else layer(h, mask)
            states.append(h)
        return states

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The last layer's output through post_layernorm: [images, patches (+1 with CLIP's class), width]."""
        return self.post_layernorm(self.layer_states(pixel_values, None, patch_mask)[-1])


__all__ = [
    "ACTIVATIONS",
    "TOWER_DEFAULTS",
    "PoolingHead",
    "TowerArgs",
    "VisionAttention",
    "VisionEmbeddings",
    "VisionEncoderLayer",
    "VisionTransformer",
    "activation",
    "bucketed_position_ids",
]

"""The vision transformer of Qwen2-VL and Qwen2.5-VL (`visual.*` in their checkpoints).

Images arrive as transformers' processor leaves them: `pixel_values` [all patches of all images, channels *
temporal_patch_size * patch_size^2], each image's patches already grouped by spatial_merge_size^2 blocks, and
`image_grid_thw` [images, 3] (frames, patch rows, patch columns). A Conv3d-shaped projection embeds each patch;
blocks with a fused qkv and 2-D rotary positions (patch row, patch column) attend within each frame of each image
only; the merger concatenates each block of merge^2 patches and projects it to the text model's width.

Qwen2-VL: LayerNorm blocks with a plain MLP. Qwen2.5-VL: RMSNorm blocks with a gated MLP, and attention within
windows of window_size pixels on every block but `fullatt_block_indexes`: the patches are put in window order for
the whole tower (each window contiguous) and the merged features put back in the processor's order at the end.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...errors import CheckpointError, DataError, UnsupportedError
from ..field_checks import check_fields, is_int, is_number
from ..mlp import ACTIVATIONS as GATED_ACTIVATIONS
from ..mlp import GatedMLP
from .towers import ACTIVATIONS as PLAIN_ACTIVATIONS
from ..norms import RMSNorm

QWEN2_VL, QWEN2_5_VL = "qwen2_vl", "qwen2_5_vl"
NORM_EPS = 1e-6  # fixed in transformers' blocks and merger, not read from the config


# transformers' defaults for a vision_config field the file leaves out, per family.
_DEFAULTS = {
    QWEN2_VL: dict(depth=32, embed_dim=1280, hidden_size=3584, hidden_act="quick_gelu", mlp_ratio=4, num_heads=16,
                   in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
    QWEN2_5_VL: dict(depth=32, hidden_size=3584, hidden_act="silu", intermediate_size=3420, num_heads=16,
                     in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=4,
                     window_size=112, out_hidden_size=3584, fullatt_block_indexes=[7, 15, 23, 31]),
}


@dataclass
class VisionTowerArgs:
    """vision_config under transformers' names. Qwen2-VL: the tower is `embed_dim` wide and `hidden_size` is the
    merger's output (the text width); Qwen2.5-VL: the tower is `hidden_size` wide, the merger gives
    `out_hidden_size`."""
    family: str = QWEN2_VL
    depth: int = 32
    embed_dim: int | None = None
    hidden_size: int = 3584
    hidden_act: str = "quick_gelu"
    mlp_ratio: float | None = None
    intermediate_size: int | None = None
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int | None = None
    window_size: int | None = None
    fullatt_block_indexes: list = field(default_factory=list)
    tokens_per_second: float | None = None
    rope_theta: float = 10000.0

    @classmethod
    def from_dict(cls, config: dict, source: str, family: str) -> VisionTowerArgs:
        config = dict(config)
        if "in_channels" not in config and "in_chans" in config:  # older hub files' name for it
            config["in_channels"] = config["in_chans"]
        rope = config.get("rope_parameters")
        if isinstance(rope, dict) and "rope_theta" in rope:
            config["rope_theta"] = rope["rope_theta"]
        names = {f.name for f in dataclasses.fields(cls)} - {"family"}
        values = {**_DEFAULTS[family], **{k: v for k, v in config.items() if k in names}}
        args = cls(family=family, **values)
        args.validate(source)
        return args

    @property
    def qwen25(self) -> bool:
        return self.family == QWEN2_5_VL

    @property
    def width(self) -> int:
        return self.hidden_size if self.qwen25 else self.embed_dim

    @property
    def out_size(self) -> int:
        return self.out_hidden_size if self.qwen25 else self.hidden_size

    @property
    def mlp_size(self) -> int:
        return self.intermediate_size if self.qwen25 else int(self.embed_dim * self.mlp_ratio)

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size ** 2

    @property
    def window_merged(self) -> int:
        """A window's side in merged patches."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @property
    def patch_values(self) -> int:
        """Numbers per patch in pixel_values."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    def validate(self, source: str):
        where = f"{source} (vision_config)"
        sizes = ["depth", "hidden_size", "num_heads", "in_channels", "patch_size", "spatial_merge_size",
                 "temporal_patch_size"]
        sizes += ["intermediate_size", "out_hidden_size", "window_size"] if self.qwen25 else ["embed_dim"]
        check_fields(self, where, positive_ints=sizes, positive_floats=["rope_theta"])
        if not self.qwen25 and (not is_number(self.mlp_ratio) or self.mlp_size <= 0):
            raise CheckpointError(f"{where}: field 'mlp_ratio' must be a positive number, got {self.mlp_ratio!r}")
        if self.width % self.num_heads or self.head_dim % 4:
            name = "hidden_size" if self.qwen25 else "embed_dim"
            raise CheckpointError(f"{where}: {name} ({self.width}) must be num_heads ({self.num_heads}) heads of a "
                                  "size divisible by 4 (the 2-D rotary embedding splits each head in four)")
        table = GATED_ACTIVATIONS if self.qwen25 else PLAIN_ACTIVATIONS
        if self.hidden_act not in table:
            raise UnsupportedError(f"{where}: hidden_act '{self.hidden_act}' is not supported; supported: "
                                   f"{', '.join(table)}")
        if self.qwen25:
            if self.window_merged < 1:
                raise CheckpointError(f"{where}: window_size ({self.window_size}) must cover at least one merged "
                                      f"patch (spatial_merge_size * patch_size = "
                                      f"{self.spatial_merge_size * self.patch_size} pixels)")
            blocks = self.fullatt_block_indexes
            if not isinstance(blocks, (list, tuple)) or not all(is_int(i) for i in blocks):
                raise CheckpointError(f"{where}: field 'fullatt_block_indexes' must be a list of block indices, "
                                      f"got {blocks!r}")


# ---- the pieces -------------------------------------------------------------------------------------------------
class PatchConv3d(nn.Conv3d):
    """Conv3d over one patch with kernel = stride = the patch: a linear map of each patch's numbers. The weight
    keeps the Conv3d shape of the checkpoints; given flattened patches [patches, C*kT*kH*kW] the forward is that
    linear map (the same sums, no conv kernel); given [.., C, kT, kH, kW] it is the convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return F.linear(x, self.weight.flatten(1))
        return super().forward(x)


class PatchEmbed(nn.Module):
    def __init__(self, args: VisionTowerArgs):
        super().__init__()
        kernel = (args.temporal_patch_size, args.patch_size, args.patch_size)
        self.proj = PatchConv3d(args.in_channels, args.width, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # `proj` may carry LoRA (lora/conv.py), which reads the flattened patches the same way
        return self.proj(pixel_values.to(self.proj.weight.dtype))


class Segments:
    """Contiguous runs of a packed sequence that attend only within themselves (frames of images, or windows).
    Runs of equal length are gathered into one batch, so attention is a few SDPA calls, not one per run."""

    def __init__(self, lengths: list[int], device):
        self.single = len(lengths) == 1
        starts = torch.tensor([0] + lengths[:-1], device=device).cumsum(0)
        by_length: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            by_length.setdefault(n, []).append(i)
        self.groups = []  # (token index [runs, length])
        order = []
        for n, runs in by_length.items():
            index = starts[runs][:, None] + torch.arange(n, device=device)
            self.groups.append(index)
            order.append(index.flatten())
        order = torch.cat(order)
        self.inverse = torch.empty_like(order)
        self.inverse[order] = torch.arange(order.numel(), device=device)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v [tokens, heads, head_dim] -> [tokens, heads * head_dim]."""
        N = q.shape[0]
        if self.single:
            out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))
            return out.transpose(0, 1).reshape(N, -1)
        pieces = []
        for index in self.groups:
            qs, ks, vs = (t[index].transpose(1, 2) for t in (q, k, v))  # [runs, heads, length, head_dim]
            out = F.scaled_dot_product_attention(qs, ks, vs)
            pieces.append(out.transpose(1, 2).reshape(-1, q.shape[1] * q.shape[2]))
        return torch.cat(pieces)[self.inverse]


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rotary(x, cos, sin):
    """In fp32 whatever the weights' dtype, as transformers does for the vision tower."""
    x32 = x.float()
    return (x32 * cos + _rotate_half(x32) * sin).to(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, args: VisionTowerArgs):
        super().__init__()
        self.num_heads = args.num_heads
        self.qkv = nn.Linear(args.width, 3 * args.width, bias=True)
        self.proj = nn.Linear(args.width, args.width, bias=True)

    def forward(self, x, cos, sin, segments: Segments):
        N = x.shape[0]
        q, k, v = self.qkv(x).view(N, 3, self.num_heads, -1).unbind(1)
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        return self.proj(segments.attend(q, k, v))


class VisionMLP(nn.Module):
    """Qwen2-VL's fc1 -> act -> fc2."""

    def __init__(self, args: VisionTowerArgs):
        super().__init__()
        self.fc1 = nn.Linear(args.width, args.mlp_size)
        self.fc2 = nn.Linear(args.mlp_size, args.width)
        self.act = PLAIN_ACTIVATIONS[args.hidden_act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _norm(args: VisionTowerArgs, dim: int) -> nn.Module:
    return RMSNorm(dim, NORM_EPS) if args.qwen25 else nn.LayerNorm(dim, eps=NORM_EPS)


class VisionBlock(nn.Module):
    def __init__(self, args: VisionTowerArgs):
        super().__init__()
        self.norm1 = _norm(args, args.width)
        self.norm2 = _norm(args, args.width)
        self.attn = VisionAttention(args)
        self.mlp = (GatedMLP(args.width, args.mlp_size, args.hidden_act, bias=True) if args.qwen25
                    else VisionMLP(args))

    def forward(self, x, cos, sin, segments: Segments):
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Each block of merge^2 patches, normed, concatenated and projected: `visual.merger.*`."""

    def __init__(self, args: VisionTowerArgs):
        super().__init__()
        self.merged = args.width * args.merge_unit
        self.ln_q = _norm(args, args.width)
        self.mlp = nn.Sequential(nn.Linear(self.merged, self.merged), nn.GELU(), nn.Linear(self.merged, args.out_size))

    def forward(self, x):
        return self.mlp(self.ln_q(x).view(-1, self.merged))


# ---- the tower --------------------------------------------------------------------------------------------------
class VisionTransformer(nn.Module):
    """pixel_values + image_grid_thw -> merged features [image tokens, text width], in the processor's order."""

    def __init__(self, args: VisionTowerArgs):
        super().__init__()
        self.args = args
        self.patch_embed = PatchEmbed(args)
        self.blocks = nn.ModuleList(VisionBlock(args) for _ in range(args.depth))
        self.merger = PatchMerger(args)
        self.full_attention = set(args.fullatt_block_indexes) if args.qwen25 else set(range(args.depth))
        self.vision_checkpointing = False  # set by the model's set_gradient_checkpointing

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        args = self.args
        grids = self.check_inputs(pixel_values, grid_thw)
        device = pixel_values.device
        x = self.patch_embed(pixel_values)
        cos, sin = self.rotary(grids, device)
        frames = Segments([h * w for t, h, w in grids for _ in range(t)], device)
        windows = order = None
        if args.qwen25 and len(self.full_attention) < args.depth:
            order, window_lengths = window_order(grids, args.spatial_merge_size, args.window_merged, device)
            patches = (order[:, None] * args.merge_unit + torch.arange(args.merge_unit, device=device)).flatten()
            x, cos, sin = x[patches], cos[patches], sin[patches]
            windows = Segments(window_lengths, device)
        for i, block in enumerate(self.blocks):
            segments = frames if i in self.full_attention else windows
            if self.vision_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, segments, use_reentrant=False)
            else:
                x = block(x, cos, sin, segments)
        merged = self.merger(x)
        if order is not None:
            merged = merged[torch.argsort(order)]
        return merged

    def rotary(self, grids, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos / sin [patches, head_dim] of each patch's (row, column), in fp32: half the frequencies turn with the
        row, half with the column."""
        half = self.args.head_dim // 2  # each axis turns half the frequencies of the head
        inv_freq = 1.0 / (self.args.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float, device=device) / half))
        coords = patch_coordinates(grids, self.args.spatial_merge_size, device)  # [patches, 2]
        freqs = (coords[..., None].float() * inv_freq).flatten(1)  # row frequencies, then column ones
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[:, None], emb.sin()[:, None]  # broadcast over heads

    def check_inputs(self, pixel_values, grid_thw) -> list[tuple[int, int, int]]:
        args = self.args
        if grid_thw is None:
            raise DataError("Qwen2-VL images need image_grid_thw (the processor's [images, 3] grid) with pixel_values")
        if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
            raise DataError(f"image_grid_thw must be [number of images, 3] (t, h, w), got {list(grid_thw.shape)}")
        grids = [tuple(int(v) for v in row) for row in grid_thw.tolist()]
        merge = args.spatial_merge_size
        for grid in grids:
            if min(grid) <= 0 or grid[1] % merge or grid[2] % merge:
                raise DataError(f"image_grid_thw row {list(grid)}: sizes must be positive, height and width "
                                f"multiples of spatial_merge_size ({merge})")
        patches = sum(t * h * w for t, h, w in grids)
        if pixel_values.dim() != 2 or tuple(pixel_values.shape) != (patches, args.patch_values):
            raise DataError(f"pixel_values has shape {list(pixel_values.shape)} but image_grid_thw and the vision "
                            f"config imply [{patches}, {args.patch_values}] (patches, channels * temporal_patch_size "
                            "* patch_size^2): were the images processed for this model?")
        return grids


def patch_coordinates(grids, merge: int, device) -> torch.Tensor:
    """(row, column) of every patch, in the processor's order: frame by frame, merge x merge blocks row-major,
    patches row-major within a block."""
    out = []
    for t, h, w in grids:
        rows = torch.arange(h, device=device)[:, None].expand(h, w)
        cols = torch.arange(w, device=device)[None, :].expand(h, w)
        block = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(block).transpose(1, 2).flatten()
        cols = cols.reshape(block).transpose(1, 2).flatten()
        out.append(torch.stack((rows, cols), dim=-1).repeat(t, 1))
    return torch.cat(out)


def window_order(grids, merge: int, side: int, device) -> tuple[torch.Tensor, list[int]]:
    """Qwen2.5-VL's windows: (merged-patch order that makes each window contiguous, each window's length in
    patches). Windows tile each frame's merged grid in side x side squares, row-major; edge windows are smaller."""
    order, lengths, offset = [], [], 0
    for t, h, w in grids:
        rows, cols = h // merge, w // merge
        n_rows, n_cols = -(-rows // side), -(-cols // side)
        index = torch.arange(t * rows * cols, device=device).view(t, rows, cols)
        padded = F.pad(index, (0, n_cols * side - cols, 0, n_rows * side - rows), value=-1)
        tiles = padded.view(t, n_rows, side, n_cols, side).permute(0, 1, 3, 2, 4).reshape(-1, side * side)
        kept = tiles >= 0
        order.append(tiles[kept] + offset)
        lengths += [n * merge * merge for n in kept.sum(1).tolist() if n]
        offset += t * rows * cols
    return torch.cat(order), lengths


__all__ = ["QWEN2_5_VL", "QWEN2_VL", "PatchEmbed", "PatchMerger", "Segments", "VisionAttention", "VisionBlock",
           "VisionMLP", "VisionTowerArgs", "VisionTransformer", "patch_coordinates", "window_order"]

"""M-RoPE, the multimodal rotary embedding of Qwen2-VL and Qwen2.5-VL, and the positions it reads.

Every token has three positions (temporal, height, width) instead of one. Text tokens carry the same number on the
three axes, counting on from whatever precedes them; an image's tokens carry their grid coordinates (the frame, the
row and the column of the merged patch) offset by the position the image starts at, and the text after an image
resumes at that start + the image's larger side. The rotary frequencies are split in `mrope_section` bands, band i
turning with axis i % 3.

Because an image spans fewer positions than tokens, a row's next position after the prompt is not its length: the
difference (`rope deltas`, per row) is kept at prefill, and each decoding step places its tokens at
past length + delta on all three axes.

`rope_index` is transformers' `get_rope_index` (images only): the placeholder tokens of a row are consumed image by
image in the order of `image_grid_thw`, each taking t * (h / merge) * (w / merge) of them, so images that follow
each other without a separating token are still told apart.
"""
from __future__ import annotations

from itertools import pairwise

import torch

from ...errors import CheckpointError, DataError, UnsupportedError
from ..rope import RotaryEmbedding

# Rope types whose tables do not depend on the positions in the batch: the three axes share one table.
MROPE_TYPES = ("default", "linear", "llama3", "yarn")


class MultimodalRotaryEmbedding(RotaryEmbedding):
    """cos / sin [batch, seq, head_dim] for positions [3, batch, seq] (or plain [batch, seq]: text only, the same
    on every axis), in the (cos, sin) layout velotune's Attention applies."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None, mrope_section: list[int],
                 max_position_embeddings: int, source: str = "config.json"):
        super().__init__(head_dim, theta, scaling, 1.0, max_position_embeddings)
        if self.kind not in MROPE_TYPES:
            raise UnsupportedError(f"{source}: rope type '{self.kind}' with M-RoPE (mrope_section) is not supported; "
                                   f"supported: {', '.join(MROPE_TYPES)}")
        self.mrope_section = check_mrope_section(mrope_section, self.dim, source)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        if position_ids.dim() == 2:
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        with torch.autocast(device_type=position_ids.device.type, enabled=False):
            freqs = position_ids[..., None].float() * self.inv_freq.float().to(position_ids.device)
            # Band i of the frequencies turns with axis i % 3 (as transformers, for sections longer than three).
            bands = freqs.split(self.mrope_section, dim=-1)
            freqs = torch.cat([band[i % 3] for i, band in enumerate(bands)], dim=-1)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos(), emb.sin()
            if self.attention_scaling != 1.0:
                cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
            return cos.to(dtype), sin.to(dtype)


def check_mrope_section(section, rotary_dim: int, source: str) -> list[int]:
    """mrope_section: positive integers summing to half the rotary dimension (one per frequency)."""
    if (not isinstance(section, (list, tuple)) or not section
            or any(not isinstance(n, int) or isinstance(n, bool) or n <= 0 for n in section)):
        raise CheckpointError(f"{source}: field 'mrope_section' must be a list of positive integers, got {section!r}")
    if sum(section) != rotary_dim // 2:
        raise CheckpointError(f"{source}: field 'mrope_section' {list(section)} sums to {sum(section)}, but the "
                              f"head dimension {rotary_dim} has {rotary_dim // 2} rotary frequencies")
    return list(section)


# ---- positions ---------------------------------------------------------------------------------------------------
def rope_index(input_ids: torch.Tensor, image_token_id: int, image_grid_thw: torch.Tensor | None,
               spatial_merge_size: int, attention_mask: torch.Tensor | None = None,
               document_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions [3, batch, seq], rope deltas [batch, 1]) of a prompt batch, as transformers' get_rope_index.

    Padding (attention_mask 0, either side) takes position 0 and is skipped by the counting. With `document_ids`
    (packed rows) positions restart at each document; the deltas then describe the row's last document."""
    B, T = input_ids.shape
    positions = torch.zeros(3, B, T, dtype=input_ids.dtype, device=input_ids.device)
    deltas = torch.zeros(B, 1, dtype=torch.long, device=input_ids.device)
    grids = iter(_grid_rows(image_grid_thw))
    used = 0
    for row in range(B):
        real = attention_mask[row].bool() if attention_mask is not None else None
        ids = input_ids[row] if real is None else input_ids[row][real]
        row_positions = []
        for segment in _documents(ids, document_ids, row, real):
            segment_positions, count = _sequence_positions(segment, image_token_id, grids, spatial_merge_size, row)
            used += count
            row_positions.append(segment_positions)
        if not row_positions:
            continue
        found = torch.cat(row_positions, dim=1).to(positions.device)
        if real is None:
            positions[:, row] = found
        else:
            positions[:, row, real] = found
        deltas[row, 0] = int(row_positions[-1].max()) + 1 - row_positions[-1].shape[1]
    if next(grids, None) is not None:
        total = len(_grid_rows(image_grid_thw))
        raise DataError(f"image_grid_thw describes {total} images but the text holds the placeholders of only {used}: "
                        "each image needs its placeholder tokens in the prompt (expanded by the processor)")
    return positions, deltas


def decode_positions(attention_mask: torch.Tensor | None, past: int, length: int,
                     deltas: torch.Tensor) -> torch.Tensor:
    """Positions [3, batch, length] of tokens that follow a cached prompt: each row's text position (counting its
    real tokens, as the attention_mask over past + new tokens marks them) plus the row's rope delta."""
    if attention_mask is not None:
        text = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
    else:
        text = torch.arange(past, past + length, device=deltas.device).unsqueeze(0).expand(deltas.shape[0], -1)
    text = text + deltas.to(text.device)
    return text.unsqueeze(0).expand(3, -1, -1)


def _grid_rows(image_grid_thw) -> list[tuple[int, int, int]]:
    if image_grid_thw is None:
        return []
    if image_grid_thw.dim() != 2 or image_grid_thw.shape[1] != 3:
        raise DataError(f"image_grid_thw must be [number of images, 3] (t, h, w), got {list(image_grid_thw.shape)}")
    return [tuple(int(v) for v in row) for row in image_grid_thw.tolist()]


def _documents(ids: torch.Tensor, document_ids, row: int, real):
    """The real tokens of one row, split into its packed documents (the whole row without document_ids)."""
    if document_ids is None:
        return [ids]
    docs = document_ids[row] if real is None else document_ids[row][real]
    if docs.numel() == 0:
        return []
    starts = [0] + (torch.nonzero(docs[1:] != docs[:-1]).flatten() + 1).tolist() + [docs.numel()]
    return [ids[a:b] for a, b in pairwise(starts)]


def _sequence_positions(ids: torch.Tensor, image_token_id: int, grids, merge: int, row: int):
    """Positions [3, len(ids)] of one sequence of real tokens, and the number of images it held."""
    n = ids.numel()
    if n == 0:
        return torch.zeros(3, 0, dtype=torch.long, device=ids.device), 0
    flags = ids == image_token_id
    bounds = [0] + (torch.nonzero(flags[1:] != flags[:-1]).flatten() + 1).tolist() + [n]
    pieces, start_position, images = [], 0, 0
    for start, end in pairwise(bounds):
        if not bool(flags[start]):
            pieces.append(torch.arange(end - start, device=ids.device).expand(3, -1) + start_position)
            start_position += end - start
            continue
        at = start
        while at < end:  # a run of placeholders may hold several images
            grid = next(grids, None)
            if grid is None:
                raise DataError(f"row {row} holds more image placeholder tokens (id {image_token_id}) than "
                                "image_grid_thw describes images")
            t, h, w = grid
            if h % merge or w % merge:
                raise DataError(f"image_grid_thw row {list(grid)}: height and width must be multiples of "
                                f"spatial_merge_size ({merge})")
            count = t * (h // merge) * (w // merge)
            if at + count > end:
                raise DataError(f"row {row}: an image of grid {list(grid)} needs {count} placeholder tokens but its "
                                f"run holds {end - at}: was the prompt expanded for other images?")
            pieces.append(_image_positions(t, h // merge, w // merge, start_position, ids.device))
            start_position += max(h, w) // merge
            at += count
            images += 1
    return torch.cat(pieces, dim=1), images


def _image_positions(t: int, h: int, w: int, start: int, device) -> torch.Tensor:
    """[3, t * h * w]: frame, row and column of each merged patch (row-major), each offset by `start`."""
    grid = torch.meshgrid(torch.arange(t, device=device), torch.arange(h, device=device),
                          torch.arange(w, device=device), indexing="ij")
    return torch.stack(grid, dim=0).reshape(3, -1) + start


__all__ = ["MROPE_TYPES", "MultimodalRotaryEmbedding", "check_mrope_section", "decode_positions", "rope_index"]

"""M-RoPE, the multimodal rotary embedding of Qwen2-VL and Qwen2.5-VL, and the positions it reads.

Every token has three positions (temporal, height, width) instead of one. Text tokens carry the same number on the
three axes, counting on from whatever precedes them; an image's tokens carry their grid coordinates (the frame, the
row and the column of the merged patch) offset by the position the image starts at, and the text after an image
resumes at that start + the image's larger side. The rotary frequencies are split in `mrope_section` bands, band i
turning with axis i % 3.

Because an image spans fewer positions than tokens, a row's next position after the prompt is not its length: the
difference (`rope deltas`, per row) is kept at prefill, and each decoding step places its tokens at
past length + delta on all three axes.

`rope_index` is transformers' `get_rope_index`: the placeholder tokens of a row are consumed image by image in the
order of `image_grid_thw` (video by video in the order of `video_grid_thw` for the video token), each taking
t * (h / merge) * (w / merge) of them, so images that follow each other without a separating token are still told
apart. A video's frame axis (Qwen2.5-VL: scaled by tokens_per_second * second_per_grid_ts, truncated) does not move
the text after it: that resumes at the video's start + its larger side, as transformers places it.
"""
from __future__ import annotations

from itertools import pairwise

import torch

from ...errors import CheckpointError, DataError, UnsupportedError
from ..rope import RotaryEmbedding

TEXT, IMAGE, VIDEO = 0, 1, 2  # the token kinds of a prompt (transformers' mm_token_type_ids values)
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
               document_ids: torch.Tensor | None = None, *, video_token_id: int | None = None,
               video_grid_thw: torch.Tensor | None = None, second_per_grid_ts=None,
               tokens_per_second: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions [3, batch, seq], rope deltas [batch, 1]) of a prompt batch, as transformers' get_rope_index.

    Padding (attention_mask 0, either side) takes position 0 and is skipped by the counting. With `document_ids`
    (packed rows) positions restart at each document; the deltas then describe the row's last document.
    Videos (`video_token_id`, `video_grid_thw`): `tokens_per_second` set (Qwen2.5-VL) spaces frame k of a video at
    int(k * tokens_per_second * second_per_grid_ts[video]) (1 second per grid step when not given); unset
    (Qwen2-VL), at k."""
    B, T = input_ids.shape
    positions = torch.zeros(3, B, T, dtype=input_ids.dtype, device=input_ids.device)
    deltas = torch.zeros(B, 1, dtype=torch.long, device=input_ids.device)
    image_rows = [(grid, None) for grid in _grid_rows(image_grid_thw)]
    grids = {IMAGE: iter(image_rows), VIDEO: iter(_video_rows(video_grid_thw, second_per_grid_ts, tokens_per_second))}
    token_ids = {IMAGE: image_token_id, VIDEO: video_token_id}
    used = {IMAGE: 0, VIDEO: 0}
    for row in range(B):
        real = attention_mask[row].bool() if attention_mask is not None else None
        ids = input_ids[row] if real is None else input_ids[row][real]
        row_positions = []
        for segment in _documents(ids, document_ids, row, real):
            segment_positions, count = _sequence_positions(segment, token_ids, grids, spatial_merge_size, row)
            used[IMAGE] += count[IMAGE]
            used[VIDEO] += count[VIDEO]
            row_positions.append(segment_positions)
        if not row_positions:
            continue
        found = torch.cat(row_positions, dim=1).to(positions.device)
        if real is None:
            positions[:, row] = found
        else:
            positions[:, row, real] = found
        deltas[row, 0] = int(row_positions[-1].max()) + 1 - row_positions[-1].shape[1]
    for kind, name in ((IMAGE, "image"), (VIDEO, "video")):
        if next(grids[kind], None) is not None:
            total = len(_grid_rows(image_grid_thw if kind == IMAGE else video_grid_thw, f"{name}_grid_thw"))
            raise DataError(f"{name}_grid_thw describes {total} {name}s but the text holds the placeholders of only "
                            f"{used[kind]}: each {name} needs its placeholder tokens in the prompt (expanded by the "
                            "processor)")
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


def _grid_rows(grid_thw, name: str = "image_grid_thw") -> list[tuple[int, int, int]]:
    if grid_thw is None:
        return []
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise DataError(f"{name} must be [number of {name[:5]}s, 3] (t, h, w), got {list(grid_thw.shape)}")
    return [tuple(int(v) for v in row) for row in grid_thw.tolist()]


def _video_rows(video_grid_thw, second_per_grid_ts, tokens_per_second) -> list:
    """(grid, frame spacing) per video. The spacing is computed with transformers' own operations (a 0-d tensor
    times tokens_per_second when seconds come as a tensor, python numbers otherwise) so the truncated frame
    positions agree with it to the last bit."""
    rows = _grid_rows(video_grid_thw, "video_grid_thw")
    if tokens_per_second is None:
        return [(grid, None) for grid in rows]
    if second_per_grid_ts is None:
        seconds = [1] * len(rows)
    else:
        seconds = list(second_per_grid_ts)
        if len(seconds) < len(rows):
            raise DataError(f"second_per_grid_ts has {len(seconds)} entries but video_grid_thw describes "
                            f"{len(rows)} videos: one per video")
    return [(grid, tokens_per_second * s) for grid, s in zip(rows, seconds)]


def _documents(ids: torch.Tensor, document_ids, row: int, real):
    """The real tokens of one row, split into its packed documents (the whole row without document_ids)."""
    if document_ids is None:
        return [ids]
    docs = document_ids[row] if real is None else document_ids[row][real]
    if docs.numel() == 0:
        return []
    starts = [0] + (torch.nonzero(docs[1:] != docs[:-1]).flatten() + 1).tolist() + [docs.numel()]
    return [ids[a:b] for a, b in pairwise(starts)]


def _sequence_positions(ids: torch.Tensor, token_ids: dict, grids: dict, merge: int, row: int):
    """Positions [3, len(ids)] of one sequence of real tokens, and the number of images and videos it held."""
    n = ids.numel()
    held = {IMAGE: 0, VIDEO: 0}
    if n == 0:
        return torch.zeros(3, 0, dtype=torch.long, device=ids.device), held
    kinds = torch.zeros_like(ids)
    for kind, token in token_ids.items():
        if token is not None:
            kinds[ids == token] = kind
    bounds = [0] + (torch.nonzero(kinds[1:] != kinds[:-1]).flatten() + 1).tolist() + [n]
    pieces, start_position = [], 0
    for start, end in pairwise(bounds):
        kind = int(kinds[start])
        if kind == TEXT:
            pieces.append(torch.arange(end - start, device=ids.device).expand(3, -1) + start_position)
            start_position += end - start
            continue
        name = "image" if kind == IMAGE else "video"
        at = start
        while at < end:  # a run of placeholders may hold several images (or videos)
            item = next(grids[kind], None)
            if item is None:
                raise DataError(f"row {row} holds more {name} placeholder tokens (id {token_ids[kind]}) than "
                                f"{name}_grid_thw describes {name}s")
            (t, h, w), spacing = item
            if h % merge or w % merge:
                raise DataError(f"{name}_grid_thw row {[t, h, w]}: height and width must be multiples of "
                                f"spatial_merge_size ({merge})")
            count = t * (h // merge) * (w // merge)
            if at + count > end:
                raise DataError(f"row {row}: a {name} of grid {[t, h, w]} needs {count} placeholder tokens but its "
                                f"run holds {end - at}: was the prompt expanded for other {name}s?")
            pieces.append(_image_positions(t, h // merge, w // merge, start_position, ids.device, spacing))
            start_position += max(h, w) // merge
            at += count
            held[kind] += 1
    return torch.cat(pieces, dim=1), held


def _image_positions(t: int, h: int, w: int, start: int, device, spacing=None) -> torch.Tensor:
    """[3, t * h * w]: frame, row and column of each merged patch (row-major), each offset by `start`; frame k at
    int(k * spacing) when a spacing is given (transformers truncates the product, then adds the start)."""
    frames = torch.arange(t, device=device)
    if spacing is not None:
        frames = (frames * spacing).long()
    grid = torch.meshgrid(frames, torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack(grid, dim=0).reshape(3, -1) + start


__all__ = ["MROPE_TYPES", "MultimodalRotaryEmbedding", "check_mrope_section", "decode_positions", "rope_index"]

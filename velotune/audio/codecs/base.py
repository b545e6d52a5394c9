"""The audio-codec interface text-to-speech trains against: a codec turns a waveform into a few levels of discrete
codes and back; its `CodecSpec` says how those levels make one frame of `codes_per_frame` tokens.

A frame is one code of the coarsest level and every finer code under it, written depth first: a level whose
stride is half its parent's has two codes per parent code, and each is followed by its own children. For SNAC's
24 kHz model (strides 4, 2, 1) a frame is [l0, l1a, l2a, l2b, l1b, l2c, l2d], the order Orpheus trains on. Slot
`s` of a frame holds code `c` as token `base + s * codebook_size + c`, so the slots use disjoint token ranges and a
language model's vocabulary holds `codes_per_frame * codebook_size` code tokens.

A codec is read from a local directory (config.json and safetensors weights) by `load_codec` (loading.py);
`read_codec_spec` reads only the layout, so training on precomputed codes needs no codec weights and no codec
package.
"""
from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from ...errors import ConfigError, DataError


@dataclass(frozen=True)
class CodecSpec:
    """The shape of a codec's codes. `level_strides`: each level's step in hops, coarsest first (SNAC's
    vq_strides); `hop_length`: samples per hop (the finest possible step)."""

    name: str
    sample_rate: int
    codebook_size: int
    level_strides: tuple
    hop_length: int

    def __post_init__(self):
        strides = tuple(int(s) for s in self.level_strides)
        object.__setattr__(self, "level_strides", strides)
        where = f"codec {self.name}"
        if not strides or any(s < 1 for s in strides):
            raise ConfigError(f"{where}: level strides must be positive whole numbers, got {list(strides)}")
        if any(strides[i] % strides[i + 1] for i in range(len(strides) - 1)):
            raise ConfigError(f"{where}: each level's stride must divide the coarser one's, got {list(strides)}")
        for name in ("sample_rate", "codebook_size", "hop_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{where}: {name} must be a positive whole number, got {value!r}")

    # ---- sizes ------------------------------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self.level_strides)

    @property
    def codes_per_level(self) -> tuple:
        """Codes of each level in one frame (1, 2, 4 for SNAC 24 kHz)."""
        return tuple(self.level_strides[0] // s for s in self.level_strides)

    @property
    def codes_per_frame(self) -> int:
        return sum(self.codes_per_level)

    @property
    def samples_per_frame(self) -> int:
        return self.hop_length * self.level_strides[0]

    @property
    def frame_rate(self) -> float:
        """Frames per second of audio."""
        return self.sample_rate / self.samples_per_frame

    @property
    def code_tokens(self) -> int:
        """Tokens a language model needs for the codes: one range of codebook_size per slot."""
        return self.codes_per_frame * self.codebook_size

    @cached_property
    def frame_order(self) -> tuple:
        """(level, index within the frame's codes of that level) of each slot, depth first."""
        order = []

        def visit(level: int, index: int):
            order.append((level, index))
            if level + 1 < self.num_levels:
                children = self.level_strides[level] // self.level_strides[level + 1]
                for child in range(children):
                    visit(level + 1, index * children + child)
        visit(0, 0)
        return tuple(order)

    def to_dict(self) -> dict:
        return {"name": self.name, "sample_rate": self.sample_rate, "codebook_size": self.codebook_size,
                "level_strides": list(self.level_strides), "hop_length": self.hop_length,
                "codes_per_frame": self.codes_per_frame, "samples_per_frame": self.samples_per_frame,
                "frame_rate": self.frame_rate}

    @classmethod
    def from_dict(cls, data: dict, source: str) -> "CodecSpec":
        try:
            return cls(str(data["name"]), data["sample_rate"], data["codebook_size"], tuple(data["level_strides"]),
                       data["hop_length"])
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"{source}: the codec entry lacks {exc} (name, sample_rate, codebook_size, "
                              "level_strides, hop_length)") from None

    # ---- codes <-> frames <-> tokens --------------------------------------------------------------------------
    def num_frames(self, codes, where: str = "codes") -> int:
        """The frames `codes` (one 1-D sequence per level) hold; DataError naming `where` unless every level has
        its share of the same number of frames and every code fits the codebook."""
        if not isinstance(codes, (list, tuple)) or len(codes) != self.num_levels:
            got = len(codes) if isinstance(codes, (list, tuple)) else type(codes).__name__
            raise DataError(f"{where}: expected {self.num_levels} levels of codes ({self.name}), got {got}")
        lengths = [int(torch.as_tensor(level).numel()) for level in codes]
        frames = lengths[0]
        expected = [frames * n for n in self.codes_per_level]
        if lengths != expected or frames == 0:
            raise DataError(f"{where}: level lengths {lengths} do not make whole frames of {self.name} "
                            f"(for {max(frames, 1)} frames: {[max(frames, 1) * n for n in self.codes_per_level]})")
        for k, level in enumerate(codes):
            level = torch.as_tensor(level)
            if level.is_floating_point() or bool((level < 0).any()) or bool((level >= self.codebook_size).any()):
                raise DataError(f"{where}: level {k} holds codes outside 0..{self.codebook_size - 1} (the codebook "
                                f"of {self.name}): a codec / vocabulary mismatch")
        return frames

    def interleave(self, codes, where: str = "codes") -> torch.Tensor:
        """Per-level codes -> [frames * codes_per_frame] codes in frame order (each still in 0..codebook_size-1)."""
        frames = self.num_frames(codes, where)
        levels = [torch.as_tensor(level, dtype=torch.long).reshape(frames, n)
                  for level, n in zip(codes, self.codes_per_level)]
        return torch.stack([levels[k][:, i] for k, i in self.frame_order], dim=1).reshape(-1)

    def deinterleave(self, flat, where: str = "codes") -> list:
        """The inverse of `interleave`: [frames * codes_per_frame] -> one [frames * n] LongTensor per level."""
        flat = torch.as_tensor(flat, dtype=torch.long).reshape(-1)
        if flat.numel() == 0 or flat.numel() % self.codes_per_frame:
            raise DataError(f"{where}: {flat.numel()} codes are not whole frames of {self.codes_per_frame}")
        slots = flat.reshape(-1, self.codes_per_frame)
        levels = [torch.empty(slots.shape[0], n, dtype=torch.long) for n in self.codes_per_level]
        for slot, (k, i) in enumerate(self.frame_order):
            levels[k][:, i] = slots[:, slot]
        return [level.reshape(-1) for level in levels]

    def codes_to_tokens(self, codes, base_id: int, where: str = "codes") -> torch.Tensor:
        """Per-level codes -> language-model token ids: slot s's code c is base_id + s * codebook_size + c."""
        flat = self.interleave(codes, where).reshape(-1, self.codes_per_frame)
        offsets = torch.arange(self.codes_per_frame, dtype=torch.long) * self.codebook_size
        return (flat + offsets + int(base_id)).reshape(-1)

    def tokens_to_codes(self, tokens, base_id: int, where: str = "tokens") -> list:
        """Token ids -> per-level codes; DataError naming the first token outside its slot's range (a token of
        another slot, or not a code token at all)."""
        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        if tokens.numel() == 0 or tokens.numel() % self.codes_per_frame:
            raise DataError(f"{where}: {tokens.numel()} code tokens are not whole frames of "
                            f"{self.codes_per_frame}")
        slots = (tokens - int(base_id)).reshape(-1, self.codes_per_frame)
        offsets = torch.arange(self.codes_per_frame, dtype=torch.long) * self.codebook_size
        codes = slots - offsets
        wrong = ((codes < 0) | (codes >= self.codebook_size)).reshape(-1).nonzero()
        if wrong.numel():
            at = int(wrong[0])
            raise DataError(f"{where}: token {int(tokens[at])} at position {at} is not a code of frame slot "
                            f"{at % self.codes_per_frame} (ids {int(base_id) + int(offsets[at % self.codes_per_frame])}"
                            f"..{int(base_id) + int(offsets[at % self.codes_per_frame]) + self.codebook_size - 1})")
        return self.deinterleave(codes.reshape(-1), where)


class AudioCodec(ABC):
    """A neural audio codec: `encode(waveform[, sample_rate])` -> codes per level, `decode(codes)` -> waveform,
    both without gradients. The layout attributes are its `spec`'s."""

    def __init__(self, spec: CodecSpec, source: str):
        self.spec = spec
        self.source = source    # the directory it was read from, or how it was made

    name = property(lambda self: self.spec.name)
    sample_rate = property(lambda self: self.spec.sample_rate)
    codebook_size = property(lambda self: self.spec.codebook_size)
    codes_per_frame = property(lambda self: self.spec.codes_per_frame)
    samples_per_frame = property(lambda self: self.spec.samples_per_frame)
    frame_rate = property(lambda self: self.spec.frame_rate)
    num_levels = property(lambda self: self.spec.num_levels)

    @abstractmethod
    def encode(self, waveform, sample_rate: int | None = None) -> list:
        """Samples [n] (or [batch, n]) at `sample_rate` (default: the codec's; others are resampled) -> one LongTensor
        per level, [frames * n_level] (or [batch, ...]): ceil(n / samples_per_frame) frames."""

    @abstractmethod
    def decode(self, codes) -> torch.Tensor:
        """Codes per level -> float32 samples at `sample_rate`, frames * samples_per_frame of them."""

    @abstractmethod
    def to(self, device) -> "AudioCodec":
        """Moves the codec's weights; returns the codec."""


# ---- finding codecs --------------------------------------------------------------------------------------------

CONFIG_NAME = "config.json"
CODEC_KEY = "codec"      # a velotune-written config.json names its codec type here


def write_codec_config(path: Path, config: dict, codec_type: str) -> None:
    (path / CONFIG_NAME).write_text(json.dumps({**config, CODEC_KEY: codec_type}, indent=2) + "\n", encoding="utf-8")


def frames_for(num_samples: int, spec: CodecSpec) -> int:
    """Frames a clip of `num_samples` samples encodes to."""
    return math.ceil(num_samples / spec.samples_per_frame)

"""SNAC (multi-scale neural audio codec) behind velotune's codec interface, through the `snac` package (its
network code only: the weights are read here, from safetensors).

    codec = load_codec("codecs/snac_24khz")      # config.json + model.safetensors
    codes = codec.encode(samples)                 # [l0 (F), l1 (2F), l2 (4F)] for the 24 kHz model
    codec.decode(codes)                           # F * 2048 samples at 24 kHz

The 24 kHz model's levels step every 4, 2 and 1 hops of 512 samples: a frame (one coarse code) is 2048 samples,
11.7 frames a second, 7 codes each. The released checkpoint is a pickled pytorch_model.bin, which velotune does not
read (a pickle can run code): convert it once to model.safetensors (`safetensors.torch.save_file` of its state
dict) and keep the config.json beside it. The weight-norm tensors may be named either way (weight_g / weight_v, or
parametrizations.weight.original0 / original1); torch reads both.

Without weights (`SnacCodec.from_config(config, seed=...)`) the codec is random: right shapes, meaningless sound,
what the tests use.
"""
from __future__ import annotations

import inspect
import logging
from pathlib import Path

import torch

from ...errors import CheckpointError, ConfigError, UnsupportedError
from .base import AudioCodec, CodecSpec, write_codec_config

log = logging.getLogger("velotune")

# The released 24 kHz speech model's config.json (what Orpheus' tokens are codes of).
SNAC_24KHZ_CONFIG = {"sampling_rate": 24000, "encoder_dim": 48, "encoder_rates": [2, 4, 8, 8], "decoder_dim": 1024,
                     "decoder_rates": [8, 8, 4, 2], "attn_window_size": None, "codebook_size": 4096,
                     "codebook_dim": 8, "vq_strides": [4, 2, 1], "noise": True, "depthwise": True}
# The snac package's own defaults, for keys a config.json leaves out.
_DEFAULTS = {"sampling_rate": 44100, "encoder_rates": [3, 3, 7, 7], "codebook_size": 4096,
             "vq_strides": [8, 4, 2, 1]}
WEIGHTS_NAME = "model.safetensors"
PICKLED = ("pytorch_model.bin", "model.pt", "snac.pt")


def looks_like(config: dict) -> bool:
    return "vq_strides" in config and "encoder_rates" in config


def spec_from_config(config: dict, source: str) -> CodecSpec:
    """The code layout a SNAC config.json describes (no weights, no snac package)."""
    merged = {**_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    rates = merged["encoder_rates"]
    if not isinstance(rates, list) or not rates or not all(isinstance(r, int) and r > 0 for r in rates):
        raise ConfigError(f"{source}: encoder_rates must be a list of positive whole numbers, got {rates!r}")
    strides = merged["vq_strides"]
    if not isinstance(strides, list) or not all(isinstance(s, int) for s in strides):
        raise ConfigError(f"{source}: vq_strides must be a list of whole numbers, got {strides!r}")
    hop = 1
    for rate in rates:
        hop *= rate
    try:
        return CodecSpec("snac", merged["sampling_rate"], merged["codebook_size"], tuple(strides), hop)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


KNOWN_SPECS = {"snac_24khz": spec_from_config(SNAC_24KHZ_CONFIG, "snac_24khz")}


def _snac_class():
    try:
        from snac import SNAC
    except ImportError:
        raise UnsupportedError("the SNAC codec needs the 'snac' package (network code only, no weights): "
                               "pip install snac") from None
    return SNAC


def _build(config: dict, source: str):
    """The snac network of `config` (keys it does not take are ignored), randomly initialised."""
    cls = _snac_class()
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    ignored = sorted(set(config) - accepted - {"codec"})
    if ignored:
        log.info("%s: ignoring config keys the SNAC network does not take: %s", source, ", ".join(ignored))
    try:
        return cls(**{k: v for k, v in config.items() if k in accepted})
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{source}: the SNAC network cannot be built from this config: {exc}") from None


class SnacCodec(AudioCodec):
    """A SNAC network (the `snac` package's module) with its config."""

    def __init__(self, model, config: dict, source: str):
        super().__init__(spec_from_config(config, source), source)
        self.model = model.eval()
        self.config = {k: v for k, v in config.items() if k != "codec"}

    @classmethod
    def from_config(cls, config: dict | None = None, *, seed: int | None = 0) -> "SnacCodec":
        """A codec of random weights (seeded) with `config` (default: the 24 kHz model's)."""
        config = dict(SNAC_24KHZ_CONFIG if config is None else config)
        spec_from_config(config, "the SNAC config")
        state = torch.random.get_rng_state()
        if seed is not None:
            torch.manual_seed(seed)
        try:
            model = _build(config, "the SNAC config")
        finally:
            torch.random.set_rng_state(state)
        return cls(model, config, f"random SNAC (seed {seed})")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> "SnacCodec":
        self.model.to(device)
        return self

    # ---- codes ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, waveform, sample_rate: int | None = None) -> list:
        samples = torch.as_tensor(waveform, dtype=torch.float32)
        if samples.dim() not in (1, 2) or samples.shape[-1] == 0:
            raise ValueError(f"a waveform is [samples] or [batch, samples] with samples > 0; got {list(samples.shape)}")
        if sample_rate is not None and int(sample_rate) != self.sample_rate:
            samples = _resample(samples, int(sample_rate), self.sample_rate)
        single = samples.dim() == 1
        batch = samples.reshape(-1, 1, samples.shape[-1]).to(self.device)
        codes = self.model.encode(batch)
        return [c[0].cpu() if single else c.cpu() for c in codes]

    @torch.no_grad()
    def decode(self, codes) -> torch.Tensor:
        levels = [torch.as_tensor(c, dtype=torch.long) for c in codes]
        single = all(level.dim() == 1 for level in levels)
        if single:
            self.spec.num_frames(levels)
            levels = [level[None] for level in levels]
        else:
            for row in range(levels[0].shape[0]):
                self.spec.num_frames([level[row] for level in levels], f"codes of row {row}")
        audio = self.model.decode([level.to(self.device) for level in levels])
        audio = audio.reshape(audio.shape[0], -1).float().cpu()
        return audio[0] if single else audio

    # ---- files ------------------------------------------------------------------------------------------------
    def save(self, out_dir) -> Path:
        """config.json (with "codec": "snac") and model.safetensors: a directory `load_codec` reads."""
        from safetensors.torch import save_file
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
        write_codec_config(out, self.config, "snac")
        return out


def _resample(samples: torch.Tensor, rate: int, target: int) -> torch.Tensor:
    from ..decode import prepare_samples
    rows = samples.reshape(-1, samples.shape[-1])
    out = [torch.from_numpy(prepare_samples(row.numpy(), rate, source="the waveform", sample_rate=target)[0])
           for row in rows]
    return out[0] if samples.dim() == 1 else torch.stack(out)


def load_codec_dir(path: Path, config: dict) -> SnacCodec:
    """The codec in `path`: config.json's network with the safetensors weights, every tensor accounted for."""
    from ...models.checkpoint import iter_tensors
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = [name for name in PICKLED if (path / name).is_file()]
        why = (f" ({pickled[0]} is a pickle, which velotune never reads: convert it to {WEIGHTS_NAME} with "
               "safetensors.torch.save_file)") if pickled else ""
        raise CheckpointError(f"{path}: no {WEIGHTS_NAME}{why}")
    source = str(path / "config.json")
    spec_from_config(config, source)
    model = _build(config, source)
    state = {name: tensor for name, tensor, _ in iter_tensors(files)}
    # torch's weight norm reads the older weight_g / weight_v names too (a hook renames them as they load).
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a shape that does not fit
        raise CheckpointError(f"{path}: the weights do not fit config.json's network: "
                              f"{str(exc).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        parts = [f"{label}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                 for label, names in (("missing", missing), ("unexpected", unexpected)) if names]
        raise CheckpointError(f"{path}: the weights do not match config.json's network ({'; '.join(parts)})")
    return SnacCodec(model, config, str(path))

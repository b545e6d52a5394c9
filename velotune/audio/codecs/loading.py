"""Finding a codec by name or directory: which codec type a directory holds (its config.json), its code layout, and
the loaded codec. Kept apart from base.py so that the interface does not import its implementations."""
from __future__ import annotations

from pathlib import Path

from ...errors import CheckpointError, ConfigError
from .base import CODEC_KEY, CONFIG_NAME, AudioCodec, CodecSpec


def _codec_types() -> dict:
    """type name -> module with `spec_from_config(config, source)` and `load_codec_dir(dir, device)`."""
    from . import snac
    return {"snac": snac}


def _named_specs() -> dict:
    from .snac import KNOWN_SPECS
    return dict(KNOWN_SPECS)


def _codec_type(config: dict, path: Path) -> str:
    types = _codec_types()
    named = config.get(CODEC_KEY)
    if named is not None:
        if named not in types:
            raise ConfigError(f"{path}: codec {named!r} is not one velotune reads (known: {', '.join(types)})")
        return named
    for name, module in types.items():
        if module.looks_like(config):
            return name
    raise ConfigError(f"{path}: not a codec config velotune recognises (a SNAC config has vq_strides and "
                      f"encoder_rates; or set \"{CODEC_KEY}\": one of {', '.join(types)})")


def _read_config(path: Path) -> dict:
    from ...models.checkpoint import read_json
    config = read_json(path)
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return config


def _codec_dir(name_or_dir) -> Path | None:
    path = Path(str(name_or_dir)).expanduser()
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise CheckpointError(f"{path}: no {CONFIG_NAME}: a codec directory holds config.json and "
                                  "model.safetensors")
        return path
    if path.exists():
        raise CheckpointError(f"{path}: expected a codec directory (config.json + model.safetensors), found a file")
    return None


def read_codec_spec(name_or_dir) -> CodecSpec:
    """The layout of a codec directory (its config.json alone; no weights read, no codec package needed), or of a
    known codec by name (snac_24khz)."""
    path = _codec_dir(name_or_dir)
    if path is None:
        known = _named_specs()
        if str(name_or_dir) in known:
            return known[str(name_or_dir)]
        raise ConfigError(f"codec {str(name_or_dir)!r}: no such directory, and not a known codec name "
                          f"({', '.join(known)})")
    config = _read_config(path / CONFIG_NAME)
    return _codec_types()[_codec_type(config, path / CONFIG_NAME)].spec_from_config(config, str(path / CONFIG_NAME))


def load_codec(name_or_dir, device=None) -> AudioCodec:
    """A codec with its weights, from a local directory: config.json and safetensors weights (pickled .bin/.pt
    files are never read). A known name alone (snac_24khz) has no weights here and is refused, saying so."""
    path = _codec_dir(name_or_dir)
    if path is None:
        known = _named_specs()
        if str(name_or_dir) in known:
            raise CheckpointError(f"codec {str(name_or_dir)!r}: velotune downloads no codec weights; give a local "
                                  "directory with its config.json and model.safetensors (a pickled "
                                  "pytorch_model.bin must be converted to safetensors first)")
        raise ConfigError(f"codec {str(name_or_dir)!r}: no such directory (a codec directory holds config.json "
                          "and model.safetensors)")
    config = _read_config(path / CONFIG_NAME)
    codec = _codec_types()[_codec_type(config, path / CONFIG_NAME)].load_codec_dir(path, config)
    return codec.to(device) if device is not None else codec

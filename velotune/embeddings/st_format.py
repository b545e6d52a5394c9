"""sentence-transformers directories in and out.

Read: modules.json lists the modules (Transformer at the directory's root or a sub-directory, Pooling, Normalize);
sentence_bert_config.json holds max_seq_length and do_lower_case; 1_Pooling/config.json the pooling modes (both the
boolean keys of older versions and the `pooling_mode` of newer ones); config_sentence_transformers.json the prompts
(query/document prefixes), the default prompt and the similarity function. A plain Hugging Face directory (no
modules.json) reads as sentence-transformers reads one: mean pooling for an encoder, last-token pooling and
normalisation for a decoder (as decoder embedders are trained). Modules we do not run (Dense, LayerNorm, Router,
...) are refused by name rather than silently skipped: the embeddings would differ.

Write: the backbone's weights under Hugging Face names (LoRA merged), config.json, the tokenizer, and the files
above in the form every sentence-transformers version reads (legacy module paths, boolean pooling keys), all in
one atomic directory write.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError, UnsupportedError
from ..models import checkpoint as ckpt
from .model import EmbedderSettings, SentenceEncoder
from .pooling import Pooling

log = logging.getLogger("velotune")

MODULES = "modules.json"
ST_CONFIG = "config_sentence_transformers.json"
# sentence-transformers' Transformer module settings, under the names its versions have used.
TRANSFORMER_CONFIGS = ("sentence_bert_config.json", "sentence_roberta_config.json", "sentence_distilbert_config.json",
                       "sentence_xlm-roberta_config.json", "sentence_camembert_config.json")
KNOWN = {"Transformer", "Pooling", "Normalize"}


def is_sentence_model_dir(path) -> bool:
    return (Path(path) / MODULES).is_file()


def read_settings(model_dir: Path) -> tuple[EmbedderSettings, Path]:
    """The directory's embedding settings and the directory holding the backbone's weights."""
    modules_file = model_dir / MODULES
    modules = ckpt.read_json(modules_file)
    if not isinstance(modules, list) or not all(isinstance(m, dict) and "type" in m for m in modules):
        raise CheckpointError(f"{modules_file}: expected a list of modules, each with a 'type'")
    kinds = [(m["type"].rsplit(".", 1)[-1], m) for m in modules]
    unknown = [m["type"] for kind, m in kinds if kind not in KNOWN]
    if unknown:
        raise UnsupportedError(f"{modules_file}: module(s) {', '.join(unknown)} are not supported (velotune runs "
                               "Transformer, Pooling and Normalize); the embeddings would differ without them")
    transformers = [m for kind, m in kinds if kind == "Transformer"]
    if len(transformers) != 1:
        raise UnsupportedError(f"{modules_file}: expected one Transformer module, found {len(transformers)}")
    backbone_dir = model_dir / transformers[0].get("path", "")
    settings = EmbedderSettings(normalize=any(kind == "Normalize" for kind, _ in kinds))
    for name in TRANSFORMER_CONFIGS:
        if (backbone_dir / name).is_file():
            config = ckpt.read_json(backbone_dir / name)
            settings.max_seq_length = config.get("max_seq_length")
            settings.do_lower_case = bool(config.get("do_lower_case", False))
            break
    poolings = [m for kind, m in kinds if kind == "Pooling"]
    if poolings:
        pooling_file = model_dir / poolings[0].get("path", "") / "config.json"
        settings.pooling = Pooling.from_config(ckpt.read_json(pooling_file), str(pooling_file))
    if (model_dir / ST_CONFIG).is_file():
        extra = ckpt.read_json(model_dir / ST_CONFIG)
        settings.prompts = {k: v for k, v in (extra.get("prompts") or {}).items() if isinstance(v, str)}
        settings.default_prompt_name = extra.get("default_prompt_name")
        settings.similarity_fn_name = extra.get("similarity_fn_name")
    return settings, backbone_dir


def load_sentence_model(name_or_path, dtype=None, device=None, max_seq_length: int | None = None,
                        pooling: str | list | None = None, normalize: bool | None = None):
    """(SentenceEncoder, tokenizer) from a sentence-transformers directory or a plain Hugging Face one (`vt.load_embedder`).
    `pooling` / `normalize` override what the directory says; `max_seq_length` caps the tokens per text."""
    from ..models.encoders import encoder_model_types, load_encoder
    from ..models.tokenizer import load_tokenizer
    model_dir = ckpt.resolve_model_dir(name_or_path)
    if is_sentence_model_dir(model_dir):
        settings, backbone_dir = read_settings(model_dir)
    else:
        settings, backbone_dir = None, model_dir
    config = ckpt.read_config(backbone_dir)
    model_type = config.get("model_type")
    if model_type in encoder_model_types():
        backbone = load_encoder(backbone_dir, dtype=dtype, device=device)
        settings = settings or EmbedderSettings()
        limit = backbone.max_positions  # usable positions (RoBERTa's table holds two it never uses)
    else:
        from ..models.loader import load
        try:
            backbone, _ = load(backbone_dir, dtype=dtype, device=device, load_tokenizer_files=False)
        except UnsupportedError as exc:
            raise UnsupportedError(f"{backbone_dir / 'config.json'}: model_type {model_type!r} is neither an encoder "
                                   f"({', '.join(encoder_model_types())}) nor a decoder velotune runs: {exc}") from None
        settings = settings or EmbedderSettings(pooling=Pooling(("lasttoken",)), normalize=True)
        limit = config.get("max_position_embeddings")
    if pooling is not None:
        settings.pooling = Pooling(pooling)
    if normalize is not None:
        settings.normalize = bool(normalize)
    if max_seq_length is not None:
        settings.max_seq_length = max_seq_length
    if settings.max_seq_length is None:
        settings.max_seq_length = limit
    elif limit and settings.max_seq_length > limit:
        raise ConfigError(f"max_seq_length {settings.max_seq_length} is beyond what {backbone_dir / 'config.json'} "
                          f"allows (max_position_embeddings {limit})")
    model = SentenceEncoder(backbone, settings)
    model.set_source(model_dir, settings.max_seq_length)
    tokenizer = load_tokenizer(model_dir if (model_dir / "tokenizer_config.json").is_file() else backbone_dir)
    return model, tokenizer


def save_sentence_model(model: SentenceEncoder, tokenizer, out_dir, *, dtype=None, overwrite: bool = False) -> Path:
    """Writes a sentence-transformers directory (LoRA merged into the weights), atomically (`vt.save_embedder`)."""
    from ..lora import merged_state_dict
    from ..models.dtypes import parse_dtype
    if not isinstance(model, SentenceEncoder):
        raise UnsupportedError(f"save_embedder: {type(model).__name__} is not a SentenceEncoder "
                               "(load one with vt.load_embedder)")
    target = parse_dtype(dtype) if dtype is not None else None
    # The names the backbone saves (no buffers), under the plain names of the layers LoRA wraps.
    names = {name.replace(".base_layer.", ".") for name in model.backbone.state_for_saving()}
    state = {k: v.detach().to("cpu").contiguous() for k, v in merged_state_dict(model.backbone, target).items()
             if k in names}
    state.update(_unused_heads(model.backbone.source_dir, target))
    out_dir = Path(out_dir)
    with ckpt.atomic_dir(out_dir, overwrite=overwrite) as tmp:
        config = dict(model.backbone.args.to_dict())
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        ckpt.save_safetensors(state, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _write_settings(model, tmp)
    return out_dir


def _unused_heads(source_dir, dtype) -> dict:
    """The source's BERT pooler, which embeddings never use but transformers' BertModel expects: carried over
    unchanged so that loading the saved directory does not report it missing and initialise it at random."""
    if source_dir is None:
        return {}
    try:
        files = ckpt.weight_files(Path(source_dir))
    except CheckpointError:
        return {}
    return {name: tensor.to(dtype) if dtype is not None else tensor
            for name, tensor, _ in ckpt.iter_tensors(files) if name.startswith("pooler.")}


def _write_settings(model: SentenceEncoder, out: Path):
    settings = model.settings
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if settings.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (out / "2_Normalize").mkdir()
    _write_json(out / MODULES, modules)
    (out / "1_Pooling").mkdir()
    _write_json(out / "1_Pooling" / "config.json", settings.pooling.to_config(model.hidden_size))
    _write_json(out / TRANSFORMER_CONFIGS[0], {"max_seq_length": model.max_seq_length,
                                               "do_lower_case": settings.do_lower_case})
    _write_json(out / ST_CONFIG, {"prompts": settings.prompts, "default_prompt_name": settings.default_prompt_name,
                                  "similarity_fn_name": settings.similarity_fn_name or "cosine",
                                  "model_type": "SentenceTransformer",
                                  "__version__": {"velotune": _version(), "pytorch": torch.__version__}})


def _write_json(path: Path, value):
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def _version() -> str:
    from .. import __version__
    return __version__

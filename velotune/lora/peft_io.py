"""Adapters in PEFT's file format: `adapter_config.json` + `adapter_model.safetensors`, tensors named
`base_model.model.<module>.lora_A.weight` / `.lora_B.weight` / `.lora_magnitude_vector` (DoRA) and
`base_model.model.<module>.<param>` for modules_to_save. Written by us, `peft.PeftModel.from_pretrained` loads
them; written by PEFT, `load_adapter` loads them. LoRA on mixture-of-experts experts is written and read as PEFT's
`target_parameters` on transformers' fused expert tensors (peft_experts.py); a model that itself holds fused expert
parameters (gpt-oss) has their adapters in PEFT's layout already (param_lora.py), under PEFT's names."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, UnsupportedError
from ..models import checkpoint as ckpt
from ..models.header_check import header_shapes, warn_if_not_finite
from ..models.interface import VelotuneModel, require_model
from . import param_lora, peft_experts
from .embedding import LoraEmbedding
from .inject import (ALL_LINEAR, adaptable_names, add_lora, check_hyperparameters, embedding_names, linear_names,
                     lora_layers, name_matches, remove_lora, resolve_targets)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# How a LoRA layer's A tensor ends in PEFT's files: linears and convolutions, and the embedding table's parameter.
A_SUFFIXES = (".lora_A.weight", ".lora_embedding_A")

# PEFT options we do not implement -> the value that means "off". A config that turns one on is refused.
_OFF = {"rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
        "lora_bias": False, "bias": "none", "exclude_modules": None, "target_parameters": None,
        "trainable_token_indices": None, "layer_replication": None, "use_qalora": False, "fan_in_fan_out": False,
        "alora_invocation_tokens": None, "use_bdlora": None}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors (the live parameters) under PEFT's file names (transformers' module names); expert
    adapters stay per expert here (`file_state_dict` fuses them as the file holds them)."""
    settings = _settings(model)
    out = {}
    for name, layer in lora_layers(model).items():
        if isinstance(layer, param_lora.LoraExperts):
            files = param_lora.file_modules(model, [f"{name}.{p}" for p in layer.adapters])
            for param, adapter in layer.adapters.items():
                key = f"{PREFIX}{model.peft_name(files[f'{name}.{param}'])}"
                out[f"{key}.lora_A.weight"] = adapter.lora_A.weight
                out[f"{key}.lora_B.weight"] = adapter.lora_B.weight
            continue
        name = model.peft_name(name)
        if isinstance(layer, LoraEmbedding):  # PEFT's names: parameters, not linears (no ".weight")
            out[f"{PREFIX}{name}.lora_embedding_A"] = layer.lora_embedding_A
            out[f"{PREFIX}{name}.lora_embedding_B"] = layer.lora_embedding_B
            continue
        out[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight
        out[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight
        if layer.use_dora:
            out[f"{PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector
    for name in settings.modules_to_save:
        for pname, p in model.get_submodule(name).named_parameters():
            out[f"{PREFIX}{model.peft_name(name)}.{pname}"] = p
    return out


# velotune's model tasks -> PEFT's task_type (what PEFT wraps the base in when it loads the adapter)
PEFT_TASKS = {"speech-seq2seq": "SEQ_2_SEQ_LM"}


def _peft_task(model: nn.Module) -> str:
    return PEFT_TASKS.get(getattr(model, "task", None), "CAUSAL_LM")


def adapter_config(model: nn.Module) -> dict:
    s = _settings(model)
    layers = lora_layers(model)
    layout = peft_experts.saved_layout(model, layers)
    config = {
        "peft_type": "LORA", "task_type": _peft_task(model), "base_model_name_or_path": _base_name(model),
        "r": s.r, "lora_alpha": int(s.alpha) if float(s.alpha).is_integer() else s.alpha,
        "lora_dropout": s.dropout, "target_modules": _peft_targets(model, s),
        "use_rslora": s.rslora, "use_dora": s.dora,
        "modules_to_save": [model.peft_name(n) for n in s.modules_to_save] or None,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "lora_bias": False, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {}, "exclude_modules": None, "revision": None,
    }
    if layout:  # experts: PEFT's target_parameters on the fused tensors (no dropout there: see peft_experts)
        config.update(peft_experts.config_fields(model, s, layout, peft_experts.shares_a(model, layers, layout)),
                      lora_dropout=0.0)
        config["target_modules"] = _peft_targets(model, s) if _module_targets(model, s) else None
    fused = _fused_targets(model, s)
    if fused:  # fused expert parameters (gpt-oss): PEFT's target_parameters, which take no dropout (param_lora)
        config.update(target_parameters=param_lora.target_parameters(model, fused), lora_dropout=0.0)
        config["target_modules"] = _peft_targets(model, s) if _module_targets(model, s) else None
    return config


def file_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What adapter_model.safetensors holds: `adapter_state_dict`, expert adapters fused as PEFT lays them out."""
    state = adapter_state_dict(model)
    layers = lora_layers(model)
    layout = peft_experts.saved_layout(model, layers)
    if not layout:
        return state
    return peft_experts.fuse_state(model, state, layers, layout, peft_experts.shares_a(model, layers, layout))


def save_adapter(model: nn.Module, out_dir, overwrite: bool = False, tokenizer=None) -> Path:
    """Writes the adapter in PEFT's format, atomically (a temporary directory renamed into place); with
    `tokenizer`, its files go in the same write, so the chat template the adapter was trained with travels
    with it (and a stale template from an earlier write cannot survive beside new weights)."""
    from safetensors.torch import save_file
    model = model.adapter_root() if isinstance(model, VelotuneModel) else model  # the names the adapter uses
    config = adapter_config(model)
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in file_state_dict(model).items()}
    out_dir = Path(out_dir)
    with ckpt.atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out_dir


def load_adapter(model: nn.Module, adapter_dir, trainable: bool = True) -> nn.Module:
    """Loads a PEFT-format LoRA adapter. A model without LoRA gets the layers the config describes first;
    a model with LoRA must match the config (rank, alpha, targets). Names or shapes that do not fit raise
    CheckpointError naming them, and leave the model as it was."""
    root = require_model(model, "vt.load_adapter", VelotuneModel).adapter_root()
    if root is not model:  # a sentence embedder: the adapter is its backbone's
        load_adapter(root, adapter_dir, trainable)
        return model
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    kwargs = _our_names(model, settings_from_config(config, adapter_dir / CONFIG_NAME), adapter_dir / CONFIG_NAME)
    weights = adapter_dir / WEIGHTS_NAME
    if not weights.is_file():
        also = " (adapter_model.bin is there: only safetensors adapters are read)" \
            if (adapter_dir / "adapter_model.bin").is_file() else ""
        raise CheckpointError(f"{adapter_dir}: no {WEIGHTS_NAME}{also}")
    if param_lora.fused_param_names(model):
        fused = _param_targets(model, kwargs, config, adapter_dir / CONFIG_NAME)
    else:
        fused = _expert_targets(model, kwargs, config, adapter_dir)
    layers = lora_layers(model)
    if any(layer.merged for layer in layers.values()):
        raise UnsupportedError("the model's adapters are merged: unmerge_lora(model) before loading other weights")
    added = not layers
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:  # targets the model does not have: an adapter for another model
        if added:
            _check_against_weights(model, kwargs, adapter_dir, fused)  # before add_lora allocates r x features
            add_lora(model, **kwargs)
        else:
            _check_compatible(model, kwargs, adapter_dir / CONFIG_NAME)
    except ConfigError as exc:
        raise CheckpointError(f"{adapter_dir / CONFIG_NAME}: {exc}") from None
    try:
        _copy_tensors(model, weights, fused, kwargs)
    except CheckpointError:
        if added:
            remove_lora(model)
            for n, p in model.named_parameters():
                p.requires_grad_(flags.get(n, p.requires_grad))
        raise
    for p in adapter_state_dict(model).values():
        p.requires_grad_(trainable)
    return model


def read_adapter_config(adapter_dir: Path) -> dict:
    if not adapter_dir.is_dir():
        raise CheckpointError(f"{adapter_dir}: no such adapter directory")
    path = adapter_dir / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{adapter_dir}: no {CONFIG_NAME} (not a PEFT adapter directory?)")
    config = ckpt.read_json(path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return config


def settings_from_config(config: dict, source) -> dict:
    """adapter_config.json -> add_lora keyword arguments; options we do not implement are refused by name."""
    if config.get("peft_type") != "LORA":
        raise UnsupportedError(f"{source}: peft_type {config.get('peft_type')!r}; only LORA adapters are supported")
    peft_experts.check_patterns(config, source)  # expert rank/alpha patterns are ours to read (peft_experts)
    experts = ("target_parameters", "rank_pattern", "alpha_pattern")
    used = [k for k, off in _OFF.items() if k not in experts and config.get(k, off) not in (off, None, False, {}, [])]
    if used:
        raise UnsupportedError(f"{source}: uses PEFT option(s) velotune does not implement: "
                               + ", ".join(f"{k}={config[k]!r}" for k in used))
    needed = ("r", "lora_alpha") if config.get("target_parameters") else ("r", "lora_alpha", "target_modules")
    missing = [k for k in needed if config.get(k) is None]
    if missing:
        raise CheckpointError(f"{source}: missing field(s) {', '.join(missing)}")
    return dict(r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout") or 0.0,
                targets=config.get("target_modules") or [], rslora=bool(config.get("use_rslora")),
                dora=bool(config.get("use_dora")), modules_to_save=config.get("modules_to_save") or None)


def _our_names(model, kwargs: dict, source: Path) -> dict:
    """Full module names in an adapter config (transformers' names) -> ours; leaf names stay. A regex is PEFT's
    match against transformers' in-memory names, which differ from ours in a vision family (`model.text_model.` for
    our `language_model.model.`): it is resolved there, to the list of our linears it selects."""
    targets = kwargs["targets"]
    if isinstance(targets, str) and targets != ALL_LINEAR and not re.fullmatch(r"[\w.]+", targets):
        try:
            chosen = [n for n in adaptable_names(model) if re.fullmatch(targets, model.peft_name(n))]
        except re.error as exc:
            raise CheckpointError(f"{source}: target_modules {targets!r} is not a valid regex ({exc})") from None
        if not chosen:
            raise CheckpointError(f"{source}: target_modules regex {targets!r} matches no linear layer of this "
                                  f"model (matched against transformers' module names, e.g. "
                                  f"{model.peft_name(linear_names(model)[0])})")
        kwargs["targets"] = chosen
    elif isinstance(targets, list) and targets:
        kwargs["targets"] = [model.name_from_peft(t) if "." in t else t for t in targets]
    if kwargs.get("modules_to_save"):
        kwargs["modules_to_save"] = [model.name_from_peft(n) for n in kwargs["modules_to_save"]]
    return kwargs


def _expert_targets(model, kwargs: dict, config: dict, adapter_dir: Path) -> list:
    """On an MoE model: the fused expert targets (target_parameters) added to kwargs["targets"] as our expert
    linears, and module targets kept off the experts (transformers 5 holds no expert linears: a PEFT leaf name
    such as `gate_proj` means Qwen3-MoE's dense layers there), unless the file holds per-expert tensors (an
    adapter for transformers 4's layout)."""
    source, weights = adapter_dir / CONFIG_NAME, adapter_dir / WEIGHTS_NAME
    if not peft_experts.moe_modules(model):
        if config.get("target_parameters"):
            peft_experts.read_targets(model, config, source)  # names the entries it does not know
        return []
    names = list(header_shapes([weights]))
    peft_experts.check_dense_names(model, names, weights)
    try:
        fused = peft_experts.read_targets(model, config, source)
        modules = resolve_targets(model, kwargs["targets"]) if kwargs["targets"] else []
    except ConfigError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    if not peft_experts.has_per_expert_tensors(names):
        modules = [n for n in modules if not peft_experts.is_expert_linear(n)]
    patterns = {**(config.get("rank_pattern") or {}), **(config.get("alpha_pattern") or {})}
    clash = [(k, n) for k in patterns for n in modules if re.match(rf"(.*\.)?({k})$", model.peft_name(n))]
    if clash:
        raise UnsupportedError(f"{source}: rank/alpha pattern {clash[0][0]!r} also applies to module "
                               f"{model.peft_name(clash[0][1])}; velotune keeps one rank for modules")
    kwargs["targets"] = modules + peft_experts.expert_linears(model, fused)
    if not kwargs["targets"]:
        raise CheckpointError(f"{source}: target_modules / target_parameters select no layer of this model")
    return fused


def _param_targets(model, kwargs: dict, config: dict, source: Path) -> list:
    """On a model holding fused expert parameters (gpt-oss): target_parameters resolved to their full names and
    added to kwargs["targets"]; target_modules select modules only (PEFT's never select a parameter). The file's
    tensors are in our layout already: nothing to expand (returns [])."""
    params = param_lora.fused_param_names(model)
    chosen = param_lora.read_targets(model, config, source)
    try:
        modules = resolve_targets(model, kwargs["targets"]) if kwargs["targets"] else []
    except ConfigError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    kwargs["targets"] = [n for n in modules if n not in set(params)] + [n for n in params if n in chosen]
    if not kwargs["targets"]:
        raise CheckpointError(f"{source}: target_modules / target_parameters select no layer of this model")
    return []


def _check_compatible(model, kwargs, source):
    s = _settings(model)
    ours = dict(r=s.r, alpha=float(s.alpha), rslora=s.rslora, dora=s.dora, targets=sorted(s.targets))
    theirs = dict(r=kwargs["r"], alpha=float(kwargs["alpha"]), rslora=kwargs["rslora"], dora=kwargs["dora"],
                  targets=sorted(resolve_targets(model, kwargs["targets"])))
    diff = [f"{k}: model has {ours[k]!r}, adapter has {theirs[k]!r}" for k in ours if ours[k] != theirs[k]]
    if diff:
        raise CheckpointError(f"{source}: adapter does not match the LoRA layers already in the model "
                              f"({'; '.join(diff)}); load it into a model without LoRA instead")


def _check_against_weights(model, kwargs: dict, adapter_dir: Path, fused: list | None = None):
    """adapter_config.json against adapter_model.safetensors' header (names and shapes, no data) and the model's
    layers, before any LoRA layer is built: a tampered `r` would otherwise allocate r x features per layer."""
    source, weights = adapter_dir / CONFIG_NAME, adapter_dir / WEIGHTS_NAME
    check_hyperparameters(kwargs["r"], kwargs["alpha"], kwargs["dropout"])
    header = {name: torch.empty(shape, device="meta") for name, (shape, _) in header_shapes([weights]).items()}
    if fused:  # fused expert tensors -> per-expert shapes (meta tensors: no data read)
        header = peft_experts.expand(model, fused, header, kwargs, weights)
    found = {_normalize(name, model): tuple(t.shape) for name, t in header.items()}
    in_files = {_normalize(name, model): name for name in header}   # ours -> as the file spells it
    targets = resolve_targets(model, kwargs["targets"])
    # fused expert parameters: their tensors sit under PEFT's (nested) module path, [r x experts, in] / [out, ...]
    files = param_lora.file_modules(model, [n for n in targets if n in set(param_lora.fused_param_names(model))])
    a_keys = {n[len(PREFIX):-len(suffix)]: n for n in found for suffix in A_SUFFIXES if n.endswith(suffix)}
    ranks = {found[key][0] for module, key in a_keys.items() if found[key] and module not in set(files.values())}
    if ranks and ranks != {kwargs["r"]}:
        raise CheckpointError(f"{source}: r is {kwargs['r']} but {weights} holds rank-"
                              f"{'/'.join(str(r) for r in sorted(ranks))} LoRA weights")
    in_file = list(a_keys)
    absent = [n for n in targets if files.get(n, n) not in set(in_file)]
    if absent:
        fields = "target_modules / target_parameters" if fused or files else "target_modules"
        raise CheckpointError(f"{source}: {fields} select layers that {weights} has no weights for: {_few(absent)}")
    extra = [n for n in in_file if n not in {files.get(t, t) for t in targets}]
    odd = [(n, why) for n in extra if (why := _not_adaptable(model, n))]
    if odd:  # what PEFT adapted is not a linear velotune has (another model's module, a convolution)
        tensors = [in_files[a_keys[n]] for n, _ in odd]
        also = f" (also: {_few(tensors[1:])})" if len(odd) > 1 else ""
        raise CheckpointError(f"{weights}: tensor {tensors[0]} is LoRA for {model.peft_name(odd[0][0])}, "
                              f"{odd[0][1]}{also}")
    if extra:
        raise CheckpointError(f"{weights} holds LoRA weights for layers target_modules does not select: "
                              f"{_few(extra)}")
    expected = {}
    for name in targets:
        if name in files:
            experts, n_in, n_out = param_lora.fused_param(model, name).shape
            expected[f"{PREFIX}{files[name]}.lora_A.weight"] = (kwargs["r"] * experts, n_in)
            expected[f"{PREFIX}{files[name]}.lora_B.weight"] = (n_out, kwargs["r"] * experts)
            continue
        base = model.get_submodule(name)
        if isinstance(base, nn.Embedding):  # PEFT's embedding pair (lora/embedding.py)
            expected[f"{PREFIX}{name}.lora_embedding_A"] = (kwargs["r"], base.num_embeddings)
            expected[f"{PREFIX}{name}.lora_embedding_B"] = (base.embedding_dim, kwargs["r"])
            continue
        if isinstance(base, nn.modules.conv._ConvNd):  # PEFT's convolution pair (lora/conv.py)
            ones = (1,) * len(base.kernel_size)
            expected[f"{PREFIX}{name}.lora_A.weight"] = (kwargs["r"], base.in_channels, *base.kernel_size)
            expected[f"{PREFIX}{name}.lora_B.weight"] = (base.out_channels, kwargs["r"], *ones)
            continue
        expected[f"{PREFIX}{name}.lora_A.weight"] = (kwargs["r"], base.in_features)
        expected[f"{PREFIX}{name}.lora_B.weight"] = (base.out_features, kwargs["r"])
    wrong = _wrong_shapes(expected, found)
    if wrong:
        raise CheckpointError(f"{weights}: adapter does not fit this model; wrong shape: {_few(wrong)}")


def _wrong_shapes(expected: dict, found: dict) -> list[str]:
    return [f"{k} {list(found[k])} (model needs {list(shape)})"
            for k, shape in expected.items() if k in found and tuple(found[k]) != tuple(shape)]


@torch.no_grad()
def _copy_tensors(model, weights: Path, fused: list | None = None, kwargs: dict | None = None):
    expected = {_normalize(k, model): v for k, v in adapter_state_dict(model).items()}
    raw = {name: tensor for name, tensor, _ in ckpt.iter_tensors([weights])}
    if fused:
        raw = peft_experts.expand(model, fused, raw, kwargs, weights)
    found = {_normalize(name, model): tensor for name, tensor in raw.items()}
    in_file = {_normalize(name, model): name for name in raw}   # ours -> as the file spells it
    # PEFT saves the whole token embedding table beside an adapter on it (save_embedding_layers "auto": the table
    # may have been resized or trained) and loads it into the model: so do we, where the file has it.
    tables = {_normalize(f"{PREFIX}{model.peft_name(n)}.base_layer.weight", model): layer.base_layer.weight
              for n, layer in lora_layers(model).items() if isinstance(layer, LoraEmbedding)}
    expected.update({k: v for k, v in tables.items() if k in found})
    missing = [k for k in expected if k not in found]
    unexpected = [in_file[k] for k in found if k not in expected]
    shapes = _wrong_shapes({k: v.shape for k, v in expected.items()}, {k: v.shape for k, v in found.items()})
    problems = [f"{label}: {_few(items)}" for label, items in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if items]
    if problems:
        raise CheckpointError(f"{weights}: adapter does not fit this model; " + "; ".join(problems))
    for k, p in expected.items():
        warn_if_not_finite(k, found[k], weights)
        p.copy_(found[k])


def _normalize(name: str, model) -> str:
    """Names as PEFT versions write them -> ours: no adapter-name segment, DoRA magnitude without `.weight`,
    transformers' module path as ours (`PREFIX` kept)."""
    name = name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
    for table in (".lora_embedding_A", ".lora_embedding_B"):  # an embedding's pair, as PEFT holds it in memory
        if name.endswith(table + ".default"):
            name = name[: -len(".default")]
    for old in (".lora_magnitude_vector.default.weight", ".lora_magnitude_vector.weight"):
        if name.endswith(old):
            name = name[: -len(old)] + ".lora_magnitude_vector"
    name = name[len(PREFIX):] if name.startswith(PREFIX) else name
    return PREFIX + model.name_from_peft(name)


def _not_adaptable(model, name: str) -> str | None:
    """Why LoRA weights for module `name` (ours) can never load here, or None for a linear of the model."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return "a module this model does not have (an adapter for another model?)"
    if isinstance(module, nn.Embedding) and name not in embedding_names(model):
        return ("an embedding table other than the token embeddings: velotune puts LoRA on the token embedding "
                "table only (leave it out of target_modules)")
    if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)):
        return (f"a {type(module).__name__} here: velotune puts LoRA on linear layers, convolutions and the token "
                "embedding table only (leave it out of target_modules)")
    return None


def _few(items, n=4) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _settings(model):
    settings = require_model(model, "LoRA adapter files", VelotuneModel).lora_settings
    if settings is None:
        raise UnsupportedError("this model has no LoRA adapters: call add_lora(model, ...) or load_adapter() first")
    return settings


def _base_name(model) -> str | None:
    return str(model.source_dir) if model.source_dir is not None else None


def _module_targets(model, settings) -> list[str]:
    """Our targets PEFT reaches as modules: all but the experts of a model whose experts are written fused, and
    all but fused expert parameters."""
    fused = set(_fused_targets(model, settings))
    return [n for n in settings.targets if not peft_experts.is_expert_linear(n) and n not in fused]


def _fused_targets(model, settings) -> list[str]:
    """Our targets that are fused expert parameters (gpt-oss), PEFT's target_parameters."""
    params = set(param_lora.fused_param_names(model))
    return [n for n in settings.targets if n in params]


def _peft_targets(model, settings) -> list[str]:
    """The shortest PEFT `target_modules` that selects exactly our targets: leaf names when they suffice."""
    fused = bool(peft_experts.saved_layout(model, lora_layers(model)))
    params = set(_fused_targets(model, settings))
    targets = _module_targets(model, settings) if fused else [n for n in settings.targets if n not in params]
    linears = [n for n in linear_names(model) if not (fused and peft_experts.is_expert_linear(n))]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in targets})
    chosen = [n for n in linears if any(name_matches(n, leaf) for leaf in leaves)]
    # PEFT also adapts convolutions and embeddings a leaf name matches (Qwen2-VL's Conv3d `patch_embed.proj` for
    # `proj`): with such a namesake, full names keep its adapter to our layers.
    namesakes = [n for n, m in model.named_modules() if isinstance(m, (nn.Embedding, nn.modules.conv._ConvNd))
                 and any(name_matches(n, leaf) for leaf in leaves)]
    if sorted(chosen) == sorted(targets) and not namesakes:
        return leaves
    return [model.peft_name(n) for n in targets]

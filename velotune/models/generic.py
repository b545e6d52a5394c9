"""The generic (slower) path: a `model_type` with no file of ours runs as the `transformers` model itself,
wrapped to look like our `CausalLM`: same forward signature (our KVCache included), same `CausalLMOutput`,
same loss code. Parameter names are the transformers model's own (`gpt_neox.layers.0...`, `lm_head.weight`):
its children are registered directly on the wrapper, never under a prefix, and `vt.save` writes them back
under the checkpoint's names. No fused kernels here; a warning says so, once per process.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..errors import CheckpointError, UnsupportedError
from . import checkpoint as ckpt
from .base import CausalLMOutput, _default_positions, next_token_loss
from .header_check import check_generic, check_positive_sizes, header_shapes, warn_if_not_finite
from .registry import supported_model_types

log = logging.getLogger("velotune")
_warned = False


@dataclass
class GenericArgs:
    """What the rest of velotune reads from `model.args`; the full config stays in `raw` for saving."""
    model_type: str
    tie_word_embeddings: bool = False
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_hf_config(cls, hf_config, raw: dict):
        text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        return cls(model_type=raw["model_type"],
                   tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
                   vocab_size=getattr(text, "vocab_size", None), hidden_size=getattr(text, "hidden_size", None),
                   num_hidden_layers=getattr(text, "num_hidden_layers", None), raw=dict(raw))

    def to_dict(self) -> dict:
        return dict(self.raw)


class GenericCausalLM(nn.Module):
    """A transformers causal LM behind our `CausalLM` interface."""

    is_generic = True

    def __init__(self, hf_model: nn.Module, args: GenericArgs):
        super().__init__()
        # Held outside `_modules` so its parameters are not listed twice, nor under an `hf.` prefix.
        object.__setattr__(self, "hf_model", hf_model)
        for name, child in hf_model.named_children():
            self.add_module(name, child)
        for name, param in hf_model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        self.args = args
        self._takes_positions = "position_ids" in inspect.signature(hf_model.forward).parameters

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        hf = self.__dict__.get("hf_model")
        # A child replaced on the wrapper (a quantized or LoRA head) must be replaced where forward runs too.
        if hf is not None and isinstance(value, nn.Module) and name in hf._modules:
            setattr(hf, name, value)

    @property
    def model_type(self) -> str:
        return self.args.model_type

    def train(self, mode: bool = True):
        super().train(mode)
        self.hf_model.training = mode  # the children follow through super(); the top level does not
        return self

    def set_gradient_checkpointing(self, enabled: bool = True):
        if enabled:
            self.hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.hf_model.gradient_checkpointing_disable()

    def tie_weights(self):
        self.hf_model.tie_weights()

    def embed(self, input_ids):
        return self.hf_model.get_input_embeddings()(input_ids)

    def logits(self, hidden):
        return self.hf_model.get_output_embeddings()(hidden)

    def get_input_embeddings(self):
        return self.hf_model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.hf_model.get_output_embeddings()

    def forward(self, input_ids=None, *, labels=None, position_ids=None, attention_mask=None, cache=None,
                inputs_embeds=None, return_logits: bool = True, reduction: str = "mean",
                output_hidden_states: bool = False) -> CausalLMOutput:
        kwargs = dict(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                      output_hidden_states=output_hidden_states, return_dict=True)
        if position_ids is None and attention_mask is not None and self._takes_positions:
            # As our own models: left-padded rows count positions from their first real token.
            ref = input_ids if input_ids is not None else inputs_embeds
            position_ids = _default_positions(attention_mask, _past_length(cache), ref.shape[1], ref.device,
                                              ref.shape[0])
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        out = self._run(kwargs, cache)
        result = CausalLMOutput(hidden_states=out.hidden_states[-1] if output_hidden_states else None)
        if labels is not None:
            result.loss, result.num_tokens = next_token_loss(labels, reduction, logits=out.logits)
        if return_logits or labels is None:
            result.logits = out.logits
        return result

    def _run(self, kwargs, cache):
        from transformers import Cache, DynamicCache
        if cache is None:
            return self.hf_model(**kwargs, use_cache=False)
        if isinstance(cache, Cache):
            return self.hf_model(**kwargs, past_key_values=cache, use_cache=True)
        # Our KVCache (velotune.infer.cache): transformers attends through its own cache object, so it gets
        # one holding what ours holds, and the new keys and values go back into ours. transformers' own
        # DynamicCache copies the same way (torch.cat) on every step.
        past = cache.past_length
        layers = sorted(cache.keys)
        hf_cache = DynamicCache(ddp_cache_data=[(cache.keys[i][:, :, :past], cache.values[i][:, :, :past])
                                                for i in layers]) if past else DynamicCache()
        out = self.hf_model(**kwargs, past_key_values=hf_cache, use_cache=True)
        for i, layer in enumerate(hf_cache.layers):
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                cache.update(i, layer.keys[:, :, past:], layer.values[:, :, past:])
        return out

    def state_for_saving(self) -> dict:
        """The state dict under checkpoint names, each tied tensor once (under its first name, as transformers)."""
        state, seen = {}, set()
        for name, tensor in self.state_dict().items():
            key = (tensor.data_ptr(), tensor.shape, tensor.dtype)
            if tensor.numel() and key in seen:
                continue
            seen.add(key)
            state[name] = tensor
        try:  # transformers 5 may rename (or fuse) tensors on load; writing them back undoes that
            from transformers.core_model_loading import revert_weight_conversion
        except ImportError:
            return state
        return dict(revert_weight_conversion(self.hf_model, state))


def _past_length(cache) -> int:
    if cache is None:
        return 0
    return cache.past_length if hasattr(cache, "past_length") else cache.get_seq_length()


def load_generic(model_dir: Path, config: dict, dtype, device, quantize=None) -> GenericCausalLM:
    """Loads a checkpoint whose model_type has no file of ours through transformers (offline)."""
    model_type = config["model_type"]
    config_path = model_dir / "config.json"
    _check_known(model_type, config, model_dir)
    check_positive_sizes(config, config_path)
    shapes = header_shapes(ckpt.weight_files(model_dir))  # safetensors only: nothing is unpickled
    hf_config = _read_hf_config(model_dir, model_type)
    check_generic(hf_config.get_text_config(), shapes, config_path)  # before transformers builds anything
    _warn_once(model_type)
    from transformers import AutoModelForCausalLM
    try:
        hf, info = AutoModelForCausalLM.from_pretrained(str(model_dir), config=hf_config, dtype=dtype,
                                                        local_files_only=True, use_safetensors=True,
                                                        output_loading_info=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise _not_loadable(model_dir, model_type, exc) from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{model_dir}: weights missing from the checkpoint: {shown}")
    for name, param in hf.named_parameters():
        warn_if_not_finite(name, param.detach(), model_dir)
    model = GenericCausalLM(hf.to(device), GenericArgs.from_hf_config(hf.config, config))
    if quantize:
        from .quantize import quantize_model
        model = quantize_model(model, quantize, compute_dtype=dtype, device=device)
    return model.eval()


def _read_hf_config(model_dir: Path, model_type: str):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, RuntimeError, ValueError, TypeError) as exc:
        raise _not_loadable(model_dir, model_type, exc) from None


def _not_loadable(model_dir: Path, model_type: str, exc: Exception) -> CheckpointError:
    return CheckpointError(f"{model_dir}: transformers could not load this {model_type} checkpoint: "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")


def _check_known(model_type: str, config: dict, model_dir: Path):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    ours = ", ".join(supported_model_types())
    if model_type not in CONFIG_MAPPING_NAMES:
        import transformers
        remote = " (its config asks for remote code, which velotune does not run)" if "auto_map" in config else ""
        raise UnsupportedError(
            f"{model_dir / 'config.json'}: model_type '{model_type}' is not supported{remote}: velotune has "
            f"architecture files for {ours}, and transformers {transformers.__version__} (the generic path) "
            f"does not know it either")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedError(
            f"{model_dir / 'config.json'}: model_type '{model_type}' has no causal language model in transformers; "
            f"velotune trains decoder language models (own architecture files: {ours})")


def _warn_once(model_type: str):
    global _warned
    if _warned:
        return
    _warned = True
    log.warning("model_type '%s' has no velotune architecture file: it runs through transformers' own model "
                "(the generic path: slower, more memory, no fused kernels). Own files: %s",
                model_type, ", ".join(supported_model_types()))

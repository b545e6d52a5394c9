"""The generic (slower) path: a `model_type` with no file of ours runs as the `transformers` model itself,
behind the same interface as our own models (interface.LanguageModel): same forward signature (our KVCache
included), same `CausalLMOutput`, same loss code. Parameter names are the transformers model's own
(`gpt_neox.layers.0...`, `lm_head.weight`): its children are registered directly on the wrapper, never under a
prefix, and `vt.save` writes them back under the checkpoint's names. No fused kernels here; a warning says so,
once per process.

Packed documents go through transformers' own packing: with no attention_mask and no cache, transformers splits a
row where its position ids stop counting up by one (its masks, sliding windows and flash-attention varlen all
follow). So `document_ids` become positions restarting per document, and explicit `position_ids` without
`document_ids` get an all-ones attention_mask, which turns that inference off: one document per row, as on our
own models.
"""
from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, UnsupportedError
from . import checkpoint as ckpt
from .attention import check_document_ids, document_positions, document_starts
from .base import CausalLMOutput, default_positions, next_token_loss
from .header_check import check_generic, check_positive_sizes, header_shapes, warn_if_not_finite
from .interface import LanguageModel, check_checkpointing_mode, check_every_n_layers
from .registry import supported_model_types

log = logging.getLogger("velotune")
_warned = False
_warned_offload = False
# The logits of forward and of logits(hidden_states) agree to this relative error when the head is plain.
_HEAD_MATCH = 1e-3
_BLOCK_LIST_NAMES = ("layers", "h", "blocks")


@dataclass
class GenericArgs:
    """What the rest of velotune reads from `model.args`; the full config stays in `raw` for saving."""
    model_type: str
    tie_word_embeddings: bool = False
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    bos_token_id: object = None
    eos_token_id: object = None
    pad_token_id: object = None
    final_logit_softcapping: float | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_hf_config(cls, hf_config, raw: dict):
        # transformers configs: a multimodal one nests its text model's fields; an older one lacks some keys.
        text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        known = {name: getattr(text, name, None) for name in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                             "bos_token_id", "eos_token_id", "pad_token_id",
                                                             "final_logit_softcapping")}
        return cls(model_type=raw["model_type"], tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
                   raw=dict(raw), **known)

    def to_dict(self) -> dict:
        return dict(self.raw)


class GenericCausalLM(LanguageModel):
    """A transformers causal LM behind our interface."""

    path = "generic"
    supports_logits_to_keep = False  # transformers builds every position's logits here: prefill runs in chunks

    def __init__(self, hf_model: nn.Module, args: GenericArgs):
        super().__init__(args)
        # Held outside `_modules` so its parameters are not listed twice, nor under an `hf.` prefix.
        object.__setattr__(self, "hf_model", hf_model)
        for name, child in hf_model.named_children():
            self.add_module(name, child)
        for name, param in hf_model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        # transformers' own forward signature (a third-party API, not our interface): some models take no positions.
        self._takes_positions = "position_ids" in inspect.signature(hf_model.forward).parameters
        self._checkpointing: bool | str = False
        self._checkpoint_every = 1
        self._head_is_plain: bool | None = None  # measured on first use (see _check_head)

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        hf = self.__dict__.get("hf_model")
        # A child replaced on the wrapper (a quantized or LoRA head) must be replaced where forward runs too.
        if hf is not None and isinstance(value, nn.Module) and name in hf._modules:
            setattr(hf, name, value)

    def train(self, mode: bool = True):
        super().train(mode)
        self.hf_model.training = mode  # the children follow through super(); the top level does not
        return self

    # ---- the interface -------------------------------------------------------------------------------------
    def blocks(self) -> list[nn.Module]:
        """The transformers model's list of decoder layers: a ModuleList named layers / h / blocks, else the one
        with num_hidden_layers entries."""
        lists = [(name.rsplit(".", 1)[-1], m) for name, m in self.named_modules()
                 if isinstance(m, nn.ModuleList) and len(m)]
        for leaf, module in lists:
            if leaf in _BLOCK_LIST_NAMES:
                return list(module)
        for _, module in lists:
            if len(module) == self.args.num_hidden_layers:
                return list(module)
        raise UnsupportedError(f"{self.model_type} (generic path): cannot find its decoder blocks (no ModuleList "
                               f"named {' / '.join(_BLOCK_LIST_NAMES)} or of num_hidden_layers entries)")

    def get_input_embeddings(self) -> nn.Module:
        return self.hf_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.hf_model.get_output_embeddings()

    def tie_weights(self):
        self.hf_model.tie_weights()

    def set_gradient_checkpointing(self, mode: bool | str = True):
        """"offload" is not available on this path: blocks are recomputed, their inputs stay on the device."""
        global _warned_offload
        check_checkpointing_mode(mode)
        if mode == "offload" and not _warned_offload:
            _warned_offload = True
            log.warning("gradient checkpointing 'offload': not available on the generic path (%s); blocks are "
                        "recomputed and their inputs stay on the device", self.model_type)
        hf = self.hf_model
        # transformers 5.x names it activation checkpointing (the gradient_* names warn there and go in v6).
        if mode and hasattr(hf, "activation_checkpointing_enable"):
            every = {"every_n_layers": self._checkpoint_every} if self._checkpoint_every != 1 else {}
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False}, **every)
        elif mode:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            (getattr(hf, "activation_checkpointing_disable", None) or hf.gradient_checkpointing_disable)()
        self._checkpointing = mode

    def set_checkpoint_every(self, every_n_layers: int):
        """transformers picks blocks 0, n, 2n, ... itself where it knows every_n_layers (5.x's activation
        checkpointing); older releases checkpoint every block only."""
        check_every_n_layers(every_n_layers)
        if every_n_layers != 1 and not hasattr(self.hf_model, "activation_checkpointing_enable"):
            raise UnsupportedError(f"activation checkpointing every_n_layers={every_n_layers}: this transformers "
                                   f"release checkpoints every block of {self.model_type} or none")
        self._checkpoint_every = every_n_layers

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(self._checkpointing)

    def hidden_states(self, input_ids=None, *, position_ids=None, document_ids=None, attention_mask=None,
                      cache=None, inputs_embeds=None):
        """The transformers base model's last hidden state (its final norm's output)."""
        kwargs = self._transformers_inputs(input_ids, inputs_embeds, position_ids, document_ids, attention_mask,
                                           cache)
        return _run(self.hf_model.base_model, kwargs, cache).last_hidden_state

    def logits(self, hidden):
        if not self._check_head():
            raise UnsupportedError(f"{self.model_type} (generic path): transformers computes its logits otherwise "
                                   "than the output head on the final hidden states (a logit scale, a norm inside "
                                   "the head, ...); only forward() gives its logits")
        logits = self.get_output_embeddings()(hidden)
        cap = self.final_logit_softcap
        return torch.tanh(logits / cap) * cap if cap else logits

    def head_weight(self):
        head = self.get_output_embeddings()
        return head.weight if type(head) is nn.Linear and self._check_head() else None

    @property
    def final_logit_softcap(self):
        return self.args.final_logit_softcapping

    def forward(self, input_ids=None, *, labels=None, position_ids=None, document_ids=None, attention_mask=None,
                cache=None, inputs_embeds=None, return_logits: bool | None = None, reduction: str = "mean",
                logits_to_keep: int = 0, output_hidden_states: bool = False) -> CausalLMOutput:
        if return_logits is None:
            return_logits = labels is None or not torch.is_grad_enabled()
        kwargs = self._transformers_inputs(input_ids, inputs_embeds, position_ids, document_ids, attention_mask,
                                           cache)
        out = _run(self.hf_model, dict(kwargs, output_hidden_states=output_hidden_states), cache)
        result = CausalLMOutput(hidden_states=out.hidden_states[-1] if output_hidden_states else None)
        if labels is not None:
            result.loss, result.num_tokens = next_token_loss(labels, reduction, logits=out.logits)
        if return_logits or labels is None:
            keep = logits_to_keep and labels is None
            result.logits = out.logits[:, -logits_to_keep:] if keep else out.logits
        return result

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

    # ---- pieces --------------------------------------------------------------------------------------------
    def _transformers_inputs(self, input_ids, inputs_embeds, position_ids, document_ids, attention_mask,
                             cache) -> dict:
        """The keyword arguments of the transformers call that means what ours mean (see the module docstring)."""
        ref = input_ids if input_ids is not None else inputs_embeds
        B, T = ref.shape[:2]
        if document_ids is not None:
            position_ids = self._packed_positions(document_ids, position_ids, attention_mask, cache, (B, T))
        elif position_ids is not None and attention_mask is None and cache is None:
            self.note_positions_without_documents(position_ids)
            attention_mask = torch.ones(B, T, dtype=torch.long, device=ref.device)
        elif position_ids is None and attention_mask is not None and self._takes_positions:
            # As our own models: left-padded rows count positions from their first real token.
            position_ids = default_positions(attention_mask, _past_length(cache), T, ref.device, B)
        kwargs = dict(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                      return_dict=True)
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        return kwargs

    def _packed_positions(self, document_ids, position_ids, attention_mask, cache, shape):
        check_document_ids(document_ids, shape, cache)
        where = f"{self.model_type} (generic path)"
        if attention_mask is not None:
            raise UnsupportedError(f"{where}: document_ids with an attention_mask: transformers packs documents "
                                   "only without one; pass document_ids alone")
        if not self._takes_positions:
            raise UnsupportedError(f"{where}: the transformers model takes no position_ids, so it cannot keep "
                                   "packed documents apart; set data.packing: false")
        if position_ids is None:
            return document_positions(document_ids)
        counted = torch.ones_like(document_ids, dtype=torch.bool)
        counted[:, 1:] = position_ids.expand(shape)[:, 1:] - position_ids.expand(shape)[:, :-1] != 1
        if not torch.equal(counted, document_starts(document_ids)):
            raise UnsupportedError(f"{where}: position_ids must restart at each document of document_ids and count "
                                   "up by one within it (transformers finds documents from the positions)")
        return position_ids

    def _check_head(self) -> bool:
        """Whether transformers' logits are the output head (soft-capped when config.json says so) on the final
        hidden states. Families differ here (a logit scale, a norm inside the head) in ways no config key names
        reliably, so it is measured, once, on a few tokens, with every module in eval mode."""
        if self._head_is_plain is None:
            device = next(self.parameters()).device
            ids = torch.arange(min(8, self.args.vocab_size or 8), device=device)[None]
            modes = {m: m.training for m in (self.hf_model, *self.modules())}
            self.eval()
            try:
                with torch.no_grad():
                    full = _run(self.hf_model, dict(input_ids=ids, return_dict=True), None).logits.float()
                    logits = self.get_output_embeddings()(self.hidden_states(ids)).float()
            finally:
                for module, training in modes.items():
                    module.training = training
            cap = self.final_logit_softcap
            if cap:
                logits = torch.tanh(logits / cap) * cap
            self._head_is_plain = bool((logits - full).norm() <= _HEAD_MATCH * full.norm())
        return self._head_is_plain


def _run(module, kwargs, cache):
    """`module` (the transformers model, or its base model) called with our cache, if any."""
    from transformers import Cache, DynamicCache
    if cache is None:
        return module(**kwargs, use_cache=False)
    name = _cache_argument(type(module))
    if isinstance(cache, Cache):
        return module(**kwargs, **{name: cache}, use_cache=True)
    # Our KVCache (velotune.infer.cache): transformers attends through its own cache object, so it gets
    # one holding what ours holds, and the new keys and values go back into ours. transformers' own
    # DynamicCache copies the same way (torch.cat) on every step.
    past = cache.past_length
    layers = sorted(cache.keys)
    hf_cache = DynamicCache(ddp_cache_data=[(cache.keys[i][:, :, :past], cache.values[i][:, :, :past])
                                            for i in layers]) if past else DynamicCache()
    out = module(**kwargs, **{name: hf_cache}, use_cache=True)
    for i, layer in enumerate(hf_cache.layers):
        if getattr(layer, "keys", None) is not None and layer.keys.numel():  # a transformers cache layer
            cache.update(i, layer.keys[:, :, past:], layer.values[:, :, past:])
    return out


@functools.cache
def _cache_argument(model_class) -> str:
    """The name the model's forward takes its cache by: `cache` from transformers 5.2x (where `past_key_values` is
    a deprecated alias, to be removed), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _past_length(cache) -> int:
    if cache is None:
        return 0
    # Ours (velotune.infer.cache.KVCache) or a transformers Cache.
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

"""Whisper (speech recognition): an audio encoder over log-mel frames and a text decoder that cross-attends to it.

`WhisperArgs` reads config.json under transformers' names; `Whisper` has transformers' parameter names
(`model.encoder.conv1.weight`, `model.decoder.layers.0.encoder_attn.q_proj.weight`, `proj_out.weight` tied to
`model.decoder.embed_tokens.weight`), so a WhisperForConditionalGeneration checkpoint loads by name
(`load_whisper` / `save_whisper`, whisper_files.py). Greedy decoding with a cache is `transcribe_ids`
(whisper_decode.py). This module is the public face of all three.

Labels are not shifted inside, unlike a causal LM: position t of the decoder predicts labels[t], and without
decoder_input_ids the decoder reads the labels shifted right behind decoder_start_token_id, as transformers does.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data.encode import IGNORE_INDEX
from ..errors import CheckpointError
from ..kernels.offload import offloaded_checkpoint
from ..kernels.recompute_saved import recomputed_in_backward
from .base import position_loss
from .encoders.base import activation
from .field_checks import check_fields
from .interface import VelotuneModel, check_checkpointing_mode
from .whisper_blocks import DecodingCache, WhisperBackbone, decoder_self_mask, layer_norm
from .whisper_decode import transcribe_ids
from .whisper_files import SPEECH_SEQ2SEQ, load_whisper, save_whisper

log = logging.getLogger("velotune")


@dataclass
class WhisperArgs:
    """config.json fields Whisper reads, under transformers' names; a field the file leaves out takes
    transformers' default. The whole config is kept in `raw` and written back by to_dict()."""
    model_type: str = "whisper"
    vocab_size: int = 51865
    num_mel_bins: int = 80
    d_model: int = 384
    encoder_layers: int = 4
    decoder_layers: int = 4
    encoder_attention_heads: int = 6
    decoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    decoder_ffn_dim: int = 1536
    max_source_positions: int = 1500
    max_target_positions: int = 448
    activation_function: str = "gelu"
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.0
    decoder_layerdrop: float = 0.0
    scale_embedding: bool = False
    tie_word_embeddings: bool = True
    apply_spec_augment: bool = False
    pad_token_id: int | None = 50256
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    decoder_start_token_id: int | None = 50257
    raw: dict = field(default_factory=dict, repr=False)

    SIZES = ("vocab_size", "num_mel_bins", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
             "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "max_source_positions",
             "max_target_positions")
    RATES = ("dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop", "decoder_layerdrop")
    FLAGS = ("scale_embedding", "tie_word_embeddings", "apply_spec_augment")
    TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")

    @classmethod
    def from_dict(cls, config: dict, source: str = "config.json") -> "WhisperArgs":
        names = {f.name for f in dataclasses.fields(cls)} - {"raw"}
        args = cls(**{k: v for k, v in config.items() if k in names}, raw=dict(config))
        args.validate(source)
        return args

    def validate(self, source: str):
        check_fields(self, source, positive_ints=self.SIZES, probabilities=self.RATES, flags=self.FLAGS,
                     token_ids=self.TOKEN_IDS)
        for heads in ("encoder_attention_heads", "decoder_attention_heads"):
            if self.d_model % getattr(self, heads):
                raise CheckpointError(f"{source}: d_model ({self.d_model}) is not a multiple of {heads} "
                                      f"({getattr(self, heads)})")
        activation(self.activation_function, source, "activation_function")
        if self.scale_embedding:
            log.warning("%s: scale_embedding is true, but Whisper does not scale its embeddings (transformers "
                        "ignores the field too); the model runs unscaled", source)
        if self.apply_spec_augment:
            log.warning("%s: apply_spec_augment is true; velotune's Whisper does not mask features inside the "
                        "model: SpecAugment belongs to the data pipeline", source)

    def to_dict(self) -> dict:
        """config.json as read: keys this file does not use included, untouched."""
        return dict(self.raw)


@dataclass
class WhisperOutput:
    logits: torch.Tensor | None = None                 # [batch, seq, vocab]
    loss: torch.Tensor | None = None                   # mean or sum over target tokens, or [batch, seq] ("none")
    num_tokens: torch.Tensor | None = None             # number of target (non-ignored) labels
    encoder_hidden_states: torch.Tensor | None = None  # [batch, max_source_positions, d_model]


def decoder_input_ids_from_labels(labels: torch.Tensor, decoder_start_token_id: int | None,
                                  pad_token_id: int | None) -> torch.Tensor:
    """labels [batch, seq] shifted one right behind decoder_start_token_id, ignored labels (-100) read as padding:
    the decoder input transformers builds from labels."""
    if decoder_start_token_id is None or pad_token_id is None:
        raise ValueError("building decoder_input_ids from labels needs decoder_start_token_id and pad_token_id in "
                         "config.json; pass decoder_input_ids instead")
    shifted = torch.full_like(labels, decoder_start_token_id)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad_token_id)


def seq2seq_loss(labels, reduction: str = "mean", *, logits=None, hidden=None, weight=None, logits_fn=None):
    """Cross-entropy of position t against labels[t] (no shift); returns (loss, number of target tokens).

    From `logits` [B, T, V] when given; else from `hidden` [B, T, H] with the head `weight` (fused and chunked,
    never building the full logits), or with `logits_fn` for a head that is not a plain Linear. reduction "mean" /
    "sum" over the target tokens, or "none": the loss of each position [B, T] (0 where the label is -100)."""
    return position_loss(labels, reduction, logits=logits, hidden=hidden, weight=weight, logits_fn=logits_fn)



class Whisper(VelotuneModel):
    """transformers' WhisperForConditionalGeneration: `model.encoder`, `model.decoder`, `proj_out`."""

    task = SPEECH_SEQ2SEQ
    hf_architecture = "WhisperForConditionalGeneration"

    def __init__(self, args: WhisperArgs):
        super().__init__(args)
        act = activation(args.activation_function, "config.json", "activation_function")
        self.model = WhisperBackbone(args, act)
        self.proj_out = nn.Linear(args.d_model, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.tie_weights()
        self.checkpointing: bool | str = False

    def tie_weights(self):
        self.proj_out.weight = self.model.decoder.embed_tokens.weight

    # ---- the interface ---------------------------------------------------------------------------------------
    def blocks(self) -> list[nn.Module]:
        """Encoder layers, then decoder layers."""
        return [*self.model.encoder.layers, *self.model.decoder.layers]

    def get_input_embeddings(self) -> nn.Module:
        return self.model.decoder.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.proj_out

    def head_weight(self) -> torch.Tensor | None:
        """proj_out's weight when it is a plain Linear (the fused loss); None with LoRA on it: use `logits`."""
        return self.proj_out.weight if type(self.proj_out) is nn.Linear else None

    def set_gradient_checkpointing(self, mode: bool | str = True):
        """True: recompute each layer in backward. "offload": encoder layers also keep their input on the CPU;
        decoder layers are recomputed with theirs on the device (short token sequences, and they share the
        encoder's output, which must stay in the graph)."""
        check_checkpointing_mode(mode)
        self.checkpointing = mode

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(self.checkpointing)

    def state_for_saving(self) -> dict:
        """Parameters under checkpoint names; a tied proj_out is left out, as transformers writes it."""
        state = dict(self.state_dict())
        if self.args.tie_word_embeddings:
            state.pop("proj_out.weight", None)
        return state

    def freeze_encoder(self):
        """No gradient for the audio encoder (a common fine-tuning setting: train the decoder only)."""
        self.model.encoder.requires_grad_(False)

    # ---- forward ---------------------------------------------------------------------------------------------
    def encode(self, input_features: torch.Tensor) -> torch.Tensor:
        """log-mel frames [batch, num_mel_bins, 2 * max_source_positions] -> [batch, max_source_positions, d_model]."""
        return self.model.encoder.layer_norm(self._encoder_layers(input_features))

    def _encoder_layers(self, input_features: torch.Tensor) -> torch.Tensor:
        """The encoder before its final norm."""
        encoder = self.model.encoder
        return self._run_layers(encoder.layers, encoder.embed(input_features), self.args.encoder_layerdrop, ())

    def decode(self, decoder_input_ids: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
               decoder_attention_mask: torch.Tensor | None = None, cache: DecodingCache | None = None):
        """The decoder's final norm output [batch, seq, d_model]: what proj_out reads. With a `cache`, the ids are
        the positions after those cached, and the encoder states may be None once the cache holds their keys."""
        decoder = self.model.decoder
        past = cache.past_length if cache is not None else 0
        h = decoder.embed(decoder_input_ids, past)
        mask = decoder_self_mask(decoder_attention_mask, decoder_input_ids.shape[1], past, h.device)
        h = self._run_layers(decoder.layers, h, self.args.decoder_layerdrop, (encoder_hidden_states, mask, cache))
        return decoder.layer_norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj_out(hidden)

    def forward(self, input_features=None, decoder_input_ids=None, *, labels=None, decoder_attention_mask=None,
                encoder_hidden_states=None, cache: DecodingCache | None = None, return_logits: bool | None = None,
                reduction: str = "mean") -> WhisperOutput:
        """transformers' call: `model(input_features, labels=labels)` or with decoder_input_ids. With labels and
        gradients on, the loss is the fused chunked one and `logits` is None unless `return_logits=True`.
        `encoder_hidden_states` (from `encode`) replaces input_features to reuse one encoding."""
        if labels is not None:
            if labels.shape[1] > self.args.max_target_positions:
                raise ValueError(f"labels have {labels.shape[1]} positions, more than the "
                                 f"{self.args.max_target_positions} of this model (max_target_positions)")
            if decoder_input_ids is None:
                decoder_input_ids = decoder_input_ids_from_labels(labels, self.args.decoder_start_token_id,
                                                                  self.args.pad_token_id)
        if decoder_input_ids is None:
            raise ValueError("Whisper's forward needs decoder_input_ids or labels")
        recompute = contextlib.nullcontext()
        if encoder_hidden_states is None:
            if input_features is None:
                raise ValueError("Whisper's forward needs input_features (or encoder_hidden_states from encode)")
            before_norm = self._encoder_layers(input_features)
            norm = self.model.encoder.layer_norm
            encoder_hidden_states = norm(before_norm)
            if not (self.checkpointing and self.training):
                # The final norm keeps its input: every decoder layer's cross-attention keeps a recipe for the
                # encoder's output instead of the output itself, rebuilt once when backward reaches the decoder.
                recompute = recomputed_in_backward(encoder_hidden_states, lambda: layer_norm(norm, before_norm))
        if return_logits is None:
            return_logits = labels is None or not torch.is_grad_enabled()
        with recompute:
            hidden = self.decode(decoder_input_ids, encoder_hidden_states, decoder_attention_mask, cache)
        out = WhisperOutput(encoder_hidden_states=encoder_hidden_states)
        if return_logits:
            out.logits = self.logits(hidden)
        if labels is not None:
            out.loss, out.num_tokens = seq2seq_loss(labels, reduction, logits=out.logits, hidden=hidden,
                                                    weight=self.head_weight(), logits_fn=self.logits)
        return out

    def _run_layers(self, layers, h, layerdrop: float, extra: tuple):
        """Each layer in turn, `layer(h, *extra)`; skipped with probability `layerdrop` in training (transformers'
        LayerDrop, drawn from torch's RNG), recomputed in backward when checkpointing is on."""
        recompute = self.checkpointing and self.training and torch.is_grad_enabled()
        for layer in layers:
            if self.training and layerdrop > 0 and bool(torch.rand([]) < layerdrop):
                continue
            if not recompute:
                h = layer(h, *extra)
            elif self.checkpointing == "offload" and not extra:
                h = offloaded_checkpoint(layer, h)
            else:
                h = checkpoint(layer, h, *extra, use_reentrant=False)
        return h


# What the registry reads: (model_type "whisper", task SPEECH_SEQ2SEQ) -> this module's Args and Model.
Args = WhisperArgs
Model = Whisper


__all__ = ["Args", "DecodingCache", "Model", "SPEECH_SEQ2SEQ", "Whisper", "WhisperArgs", "WhisperOutput",
           "decoder_input_ids_from_labels", "load_whisper", "save_whisper", "seq2seq_loss", "transcribe_ids"]

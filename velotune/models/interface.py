"""The written interface of a velotune model: what the loop, the objectives, generation, LoRA, quantization,
export and sharding may rely on, implemented by our own architecture files (`base.CausalLM`, path "native") and by
the transformers wrapper (`generic.GenericCausalLM`, path "generic").

Why a base class (an `nn.Module` subclass with abstract methods) and not a `typing.Protocol` plus a mixin: the
declared attributes (`source_dir`, `max_seq_length`, `quantization`, `lora_settings`) then exist on every model from
construction, with their defaults, so nothing is ever set after the fact and probed with getattr; the methods
transformers-style loops call (`gradient_checkpointing_enable`, `num_parameters`, ...) are written once for both
paths; an incomplete subclass fails when it is built, naming what it lacks; and `isinstance(model, LanguageModel)`
is exact, where a runtime Protocol check only sees that some attributes exist. A mixin would have to run before
`nn.Module.__init__` sets up parameter registration, which is what a base class does by construction.

Packed documents are explicit: `document_ids` [batch, seq] (one id per document of a row, the row's tail padding
an id of its own) is what makes a forward attend within documents only. `position_ids` alone are plain positions.
"""
from __future__ import annotations

import logging
from abc import ABCMeta, abstractmethod
from pathlib import Path

import torch
from torch import nn

from ..errors import UnsupportedError
from .registry import CAUSAL_LM

log = logging.getLogger("velotune")

CHECKPOINTING_MODES = (False, True, "offload")


class VelotuneModel(nn.Module, metaclass=ABCMeta):
    """What every velotune model declares, whatever its family (decoder, encoder, sentence embedder): the state the
    loader, LoRA, quantization, checkpoints and the loop rely on, set at construction and never probed.

    `args` the typed config.json (`to_dict()` writes it back; `model_type` on every family); `source_dir` the
    checkpoint directory (None: not loaded from one); `max_seq_length` the context length asked for, else the
    config's; `quantization` None, "nf4" or "int8"; `lora_settings` None until `add_lora` (a `lora.LoraSettings`)."""

    task = CAUSAL_LM

    def __init__(self, args):
        super().__init__()
        self.args = args
        self.source_dir: Path | None = None
        self.max_seq_length: int | None = None
        self.quantization: str | None = None
        self.lora_settings = None

    def set_source(self, source_dir, max_seq_length: int | None = None):
        """Where the weights came from and the context length to hold requests to (the loader's one call)."""
        self.source_dir = Path(source_dir) if source_dir is not None else None
        self.max_seq_length = max_seq_length

    @property
    def model_type(self) -> str:
        return self.args.model_type

    def peft_name(self, name: str) -> str:
        """Our module name -> the name transformers' model has for it in memory, which PEFT's adapter files use.
        The same by default (a family whose module tree differs from transformers' maps it)."""
        return name

    def name_from_peft(self, name: str) -> str:
        """The inverse of `peft_name`."""
        return name

    def adapter_root(self) -> nn.Module:
        """The module LoRA adapts and whose names adapter files use: the model itself, or the backbone a
        wrapper (a sentence embedder) carries."""
        return self

    @abstractmethod
    def blocks(self) -> list[nn.Module]:
        """The repeated transformer blocks, in order (FSDP2 shards each; the KV cache holds one per decoder block)."""

    @abstractmethod
    def get_input_embeddings(self) -> nn.Module:
        """The token embedding table (transformers' name)."""

    @abstractmethod
    def set_gradient_checkpointing(self, mode: bool | str = True):
        """True: recompute each block in backward; "offload": also keep block inputs on the CPU; False: off."""

    @property
    @abstractmethod
    def is_gradient_checkpointing(self) -> bool:
        """Whether a checkpointing mode is on."""

    @abstractmethod
    def state_for_saving(self) -> dict:
        """The state dict under checkpoint names, each tied tensor once, as transformers writes it."""

    # ---- the names transformers-style loops call, for every family -------------------------------------------
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False):
        """transformers 5's name: recompute the blocks in backward. `every_n_layers` n: only blocks 0, n, 2n, ...
        (as transformers picks them; the others keep their activations), where the family's block loop supports it;
        `offload` (or `{"offload": True}`): also keep the checkpointed blocks' inputs on the CPU. Other kwargs
        (`use_reentrant`) are accepted and ignored: checkpointing here is always non-reentrant."""
        offload = offload or bool((activation_checkpointing_kwargs or {}).get("offload"))
        self.set_checkpoint_every(every_n_layers)
        self.set_gradient_checkpointing("offload" if offload else True)

    def activation_checkpointing_disable(self):
        self.set_gradient_checkpointing(False)

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.is_gradient_checkpointing

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs):
        """The name transformers 4 and most training scripts use (deprecated there in 5.x, kept here)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self):
        self.activation_checkpointing_disable()

    def set_checkpoint_every(self, every_n_layers: int):
        """Checkpoint blocks 0, n, 2n, ... only. Families whose block loop checkpoints every block take 1 only."""
        check_every_n_layers(every_n_layers)
        if every_n_layers != 1:
            raise UnsupportedError(f"activation checkpointing every_n_layers={every_n_layers}: {type(self).__name__} "
                                   "checkpoints every block or none (every_n_layers=1)")

    def enable_input_require_grads(self):
        """A no-op kept for loops written for transformers: checkpointing here is non-reentrant, which does not
        need the embeddings' output to require gradients."""

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters counted once (a tied head is the embedding), as transformers counts them: excluding
        embeddings leaves out the input embedding table only."""
        skip = {id(self.get_input_embeddings().weight)} if exclude_embeddings else set()
        seen, total = set(), 0
        for p in self.parameters():
            if id(p) in seen or id(p) in skip or (only_trainable and not p.requires_grad):
                continue
            seen.add(id(p))
            total += p.numel()
        return total


class LanguageModel(VelotuneModel):
    """A language model velotune can train, run, adapt and export (the declared state is VelotuneModel's;
    `args` here also has `vocab_size`, `tie_word_embeddings`, `bos_token_id` / `eos_token_id` / `pad_token_id`
    on both paths)."""

    path = "native"                  # "native": our architecture file; "generic": transformers' own model
    supports_logits_to_keep = False  # True: forward(logits_to_keep=n) builds the logits of the last n positions only
    final_logit_softcap = None       # a float when logits(hidden) soft-caps: the fused loss with head_weight() must too

    def __init__(self, args):
        super().__init__(args)
        self._positions_noted = False

    def note_positions_without_documents(self, position_ids: torch.Tensor):
        """Loops written for transformers' padding-free packing pass position_ids that restart at each document and
        rely on them to pack; here only `document_ids` pack. Said once per model, and checked once (the check
        reads the tensor, a synchronisation on a GPU)."""
        if self._positions_noted:
            return
        self._positions_noted = True
        if position_ids.shape[-1] > 1 and bool((position_ids[..., 1:] < position_ids[..., :-1]).any()):
            log.warning("position_ids restart within a row, but without document_ids the row is one document: "
                        "attention crosses the restarts. To pack documents, pass document_ids= (velotune's "
                        "collate gives them)")

    # ---- what every path implements --------------------------------------------------------------------------
    @abstractmethod
    def forward(self, input_ids=None, *, labels=None, position_ids=None, document_ids=None, attention_mask=None,
                cache=None, inputs_embeds=None, return_logits: bool | None = None, reduction: str = "mean",
                logits_to_keep: int = 0, output_hidden_states: bool = False):
        """A `CausalLMOutput`. With labels and gradients on, `logits` is None unless `return_logits=True`."""

    @abstractmethod
    def hidden_states(self, input_ids=None, *, position_ids=None, document_ids=None, attention_mask=None,
                      cache=None, inputs_embeds=None) -> torch.Tensor:
        """The final norm's output [batch, seq, hidden]: what the output head reads."""

    @abstractmethod
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output head on `hidden` [..., hidden] -> [..., vocab], soft-capped as the family does."""

    @abstractmethod
    def head_weight(self) -> torch.Tensor | None:
        """The output head's weight [vocab, hidden] when the head is a plain Linear (for the fused, chunked loss,
        with `final_logit_softcap`); None when it is not (LoRA on the head, a quantized head): use `logits`."""

    @abstractmethod
    def get_output_embeddings(self) -> nn.Module:
        """The output head (transformers' name): never quantized, never in "all-linear" LoRA."""


def check_checkpointing_mode(mode):
    if mode not in CHECKPOINTING_MODES:
        raise ValueError(f"gradient checkpointing must be True, False or 'offload', got {mode!r}")


def check_every_n_layers(n):
    if type(n) is not int or n < 1:
        raise ValueError(f"activation checkpointing every_n_layers must be a positive integer, got {n!r}")


# Named in the error for a module that is not a velotune model (the first three are LanguageModel's own).
_MEMBERS = ("hidden_states", "logits", "head_weight", "blocks", "set_gradient_checkpointing", "state_for_saving",
            "source_dir", "max_seq_length", "quantization", "lora_settings")
_OWN_MEMBERS = {"LanguageModel": 0, "VelotuneModel": 3}


def require_model(model, use: str, kind: type = None):
    """`model` itself when it implements the interface (`kind`: LanguageModel by default; VelotuneModel where any
    family does); else one UnsupportedError naming what it lacks."""
    kind = kind or LanguageModel
    if isinstance(model, kind):
        return model
    # Looked up only to word the error: the module is refused whatever it has.
    missing = [name for name in _MEMBERS[_OWN_MEMBERS.get(kind.__name__, 0):] if not hasattr(model, name)]
    lacks = f"it lacks {', '.join(missing)}" if missing else "it does not subclass it"
    raise UnsupportedError(f"{use}: {type(model).__name__} is not a velotune model "
                           f"(velotune.models.interface.{kind.__name__}): {lacks}. Load the model with vt.load(...), "
                           f"or subclass {kind.__name__}")


__all__ = ["LanguageModel", "VelotuneModel", "require_model", "check_checkpointing_mode", "CAUSAL_LM", "CHECKPOINTING_MODES"]

"""What the bidirectional encoder families share: the typed config base, the key-padding mask, the activations of
their feed-forward blocks, attention over split heads, and `EncoderModel`, the interface every family implements.

An encoder returns hidden states [batch, seq, hidden] (transformers' `last_hidden_state`); pooling them into one
vector per text belongs to velotune.embeddings, not here.
"""
from __future__ import annotations

import dataclasses
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ...errors import CheckpointError, UnsupportedError
from ...kernels.offload import offloaded_checkpoint
from ..field_checks import check_fields
from ..interface import VelotuneModel, check_checkpointing_mode
from ..registry import ENCODER


@dataclass
class EncoderArgs:
    """config.json fields every encoder family reads, under transformers' names. Defaults are transformers'
    defaults for a key the file leaves out; the untouched config is kept in `raw` and written back by to_dict()."""
    model_type: str = ""
    vocab_size: int = 0
    hidden_size: int = 0
    num_hidden_layers: int = 0
    num_attention_heads: int = 0
    intermediate_size: int = 0
    max_position_embeddings: int = 512
    pad_token_id: int | None = None
    raw: dict = field(default_factory=dict, repr=False)

    # Class-level lists of what validate() checks (ClassVar: not dataclass fields, so subclasses override them).
    REQUIRED: ClassVar[tuple] = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                 "intermediate_size")
    POSITIVE_INTS: ClassVar[tuple] = REQUIRED + ("max_position_embeddings",)
    PROBABILITIES: ClassVar[tuple] = ()      # dropout rates: in [0, 1)
    POSITIVE_FLOATS: ClassVar[tuple] = ()    # norm epsilons
    FLAGS: ClassVar[tuple] = ()              # booleans

    @classmethod
    def from_dict(cls, config: dict, source: str = "config.json"):
        missing = [k for k in cls.REQUIRED if k not in config]
        if missing:
            raise CheckpointError(f"{source}: missing required field(s) {', '.join(missing)}")
        names = {f.name for f in dataclasses.fields(cls)} - {"raw"}
        args = cls(**{k: v for k, v in config.items() if k in names}, raw=dict(config))
        args.validate(source)
        return args

    def validate(self, source: str):
        check_fields(self, source, positive_ints=self.POSITIVE_INTS, probabilities=self.PROBABILITIES,
                     positive_floats=self.POSITIVE_FLOATS, flags=self.FLAGS)
        if self.hidden_size % self.num_attention_heads:
            raise CheckpointError(f"{source}: hidden_size ({self.hidden_size}) is not a multiple of "
                                  f"num_attention_heads ({self.num_attention_heads})")
        check_fields(self, source, token_ids=("pad_token_id",))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        """config.json as read: keys this file does not use included, untouched."""
        return dict(self.raw)


# config.json activation name -> the function. transformers' "gelu" is the exact (erf) form; "gelu_new" and
# "gelu_fast" write the tanh approximation out by hand, the same function up to rounding.
_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def activation(name, source: str, field_name: str):
    if name not in _ACTIVATIONS:
        raise UnsupportedError(f"{source}: {field_name} '{name}' is not supported by velotune's encoders; "
                               f"supported: {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def key_padding_mask(attention_mask: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor | None:
    """attention_mask [batch, seq] (1 real, 0 padding; any side) -> boolean [batch, 1, 1, seq] (True: attend),
    broadcast over heads and queries; None when there is none. Padded queries still attend to the real keys, as in
    transformers, so their (unused) outputs match too."""
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(f"attention_mask has shape {list(attention_mask.shape)} but input_ids has {list(shape)}")
    return attention_mask.bool()[:, None, None, :]


def attend(q, k, v, mask, dropout_p: float, output_shape) -> torch.Tensor:
    """Scaled dot-product attention of [batch, seq, heads, head_dim] projections; returns [batch, seq, hidden].
    Dropout on the attention probabilities draws from torch's RNG, so a restored RNG state (gradient
    checkpointing, GradCache's second pass) gives the same masks."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, dropout_p=dropout_p)
    return out.transpose(1, 2).reshape(output_shape)


class EncoderModel(VelotuneModel):
    """A bidirectional encoder with Hugging Face parameter names (the base model's, no task prefix, no head).

    Subclasses build their modules, implement `forward`, `blocks`, `get_input_embeddings` and `max_positions`,
    and call `run_blocks` so that gradient checkpointing works the same for every family."""

    task = ENCODER
    hf_architecture = ""               # the transformers class whose checkpoints these are ("BertModel", ...)
    checkpoint_prefixes: tuple = ()    # prefixes the task models' checkpoints put before our names ("bert.")

    def __init__(self, args):
        super().__init__(args)
        self.checkpointing: bool | str = False

    @abstractmethod
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [batch, seq, hidden]: transformers' last_hidden_state for the same inputs."""

    @property
    @abstractmethod
    def max_positions(self) -> int:
        """The longest input the position table holds (the default max_seq_length)."""

    @property
    def hidden_size(self) -> int:
        return self.args.hidden_size

    def set_gradient_checkpointing(self, mode: bool | str = True):
        check_checkpointing_mode(mode)
        self.checkpointing = mode

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(self.checkpointing)

    def state_for_saving(self) -> dict:
        """Parameters under their checkpoint names (no buffer is persistent: position ids and RoPE tables are
        rebuilt from the config, as transformers does)."""
        return dict(self.state_dict())

    def check_length(self, seq_len: int):
        if seq_len > self.max_positions:
            raise ValueError(f"input of {seq_len} tokens is longer than the {self.max_positions} positions of this "
                             f"{self.model_type} model: truncate it (max_seq_length)")

    def run_blocks(self, h: torch.Tensor, *extra) -> torch.Tensor:
        """Each block in turn, `block(h, *extra)`; recomputed in backward when checkpointing is on. Both kinds
        of recomputation restore torch's RNG state, so dropout draws the same masks twice."""
        recompute = self.checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks():
            if not recompute:
                h = block(h, *extra)
            elif self.checkpointing == "offload":
                h = offloaded_checkpoint(lambda x, block=block: block(x, *extra), h)
            else:
                h = checkpoint(block, h, *extra, use_reentrant=False)
        return h


__all__ = ["EncoderArgs", "EncoderModel", "activation", "attend", "key_padding_mask"]

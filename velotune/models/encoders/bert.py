"""BERT (and MiniLM, which is a BERT checkpoint): post-norm blocks, learned absolute positions, token types.

Module names are transformers' BertModel's (`embeddings.word_embeddings`, `encoder.layer.N.attention.self.query`,
...), so a checkpoint's tensors load by name. The pooler (`pooler.dense`) is not built: embedding models pool the
hidden states themselves (sentence-transformers never reads it), and the loader skips it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...errors import UnsupportedError
from .base import EncoderArgs, EncoderModel, activation, attend, key_padding_mask
from .unpadded import TokenLayout, has_padding


@dataclass
class Args(EncoderArgs):
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    position_embedding_type: str = "absolute"
    is_decoder: bool = False
    add_cross_attention: bool = False

    POSITIVE_INTS = EncoderArgs.POSITIVE_INTS + ("type_vocab_size",)
    PROBABILITIES = ("hidden_dropout_prob", "attention_probs_dropout_prob")
    POSITIVE_FLOATS = ("layer_norm_eps",)
    FLAGS = ("is_decoder", "add_cross_attention")

    def validate(self, source: str):
        super().validate(source)
        activation(self.hidden_act, source, "hidden_act")
        # transformers 5 dropped relative position embeddings and would silently compute absolute ones.
        if self.position_embedding_type != "absolute":
            raise UnsupportedError(f"{source}: position_embedding_type '{self.position_embedding_type}' is not "
                                   "supported; velotune's encoders read 'absolute' position embeddings only")
        if self.is_decoder or self.add_cross_attention:
            raise UnsupportedError(f"{source}: is_decoder / add_cross_attention make this {self.model_type} a "
                                   "causal decoder; velotune's encoders are bidirectional only")


class Embeddings(nn.Module):
    """word + token type + position embeddings, LayerNorm, dropout."""

    def __init__(self, args: Args):
        super().__init__()
        self.word_embeddings = nn.Embedding(args.vocab_size, args.hidden_size, padding_idx=args.pad_token_id)
        self.position_embeddings = self.make_position_embeddings(args)
        self.token_type_embeddings = nn.Embedding(args.type_vocab_size, args.hidden_size)
        self.LayerNorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.dropout = nn.Dropout(args.hidden_dropout_prob)

    @staticmethod
    def make_position_embeddings(args):
        return nn.Embedding(args.max_position_embeddings, args.hidden_size)

    def position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """0..T-1 on every row, whatever the padding (transformers' BertModel does not shift left-padded rows)."""
        return torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]

    def forward(self, input_ids, token_type_ids=None):
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        h = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        h = h + self.position_embeddings(self.position_ids(input_ids))
        return self.dropout(self.LayerNorm(h))


class SelfAttention(nn.Module):
    def __init__(self, args: Args):
        super().__init__()
        self.heads, self.head_dim = args.num_attention_heads, args.head_dim
        self.query = nn.Linear(args.hidden_size, args.hidden_size)
        self.key = nn.Linear(args.hidden_size, args.hidden_size)
        self.value = nn.Linear(args.hidden_size, args.hidden_size)
        # Holds the rate only: the attention call applies it to the probabilities (as transformers' module does).
        self.dropout = nn.Dropout(args.attention_probs_dropout_prob)

    def forward(self, x, mask):
        """`x` [batch, seq, hidden] with a key mask (or None), or the real tokens [tokens, hidden] with their
        TokenLayout (attention by groups of rows of similar length)."""
        p = self.dropout.p if self.training else 0.0
        if isinstance(mask, TokenLayout):
            split = (x.shape[0], self.heads, self.head_dim)
            q, k, v = (proj(x).view(split) for proj in (self.query, self.key, self.value))
            return mask.attend(q, k, v, p).reshape(x.shape)
        split = (*x.shape[:2], self.heads, self.head_dim)
        q, k, v = self.query(x).view(split), self.key(x).view(split), self.value(x).view(split)
        return attend(q, k, v, mask, p, x.shape)


class ResidualOutput(nn.Module):
    """LayerNorm(dropout(dense(x)) + residual): BertSelfOutput and BertOutput, which differ in width only."""

    def __init__(self, args: Args, width_in: int):
        super().__init__()
        self.dense = nn.Linear(width_in, args.hidden_size)
        self.LayerNorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.dropout = nn.Dropout(args.hidden_dropout_prob)

    def forward(self, x, residual):
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    def __init__(self, args: Args):
        super().__init__()
        self.self = SelfAttention(args)
        self.output = ResidualOutput(args, args.hidden_size)

    def forward(self, x, mask):
        return self.output(self.self(x, mask), x)


class Intermediate(nn.Module):
    def __init__(self, args: Args):
        super().__init__()
        self.dense = nn.Linear(args.hidden_size, args.intermediate_size)
        self.act = activation(args.hidden_act, "config.json", "hidden_act")

    def forward(self, x):
        return self.act(self.dense(x))


class Layer(nn.Module):
    """Post-norm block: attention then feed-forward, each added to its input and LayerNormed."""

    def __init__(self, args: Args):
        super().__init__()
        self.attention = Attention(args)
        self.intermediate = Intermediate(args)
        self.output = ResidualOutput(args, args.intermediate_size)

    def forward(self, x, mask):
        h = self.attention(x, mask)
        return self.output(self.intermediate(h), h)


class Encoder(nn.Module):
    def __init__(self, args: Args):
        super().__init__()
        self.layer = nn.ModuleList(Layer(args) for _ in range(args.num_hidden_layers))


class Model(EncoderModel):
    """transformers' BertModel without its pooler."""

    Args = Args
    hf_architecture = "BertModel"
    checkpoint_prefixes = ("bert.",)
    embeddings_class = Embeddings

    def __init__(self, args: Args):
        super().__init__(args)
        self.embeddings = self.embeddings_class(args)
        self.encoder = Encoder(args)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        """Hidden states [batch, seq, hidden]. With padding, the blocks run on the real tokens only (unpadded.py):
        padding positions come out as zeros, real ones as transformers computes them."""
        self.check_length(input_ids.shape[1])
        key_padding_mask(attention_mask, input_ids.shape)  # refuses a mask whose shape is not the input's
        h = self.embeddings(input_ids, token_type_ids)
        if not has_padding(attention_mask):
            return self.run_blocks(h, None)
        layout = TokenLayout(attention_mask)
        return layout.pad(self.run_blocks(layout.gather(h), layout))

    @property
    def max_positions(self) -> int:
        return self.args.max_position_embeddings

    def blocks(self) -> list[nn.Module]:
        return list(self.encoder.layer)

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.word_embeddings

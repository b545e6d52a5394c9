"""What every architecture shares: the output type, the pre-norm decoder block, the backbone and the
causal-LM head with its loss. An architecture file picks the pieces and the family's constants."""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data.encode import IGNORE_INDEX
from ..kernels import linear_cross_entropy
from ..kernels.shape_buckets import bucket_length
from ..kernels.offload import offloaded_checkpoint
from .attention import Attention, AttentionMask, check_document_ids, document_positions
from .interface import LanguageModel, check_checkpointing_mode, check_every_n_layers
from .mlp import GatedMLP
from .norms import RMSNorm
from .rope import RotaryEmbedding


def is_sharded_root(module: nn.Module) -> bool:
    """Whether FSDP2's fully_shard was applied to `module` (only possible once torch.distributed.fsdp is loaded)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    sharded = getattr(fsdp, "FSDPModule", None)
    return sharded is not None and isinstance(module, sharded)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None = None      # [batch, seq, vocab]
    loss: torch.Tensor | None = None        # as asked by `reduction`: mean or sum over target tokens, or
                                            # per position [B, T] ("none")
    num_tokens: torch.Tensor | None = None  # number of target (non-ignored) tokens
    hidden_states: torch.Tensor | None = None


class PreNormBlock(nn.Module):
    """x + attn(norm(x)), then h + mlp(norm(h)): Llama, Mistral, Qwen, Gemma, Phi-3."""

    def __init__(self, args, layer_idx: int, *, attn_kwargs=None, mlp_fused=False, mlp_bias=None, act=None,
                 norm_offset=0.0):
        super().__init__()
        self.self_attn = Attention(args, layer_idx, norm_offset=norm_offset, **(attn_kwargs or {}))
        self.mlp = GatedMLP(args.hidden_size, args.intermediate_size, act or args.hidden_act,
                            bias=args.mlp_bias if mlp_bias is None else mlp_bias, fused=mlp_fused)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, norm_offset)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, norm_offset)

    def forward(self, x, rope, mask, cache=None):
        h = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward_rows(self, x, rows, rope, mask):
        """The block's output at positions `rows` [B, K] only (see Attention.forward_rows)."""
        picked = x.gather(1, rows[..., None].expand(*rows.shape, x.shape[-1]))
        h = picked + self.self_attn.forward_rows(self.input_layernorm(x), rows, rope, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    """`model.*` in the checkpoints: embeddings, blocks, final norm."""

    def __init__(self, args, make_block, norm_offset: float = 0.0):
        super().__init__()
        # As transformers: the pad token's embedding row gets no gradient.
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size, padding_idx=padding_idx(args))
        self.layers = nn.ModuleList(make_block(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, norm_offset)
        self.rotary_emb = RotaryEmbedding(args.head_dim, args.rope_theta, args.rope_scaling,
                                          args.partial_rotary_factor, args.max_position_embeddings)
        self.gradient_checkpointing = False  # False, True, or "offload" (block inputs kept on the CPU)
        self.checkpoint_every = 1            # checkpoint blocks 0, n, 2n, ... (transformers' every_n_layers)

    def forward(self, h, rope, mask, cache=None, rows=None):
        """`rows` [B, K]: the last block computes those positions only (the output is [B, K, hidden])."""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            run = layer if rows is None or i < last else (lambda x, *_, layer=layer: layer.forward_rows(x, rows, rope,
                                                                                                         mask))
            if (self.gradient_checkpointing and self.training and torch.is_grad_enabled()
                    and i % self.checkpoint_every == 0):
                if self.gradient_checkpointing == "offload":
                    h = offloaded_checkpoint(lambda x, run=run: run(x, rope, mask, cache), h)
                else:
                    h = checkpoint(run, h, rope, mask, cache, use_reentrant=False)
            else:
                h = run(h, rope, mask, cache)
        return self.norm(h)


class CausalLM(LanguageModel):
    """Decoder-only language model with a Hugging Face compatible state dict (the interface's native path).

    Subclasses set `Args`, `make_block`, and the family constants below.
    """

    Args = None
    norm_offset = 0.0            # 1.0 for Gemma's (1 + weight) norms
    scale_embeddings = False     # Gemma multiplies embeddings by sqrt(hidden_size)
    supports_logits_to_keep = True

    _forward_depth = 0  # > 0 while the model's own forward runs (see hidden_states)

    def __init__(self, args):
        super().__init__(args)
        self.model = Backbone(args, self.make_block, self.norm_offset)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.tie_weights()

    @staticmethod
    def make_block(args, layer_idx):
        return PreNormBlock(args, layer_idx)

    # ---- checkpoint layouts: the stored names and shapes are ours unless a family says otherwise ----------------
    @classmethod
    def checkpoint_shapes(cls, args, shapes: dict, config_path) -> dict:
        """The header shapes (name -> (shape, file)) under our names, checked; the same by default."""
        return shapes

    @classmethod
    def checkpoint_tensors(cls, name: str, tensor):
        """(our name, tensor) pairs for one stored tensor (a fused one may give several); itself by default."""
        yield name, tensor

    def tie_weights(self):
        self.lm_head.weight = self.model.embed_tokens.weight

    def blocks(self) -> list[nn.Module]:
        return list(self.model.layers)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def head_weight(self):
        return self.lm_head.weight if type(self.lm_head) is nn.Linear else None

    def set_gradient_checkpointing(self, mode: bool | str = True):
        check_checkpointing_mode(mode)
        self.model.gradient_checkpointing = mode

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(self.model.gradient_checkpointing)

    def set_checkpoint_every(self, every_n_layers: int):
        check_every_n_layers(every_n_layers)
        self.model.checkpoint_every = every_n_layers

    def state_for_saving(self) -> dict:
        """A tied lm_head is left out, as Hugging Face does."""
        state = dict(self.state_dict())
        if self.args.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        return state

    # ---- forward -------------------------------------------------------------------------------
    def embed(self, input_ids):
        h = self.model.embed_tokens(input_ids)
        if self.scale_embeddings:
            h = h * torch.tensor(self.args.hidden_size ** 0.5, dtype=h.dtype)
        return h

    def hidden_states(self, input_ids=None, *, position_ids=None, document_ids=None, attention_mask=None,
                      cache=None, inputs_embeds=None, rows=None):
        """Packed rows need `document_ids`; their positions then default to restarting at each document. `rows`
        [B, K] (no cache): the final states of those positions only, [B, K, hidden].
        On a model sharded by FSDP2 (train.distributed=fsdp2), a call from outside the model's own forward (a custom
        objective's) goes through that forward: FSDP2 gathers the root's parameters (embedding, final norm, head)
        and registers their gradients' reduction in the hooks of the model's call, so a direct call would read
        shards. The head stays gathered after it until backward, so `head_weight()` / `logits()` may follow."""
        inputs = dict(position_ids=position_ids, document_ids=document_ids, attention_mask=attention_mask,
                      cache=cache, inputs_embeds=inputs_embeds, rows=rows)
        if self._forward_depth == 0 and is_sharded_root(self):
            return self(input_ids, _hidden_states=inputs)
        return self._hidden_states(input_ids, **inputs)

    def _hidden_states(self, input_ids=None, *, position_ids=None, document_ids=None, attention_mask=None,
                       cache=None, inputs_embeds=None, rows=None):
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = h.shape[:2]
        past = cache.past_length if cache is not None else 0
        if document_ids is not None:
            check_document_ids(document_ids, (B, T), cache)
        elif position_ids is not None and cache is None and attention_mask is None:
            self.note_positions_without_documents(position_ids)
        if position_ids is None:
            position_ids = (document_positions(document_ids) if document_ids is not None
                            else default_positions(attention_mask, past, T, h.device, B))
        mask = AttentionMask(T, past + T, h.device, doc_ids=document_ids,
                             key_padding=_padding_that_matters(attention_mask, cache, T))
        rope = self.model.rotary_emb(position_ids, h.dtype)
        return self.model(h, rope, mask, cache, rows)

    def forward(self, input_ids=None, *, labels=None, position_ids=None, document_ids=None, attention_mask=None,
                cache=None, inputs_embeds=None, return_logits: bool | None = None, reduction: str = "mean",
                logits_to_keep: int = 0, output_hidden_states: bool = False,
                _hidden_states: dict | None = None) -> CausalLMOutput:
        """`model(input_ids=ids, labels=ids)` as in transformers. With labels and gradients on, the loss is the
        fused chunked one and `out.logits` is None (the [batch, seq, vocab] logits are never built) unless
        `return_logits=True` asks for them; without labels, or under no_grad, logits are returned. Packed rows:
        `document_ids` (position_ids alone are plain positions, one document per row)."""
        if _hidden_states is not None:  # hidden_states() on an FSDP2-sharded model, routed through this call
            return self._hidden_states(input_ids, **_hidden_states)
        self._forward_depth += 1
        try:
            return self._forward(input_ids, labels=labels, position_ids=position_ids, document_ids=document_ids,
                                 attention_mask=attention_mask, cache=cache, inputs_embeds=inputs_embeds,
                                 return_logits=return_logits, reduction=reduction, logits_to_keep=logits_to_keep,
                                 output_hidden_states=output_hidden_states)
        finally:
            self._forward_depth -= 1

    def _forward(self, input_ids, *, labels, position_ids, document_ids, attention_mask, cache, inputs_embeds,
                 return_logits, reduction, logits_to_keep, output_hidden_states) -> CausalLMOutput:
        if return_logits is None:
            return_logits = labels is None or not torch.is_grad_enabled()
        if labels is not None and not return_logits and cache is None and not output_hidden_states \
                and type(self.model.layers[-1]) is PreNormBlock:
            return self._target_rows_forward(input_ids, labels, reduction, position_ids=position_ids,
                                             document_ids=document_ids, attention_mask=attention_mask,
                                             inputs_embeds=inputs_embeds)
        hidden = self.hidden_states(input_ids, position_ids=position_ids, document_ids=document_ids,
                                    attention_mask=attention_mask, cache=cache, inputs_embeds=inputs_embeds)
        out = CausalLMOutput(hidden_states=hidden if output_hidden_states else None)
        if return_logits or labels is None:
            # Generation needs only the last position's logits: skip the [T, vocab] product for the prompt.
            out.logits = self.logits(hidden[:, -logits_to_keep:] if logits_to_keep and labels is None else hidden)
        if labels is not None:
            out.loss, out.num_tokens = next_token_loss(labels, reduction, logits=out.logits, hidden=hidden,
                                                       weight=self.head_weight(), softcap=self.final_logit_softcap,
                                                       logits_fn=self.logits)
        return out

    def _target_rows_forward(self, input_ids, labels, reduction, **inputs) -> CausalLMOutput:
        """The loss with the last block run only where a position has a target (position t predicts labels[t+1]):
        no other output of that block is read, so the loss and every gradient are the full forward's, at the cost
        of the last block for the trained tokens alone (an SFT batch trains its answers, not its prompts)."""
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        keep = targets != IGNORE_INDEX
        most = int(keep.sum(dim=1).max()) if keep.numel() else 0
        # Kept positions first, in order; then other positions, as padding of the rows with fewer (never a kept
        # position twice, so their losses scatter back without collisions). The width is bucketed: a new shape per
        # batch would make oneDNN build (and keep) kernels for each on the CPU in half precision.
        width = min(targets.shape[1], bucket_length(max(most, 1)))
        rows = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]
        hidden = self.hidden_states(input_ids, rows=rows, **inputs)
        row_targets = targets.gather(1, rows)
        out = CausalLMOutput()
        loss, out.num_tokens = position_loss(row_targets, reduction, hidden=hidden, weight=self.head_weight(),
                                             softcap=self.final_logit_softcap, logits_fn=self.logits)
        if reduction == "none":
            loss = loss.new_zeros(targets.shape).scatter(1, rows, loss)
        out.loss = loss
        return out

    def logits(self, hidden):
        logits = self.lm_head(hidden)
        if self.final_logit_softcap:
            logits = torch.tanh(logits / self.final_logit_softcap) * self.final_logit_softcap
        return logits


def next_token_loss(labels, reduction="mean", *, logits=None, hidden=None, weight=None, softcap=None,
                    logits_fn=None):
    """Cross-entropy of position t against labels[t+1]; returns (loss, number of target tokens).

    From `logits` [B, T, V] when given; else from `hidden` [B, T, H] with the head `weight` (fused, never
    building the full logits), or with `logits_fn` for a head that is not a plain Linear (LoRA, quantized).
    reduction "mean" / "sum" over the target tokens, or "none": the loss of each position [B, T] (0 where there
    is no target), for objectives that weigh sequences (preference and RL training sum it per row).
    """
    # Position t predicts token t+1: shift the labels, not the (large) hidden states or logits.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return position_loss(targets, reduction, logits=logits, hidden=hidden, weight=weight, softcap=softcap,
                         logits_fn=logits_fn)


def position_loss(targets, reduction="mean", *, logits=None, hidden=None, weight=None, softcap=None,
                  logits_fn=None):
    """Cross-entropy of position t against targets[t] (-100: no target), as next_token_loss describes; an
    encoder-decoder's labels are already aligned with its decoder positions and come here unshifted."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    shape, targets = targets.shape, targets.reshape(-1)
    keep = targets != IGNORE_INDEX
    num_tokens = keep.sum()
    per_row = "none" if reduction == "none" else "sum"
    if logits is not None:  # ignore_index, not a boolean index: indexing would copy the whole logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets, ignore_index=IGNORE_INDEX,
                               reduction=per_row)
        if reduction == "none":
            return loss.view(shape), num_tokens
        return _reduced(loss, num_tokens, reduction), num_tokens
    # Only the rows with a target go through the head (hidden rows, not logits, are what gets gathered).
    rows = hidden.reshape(-1, hidden.shape[-1])[keep]
    if weight is not None:
        loss = linear_cross_entropy(rows, weight, targets[keep], softcap=softcap, reduction=per_row)
    else:
        loss = F.cross_entropy(logits_fn(rows).float(), targets[keep], reduction=per_row)
    if reduction == "none":
        full = loss.new_zeros(targets.shape[0]).index_put((keep.nonzero().squeeze(1),), loss)
        return full.view(shape), num_tokens
    return _reduced(loss, num_tokens, reduction), num_tokens


def _reduced(loss_sum, num_tokens, reduction):
    return loss_sum / num_tokens.clamp(min=1) if reduction == "mean" else loss_sum


def next_token_logprobs(hidden, labels, weight, *, softcap=None):
    """Log-probabilities of the labels without building logits, for objectives that weigh sequences (preference
    and RL training): hidden [B, T, H] (the final norm's output), labels [B, T] (-100: no target), the head
    `weight` [V, H]. Position t predicts labels[t+1]. Returns (per-token log-probs [B, T], 0 where there is no
    target; their sum per sequence [B]; the number of targets per sequence [B]): `next_token_loss` per token,
    negated."""
    per_token = -next_token_loss(labels, "none", hidden=hidden, weight=weight, softcap=softcap)[0]
    return per_token, per_token.sum(dim=1), (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)


def padding_idx(args):
    """config.json's pad_token_id when it is a valid row of the embedding, else None."""
    pad = args.pad_token_id
    return pad if isinstance(pad, int) and not isinstance(pad, bool) and 0 <= pad < args.vocab_size else None


def _padding_that_matters(attention_mask, cache, T):
    """The key-padding mask attention must apply, or None. Right padding without a cache (training batches, scoring)
    needs none: causality already keeps every real token from the padding after it, and the padded positions'
    outputs carry no target. Dropping it lets attention take its plain causal kernel (~13% of a 56M model's
    training step on the CPU; flash kernels on GPUs take no mask at all)."""
    if attention_mask is None:
        return None
    if cache is None and T > 1 and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
        return None
    return attention_mask.bool()


def default_positions(attention_mask, past, T, device, batch):
    """Positions of a forward without position_ids: counting on from the cache, or from each row's first real
    token when an attention_mask marks left padding."""
    if attention_mask is not None:
        # Left-padded rows: real tokens count from 0, whatever padding precedes them.
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return positions[:, -T:]
    return torch.arange(past, past + T, device=device).unsqueeze(0).expand(batch, T)

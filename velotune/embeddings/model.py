"""`SentenceEncoder`: a backbone (a bidirectional encoder, or a decoder read through its hidden states) plus pooling
and optional L2 normalisation: one embedding per text, as a sentence-transformers directory describes it.

The backbone keeps its own parameter names (`backbone.` is only the attribute here): LoRA goes into the backbone
(`adapter_root`), so an adapter file names the base model's modules as PEFT and sentence-transformers expect, and a
saved directory's weights are the backbone's, under Hugging Face names.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.interface import LanguageModel, VelotuneModel
from .pooling import Pooling

EMBEDDING = "sentence-embedding"


@dataclass
class EmbedderSettings:
    """What a sentence-transformers directory says beside the weights."""
    pooling: Pooling = field(default_factory=Pooling)
    normalize: bool = False
    max_seq_length: int | None = None
    do_lower_case: bool = False
    prompts: dict = field(default_factory=dict)      # name -> prefix, e.g. {"query": "query: "}
    default_prompt_name: str | None = None
    similarity_fn_name: str | None = None             # "cosine" (None means cosine too), "dot", ...


class SentenceEncoder(VelotuneModel):
    task = EMBEDDING

    def __init__(self, backbone: VelotuneModel, settings: EmbedderSettings | None = None):
        super().__init__(backbone.args)
        self.backbone = backbone
        self.settings = settings or EmbedderSettings()
        self.set_source(backbone.source_dir, self.settings.max_seq_length or backbone.max_seq_length)

    # LoRA, quantization and the source live on the backbone: one record, wherever it is read.
    @property
    def lora_settings(self):
        return self.backbone.lora_settings if "backbone" in self._modules else None

    @lora_settings.setter
    def lora_settings(self, value):
        if "backbone" in self._modules:
            self.backbone.lora_settings = value

    def adapter_root(self) -> nn.Module:
        return self.backbone

    @property
    def is_decoder(self) -> bool:
        return isinstance(self.backbone, LanguageModel)

    @property
    def hidden_size(self) -> int:
        return self.get_input_embeddings().weight.shape[-1]

    @property
    def dimension(self) -> int:
        """The length of one embedding."""
        return self.settings.pooling.output_dimension(self.hidden_size)

    # ---- the forward ----------------------------------------------------------------------------------------
    def token_states(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """The backbone's last hidden states [batch, seq, hidden]."""
        if self.is_decoder:
            return self.backbone.hidden_states(input_ids, attention_mask=attention_mask)
        return self.backbone(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, prompt_length: int = 0) -> torch.Tensor:
        """Embeddings [batch, dimension] of a tokenized batch (attention_mask 1 = real token)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        states = self.token_states(input_ids, attention_mask, token_type_ids)
        pooled = self.settings.pooling(states, attention_mask, prompt_length)
        if self.settings.normalize:
            pooled = nn.functional.normalize(pooled.float(), p=2, dim=-1).to(pooled.dtype)
        return pooled

    # ---- texts in, vectors out --------------------------------------------------------------------------------
    def tokenize(self, tokenizer, texts: list[str], prompt: str = "") -> dict:
        """Tokenized texts as sentence-transformers tokenizes them (prefix, lower case, truncation)."""
        if self.settings.do_lower_case:
            texts = [t.lower() for t in texts]
        texts = [prompt + t for t in texts]
        return tokenizer(texts, padding=True, truncation=True, max_length=self.max_seq_length,
                         return_tensors="pt")

    def token_lengths(self, tokenizer, texts: list[str], prompt: str = "", chunk: int = 1024) -> list[int]:
        """Tokens each text takes before truncation, counted as `tokenize` makes them (prefix, lower case, special
        tokens): a count over max_seq_length means the text is truncated."""
        lengths = []
        for start in range(0, len(texts), chunk):
            part = texts[start: start + chunk]
            if self.settings.do_lower_case:
                part = [t.lower() for t in part]
            # verbose=False: no "longer than the maximum" warning; this count is how those are found.
            ids = tokenizer([prompt + t for t in part], add_special_tokens=True, truncation=False,
                            verbose=False)["input_ids"]
            lengths.extend(len(i) for i in ids)
        return lengths

    @torch.no_grad()
    def encode(self, tokenizer, texts, *, batch_size: int = 32, prompt: str | None = None,
               prompt_name: str | None = None, progress=None) -> torch.Tensor:
        """Embeddings [len(texts), dimension] (fp32, on the CPU) of `texts`, in their order. The texts run longest
        first in batches of `batch_size` (less padding); `progress(done, total)` is called after each batch."""
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        prefix = self.prompt_text(prompt, prompt_name)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        device = next(self.parameters()).device
        out = torch.empty(len(texts), self.dimension)
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(order), batch_size):
                chosen = order[start: start + batch_size]
                batch = self.tokenize(tokenizer, [texts[i] for i in chosen], prefix)
                batch = {k: v.to(device) for k, v in batch.items()}
                vectors = self(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                               prompt_length=self.prompt_length(tokenizer, prefix))
                out[torch.tensor(chosen)] = vectors.float().cpu()
                if progress is not None:
                    progress(min(start + batch_size, len(order)), len(order))
        finally:
            self.train(was_training)
        return out[0] if single else out

    def prompt_text(self, prompt: str | None = None, prompt_name: str | None = None) -> str:
        """The prefix to put before each text: `prompt` itself, a named prompt, else the default prompt."""
        if prompt is not None:
            return prompt
        name = prompt_name or self.settings.default_prompt_name
        if name is None:
            return ""
        if name not in self.settings.prompts:
            from ..errors import ConfigError
            known = ", ".join(sorted(self.settings.prompts)) or "none"
            raise ConfigError(f"prompt name {name!r} is not one of the model's prompts ({known})")
        return self.settings.prompts[name]

    def prompt_length(self, tokenizer, prefix: str) -> int:
        """Tokens a prefix takes (with the tokenizer's leading special tokens), for pooling without the prompt."""
        if not prefix or self.settings.pooling.include_prompt:
            return 0
        return len(tokenizer(prefix, add_special_tokens=True)["input_ids"]) - _trailing_specials(tokenizer)

    # ---- the declared interface, through the backbone ---------------------------------------------------------
    def blocks(self) -> list[nn.Module]:
        return self.backbone.blocks()

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def set_gradient_checkpointing(self, mode=True):
        self.backbone.set_gradient_checkpointing(mode)

    def set_checkpoint_every(self, every_n_layers: int):
        self.backbone.set_checkpoint_every(every_n_layers)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.backbone.is_gradient_checkpointing

    def state_for_saving(self) -> dict:
        return self.backbone.state_for_saving()


def _trailing_specials(tokenizer) -> int:
    """Special tokens a tokenizer appends after a text ([SEP], </s>): not part of a prompt's length."""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    if not plain or plain[0] not in ids:
        return 0
    return len(ids) - ids.index(plain[0]) - len(plain)

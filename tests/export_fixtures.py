"""Shared by the export tests: a shrunk checkpoint of one architecture case with a real tokenizer and chat
template, loaded by velotune with LoRA adapters whose B is random (so the merge changes every target weight)."""
from __future__ import annotations

import json

import torch

from hf_reference import BASE, SHRUNK, make_checkpoint
from tiny_tokenizer import make_tokenizer

EXTRA_ROWS = 3  # embedding rows past the tokenizer's last id, as in padded vocabularies (Phi-3, Gemma)

# Cases with something llama.cpp's architecture cannot hold: case -> (the one change that fits it, the message
# the GGUF export refuses the original with). Gemma untied: llama.cpp's Gemma always ties its output head;
# Qwen 3 with attention_bias: llama.cpp's Qwen 3 reads no o_proj bias; Qwen 2 and Phi-3 with heads * head_dim
# other than hidden_size: llama.cpp sizes their attention by hidden_size.
LLAMA_CPP_FIT = {"qwen3_window": (dict(attention_bias=False), "o_proj.bias"),
                 "qwen2_tied": (dict(head_dim=BASE["hidden_size"] // BASE["num_attention_heads"]), "head_dim 24"),
                 "phi3_tied": (dict(head_dim=BASE["hidden_size"] // BASE["num_attention_heads"]), "head_dim 24"),
                 **{case: (dict(tie_word_embeddings=True), "own lm_head") for case in SHRUNK
                    if case.startswith("gemma") and not {**BASE, **SHRUNK[case]}["tie_word_embeddings"]}}


def make_tokenized_checkpoint(tmp_path, case: str, tokenizer=None, chat_template=None, **overrides):
    """(model dir, tokenizer): the tokenizer (default: byte-level BPE with a ChatML template) saved beside the
    weights; the config's special ids agree with it."""
    from velotune.data.templates import CHATML
    tok = tokenizer or make_tokenizer(chat_template=chat_template or CHATML)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    path, _ = make_checkpoint(tmp_path, case, vocab_size=len(tok) + EXTRA_ROWS, **{**ids, **overrides})
    tok.save_pretrained(str(path))
    return path, tok


def load_with_lora(path, seed: int = 0, quantize=None, **lora):
    import velotune as vt
    model, tok = vt.load(path, dtype="float32", device="cpu", quantize=quantize)
    vt.add_lora(model, **{"r": 4, "alpha": 8, "seed": seed, **lora})
    randomize_lora_b(model, seed)
    return model, tok


@torch.no_grad()
def randomize_lora_b(model, seed: int = 0, std: float = 0.05):
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def input_ids(vocab: int, length: int = 19, batch: int = 2, seed: int = 7):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model, before: dict) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def make_spm_tokenizer(byte_tokens: bool = True):
    """A SentencePiece-style tokenizer as Llama 2's tokenizer.json lays it out: <unk> <s> </s>, the 256 byte
    tokens <0x00>..<0xFF>, then BPE pieces over "▁"-joined words, with byte fallback; trained in-process."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tiny_tokenizer import DEFAULT_TEXTS
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer_tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    trainer_tok.train_from_iterator(DEFAULT_TEXTS * 4, trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    pieces = [t for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]) if t not in ("<unk>", "<s>", "</s>")]
    specials = ["<unk>", "<s>", "</s>"] + ([f"<0x{b:02X}>" for b in range(256)] if byte_tokens else [])
    vocab = {t: i for i, t in enumerate(specials + pieces)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = trainer_tok.normalizer
    tok.pre_tokenizer = trainer_tok.pre_tokenizer
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    from tokenizers import processors
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    wrapped.add_special_tokens({"additional_special_tokens": []})
    return wrapped

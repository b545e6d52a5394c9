"""A real byte-level BPE tokenizer trained in-process (milliseconds), wrapped as a `transformers` fast tokenizer.

Shared test helper: no download. It knows the special tokens of every built-in chat template, so any of them
renders to single-token turn markers; BOS is added by the tokenizer itself (like Llama), EOS and PAD are set.
"""
from __future__ import annotations

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
# Turn markers of the built-in chat templates (velotune/data/templates.py).
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
               "<start_of_turn>", "<end_of_turn>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
               "[INST]", "[/INST]"]

DEFAULT_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Write a haiku about the sea. Waves fold into foam, salt wind carries gull voices, the tide keeps its time.",
    "Translate to German: good morning. Guten Morgen.",
    "You are a helpful assistant. Answer briefly and correctly.",
    "system user assistant model instruction input response",
    "### Instruction:\n### Input:\n### Response:\nBelow is an instruction that describes a task.",
    "1 + 1 = 2, 2 * 3 = 6, 10 / 4 = 2.5; numbers 0123456789.",
]


def make_tokenizer(texts=None, chat_template=None, vocab_size: int = 384, add_bos: bool = True,
                   bos: str | None = BOS, chat_tokens: bool = True):
    """A PreTrainedTokenizerFast with bos/eos/pad set.

    bos=None: a tokenizer without BOS (like Qwen's); add_bos=False: it has one but does not add it;
    chat_tokens=False: the turn markers are not special tokens (a base model's tokenizer).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [t for t in (bos, EOS, PAD) if t] + (CHAT_TOKENS if chat_tokens else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts or DEFAULT_TEXTS) * 4, trainer=trainer)
    byte_level = processors.ByteLevel(trim_offsets=False)
    if bos and add_bos:
        template = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                 special_tokens=[(bos, tok.token_to_id(bos))])
        tok.post_processor = processors.Sequence([byte_level, template])
    else:
        tok.post_processor = byte_level
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=EOS, pad_token=PAD)
    if chat_template is not None:
        wrapped.chat_template = chat_template
    return wrapped

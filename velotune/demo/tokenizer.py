"""A byte-level BPE tokenizer trained in-process on the demo's text, with a ChatML-style chat template.

Byte-level means any text encodes (no unknown token) and decoding gives the text back exactly. Training on a
few tens of kilobytes takes milliseconds and is deterministic: the same texts give the same vocabulary.
"""
from __future__ import annotations

PAD, BOS, IM_START, IM_END = "<|pad|>", "<|bos|>", "<|im_start|>", "<|im_end|>"
# Ids 0..3 in this order. <|im_end|> closes every turn and is the EOS, so generation stops after one answer.
SPECIAL_TOKENS = (PAD, BOS, IM_START, IM_END)
EOS = IM_END

# <|bos|><|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n...<|im_end|>\n
# Newlines are written as '\n' string literals: transformers renders templates with trim_blocks, which would
# eat a literal newline after a tag. The template emits BOS itself, so rendered text is tokenized without
# add_special_tokens (the tokenizer adds nothing anyway: it has no post-processor).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

DEFAULT_VOCAB_SIZE = 1024


def train_demo_tokenizer(texts, vocab_size: int = DEFAULT_VOCAB_SIZE, model_max_length: int = 512):
    """Trains a byte-level BPE on `texts` (an iterable of strings) -> `PreTrainedTokenizerFast` with the chat
    template and special tokens set."""
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(texts, vocab_size), bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=[IM_START], chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length, padding_side="right", clean_up_tokenization_spaces=False)


def train_bpe(texts, vocab_size: int = DEFAULT_VOCAB_SIZE):
    """The bare `tokenizers.Tokenizer`: byte-level BPE with the special tokens at ids 0..3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    texts = list(texts)
    # Role names and the template's newline are in every rendered chat: make sure BPE sees them.
    texts += ["user\n", "assistant\n", "system\n"] * 2
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok

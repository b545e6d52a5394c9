"""Embedding models: an encoder (or a decoder) plus pooling, read from and written to sentence-transformers
directories; contrastive training objectives live in training/objectives/, retrieval evaluation here."""


def embed(model, tokenizer, texts, *, batch_size: int = 32, prompt: str | None = None,
          prompt_name: str | None = None):
    """`vt.embed`: embeddings [len(texts), dimension] (fp32, CPU) of `texts` (a string gives [dimension]), as
    `model.encode` computes them (a SentenceEncoder from vt.load_embedder)."""
    from .model import SentenceEncoder
    if not isinstance(model, SentenceEncoder):
        from ..errors import UnsupportedError
        raise UnsupportedError(f"vt.embed: {type(model).__name__} is not a SentenceEncoder (load one with "
                               "vt.load_embedder)")
    return model.encode(tokenizer, texts, batch_size=batch_size, prompt=prompt, prompt_name=prompt_name)

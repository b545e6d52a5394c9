"""End to end: llama.cpp (llama-cpp-python, built from PyPI's source package) loads our GGUF export and computes
the logits our LoRA model computes, for every architecture case. Skipped when llama_cpp is not installed
(building it takes many minutes, so CI does not); run `python tests/test_export_llamacpp.py` for the table.

Each case runs with the adjustments llama.cpp needs, stated per case below: features its architecture lacks
are switched off in the checkpoint, or the sequence kept within the sliding window it does not apply.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from export_fixtures import LLAMA_CPP_FIT, input_ids, load_with_lora, make_tokenized_checkpoint, rel_err
from hf_reference import BASE, SHRUNK, WINDOW

pytestmark = pytest.mark.llamacpp

# Bounds on the relative error of llama.cpp's logits against ours (fp32 on both sides, llama.cpp's KV cache in
# f32). F32 files: what remains is llama.cpp's own arithmetic, measured 2.6e-7..5.1e-7, except for Gemma, whose
# tanh-GELU ggml runs through an fp16 lookup table: 1.1e-5 (Gemma), 2.5e-4..2.9e-4 (Gemma 2, whose post-MLP
# norm rescales that error). Q8_0 files: the weights' rounding, measured 0.9e-2..1.9e-2; our own model with the
# same Q8_0-rounded weights moves 0.8e-2..1.5e-2 (llama.cpp also rounds activations to 8 bits in its matmuls).
BOUNDS = {"f32": 1e-5, "f32-gelu": 1e-3, "q8_0": 3e-2}
SEQ_LEN = 19


def llama_cpp_fit(case: str) -> tuple[dict, int]:
    """(checkpoint overrides, sequence length) under which llama.cpp implements everything the case uses."""
    overrides = dict(LLAMA_CPP_FIT.get(case, ({},))[0])
    config = {**BASE, **SHRUNK[case], **overrides}
    length = SEQ_LEN
    family = case.split("_")[0]
    if family == "gemma2":  # llama.cpp scales Gemma 2 attention by head_dim**-0.5 (query_pre_attn_scalar unused)
        overrides["query_pre_attn_scalar"] = config.get("head_dim", 256)
    elif config.get("sliding_window") and (family in ("mistral", "phi3") or config.get("use_sliding_window")):
        length = WINDOW  # llama.cpp's Llama / Qwen / Phi-3 apply no sliding window: stay inside it
    return overrides, length


def llama_cpp_logits(path, ids: list[int]) -> np.ndarray:
    from llama_cpp import Llama
    llm = Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=1,
                type_k=0, type_v=0, flash_attn=False)  # GGML type 0 = F32 cache
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def measure(tmp_path, case: str, quant: str) -> float:
    import velotune as vt
    overrides, length = llama_cpp_fit(case)
    path, tok = make_tokenized_checkpoint(tmp_path, case, **overrides)
    # general.name comes from the directory; llama.cpp gives names containing "phi3" Phi-3's special tokens,
    # which the test tokenizer lacks.
    path = path.rename(tmp_path / f"tuned-{quant}")
    model, _ = load_with_lora(path)
    ids = input_ids(len(tok), length=length, batch=1)
    with torch.no_grad():
        ours = model(ids).logits[0]
    out = vt.export(model, tok, tmp_path / f"{case}-{quant}", format="gguf", quant=quant)
    theirs = torch.from_numpy(llama_cpp_logits(out, ids[0].tolist()))
    return rel_err(theirs, ours)


@pytest.mark.parametrize("quant", ["f32", "q8_0"])
@pytest.mark.parametrize("case", list(SHRUNK))
def test_llama_cpp_logits_match_ours(tmp_path, case, quant):
    pytest.importorskip("llama_cpp")
    err = measure(tmp_path, case, quant)
    bound = BOUNDS["f32-gelu" if quant == "f32" and case.startswith("gemma") else quant]
    assert err <= bound, f"{case} {quant}: llama.cpp logits differ from ours by {err:.2e} (bound {bound:.0e})"


if __name__ == "__main__":
    import logging
    import os
    import sys
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    quants = ("f32", "f16", "bf16", "q8_0", "q5_1", "q4_0")
    print(f"{'case':20}" + "".join(f"{q:>10}" for q in quants) + "   adjustments for llama.cpp")
    for case in SHRUNK:
        with tempfile.TemporaryDirectory() as tmp:
            errs = [measure(Path(tmp), case, q) for q in quants]
        overrides, length = llama_cpp_fit(case)
        note = ", ".join(f"{k}={v}" for k, v in overrides.items()) + (f" seq={length}" if length != SEQ_LEN else "")
        print(f"{case:20}" + "".join(f"{e:10.2e}" for e in errs) + f"   {note}")

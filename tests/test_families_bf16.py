"""bf16 on every decoder family (issue 18's Mixtral, Qwen3-MoE, gpt-oss, Gemma 3, OLMo 2, Granite, and Llama, Mistral,
Qwen 2 / 3, Gemma, Gemma 2, Phi-3): our logits are as far
from a float64 reference as transformers' own bf16 logits are (at most 1.25x its relative error, + 1e-4), on the
tiny configs of the parity tests, a padded row included. The bound is measured, not a tolerance that cannot fail: an
fp32 path is exact, and a wrong bf16 path (a missing upcast in a norm or softmax) lands far above it."""
from __future__ import annotations

import pytest
import torch

import test_gemma3_parity
import test_gpt_oss_parity
import test_moe_parity
import velotune as vt
from hf_reference import make_checkpoint
from test_olmo2_granite_parity import CASES as DENSE_CASES

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _from_checkpoint(family):
    def build(folder):
        path, _ = make_checkpoint(folder, family, **DENSE_CASES[family])
        return path
    return build


def _saved(make):
    def build(folder):
        make().save_pretrained(str(folder))
        return folder
    return build


FAMILIES = {
    "mixtral": _saved(lambda: test_moe_parity.make_hf("mixtral")),
    "qwen3_moe": _saved(lambda: test_moe_parity.make_hf("qwen3_moe")),
    "gpt_oss": _saved(test_gpt_oss_parity.make_hf),
    # the released limit (7.0): fewer clamps, so the norms' rounding shows (Llama's cast order doubled our error)
    "gpt_oss_limit_7": _saved(lambda: test_gpt_oss_parity.make_hf(swiglu_limit=7.0)),
    "gemma3_text": _saved(lambda: test_gemma3_parity.make_hf("untied_softcap")),
    "olmo2": _from_checkpoint("olmo2"),
    "granite": _from_checkpoint("granite"),
}
# The earlier families (tests/hf_reference.py's tiny configs: Llama 3 RoPE, sliding windows, Gemma 2's soft-caps,
# Phi-3's partial rotary), held to the same bound.
FAMILIES.update({family: (lambda folder, family=family: make_checkpoint(folder, family)[0])
                 for family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")})


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_error_is_transformers_own(family, tmp_path):
    from transformers import AutoModelForCausalLM
    path = FAMILIES[family](tmp_path)
    # float64: transformers' grouped expert matmul takes no doubles (its eager experts do)
    reference = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float64, attn_implementation="eager",
                                                     experts_implementation="eager")
    theirs = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16, attn_implementation="eager")
    ours = vt.load(path, dtype="bfloat16", device="cpu", load_tokenizer_files=False)[0]
    vocab = reference.config.vocab_size
    ids = torch.randint(0, vocab, (2, 19), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0  # right padding: in float64 transformers' fully masked rows of left padding are NaN
    real = mask.bool()
    with torch.no_grad():
        want = reference.eval()(input_ids=ids, attention_mask=mask).logits[real]
        their = theirs.eval()(input_ids=ids, attention_mask=mask).logits[real]
        mine = ours(ids, attention_mask=mask).logits
    assert mine.dtype == torch.bfloat16
    ours_err, their_err = rel(mine[real], want), rel(their, want)
    print(f"{family}: bf16 logits relative error vs float64: velotune {ours_err:.2e}, transformers {their_err:.2e}")
    assert ours_err <= 1.25 * their_err + 1e-4

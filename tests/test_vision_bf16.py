"""bf16 on every vision family (LLaVA, Qwen2-VL, Qwen2.5-VL, Idefics3, Gemma 3): on a prompt with an image, our
logits are as far from transformers' float64 logits as transformers' own bf16 logits are (at most 1.25x its relative
error, + 1e-4), as tests/test_families_bf16.py holds the text families. A measured bound: a missing upcast in the
tower's norms or attention lands far above it."""
import pytest
import torch

import velotune as vt
from test_vision_families import family_dir  # noqa: F401  (the fixture: one tiny checkpoint per family)
from test_vision_families import image_prompt_inputs
from vision_fixtures import digit_pngs

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_bf16_error_is_transformers_own(family_dir, tmp_path):  # noqa: F811 (the imported fixture)
    from transformers import AutoModelForImageTextToText

    items = digit_pngs(tmp_path, 1, size=20)
    ours, tokenizer = vt.load(str(family_dir), dtype="bfloat16", device="cpu")
    ids, images, extra = image_prompt_inputs(ours, tokenizer, items[0][0])

    def theirs(dtype):
        model = AutoModelForImageTextToText.from_pretrained(str(family_dir), dtype=dtype,
                                                            attn_implementation="eager").eval()
        cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in images.items()}
        with torch.no_grad():
            return model(input_ids=ids, **cast, **extra).logits

    want, their = theirs(torch.float64), theirs(torch.bfloat16)
    with torch.no_grad():
        mine = ours.eval()(ids, **images).logits
    assert mine.dtype == torch.bfloat16
    ours_err, their_err = rel(mine, want), rel(their, want)
    print(f"{ours.model_type}: bf16 logits relative error vs float64: velotune {ours_err:.2e}, "
          f"transformers {their_err:.2e}")
    assert ours_err <= 1.25 * their_err + 1e-4

"""Every vision family through the data pipeline, the loop and generation, on tiny checkpoints that transformers wrote
(LLaVA, Qwen2-VL, Qwen2.5-VL, Idefics3, Gemma 3): packed rows give the loss of the same samples one per row, a LoRA run
trains, and left-padded batched generation with images equals each prompt alone."""
import pytest
import torch

import velotune as vt
from velotune.config import load_config
from velotune.infer.generation import generate_batch
from velotune.training.objectives.vision import VisionSFT
from vision_fixtures import QUESTION, digit_pngs, digit_records, write_jsonl

TEXTS = [QUESTION, " ".join("0123456789")] * 30
FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "idefics3", "gemma3")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    items = digit_pngs(folder, 8, size=20)
    # two images in one sample: places in order, several images per row
    records = digit_records(items, folder)
    records[1]["messages"][0]["content"].insert(1, {"type": "image", "image": items[2][0].name})
    return write_jsonl(folder / "train.jsonl", records), items


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory, tiny_llava):
    from velotune.bench.tiny_vlm_families import make_tiny_gemma3, make_tiny_idefics3, make_tiny_qwen2_vl
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "llava":
        return tiny_llava
    if request.param == "idefics3":
        return make_tiny_idefics3(folder, TEXTS)
    if request.param == "gemma3":
        return make_tiny_gemma3(folder, TEXTS)
    return make_tiny_qwen2_vl(folder, TEXTS, family=request.param)


def _config(model_dir, data_path, out, **train):
    return {"model": {"path": str(model_dir), "dtype": "float32"},
            "data": {"path": str(data_path), "max_seq_length": 160},
            "train": {"output_dir": str(out), "max_steps": 2, "batch_size": 3, "lr": 1e-3, "progress": False,
                      **train}}


def test_packed_rows_give_the_loss_of_the_same_samples_one_per_row(family_dir, data, tmp_path):
    data_path, _ = data
    cfg = load_config(_config(family_dir, data_path, tmp_path / "unused"))
    from transformers import AutoTokenizer
    objective = VisionSFT()
    prepared = objective.prepare(cfg, AutoTokenizer.from_pretrained(str(family_dir)), max_seq_length=160, seed=0)
    examples = prepared.train[:3]
    assert sum(e.num_images for e in examples) >= 3
    model, tokenizer = vt.load(str(family_dir), dtype="float32")
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        packed, n_packed = objective.loss(model, objective.collate([examples], pad_id=pad, packing=True))
        alone, n_alone = objective.loss(model, objective.collate([[e] for e in examples], pad_id=pad, packing=False))
    assert int(n_packed) == int(n_alone) > 0
    assert abs(float(packed) - float(alone)) < 1e-5 * float(alone)


def test_a_lora_run_trains_and_batched_generation_equals_each_prompt_alone(family_dir, data, tmp_path):
    data_path, items = data
    result = vt.train(_config(family_dir, data_path, tmp_path / "run"))
    assert result.adapter_dir is not None and result.steps == 2
    model, tokenizer = vt.load(str(family_dir), dtype="float32")
    vt.load_adapter(model, str(result.adapter_dir))
    prompts = [[{"role": "user", "content": [{"type": "image", "image": str(path)},
                                             {"type": "text", "text": QUESTION * (i + 1)}]}]
               for i, (path, _) in enumerate(items[:3])]
    assert generate_batch(model, tokenizer, prompts, max_new_tokens=3) == \
        [vt.generate(model, tokenizer, p, max_new_tokens=3) for p in prompts]


def test_an_image_token_the_model_generates_is_decoded_as_text(family_dir):
    """An untrained model may sample its image token: a cached decoding step embeds it as it is (images come with
    the prompt only) instead of asking for pixels."""
    from velotune.infer.cache import KVCache
    model, _ = vt.load(str(family_dir), dtype="float32")
    cache = KVCache.for_model(model, 16)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        out = model(torch.tensor([[model.image_token_id]]), cache=cache)
    assert out.logits.shape[1] == 1 and torch.isfinite(out.logits).all()


# PEFT warns of adapter keys it expected and did not find: a layer it adapted that we did not (Qwen2-VL's Conv3d
# patch embedding once matched our leaf target `proj`)
@pytest.mark.filterwarnings("error:Found missing adapter keys")
def test_our_adapter_loads_in_peft_on_transformers_model(family_dir, data, tmp_path):
    """velotune's adapter (LoRA on the tower and the language model, the projector in full) loads with PEFT onto
    transformers' own model of the family with the same logits, on a prompt with an image."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    _, items = data
    ours, tokenizer = vt.load(str(family_dir), dtype="float32")
    targets, saved = VisionSFT().lora_choice(ours, load_config({"vision": {"projector": "full"}}))
    vt.add_lora(ours, r=4, alpha=8, targets=targets, modules_to_save=saved)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name or any(name.startswith(m + ".") for m in saved):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    ours.eval()
    vt.save_adapter(ours, tmp_path / "ours")
    ids, images, extra = image_prompt_inputs(ours, tokenizer, items[0][0])
    base = AutoModelForImageTextToText.from_pretrained(str(family_dir), dtype=torch.float32).eval()
    theirs = PeftModel.from_pretrained(base, str(tmp_path / "ours")).eval()
    with torch.no_grad():
        want = ours(ids, **images).logits
        got = theirs(input_ids=ids, **images, **extra).logits
    assert (want - got).abs().max() < 1e-5
    assert saved and any(".lora_A." in n for n in vt.lora.adapter_state_dict(ours))


def image_prompt_inputs(model, tokenizer, image_path):
    """(ids [1, T], our image inputs, what transformers' model of the family also needs) for QUESTION on one image:
    transformers reads the image places from the processor's type ids (Gemma 3 for its image blocks, Qwen2-VL for
    its 3-D positions; 1 marks an image token)."""
    from velotune.infer.vision_prompt import encode_image_prompt
    prompt = [{"role": "user", "content": [{"type": "image", "image": str(image_path)},
                                           {"type": "text", "text": QUESTION}]}]
    ids, images = encode_image_prompt(model, tokenizer, prompt)
    ids = torch.tensor([ids])
    types = (ids == model.image_token_id).long()
    extra = {"gemma3": {"token_type_ids": types}, "qwen2_vl": {"mm_token_type_ids": types},
             "qwen2_5_vl": {"mm_token_type_ids": types}}.get(model.model_type, {})
    return ids, images, extra

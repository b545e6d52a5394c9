"""Vision-language fine-tuning through the one loop, on a tiny LLaVA with random weights: which parameters each
switch trains (exactly), LoRA and full runs that write usable outputs, generation with images after training, and
the merged export that transformers loads with the same outputs (images included)."""
import json
import shutil

import pytest
import torch

import velotune as vt
from velotune.errors import ConfigError, VelotuneError
from velotune.infer.generation import generate_batch
from vision_fixtures import QUESTION, digit_pngs, digit_records, write_jsonl


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    items = digit_pngs(folder, 24)
    return write_jsonl(folder / "train.jsonl", digit_records(items, folder)), items


def _config(model_dir, data_path, out, method="lora", steps=3, **sections):
    cfg = {"model": {"path": str(model_dir), "dtype": "float32"}, "finetune": {"method": method},
           "data": {"path": str(data_path), "max_seq_length": 48},
           "train": {"output_dir": str(out), "max_steps": steps, "batch_size": 4, "lr": 1e-3, "progress": False}}
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    return cfg


def _lora_names(model_dir, **switches):
    """The LoRA targets and fully trained modules the vision switches choose on the tiny LLaVA."""
    from velotune.config import load_config
    from velotune.training.objectives.vision import VisionSFT
    model, _ = vt.load(str(model_dir), dtype="float32")
    cfg = load_config({"model": {"path": str(model_dir)}, "vision": switches})
    return VisionSFT().lora_choice(model, cfg), model


def test_the_switches_choose_exactly_the_expected_linears(tiny_llava):
    (names, saved), model = _lora_names(tiny_llava)
    vision = [n for n in names if n.startswith("vision_tower.")]
    language = [n for n in names if n.startswith("language_model.")]
    projector = [n for n in names if n.startswith("multi_modal_projector.")]
    assert len(vision) == 2 * 6 and len(language) == 2 * 7 and projector == ["multi_modal_projector.linear_1",
                                                                            "multi_modal_projector.linear_2"]
    assert saved == [] and "language_model.lm_head" not in names
    (names, _), _ = _lora_names(tiny_llava, vision_layers=False, mlp_modules=False, projector="frozen")
    assert names == [f"language_model.model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"]
    (names, saved), _ = _lora_names(tiny_llava, language_layers=False, attention_modules=False, projector="full")
    assert names == [f"vision_tower.encoder.layers.{i}.mlp.fc{j}" for i in range(2) for j in (1, 2)]
    assert saved == ["multi_modal_projector"]
    with pytest.raises(ConfigError, match="nothing to train"):
        _lora_names(tiny_llava, vision_layers=False, language_layers=False, projector="frozen")


def test_lora_trains_then_answers_about_an_image_and_exports_for_transformers(tiny_llava, data, tmp_path):
    data_path, items = data
    result = vt.train(_config(tiny_llava, data_path, tmp_path / "run", vision={"projector": "full"}))
    adapter = result.adapter_dir
    assert (adapter / "preprocessor_config.json").is_file() and (adapter / "processor_config.json").is_file()
    assert result.data_stats["images"] == len(items)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["objective"] == "vision"

    model, tokenizer = vt.load(str(tiny_llava), dtype="float32")
    vt.load_adapter(model, str(adapter))
    prompts = [[{"role": "user", "content": [{"type": "image", "image": str(path)},
                                             {"type": "text", "text": QUESTION}]}] for path, _ in items[:3]]
    batch = generate_batch(model, tokenizer, prompts, max_new_tokens=3)
    alone = [vt.generate(model, tokenizer, p, max_new_tokens=3) for p in prompts]
    assert batch == alone   # left-padded rows with images decode as each alone

    out = vt.export(model, tokenizer, tmp_path / "merged", format="merged")
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from PIL import Image
    hf = LlavaForConditionalGeneration.from_pretrained(str(out)).eval()
    processor = AutoProcessor.from_pretrained(str(out))
    # The tiny template renders text content only: the placeholder goes in the text, as LLaVA-1.5 prompts write it.
    text = tokenizer.apply_chat_template([{"role": "user", "content": "<image>" + QUESTION}],
                                         add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[Image.open(items[0][0]).convert("RGB")], return_tensors="pt")
    merged, _ = vt.load(str(out), dtype="float32")
    with torch.no_grad():
        theirs = hf(**inputs).logits
        ours = merged(inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
        adapted = model(inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
    assert (theirs - ours).abs().max() < 1e-5 and (ours - adapted).abs().max() < 1e-4


def test_full_fine_tuning_keeps_the_parts_switched_off(tiny_llava, data, tmp_path):
    data_path, _ = data
    model, _ = vt.load(str(tiny_llava), dtype="float32")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = vt.train(_config(tiny_llava, data_path, tmp_path / "run", method="full", steps=2,
                              vision={"vision_layers": False, "projector": "frozen"}), model=model)
    after = model.state_dict()
    for name, tensor in after.items():
        moved = not torch.equal(before[name], tensor)
        assert moved == name.startswith("language_model."), name
    assert result.params["trainable_params"] < result.params["total_params"]


def test_a_text_only_model_refuses_images(tmp_path):
    from hf_reference import make_checkpoint
    from tiny_tokenizer import make_tokenizer
    from velotune.data.templates import CHATML
    tokenizer = make_tokenizer(chat_template=CHATML)
    base, _ = make_checkpoint(tmp_path, "llama", vocab_size=len(tokenizer))
    model, _ = vt.load(base, dtype="float32")
    with pytest.raises(VelotuneError, match="reads text only"):
        vt.generate(model, tokenizer, [{"role": "user", "content": [{"type": "image", "image": "x.png"},
                                                                   {"type": "text", "text": "hi"}]}])


def test_an_unknown_vision_family_is_named(tiny_llava, tmp_path):
    copy = tmp_path / "odd"
    shutil.copytree(tiny_llava, copy)
    config = json.loads((copy / "config.json").read_text())
    config["model_type"] = "paligemma"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(VelotuneError, match="paligemma"):
        vt.load(str(copy))


def test_adapters_cross_to_peft_on_transformers_model_and_back(tiny_llava, data, tmp_path):
    """velotune's adapter (LoRA on both parts, the projector in full) loads with PEFT onto transformers' LLaVA with
    the same logits; PEFT's own adapter loads into velotune's model with the same logits."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from PIL import Image
    from transformers import LlavaForConditionalGeneration

    from velotune.config import load_config
    from velotune.training.objectives.vision import VisionSFT
    from velotune.vision.processor import image_processor_for
    _, items = data
    pixels = image_processor_for(tiny_llava)([Image.open(items[0][0])]).tensors
    ids = torch.tensor([[1, 2] + [model_image_id(tiny_llava)] * 4 + [5, 6, 7]])

    ours, _ = vt.load(str(tiny_llava), dtype="float32")
    targets, saved = VisionSFT().lora_choice(ours, load_config({"vision": {"projector": "full"}}))
    vt.add_lora(ours, r=4, alpha=8, targets=targets, modules_to_save=saved)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name or name.startswith("multi_modal_projector."):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    vt.save_adapter(ours, tmp_path / "ours")
    hf = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(str(tiny_llava)).eval(),
                                   str(tmp_path / "ours")).eval()
    with torch.no_grad():
        want = ours(ids, pixel_values=pixels["pixel_values"]).logits
        got = hf(input_ids=ids, pixel_values=pixels["pixel_values"]).logits
    assert (want - got).abs().max() < 1e-5

    base = LlavaForConditionalGeneration.from_pretrained(str(tiny_llava)).eval()
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "fc1"],
                                                 init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "peft"))
    loaded, _ = vt.load(str(tiny_llava), dtype="float32")
    vt.load_adapter(loaded, tmp_path / "peft")
    with torch.no_grad():
        want = peft_model(input_ids=ids, pixel_values=pixels["pixel_values"]).logits
        got = loaded(ids, pixel_values=pixels["pixel_values"]).logits
    assert (want - got).abs().max() < 1e-5


def model_image_id(model_dir) -> int:
    return json.loads((model_dir / "config.json").read_text())["image_token_index"]


def test_image_data_for_a_text_only_model_is_refused_by_record(data, tmp_path):
    from hf_reference import make_checkpoint
    from tiny_tokenizer import make_tokenizer
    from velotune.data.templates import CHATML
    from velotune.errors import DataError
    tokenizer = make_tokenizer(chat_template=CHATML)
    base, _ = make_checkpoint(tmp_path, "llama", vocab_size=len(tokenizer))
    tokenizer.save_pretrained(str(base))
    with pytest.raises(DataError, match=r"train.jsonl:1.*holds an image; images and videos train a vision-language"):
        vt.train(_config(base, data[0], tmp_path / "run"))
    from velotune.data.formats import normalise
    video = {"messages": [{"role": "user", "content": [{"type": "video", "video": "clip.mp4"}]},
                          {"role": "assistant", "content": "A cat."}]}
    with pytest.raises(DataError, match=r"row 3: messages\[0\].*holds a video; images and videos train"):
        normalise(video, "messages", where="row 3")


def test_qlora_trains_a_vision_model_with_its_language_blocks_in_nf4(tiny_llava, data, tmp_path):
    pytest.importorskip("bitsandbytes")
    result = vt.train(_config(tiny_llava, data[0], tmp_path / "run", steps=2,
                              model={"path": str(tiny_llava), "dtype": "float32", "quantize": "nf4"}))
    assert result.adapter_dir is not None and result.final_loss == result.final_loss   # finite


def test_images_past_the_cache_are_read_again_with_the_same_losses(tiny_llava, data, tmp_path):
    kept = vt.train(_config(tiny_llava, data[0], tmp_path / "kept", steps=3))
    reread = vt.train(_config(tiny_llava, data[0], tmp_path / "reread", steps=3, vision={"image_cache_mb": 0}))
    assert reread.data_stats["reread"] == len(data[1]) and kept.data_stats["reread"] == 0
    assert reread.losses == kept.losses


def test_the_dry_run_shows_each_image_once_with_its_token_count(tiny_llava, data, tmp_path):
    plan = vt.plan_run(_config(tiny_llava, data[0], tmp_path / "run"))
    view = plan.objective.sample_view(plan.data.train[0], plan.tokenizer)
    assert "(<image> x 4)" in view and "<image><image>" not in view and "[[" in view
    n = len(data[1])
    assert any(line.startswith(f"per epoch: {n} samples") and line.endswith(f", {n} images")
               for line in plan.summary_lines())

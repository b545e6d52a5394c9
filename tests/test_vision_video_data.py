"""Videos in the data and prompt pipeline (issue 17) on tiny Qwen2-VL / Qwen2.5-VL checkpoints: a video part's tokens
in place and never trained, its tensors beside the images', the reread path, the errors naming the record; a prompt
with a video gives transformers' processor flow's ids and tensors and generates; a LoRA run on records mixing images
and videos trains, and packed rows give the loss of the same samples one per row. Videos are tiny mpeg4 files made
in-process with PyAV."""
import base64
import json
import shutil

import numpy as np
import pytest
import torch

import velotune as vt
from velotune.config import load_config
from velotune.data.encode import IGNORE_INDEX
from velotune.data.vision_data import (
    VideoRef,
    VisionStats,
    encode_vision,
    images_of,
    read_vision_record,
    video_placeholder_of,
)
from velotune.errors import DataError
from velotune.training.objectives.vision import VisionSFT
from velotune.vision.processor import image_processor_for, video_processor_for
from velotune.vision.video import read_video
from test_vision_video import tiny_video, transformers_video_module
from vision_fixtures import QUESTION, digit_pngs, write_jsonl

pytest.importorskip("av")

TEXTS = [QUESTION, " ".join("0123456789"), "What happens in the video?"] * 30
VIDEO_QUESTION = "What happens in the video?"
# Qwen2-VL's own chat template (as its hub tokenizer_config.json has it): image and video parts become
# <|vision_start|><|image_pad|><|vision_end|> / <|vision_start|><|video_pad|><|vision_end|>.
QWEN_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def qwen_dir(request, tmp_path_factory):
    from velotune.bench.tiny_vlm_families import make_tiny_qwen2_vl
    return make_tiny_qwen2_vl(tmp_path_factory.mktemp(request.param), TEXTS, family=request.param)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A folder with digit images and three tiny videos (16 x 16 flat grey frames, 10 / 8 / 6 frames at 5 fps)."""
    folder = tmp_path_factory.mktemp("media")
    items = digit_pngs(folder, 4, size=20)
    videos = [tiny_video(folder / f"v{i}.mp4", frames=frames, size=16) for i, frames in enumerate((10, 8, 6))]
    return folder, items, videos


def _records(items, videos):
    """Records mixing images and videos: video alone, image + video, image alone, video + image, a frames list."""
    (a, la), (b, lb), (c, lc), (d, _) = items
    user = lambda *parts: {"role": "user", "content": [*parts, {"type": "text", "text": VIDEO_QUESTION}]}  # noqa
    answer = lambda text: {"role": "assistant", "content": text}  # noqa: E731
    return [
        {"messages": [user({"type": "video", "video": videos[0].name}), answer("9")]},
        {"messages": [user({"type": "image", "image": a.name}, {"type": "video", "path": videos[1].name}),
                      answer(str(la))]},
        {"messages": [user({"type": "image", "image": b.name}), answer(str(lb))]},
        {"messages": [user({"type": "video", "video": videos[2].name, "fps": 4.0}, {"type": "image", "image": c.name}),
                      answer(str(lc))]},
        {"messages": [user({"type": "video", "video": [d.name, d.name, a.name, a.name], "fps": 2.0}), answer("5")]},
    ]


def _encode(record, model_dir, folder, max_len=400, train_on="assistant", stats=None):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    processor = image_processor_for(model_dir)
    sample, refs = read_vision_record(record, "messages", "train.jsonl:1", placeholder=processor.placeholder,
                                      video_placeholder=video_placeholder_of(processor), family="qwen2_vl")
    stats = stats if stats is not None else VisionStats()
    example = encode_vision(sample, refs, processor, tokenizer, tokenizer.chat_template, train_on=train_on,
                            max_len=max_len, overflow="truncate", stats=stats, base_dir=folder)
    return example, stats, tokenizer, processor


def test_a_video_part_is_expanded_in_place_never_trained_and_reread(qwen_dir, media):
    folder, items, videos = media
    record = _records(items, videos)[3]      # a video (sampled at 4 fps) then an image
    example, stats, tokenizer, processor = _encode(record, qwen_dir, folder, train_on="all")
    ids = example.input_ids.tolist()
    token = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|video_pad|>", "<|image_pad|>", "<|vision_start|>",
                                                             "<|vision_end|>")}
    clip = read_video(videos[2], fps=4.0)
    video_processor = video_processor_for(qwen_dir)
    want = video_processor([clip.frames], fps=[clip.fps])
    n_video = want.tokens_per_video[0]
    start = ids.index(token["<|video_pad|>"])
    assert ids[start - 1] == token["<|vision_start|>"] and ids[start + n_video] == token["<|vision_end|>"]
    assert ids[start: start + n_video] == [token["<|video_pad|>"]] * n_video and ids.count(token["<|video_pad|>"]) \
        == n_video
    assert ids.index(token["<|image_pad|>"]) > start + n_video      # the record's order: the video, then the image
    # train_on all: everything after the BOS is a target but the image and video tokens
    for i, label in list(zip(ids, example.labels.tolist()))[1:]:
        assert (label == IGNORE_INDEX) == (i in (token["<|video_pad|>"], token["<|image_pad|>"]))
    assert set(example.images) >= {"pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"}
    assert torch.equal(example.images["pixel_values_videos"], want.tensors["pixel_values_videos"])
    assert torch.equal(example.images["video_grid_thw"], want.tensors["video_grid_thw"])
    if video_processor.model_type == "qwen2_5_vl":   # temporal patch 2 / the sampled 4 frames a second
        assert example.images["second_per_grid_ts"].tolist() == pytest.approx([2 / clip.fps])
    assert example.num_videos == 1 and example.num_images == 1 and stats.videos == 1 and stats.images == 1
    # the dry run shows each run of image or video tokens once, with its count
    from velotune.training.objectives.vision import VisionSFT
    objective = VisionSFT()
    objective.processor = processor
    view = objective.sample_view(example, tokenizer)
    assert f"(<|video_pad|> x {n_video})" in view and "<|video_pad|><|video_pad|>" not in view
    assert "(<|image_pad|> x " in view
    # past vision.image_cache_mb: only the references stay; the batch reads and processes them again
    kept = dict(example.images)
    assert example.drop_images() and example.images == {}
    again = images_of(example, processor)
    assert set(again) == set(kept) and all(torch.equal(again[k], kept[k]) for k in kept)


def test_a_video_as_frames_and_the_videos_column(qwen_dir, media):
    folder, items, videos = media
    example, _, tokenizer, processor = _encode(_records(items, videos)[4], qwen_dir, folder)
    from PIL import Image
    frames = [Image.open(folder / items[k][0].name).convert("RGB") for k in (3, 3, 0, 0)]
    want = video_processor_for(qwen_dir)([frames], fps=[2.0])
    assert torch.equal(example.images["pixel_values_videos"], want.tensors["pixel_values_videos"])
    assert example.drop_images() and torch.equal(images_of(example, processor)["pixel_values_videos"],
                                                 want.tensors["pixel_values_videos"])
    # a sharegpt-style record: the videos column fills a bare part and a <|video_pad|> written in the text
    record = {"videos": [videos[0].name, videos[1].name],
              "messages": [{"role": "user", "content": [
                  {"type": "video"}, {"type": "text", "text": "and <|vision_start|><|video_pad|><|vision_end|>?"}]},
                  {"role": "assistant", "content": "1"}]}
    example, stats, _, _ = _encode(record, qwen_dir, folder)
    counts = [video_processor_for(qwen_dir)([read_video(v).frames]).tokens_per_video[0] for v in videos[:2]]
    assert example.num_videos == 2 and example.images["video_grid_thw"].shape == (2, 3)
    assert example.input_ids.tolist().count(tokenizer.convert_tokens_to_ids("<|video_pad|>")) == sum(counts)
    text = tokenizer.decode(example.input_ids)
    assert text.count("<|vision_start|>") == 2 and "<|vision_end|><|vision_end|>" not in text


def test_a_sample_cut_inside_its_video_tokens_is_dropped_and_counted(qwen_dir, media):
    folder, items, videos = media
    record = _records(items, videos)[0]
    whole, _, tokenizer, _ = _encode(record, qwen_dir, folder)
    video_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    inside = whole.input_ids.tolist().index(video_id) + 3
    example, stats, _, _ = _encode(record, qwen_dir, folder, max_len=inside)
    assert example is None and stats.cut_in_images == 1 and stats.samples == 0


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "hi"},
                   {"role": "assistant", "content": [{"type": "video", "video": "a.mp4"}]}]},
     "videos in assistant turns are not supported"),
    ({"videos": ["a.mp4"], "messages": [{"role": "user", "content": "no place"},
                                        {"role": "assistant", "content": "x"}]},
     "the 'videos' column holds 1 video(s) but the conversation has 0 place(s)"),
    ({"messages": [{"role": "user", "content": [{"type": "video"}]}, {"role": "assistant", "content": "x"}]},
     "more video places than videos"),
    ({"messages": [{"role": "user", "content": [{"type": "video", "video": "a.mp4", "fps": 0}]},
                   {"role": "assistant", "content": "x"}]}, "fps must be a positive number"),
])
def test_video_places_that_do_not_fit_are_errors_naming_the_record(record, message):
    with pytest.raises(DataError, match="train.jsonl:1") as err:
        read_vision_record(record, "messages", "train.jsonl:1", placeholder="<|image_pad|>",
                           video_placeholder="<|video_pad|>")
    assert message in str(err.value)


def test_missing_video_and_a_family_without_videos_name_the_record(qwen_dir, media, tiny_llava, tmp_path):
    folder, items, videos = media
    record = {"messages": [{"role": "user", "content": [{"type": "video", "video": "nothere.mp4"}]},
                           {"role": "assistant", "content": "x"}]}
    with pytest.raises(DataError, match=r"train.jsonl:1: video 1: .*nothere.mp4: video file not found"):
        _encode(record, qwen_dir, folder)
    # LLaVA reads images only: the record is refused when read, and a video reference given to its processor too
    path = write_jsonl(tmp_path / "train.jsonl", _records(items, [folder / v.name for v in videos])[:1])
    with pytest.raises(DataError, match=r"train.jsonl:1: messages\[0\].content\[0\]: .*llava, which reads images only"):
        vt.train(_config(tiny_llava, path, tmp_path / "run"))
    from transformers import AutoTokenizer
    sample, _ = read_vision_record({"messages": [{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "x"}]}, "messages", "row 7",
                                   placeholder="<image>")
    with pytest.raises(DataError, match="row 7: a video part, but llava reads images only"):
        encode_vision(sample, [VideoRef(str(videos[0]))], image_processor_for(tiny_llava),
                      AutoTokenizer.from_pretrained(str(tiny_llava)), QWEN_TEMPLATE, train_on="assistant",
                      max_len=64, overflow="truncate", stats=VisionStats(), base_dir=None)
    from velotune.infer.vision_prompt import encode_image_prompt
    model, tokenizer = vt.load(str(tiny_llava), dtype="float32")
    with pytest.raises(DataError, match="the prompt: messages\\[0\\].content\\[0\\]: unknown part type 'video' for "
                                        "llava"):
        encode_image_prompt(model, tokenizer, [{"role": "user", "content": [{"type": "video", "video": "v.mp4"}]}])


# ---- prompts ---------------------------------------------------------------------------------------------------
def _transformers_prompt(monkeypatch, model_dir, messages, frames, fps):
    """transformers' flow for a prompt with an image and a video: the chat template with the parts, then
    Qwen2VLProcessor (its PIL image processor; its video processor's arithmetic, which needs torchvision here only
    for the resize, which the 16 x 16 frames skip) expanding the placeholders and tokenizing."""
    from transformers import AutoTokenizer, BatchFeature
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as pil
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
    module = transformers_video_module(monkeypatch)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    pre = json.loads((model_dir / "preprocessor_config.json").read_text())
    kind = json.loads((model_dir / "config.json").read_text())["model_type"]
    image_processor = pil.Qwen2VLImageProcessorPil(**{k: v for k, v in pre.items() if not k.endswith("_type")
                                                      and k != "processor_class"})

    class VideoStandIn:   # transformers' Qwen2VLVideoProcessor._preprocess on the given frames (no sampling)
        merge_size, temporal_patch_size = pre["merge_size"], pre["temporal_patch_size"]

        def __call__(self, videos, **kwargs):
            frames = torch.from_numpy(videos[0]).permute(0, 3, 1, 2).contiguous()
            size = module.smart_resize(*frames.shape[-2:], factor=pre["patch_size"] * pre["merge_size"],
                                       min_pixels=pre["min_pixels"], max_pixels=pre["max_pixels"])
            assert size == tuple(frames.shape[-2:])   # no resize: the one step that would need torchvision
            # _fuse_mean_std_and_rescale_factor, then torchvision's normalize
            mean = torch.tensor(pre["image_mean"]) * 255.0
            std = torch.tensor(pre["image_std"]) * 255.0
            frames = frames.to(torch.float32).sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))
            patches, t, h, w = module.Qwen2VLVideoProcessor.patchify(
                None, frames[None], pre["patch_size"], pre["merge_size"], pre["temporal_patch_size"])
            return BatchFeature({"pixel_values_videos": patches[0], "video_grid_thw": torch.tensor([[t, h, w]])})

    from transformers.processing_utils import ProcessorMixin
    # its class check looks the video processor up among torchvision classes, which do not load here
    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=VideoStandIn())
    text = tokenizer.apply_chat_template(messages, chat_template=QWEN_TEMPLATE, add_generation_prompt=True,
                                         tokenize=False)
    from PIL import Image
    image = Image.open(messages[0]["content"][0]["image"]).convert("RGB")
    out = processor(images=[image], text=[text], videos=[frames], return_tensors="pt")
    if kind == "qwen2_5_vl":   # Qwen2_5_VLProcessor: temporal_patch_size / the sampled fps
        out["second_per_grid_ts"] = torch.tensor([pre["temporal_patch_size"] / fps])
    return out


def test_a_prompt_with_a_video_matches_transformers_and_generates(qwen_dir, media, monkeypatch):
    from transformers import AutoModelForImageTextToText

    from velotune.infer.generation import generate_batch
    from velotune.infer.vision_prompt import encode_image_prompt
    folder, items, videos = media
    image, video = str(items[0][0]), str(videos[1])
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "video", "video": video},
                                             {"type": "text", "text": VIDEO_QUESTION}]}]
    model, tokenizer = vt.load(str(qwen_dir), dtype="float32")
    ids, tensors = encode_image_prompt(model, tokenizer, messages, chat_template=QWEN_TEMPLATE)
    clip = read_video(video)
    ref = _transformers_prompt(monkeypatch, qwen_dir, messages, clip.frames, clip.fps)
    assert ids == ref["input_ids"][0].tolist()
    assert ids.count(tokenizer.convert_tokens_to_ids("<|video_pad|>")) == int(ref["video_grid_thw"].prod()) // 4
    for name in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        if name in ref:
            assert torch.allclose(tensors[name], ref[name].to(tensors[name].dtype), atol=1e-6, rtol=0), name
    assert set(tensors) == {k for k in ref if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    # the prompt's logits against transformers' model on transformers' inputs
    hf = AutoModelForImageTextToText.from_pretrained(str(qwen_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        ours = model(torch.tensor([ids]), **tensors).logits
        theirs = hf(**{k: v for k, v in ref.items() if k != "attention_mask"}).logits
    diff = (ours - theirs).abs().max().item()
    print(f"{model.model_type} video prompt logits: max abs diff {diff:.2e}")
    assert diff < 1e-5
    # a server reads no files for a request: a video path is refused, its frames as data URIs are read
    with pytest.raises(DataError, match="the prompt: video 1: file paths are not accepted here"):
        encode_image_prompt(model, tokenizer, [{"role": "user", "content": messages[0]["content"][1:]}],
                            allow_files=False)
    uri = "data:image/png;base64," + base64.b64encode(items[0][0].read_bytes()).decode()
    inline = [{"role": "user", "content": [{"type": "video", "video": [uri, uri]}]}]
    assert encode_image_prompt(model, tokenizer, inline, allow_files=False)[1]["video_grid_thw"].tolist() == \
        [[1, 4, 4]]   # 20 px frames -> 16 px: 4 x 4 patches of 4 px; two frames, one temporal patch
    # generation (the tokenizer's own template): batched with a text-and-image prompt, as each prompt alone
    prompts = [messages, [{"role": "user", "content": [{"type": "image", "image": str(items[1][0])},
                                                       {"type": "text", "text": QUESTION}]}]]
    alone = [vt.generate(model, tokenizer, p, max_new_tokens=3) for p in prompts]
    assert generate_batch(model, tokenizer, prompts, max_new_tokens=3) == alone
    assert all(isinstance(text, str) for text in alone)


# ---- training ----------------------------------------------------------------------------------------------------
def _config(model_dir, data_path, out, **train):
    return {"model": {"path": str(model_dir), "dtype": "float32"},
            "data": {"path": str(data_path), "max_seq_length": 200},
            "train": {"output_dir": str(out), "max_steps": 2, "batch_size": 3, "lr": 1e-3, "progress": False,
                      **train}}


def test_records_mixing_images_and_videos_train_and_pack(qwen_dir, media, tmp_path):
    from transformers import AutoTokenizer
    folder, items, videos = media
    path = write_jsonl(folder / f"mixed_{qwen_dir.name}.jsonl", _records(items, videos))
    result = vt.train(_config(qwen_dir, path, tmp_path / "run"))
    assert result.steps == 2 and result.adapter_dir is not None and (result.adapter_dir / "adapter_config.json").exists()
    assert all(np.isfinite(loss) for loss in result.losses) and np.isfinite(result.final_loss)
    assert result.data_stats["videos"] == 4 and result.data_stats["images"] == 3
    # packed rows: the loss of the same samples one per row; the videos read again give the same batch
    cfg = load_config(_config(qwen_dir, path, tmp_path / "unused"))
    objective = VisionSFT()
    prepared = objective.prepare(cfg, AutoTokenizer.from_pretrained(str(qwen_dir)), max_seq_length=200, seed=0)
    examples = [e for e in prepared.train if e.num_videos][:3]
    assert len(examples) == 3 and any(e.num_images for e in examples)
    model, tokenizer = vt.load(str(qwen_dir), dtype="float32")
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        packed_batch = objective.collate([examples], pad_id=pad, packing=True)
        packed, n_packed = objective.loss(model, packed_batch)
        alone, n_alone = objective.loss(model, objective.collate([[e] for e in examples], pad_id=pad, packing=False))
    print(f"{model.model_type} packed {float(packed):.6f} / one per row {float(alone):.6f} over {int(n_alone)} tokens")
    assert int(n_packed) == int(n_alone) > 0
    assert abs(float(packed) - float(alone)) < 1e-5 * float(alone)
    assert all(e.drop_images() for e in examples)
    reread = objective.collate([examples], pad_id=pad, packing=True)
    assert set(reread) == set(packed_batch) and all(torch.equal(reread[k], packed_batch[k]) for k in reread)


def test_video_settings_are_found_where_transformers_looks(qwen_dir, tiny_llava, tmp_path):
    """processor_config.json's video_processor, then video_preprocessor_config.json, then preprocessor_config.json;
    a family that reads images only has none."""
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(qwen_dir / name, folder / name)
    assert video_processor_for(folder).max_pixels == 64 * 64          # the image settings, as transformers falls back
    (folder / "video_preprocessor_config.json").write_text(json.dumps({"max_pixels": 32 * 32, "min_pixels": 64}))
    assert video_processor_for(folder).max_pixels == 32 * 32
    (folder / "processor_config.json").write_text(json.dumps({"video_processor": {"size": {
        "shortest_edge": 64, "longest_edge": 48 * 48}}}))
    assert video_processor_for(folder).max_pixels == 48 * 48
    assert video_processor_for(tiny_llava) is None
    assert video_placeholder_of(image_processor_for(tiny_llava)) is None
    assert video_placeholder_of(image_processor_for(qwen_dir)) == "<|video_pad|>"

"""Qwen2-VL / Qwen2.5-VL videos (issue 17): the model against transformers' Qwen2VLForConditionalGeneration /
Qwen2_5_VLForConditionalGeneration on tiny random models (logits, loss, every gradient in fp32, a batch with a video
in one row and an image + a video in the other, padding on either side; the 3-D positions and rope deltas against
get_rope_index, Qwen2.5-VL's second_per_grid_ts included); the video processor against transformers 5's
Qwen2VLVideoProcessor arithmetic; reading a tiny video made in-process with PyAV.
"""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from velotune.errors import DataError
from velotune.infer.cache import KVCache
from velotune.models.vision import qwen2_vl as family
from velotune.models.vision.mrope import rope_index

IMG, VID, PAD = 120, 121, 0
TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=PAD, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6,
            initializer_range=0.1,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
VISION = {
    "qwen2_vl": dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, patch_size=4, spatial_merge_size=2,
                     temporal_patch_size=2, mlp_ratio=2, initializer_range=0.1),
    "qwen2_5_vl": dict(depth=3, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=4, patch_size=4,
                       spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1],
                       tokens_per_second=4, initializer_range=0.1),
}
IMAGE_GRIDS = torch.tensor([[1, 4, 6]])                 # 6 image tokens (row 1)
VIDEO_GRIDS = torch.tensor([[2, 4, 6], [3, 6, 4]])      # 12 and 18 video tokens (row 0, row 1)
# Qwen2.5-VL spacing: 4 * 2.0 = 8 positions between grid frames (past the text after the video), 4 * 0.3 = 1.2.
SECONDS = torch.tensor([2.0, 0.3])
PATCH_VALUES = 3 * 2 * 4 * 4


def hf_classes(model_type):
    import transformers
    if model_type == "qwen2_vl":
        return transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    return transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration


@pytest.fixture(scope="module", params=list(VISION))
def pair(request, tmp_path_factory):
    """(transformers model, our model loaded from its files by the loader's recipe)."""
    config_class, model_class = hf_classes(request.param)
    torch.manual_seed(4321)
    config = config_class(text_config=TEXT, vision_config=VISION[request.param], image_token_id=IMG,
                          video_token_id=VID)
    hf = model_class._from_config(config, attn_implementation="sdpa")
    with torch.no_grad():  # norms and biases off their ones / zeros init
        for name, p in hf.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "norm" in name or "ln_q" in name else 0.0, 0.1)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(str(path))
    args = family.Args.from_dict(json.loads((path / "config.json").read_text()), source=str(path / "config.json"))
    ours = family.Model(args)
    files = load_file(path / "model.safetensors")
    ours.load_state_dict({family.Model.our_name(k): v for k, v in files.items()}, strict=True)
    assert set(ours.state_for_saving()) == set(files)
    return hf.eval(), ours.eval()


def batch(padding, seed=0):
    """(input_ids, attention_mask): row 0 one video, row 1 an image then a video; the shorter row padded."""
    g = torch.Generator().manual_seed(seed)

    def text(n):
        return torch.randint(3, 110, (n,), generator=g).tolist()

    tokens = lambda grid, merge=4: int(grid.prod()) // merge  # noqa: E731
    rows = [text(3) + [VID] * tokens(VIDEO_GRIDS[0]) + text(4),
            text(2) + [IMG] * tokens(IMAGE_GRIDS[0]) + text(2) + [VID] * tokens(VIDEO_GRIDS[1]) + text(3)]
    T = max(map(len, rows))
    ids = torch.full((2, T), PAD)
    mask = torch.zeros(2, T, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(0, len(row)) if padding != "left" else slice(T - len(row), T)
        ids[i, span], mask[i, span] = torch.tensor(row), 1
    return ids, mask


def visual_inputs(model_type, seed=5):
    g = torch.Generator().manual_seed(seed)
    out = dict(pixel_values=torch.randn(int(IMAGE_GRIDS.prod(-1).sum()), PATCH_VALUES, generator=g),
               image_grid_thw=IMAGE_GRIDS,
               pixel_values_videos=torch.randn(int(VIDEO_GRIDS.prod(-1).sum()), PATCH_VALUES, generator=g),
               video_grid_thw=VIDEO_GRIDS)
    if model_type == "qwen2_5_vl":
        out["second_per_grid_ts"] = SECONDS
    return out


def token_types(ids):
    return (ids == IMG).int() + 2 * (ids == VID).int()


@pytest.mark.parametrize("padding", ["right", "left"])
def test_video_logits_loss_and_every_gradient_match_transformers(pair, padding):
    hf, ours = pair
    kind = hf.config.model_type
    ids, mask = batch(padding)
    labels = ids.masked_fill(mask == 0, -100)
    if padding == "left":
        labels[torch.arange(2), mask.argmax(-1)] = -100
    hf.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)
    ref = hf(input_ids=ids, attention_mask=mask, mm_token_type_ids=token_types(ids), labels=labels,
             **visual_inputs(kind))
    with torch.no_grad():
        logits = ours(ids, attention_mask=mask, **visual_inputs(kind)).logits
    real = mask.bool()
    logit_diff = (logits[real] - ref.logits[real]).abs().max().item()
    scale = ref.logits[real].abs().max().item()
    out = ours(ids, labels=labels, attention_mask=mask, **visual_inputs(kind))
    loss_diff = abs(out.loss.item() - ref.loss.item())
    out.loss.backward()
    ref.loss.backward()
    ours_params = dict(ours.named_parameters())
    grad_diff, grad_rel, checked = 0.0, 0.0, 0
    for name, p in hf.named_parameters():
        mine = ours_params[family.Model.our_name(name)]
        assert p.grad is not None and mine.grad is not None, name
        diff = (mine.grad - p.grad).abs().max().item()
        grad_diff = max(grad_diff, diff)
        grad_rel = max(grad_rel, diff / max(p.grad.abs().max().item(), 1e-12))
        checked += 1
    print(f"{kind} video {padding}: logits {logit_diff:.2e} (of {scale:.1f}), loss {loss_diff:.2e}, "
          f"grads {grad_diff:.2e} abs / {grad_rel:.2e} rel over {checked} tensors")
    assert checked == len(ours_params)
    assert logit_diff <= 1e-5 * max(scale, 1.0) and loss_diff <= 1e-5 and grad_rel <= 1e-5
    # the vision tower's gradients come from the videos too (row 0 has no image)
    assert ours.visual.patch_embed.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_video_positions_and_rope_deltas_match_get_rope_index(pair, padding):
    hf, ours = pair
    kind = hf.config.model_type
    ids, mask = batch("right" if padding == "none" else padding)
    inputs = visual_inputs(kind)
    if padding == "none":  # row 0 alone: a video and no image
        ids, mask = ids[:1, :int(mask[0].sum())], None
        inputs = dict(pixel_values_videos=inputs["pixel_values_videos"][:int(VIDEO_GRIDS[0].prod())],
                      video_grid_thw=VIDEO_GRIDS[:1],
                      **({"second_per_grid_ts": SECONDS[:1]} if kind == "qwen2_5_vl" else {}))
    extra = {"second_per_grid_ts": inputs["second_per_grid_ts"]} if kind == "qwen2_5_vl" else {}
    ref_positions, ref_deltas = hf.model.get_rope_index(ids, token_types(ids), inputs.get("image_grid_thw"),
                                                        inputs["video_grid_thw"], attention_mask=mask, **extra)
    positions, deltas = ours._rope_index(ids, mask, inputs)
    assert torch.equal(positions, ref_positions) and torch.equal(deltas, ref_deltas)
    if kind == "qwen2_5_vl" and padding == "none":  # the spacing really moved the frames: 0 then 8 past the start
        assert positions[0, 0, 3:15].unique().tolist() == [3, 11]
    cache = KVCache.for_model(ours, 64)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, cache=cache, **inputs).logits
        ref = hf(input_ids=ids, attention_mask=mask, mm_token_type_ids=token_types(ids), **inputs).logits
    assert torch.equal(cache.rope_deltas, ref_deltas)
    real = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    assert (got[real] - ref[real]).abs().max().item() <= 1e-5 * max(ref.abs().max().item(), 1.0)


def test_qwen25_default_seconds_and_python_float_seconds():
    """No second_per_grid_ts: one second per grid step (transformers' default); python floats as a list."""
    ids = torch.tensor([[5] + [VID] * 12 + [6, 7]])
    grid = VIDEO_GRIDS[:1]
    positions, _ = rope_index(ids, IMG, None, 2, video_token_id=VID, video_grid_thw=grid, tokens_per_second=4)
    assert positions[0, 0, 1:7].tolist() == [1] * 6 and positions[0, 0, 7:13].tolist() == [5] * 6
    positions, _ = rope_index(ids, IMG, None, 2, video_token_id=VID, video_grid_thw=grid,
                              second_per_grid_ts=[0.26], tokens_per_second=4)
    assert positions[0, 0, 7:13].tolist() == [2] * 6   # int(1 * 4 * 0.26) = 1, + start 1
    plain, _ = rope_index(ids, IMG, None, 2, video_token_id=VID, video_grid_thw=grid)  # Qwen2-VL: frame k at k
    assert plain[0, 0, 7:13].tolist() == [2] * 6


def test_video_errors_name_their_cause(pair):
    hf, ours = pair
    kind = hf.config.model_type
    ids, mask = batch("right")
    inputs = visual_inputs(kind)
    with pytest.raises(DataError, match="video token"):
        ours(ids, attention_mask=mask, pixel_values=inputs["pixel_values"], image_grid_thw=IMAGE_GRIDS)
    with pytest.raises(DataError, match="video_grid_thw"):
        ours(ids, attention_mask=mask, **{k: v for k, v in inputs.items() if k != "video_grid_thw"})
    short = dict(inputs, pixel_values_videos=inputs["pixel_values_videos"][:48], video_grid_thw=VIDEO_GRIDS[:1])
    with pytest.raises(DataError, match="video token"):
        ours(ids, attention_mask=mask, **short)
    with pytest.raises(DataError, match="videos: pixel_values"):
        ours(ids, attention_mask=mask, **dict(inputs, pixel_values_videos=inputs["pixel_values_videos"][:, :-1]))


# ---- the processor ---------------------------------------------------------------------------------------------
def transformers_video_module(monkeypatch):
    """transformers' video_processing_qwen2_vl, imported without torchvision (not installed here): a stand-in
    module satisfies its top-level import and is removed again; only torch-only code of the module is called
    (smart_resize, patchify, get_num_of_video_patches)."""
    import importlib
    import sys
    import types
    import transformers.video_processing_utils  # noqa: F401  (everything it needs loads before the stand-in)
    from transformers.utils import is_torchvision_available
    assert not is_torchvision_available()  # cached now: the stand-in cannot change what transformers believes
    name = "transformers.models.qwen2_vl.video_processing_qwen2_vl"
    parts = ["torchvision", "torchvision.transforms", "torchvision.transforms.v2",
             "torchvision.transforms.v2.functional"]
    stubs = {p: types.ModuleType(p) for p in parts}
    for parent, child in zip(parts, parts[1:]):
        setattr(stubs[parent], child.rsplit(".", 1)[1], stubs[child])
    for p in parts:
        monkeypatch.setitem(sys.modules, p, stubs[p])
    monkeypatch.delitem(sys.modules, name, raising=False)
    module = importlib.import_module(name)
    monkeypatch.delitem(sys.modules, name)
    return module


def torchvision_resize(frames, height, width):
    """torchvision.transforms.v2.functional.resize_image for uint8 bicubic on CPU, as its source has it: the same
    size returns the input; otherwise torch's native uint8 antialiased bicubic."""
    if tuple(frames.shape[-2:]) == (height, width):
        return frames
    return torch.nn.functional.interpolate(frames, size=[height, width], mode="bicubic", align_corners=False,
                                           antialias=True)


def reference_video(module, video, *, min_pixels, max_pixels, patch=14, temporal=2, merge=2):
    """transformers' Qwen2VLVideoProcessor._preprocess for one video [T, H, W, 3] uint8 (default settings)."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    frames = torch.from_numpy(video).contiguous().permute(0, 3, 1, 2).contiguous()
    h, w = module.smart_resize(frames.shape[-2], frames.shape[-1], factor=patch * merge, min_pixels=min_pixels,
                               max_pixels=max_pixels)
    frames = torchvision_resize(frames, h, w)
    mean = torch.tensor(OPENAI_CLIP_MEAN) * (1.0 / (1 / 255))   # _fuse_mean_std_and_rescale_factor
    std = torch.tensor(OPENAI_CLIP_STD) * (1.0 / (1 / 255))
    frames = frames.to(torch.float32).sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))  # tvF.normalize
    patches, t, gh, gw = module.Qwen2VLVideoProcessor.patchify(None, frames[None], patch, merge, temporal)
    return patches[0], [t, gh, gw]


@pytest.mark.parametrize("frames,size", [(4, (40, 56)), (5, (30, 90)), (3, (200, 120))])
def test_video_processor_matches_transformers(monkeypatch, frames, size):
    from PIL import Image

    from velotune.vision.qwen2_vl_video import Qwen2VLVideoProcessor
    module = transformers_video_module(monkeypatch)
    rng = np.random.default_rng(frames)
    video = rng.integers(0, 256, (frames, *size, 3), dtype=np.uint8)
    small = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)  # the 200 x 120 frames are shrunk, others grown
    ours = Qwen2VLVideoProcessor(**small)
    out = ours([video, [Image.fromarray(f) for f in video]], fps=[2.0, 1.0])
    ref, grid = reference_video(module, video, **small)
    n = ref.shape[0]
    assert out.tensors["video_grid_thw"].tolist() == [grid, grid]
    assert torch.equal(out.tensors["pixel_values_videos"][:n], ref)
    assert torch.equal(out.tensors["pixel_values_videos"][n:], ref)   # PIL frames: the same numbers
    assert grid[0] == -(-frames // 2)    # an odd count padded with the last frame
    vp = types_namespace(size=dict(shortest_edge=small["min_pixels"], longest_edge=small["max_pixels"]),
                         patch_size=14, merge_size=2, temporal_patch_size=2)
    assert n == module.Qwen2VLVideoProcessor.get_num_of_video_patches(vp, frames, *size, {})
    assert out.tokens_per_video == [n // 4] * 2 and out.expansions[0] == "<|video_pad|>" * (n // 4)
    assert "second_per_grid_ts" not in out.tensors
    q25 = Qwen2VLVideoProcessor(**small, model_type="qwen2_5_vl")([video, video], fps=[2.0, 1.0])
    assert q25.tensors["second_per_grid_ts"].dtype == torch.float32
    assert q25.tensors["second_per_grid_ts"].tolist() == [1.0, 2.0]   # temporal_patch_size / fps


def types_namespace(**kwargs):
    import types
    return types.SimpleNamespace(**kwargs)


def test_video_processor_prompt_and_errors():
    from velotune.vision.qwen2_vl_video import Qwen2VLVideoProcessor
    proc = Qwen2VLVideoProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    video = np.zeros((2, 56, 56, 3), dtype=np.uint8)
    out = proc([video])
    text = proc.expand("see " + proc.wrap(proc.placeholder) + " ok", out, "record 1")
    assert text == "see <|vision_start|>" + "<|video_pad|>" * out.tokens_per_video[0] + "<|vision_end|> ok"
    with pytest.raises(DataError, match="record 1: the text has 2 video placeholder"):
        proc.expand(proc.placeholder * 2, out, "record 1")
    with pytest.raises(DataError, match="uint8 frames"):
        proc([video.astype(np.float32)], source="rec")
    with pytest.raises(DataError, match="fps"):
        proc([video], fps=[1.0, 2.0])
    assert set(proc.collate([out, proc([])])) == {"pixel_values_videos", "video_grid_thw"}


# ---- reading ---------------------------------------------------------------------------------------------------
def tiny_video(path, frames=10, rate=5, size=32):
    """An mpeg4 file of `frames` flat grey frames (frame i at level 20 * i + 10), written with PyAV."""
    import av
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            image = np.full((size, size, 3), 20 * i + 10, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_read_video_samples_at_fps_with_caps(tmp_path):
    from velotune.vision.video import read_video
    path = tiny_video(tmp_path / "tiny.mp4")
    video = read_video(path)  # 10 frames at 5 fps = 2 s; 2 per second -> 4 frames (also the minimum)
    assert video.frames.shape == (4, 32, 32, 3) and video.frames.dtype == np.uint8
    assert video.indices == [0, 3, 6, 9] and video.total_frames == 10 and video.source_fps == 5.0
    assert video.fps == pytest.approx(2.0)
    levels = video.frames.reshape(4, -1).mean(1)
    assert np.allclose(levels, [20 * i + 10 for i in video.indices], atol=4)  # the frames asked for, in order
    capped = read_video(path, fps=5.0, min_frames=2, max_frames=6, max_total_pixels=6 * 16 * 16)
    assert len(capped) == 6 and capped.frames.shape[1:3] == (16, 16)
    assert capped.fps == pytest.approx(3.0)   # 6 of 10 frames of a 5 fps file


def test_read_video_errors_name_the_file(tmp_path, monkeypatch):
    import sys

    from velotune.errors import UnsupportedError
    from velotune.vision.video import read_video
    with pytest.raises(DataError, match="nothere.mp4: video file not found"):
        read_video(tmp_path / "nothere.mp4")
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    with pytest.raises(DataError, match="broken.mp4: cannot read the video"):
        read_video(bad)
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(UnsupportedError, match="tiny.mp4: reading videos needs PyAV"):
        read_video(tmp_path / "tiny.mp4")


def test_read_video_feeds_the_processor(tmp_path):
    from velotune.vision.qwen2_vl_video import Qwen2VLVideoProcessor
    from velotune.vision.video import read_video
    video = read_video(tiny_video(tmp_path / "tiny.mp4"))
    out = Qwen2VLVideoProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 4, model_type="qwen2_5_vl")(
        [video.frames], fps=[video.fps])
    assert out.tensors["video_grid_thw"].tolist() == [[2, 4, 4]]
    assert out.tensors["second_per_grid_ts"].tolist() == [1.0]


def test_a_family_without_videos_refuses_them_by_name(tiny_llava):
    """Video inputs given to a family that reads images only are a DataError naming the family, not a TypeError."""
    import velotune as vt
    from velotune.errors import DataError
    model, _ = vt.load(str(tiny_llava), dtype="float32")
    with pytest.raises(DataError, match="llava reads images, not videos \\(pixel_values_videos, video_grid_thw"):
        model(torch.tensor([[1, 2, 3]]), pixel_values_videos=torch.zeros(4, 3), video_grid_thw=torch.ones(1, 3))

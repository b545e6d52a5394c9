"""Videos through the server and the command line (issue 17): `velotune serve` answering the official openai client's
video_url parts (data:video/mp4;base64 URIs, decoded in memory) with the tokens vt.generate gives for the same video
file; remote URLs, undecodable bytes, too many or too large videos, and video parts for models that do not read
videos refused with a 400 naming the part; `velotune generate --video` and `velotune chat --video` / /video.
Models are tiny Qwen2-VL / Qwen2.5-VL / LLaVA checkpoints with random weights; videos tiny mpeg4 files made with
PyAV."""
import base64
import io
import subprocess
import sys
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch

import velotune as vt
from server_process import free_port, serving
from test_vision_video import tiny_video
from velotune.errors import DataError, VelotuneError
from vision_fixtures import QUESTION

pytest.importorskip("av")

TEXTS = [QUESTION, " ".join("0123456789"), "What happens in the video?"] * 30
VIDEO_QUESTION = "What happens in the video?"
GREEDY = dict(max_new_tokens=5, temperature=0.0)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from velotune.bench.tiny_vlm_families import make_tiny_qwen2_vl
    return make_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen2_vl"), TEXTS)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Two tiny videos: 10 frames of 16 x 16 at 5 fps, and 8 of 20 x 20."""
    folder = tmp_path_factory.mktemp("clips")
    return [tiny_video(folder / "a.mp4", frames=10, size=16), tiny_video(folder / "b.mp4", frames=8, size=20)]


def _uri(path, media_type="video/mp4") -> str:
    return f"data:{media_type};base64," + base64.b64encode(path.read_bytes()).decode()


def _video_url(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


def _file_prompt(path) -> list:
    return [{"role": "user", "content": [{"type": "video", "video": str(path)},
                                         {"type": "text", "text": VIDEO_QUESTION}]}]


# ---- decoding in memory ---------------------------------------------------------------------------------------
def test_read_video_bytes_matches_the_file_and_bounds_the_work(clips, tmp_path):
    from velotune.vision.video import read_video, read_video_bytes
    from_file, from_bytes = read_video(clips[0]), read_video_bytes(clips[0].read_bytes(), source="upload")
    assert np.array_equal(from_file.frames, from_bytes.frames) and from_file.indices == from_bytes.indices
    assert from_file.fps == from_bytes.fps and from_file.total_frames == from_bytes.total_frames == 10
    capped = read_video_bytes(clips[0].read_bytes(), fps=5.0, min_frames=2, max_frames=6, max_total_pixels=6 * 8 * 8)
    assert capped.frames.shape == (6, 8, 8, 3)       # the file reader's caps hold for bytes too
    data = clips[0].read_bytes()
    for kwargs, message in [
        ({"max_frame_pixels": 15 * 15}, "upload: the video's frames are 16x16, over the 225 pixels"),
        ({"max_decoded_pixels": 5 * 16 * 16}, "upload: the video holds more frames than may be decoded here"),
    ]:
        with pytest.raises(DataError, match=message):
            read_video_bytes(data, source="upload", **kwargs)
    with pytest.raises(DataError, match="upload: cannot read the video"):
        read_video_bytes(b"not a video at all" * 10, source="upload")
    with pytest.raises(DataError, match="upload: the video is empty"):
        read_video_bytes(b"", source="upload")
    # a concat list names another file: its demuxer is not among those an upload may use
    listing = f"ffconcat version 1.0\nfile {clips[0]}\n".encode()
    with pytest.raises(DataError, match="upload: cannot read the video"):
        read_video_bytes(listing, source="upload")


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_a_video_url_part_gives_the_file_parts_tokens_and_tensors(family, clips, tmp_path):
    from velotune.bench.tiny_vlm_families import make_tiny_qwen2_vl
    from velotune.infer.vision_prompt import encode_image_prompt
    model_dir = make_tiny_qwen2_vl(tmp_path / family, TEXTS, family=family)
    model, tokenizer = vt.load(str(model_dir), dtype="float32")
    for clip in clips:
        ids, tensors = encode_image_prompt(model, tokenizer, _file_prompt(clip))
        inline = [{"role": "user", "content": [_video_url(_uri(clip)), {"type": "text", "text": VIDEO_QUESTION}]}]
        ids2, tensors2 = encode_image_prompt(model, tokenizer, inline, where="messages", allow_files=False)
        assert ids == ids2 and set(tensors) == set(tensors2)
        assert all(torch.equal(tensors[k], tensors2[k]) for k in tensors), family
    if family == "qwen2_5_vl":   # the sampled rate reached the processor: temporal patch 2 / (4 of 8 frames at 5 fps)
        assert tensors2["second_per_grid_ts"].tolist() == pytest.approx([2 / 2.5])
    for url, message in [("data:video/mp4;base64,AAAA", r"messages\[0\].content\[0\]: cannot read the video"),
                         ("data:text/plain;base64,AAAA", "not a video"),
                         ("data:video/mp4;base64,%%%", "not valid base64"),
                         ("https://example.com/a.mp4", "data:video/...;base64 URI")]:
        with pytest.raises(DataError, match=message):
            encode_image_prompt(model, tokenizer, [{"role": "user", "content": [_video_url(url)]}], where="messages",
                                allow_files=False)


# ---- the server ------------------------------------------------------------------------------------------------
def test_serve_answers_video_url_parts_as_generate_does_and_bounds_them(qwen_dir, clips):
    from openai import BadRequestError, OpenAI

    from velotune.infer.server_schema import MAX_VIDEO_URI_BYTES
    from velotune.infer.vision_prompt import encode_image_prompt
    model, tokenizer = vt.load(str(qwen_dir), dtype="float32")
    reference = [vt.generate(model, tokenizer, _file_prompt(clip), **GREEDY) for clip in clips]
    prompt_tokens = len(encode_image_prompt(model, tokenizer, _file_prompt(clips[0]))[0])
    port = free_port()
    args = [sys.executable, "-m", "velotune", "serve", str(qwen_dir), "--port", str(port), "--dtype", "float32",
            "--device", "cpu", "--max-body-bytes", str(MAX_VIDEO_URI_BYTES + 1_000_000)]
    with serving(args, port) as url:
        client = OpenAI(base_url=url + "/v1", api_key="none")
        name = client.models.list().data[0].id

        def ask(*parts):
            return client.chat.completions.create(model=name, max_tokens=GREEDY["max_new_tokens"], temperature=0,
                                                  messages=[{"role": "user", "content": list(parts)}])
        for clip, want in zip(clips, reference):
            reply = ask(_video_url(_uri(clip)), {"type": "text", "text": VIDEO_QUESTION})
            assert reply.choices[0].message.content == want
        assert reply.usage.completion_tokens > 0
        first = ask(_video_url(_uri(clips[0])), {"type": "text", "text": VIDEO_QUESTION})
        assert first.usage.prompt_tokens == prompt_tokens     # the same prompt, video tokens included
        bad = _uri(clips[0]).replace("base64,", "base64," + base64.b64encode(b"garbage!" * 3).decode(), 1)
        big = "data:video/mp4;base64," + "A" * MAX_VIDEO_URI_BYTES
        for parts, message in [
            ([_video_url("https://example.com/clip.mp4")], r"messages\[0\].content\[0\]: video_url.url must be a "
                                                           "data: URI"),
            ([_video_url("data:video/mp4;base64," + base64.b64encode(b"not a video" * 20).decode())],
             r"messages\[0\].content\[0\]: cannot read the video"),
            ([{"type": "text", "text": "x"}, _video_url(bad)], r"messages\[0\].content\[1\]: cannot read the video"),
            ([_video_url(_uri(clips[0]))] * 3, r"messages\[0\].content\[2\]: at most 2 videos per request"),
            ([_video_url(big)], r"messages\[0\].content\[0\]: the video's data URI is \d+ bytes, over the"),
        ]:
            with pytest.raises(BadRequestError, match=message):
                ask(*parts, {"type": "text", "text": VIDEO_QUESTION})
        assert httpx.get(url + "/health").status_code == 200   # still serving after the refusals
        reply = ask(_video_url(_uri(clips[1])), {"type": "text", "text": VIDEO_QUESTION})
        assert reply.choices[0].message.content == reference[1]


def test_models_that_do_not_read_videos_refuse_video_parts_by_name(tiny_llava, clips):
    from openai import BadRequestError, OpenAI
    from starlette.testclient import TestClient

    from velotune.infer.server import build_server, create_app
    from velotune.infer.server_schema import APIError, ChatRequest, chat_messages, check_video_parts
    model, tokenizer = vt.load(str(tiny_llava), dtype="float32")
    with TestClient(create_app(build_server(model, tokenizer, "llava"), None)) as http:
        client = OpenAI(base_url=str(http.base_url) + "/v1", api_key="none", http_client=http)
        with pytest.raises(BadRequestError, match=r"messages\[0\].content\[1\]: a video part, but this model reads "
                                                  r"images only; videos need a Qwen2-VL or Qwen2.5-VL model") as err:
            client.chat.completions.create(model="llava", max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "text", "text": "x"}, _video_url(_uri(clips[0]))]}])
        assert err.value.body["param"] == "messages.0.content.1"
    # a text-only model: the same refusal before the prompt is built, and chat_messages names the families too
    request = ChatRequest.model_validate({"model": "m", "messages": [
        {"role": "system", "content": "s"}, {"role": "user", "content": [_video_url(_uri(clips[0]))]}]})
    with pytest.raises(APIError, match=r"messages\[1\].content\[0\]: a video part, but this model reads text only"):
        check_video_parts(request, "text")
    with pytest.raises(APIError, match="this model reads text only; videos need a Qwen2-VL or Qwen2.5-VL model"):
        chat_messages(request, images=False)
    # a prompt for the images-only family names the part and the families (generation's path)
    from velotune.infer.vision_prompt import encode_image_prompt
    with pytest.raises(DataError, match=r"messages\[0\].content\[0\]: a video part, but llava reads images only"):
        encode_image_prompt(model, tokenizer, [{"role": "user", "content": [_video_url(_uri(clips[0]))]}],
                            where="messages", allow_files=False)


# ---- the command line ------------------------------------------------------------------------------------------
def _cli(model_dir, **extra):
    common = dict(model=str(model_dir), adapter=None, dtype="float32", quantize=None, device="cpu", chat_template=None,
                  temperature=0.0, top_k=None, top_p=None, min_p=None, repetition_penalty=None, seed=None,
                  max_new_tokens=GREEDY["max_new_tokens"])
    return SimpleNamespace(**common, **extra)


def test_generate_and_chat_take_videos(qwen_dir, tiny_llava, clips, capsys):
    from velotune.infer.chat_cli import run_chat, run_generate
    model, tokenizer = vt.load(str(qwen_dir), dtype="float32")
    reference = [vt.generate(model, tokenizer, _file_prompt(clip), **GREEDY) for clip in clips]
    run_generate(_cli(qwen_dir, prompt=VIDEO_QUESTION, messages=None, raw=False, image=[], video=[str(clips[0])]))
    assert capsys.readouterr().out.rstrip("\n") == reference[0]
    lines = iter([f"/video {clips[1]}", VIDEO_QUESTION, "/quit"])
    out = io.StringIO()
    run_chat(_cli(qwen_dir, system=None, image=[], video=[]), input_fn=lambda _: next(lines), out=out)
    text = out.getvalue()
    assert "video attached" in text and reference[1] in text
    with pytest.raises(VelotuneError, match="--video missing.mp4: no such file"):
        run_generate(_cli(qwen_dir, prompt="x", messages=None, raw=False, image=[], video=["missing.mp4"]))
    with pytest.raises(VelotuneError, match="--video: llava reads images only; videos need a Qwen2-VL or "
                                            "Qwen2.5-VL model"):
        run_generate(_cli(tiny_llava, prompt="x", messages=None, raw=False, image=[], video=[str(clips[0])]))
    lines = iter([f"/video {clips[1]}", "/quit"])
    out = io.StringIO()
    run_chat(_cli(tiny_llava, system=None, image=[], video=[]), input_fn=lambda _: next(lines), out=out)
    assert "error: /video: llava reads images only" in out.getvalue()


def test_the_cli_takes_video_flags(qwen_dir, clips):
    done = subprocess.run([sys.executable, "-m", "velotune", "generate", str(qwen_dir), "--prompt", VIDEO_QUESTION,
                           "--video", str(clips[0]), "--video", str(clips[1]), "--device", "cpu", "--dtype",
                           "float32", "--temperature", "0", "--max-new-tokens", "3"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    model, tokenizer = vt.load(str(qwen_dir), dtype="float32")
    both = [{"role": "user", "content": [{"type": "video", "video": str(c)} for c in clips]
             + [{"type": "text", "text": VIDEO_QUESTION}]}]
    assert done.stdout.rstrip("\n") == vt.generate(model, tokenizer, both, max_new_tokens=3, temperature=0.0)

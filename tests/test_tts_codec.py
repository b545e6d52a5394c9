"""The audio-codec layer of text-to-speech: SNAC's frames in Orpheus' order, codes <-> tokens, and codec directories
(random weights only: no codec weights are downloaded or shipped)."""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from velotune.audio.codecs import SNAC_24KHZ_CONFIG, CodecSpec, load_codec, read_codec_spec
from velotune.errors import CheckpointError, ConfigError, DataError

# A SNAC of the 24 kHz model's levels (strides 4, 2, 1) small enough to run in milliseconds: 4 samples a hop,
# 16 samples a frame, codebook 16.
TINY_SNAC = {"sampling_rate": 24000, "encoder_dim": 8, "encoder_rates": [2, 2], "decoder_dim": 16,
             "decoder_rates": [2, 2], "attn_window_size": None, "codebook_size": 16, "codebook_dim": 4,
             "vq_strides": [4, 2, 1], "noise": True, "depthwise": True}


def random_codes(spec: CodecSpec, frames: int, generator=None) -> list:
    return [torch.randint(0, spec.codebook_size, (frames * n,), generator=generator) for n in spec.codes_per_level]


def test_snac_24khz_frames_are_orpheus_seven_codes():
    spec = read_codec_spec("snac_24khz")
    assert (spec.codes_per_frame, spec.samples_per_frame, spec.codebook_size) == (7, 2048, 4096)
    assert spec.frame_rate == pytest.approx(24000 / 2048)
    codes = [torch.tensor([10, 11]), torch.tensor([20, 21, 22, 23]), torch.tensor([30, 31, 32, 33, 34, 35, 36, 37])]
    assert spec.interleave(codes).tolist() == [10, 20, 30, 31, 21, 32, 33, 11, 22, 34, 35, 23, 36, 37]
    tokens = spec.codes_to_tokens(codes, base_id=1000).tolist()
    assert tokens[:7] == [1000 + 10, 1000 + 4096 + 20, 1000 + 2 * 4096 + 30, 1000 + 3 * 4096 + 31,
                          1000 + 4 * 4096 + 21, 1000 + 5 * 4096 + 32, 1000 + 6 * 4096 + 33]


@pytest.mark.parametrize("strides", [(4, 2, 1), (8, 4, 2, 1), (2, 1), (1,), (4, 1)])
def test_interleave_and_tokens_round_trip_exactly(strides):
    spec = CodecSpec("test", 24000, 37, strides, 8)
    g = torch.Generator().manual_seed(sum(strides))
    for frames in (1, 5, 17):
        codes = random_codes(spec, frames, g)
        back = spec.deinterleave(spec.interleave(codes))
        assert all(torch.equal(a, b) for a, b in zip(codes, back))
        tokens = spec.codes_to_tokens(codes, 500)
        assert tokens.numel() == frames * spec.codes_per_frame
        slots = tokens.reshape(frames, spec.codes_per_frame) - 500
        for slot in range(spec.codes_per_frame):  # each slot its own range: disjoint token ids
            assert bool(((slots[:, slot] >= slot * 37) & (slots[:, slot] < (slot + 1) * 37)).all())
        back = spec.tokens_to_codes(tokens, 500)
        assert all(torch.equal(a, b) for a, b in zip(codes, back))


def test_codes_and_tokens_that_do_not_fit_are_refused():
    spec = read_codec_spec("snac_24khz")
    with pytest.raises(DataError, match="expected 3 levels"):
        spec.interleave([torch.zeros(2, dtype=torch.long)] * 2)
    with pytest.raises(DataError, match="do not make whole frames"):
        spec.interleave([torch.zeros(2), torch.zeros(4), torch.zeros(7)])
    with pytest.raises(DataError, match="codec / vocabulary mismatch"):
        spec.interleave([torch.tensor([4096]), torch.zeros(2, dtype=torch.long), torch.zeros(4, dtype=torch.long)])
    tokens = spec.codes_to_tokens(random_codes(spec, 2), 100)
    with pytest.raises(DataError, match="not whole frames"):
        spec.tokens_to_codes(tokens[:-1], 100)
    swapped = tokens.clone()
    swapped[1], swapped[2] = tokens[2], tokens[1]   # a slot-2 code where slot 1's belongs
    with pytest.raises(DataError, match="position 1 is not a code of frame slot 1"):
        spec.tokens_to_codes(swapped, 100)


def test_a_codec_layout_needs_only_its_config(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps(SNAC_24KHZ_CONFIG))
    monkeypatch.setitem(sys.modules, "snac", None)   # the snac package is not needed for the layout
    assert read_codec_spec(tmp_path) == read_codec_spec("snac_24khz")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_codec(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 4}))
    with pytest.raises(ConfigError, match="not a codec config"):
        read_codec_spec(tmp_path)
    with pytest.raises(ConfigError, match="no such directory"):
        read_codec_spec(tmp_path / "missing")


def test_pickled_or_absent_weights_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="downloads no codec weights"):
        load_codec("snac_24khz")
    (tmp_path / "config.json").write_text(json.dumps(SNAC_24KHZ_CONFIG))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not read")
    with pytest.raises(CheckpointError, match="pytorch_model.bin is a pickle"):
        load_codec(tmp_path)


# ---- the SNAC network (the snac package, random weights) ----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_codec():
    pytest.importorskip("snac")
    from velotune.audio.codecs import SnacCodec
    return SnacCodec.from_config(TINY_SNAC, seed=0)


def test_encode_and_decode_frame_counts(tiny_codec):
    codec = tiny_codec
    assert (codec.codes_per_frame, codec.samples_per_frame, codec.codebook_size) == (7, 16, 16)
    for n in (1, 16, 100, 161):
        codes = codec.encode(torch.randn(n))
        frames = math.ceil(n / 16)
        assert [c.shape[0] for c in codes] == [frames, 2 * frames, 4 * frames]
        assert all(c.dtype == torch.long and int(c.min()) >= 0 and int(c.max()) < 16 for c in codes)
        assert codec.decode(codes).shape == (frames * 16,)
    batch = codec.encode(torch.randn(2, 40))
    assert [c.shape for c in batch] == [(2, 3), (2, 6), (2, 12)]
    assert codec.decode(batch).shape == (2, 48)
    # another sample rate is resampled to the codec's first: 100 samples at 48 kHz are 50 at 24 kHz
    assert codec.encode(torch.randn(100), sample_rate=48000)[0].shape[0] == math.ceil(50 / 16)


def test_codec_directory_round_trip(tiny_codec, tmp_path):
    from safetensors.torch import load_file, save_file
    waveform = torch.randn(200)
    expected = tiny_codec.encode(waveform)
    tiny_codec.save(tmp_path / "codec")
    loaded = load_codec(tmp_path / "codec")
    assert loaded.spec == tiny_codec.spec == read_codec_spec(tmp_path / "codec")
    assert all(torch.equal(a, b) for a, b in zip(expected, loaded.encode(waveform)))
    # A conversion of an older checkpoint names the weight-norm tensors weight_g / weight_v: read the same.
    state = load_file(str(tmp_path / "codec" / "model.safetensors"))
    renamed = {k.replace("parametrizations.weight.original0", "weight_g")
               .replace("parametrizations.weight.original1", "weight_v"): v for k, v in state.items()}
    assert renamed != state
    save_file(renamed, str(tmp_path / "codec" / "model.safetensors"))
    again = load_codec(tmp_path / "codec")
    assert all(torch.equal(a, b) for a, b in zip(expected, again.encode(waveform)))
    # a tensor missing is named
    save_file({k: v for k, v in state.items() if "quantizer" not in k}, str(tmp_path / "codec" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing: quantizer"):
        load_codec(tmp_path / "codec")

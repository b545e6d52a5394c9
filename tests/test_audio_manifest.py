"""Reading speech manifests (jsonl, csv) and `datasets` sets: counts, clip rules, and errors naming file and row."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

pytest.importorskip("soundfile")
pytest.importorskip("soxr")
import soundfile

from velotune.audio import AudioStats, ClipRules, read_audio_dataset, read_manifest
from velotune.errors import ConfigError, DataError


def sine(seconds: float, rate: int, freq: float = 440.0, amplitude: float = 0.3) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(round(seconds * rate)) / rate)).astype(np.float32)


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


@pytest.fixture()
def clips(tmp_path):
    """A folder of small clips: 16 kHz wav, 8 kHz flac, 44.1 kHz stereo wav, silence, and bad files."""
    folder = tmp_path / "clips"
    folder.mkdir()
    soundfile.write(folder / "plain.wav", sine(1.0, 16000), 16000)
    soundfile.write(folder / "phone.flac", sine(0.5, 8000), 8000)
    soundfile.write(folder / "stereo.wav", np.stack([sine(0.25, 44100)] * 2, axis=1), 44100)
    soundfile.write(folder / "silence.wav", np.zeros(16000, np.float32), 16000)
    soundfile.write(folder / "long.wav", sine(2.0, 16000), 16000)
    soundfile.write(folder / "no_samples.wav", np.zeros(0, np.float32), 16000)
    (folder / "notes.wav").write_text("a text file with an audio name")
    (folder / "torn.wav").write_bytes((folder / "plain.wav").read_bytes()[:30])
    (folder / "voice.m4a").write_bytes(b"\0\0\0\x20ftypM4A ")
    return folder


def test_jsonl_manifest_reads_counts_and_skips_silence(tmp_path, clips):
    manifest = write_jsonl(tmp_path / "train.jsonl", [
        {"audio": "clips/plain.wav", "text": "plain"},
        "",
        {"audio": "clips/phone.flac", "text": "phone"},
        {"audio": "clips/silence.wav", "text": "nothing said"},
        {"audio": str(clips / "stereo.wav"), "text": "stereo", "speaker": "ignored"},
    ])
    examples, stats = read_manifest(manifest)
    assert [e.text for e in examples] == ["plain", "phone", "stereo"]
    assert [e.origin for e in examples] == [f"{manifest}:1", f"{manifest}:3", f"{manifest}:5"]
    assert [e.duration_s for e in examples] == [1.0, 0.5, 0.25]
    assert [e.resampled_from for e in examples] == [None, 8000, 44100]
    assert examples[0].path == clips.parent / "clips/plain.wav"
    assert all(e.audio.dtype == np.float32 and e.audio.size == e.duration_s * 16000 for e in examples)
    assert (stats.rows, stats.kept, stats.skipped_silent, stats.skipped_long) == (4, 3, 0 + 1, 0)
    assert (stats.resampled, stats.mixed_down) == (2, 1)
    assert stats.kept_seconds == pytest.approx(1.75)
    assert stats.skipped == [f"{manifest}:4: silent (loudest 25 ms at -inf dBFS)"]
    assert "3 of 4 clips kept" in stats.summary()


def test_csv_manifest_with_own_column_names_and_lazy_audio(tmp_path, clips):
    manifest = tmp_path / "set.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "transcript"])
        writer.writerow(["clips/plain.wav", "hello, world"])
        writer.writerow(["clips/phone.flac", "a quoted\nmultiline transcript"])
    eager, _ = read_manifest(manifest, audio_column="file", text_column="transcript")
    lazy, stats = read_manifest(manifest, audio_column="file", text_column="transcript",
                                rules=ClipRules(keep_audio=False))
    assert [e.text for e in lazy] == ["hello, world", "a quoted\nmultiline transcript"]
    assert all(e.audio is None for e in lazy) and stats.kept == 2 and stats.resampled == 1
    for a, b in zip(eager, lazy):
        np.testing.assert_array_equal(a.load(), b.load())
        assert a.load() is a.audio


def test_long_clips_are_refused_naming_the_row_or_skipped_and_counted(tmp_path, clips):
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"audio": "clips/plain.wav", "text": "ok"},
                                                  {"audio": "clips/long.wav", "text": "too long"}])
    with pytest.raises(DataError) as caught:
        read_manifest(manifest, rules=ClipRules(max_seconds=1.5))
    assert f"{manifest}:2: clip is 2.0 s, longer than 1.5 s" in str(caught.value)
    examples, stats = read_manifest(manifest, rules=ClipRules(max_seconds=1.5, long_clips="skip"))
    assert [e.text for e in examples] == ["ok"]
    assert stats.skipped_long == 1 and stats.skipped == [f"{manifest}:2: longer than 1.5 s (2.0 s)"]
    # exactly at the limit is allowed
    assert len(read_manifest(manifest, rules=ClipRules(max_seconds=2.0))[0]) == 2


def test_default_limit_is_whisper_30_seconds(tmp_path):
    soundfile.write(tmp_path / "thirty.wav", sine(30.0, 16000), 16000)
    soundfile.write(tmp_path / "over.wav", sine(30.1, 16000), 16000)
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"audio": "thirty.wav", "text": "a"},
                                                  {"audio": "over.wav", "text": "b"}])
    with pytest.raises(DataError, match=r"m\.jsonl:2: clip is 30\.1 s, longer than 30 s"):
        read_manifest(manifest)


def test_every_bad_row_is_named_in_one_error(tmp_path, clips):
    manifest = write_jsonl(tmp_path / "bad.jsonl", [
        {"audio": "clips/plain.wav", "text": "fine"},                       # 1
        {"text": "no audio key"},                                           # 2
        {"audio": "clips/plain.wav"},                                       # 3
        {"audio": "clips/plain.wav", "text": "   "},                        # 4
        {"audio": "clips/plain.wav", "text": 42},                           # 5
        {"audio": "clips/absent.wav", "text": "missing file"},              # 6
        {"audio": "clips/notes.wav", "text": "text renamed .wav"},          # 7
        {"audio": "clips/torn.wav", "text": "corrupt"},                     # 8
        {"audio": "clips/no_samples.wav", "text": "0 samples"},             # 9
        {"audio": "clips/voice.m4a", "text": "unsupported"},                # 10
        {"audio": "", "text": "empty path"},                                # 11
        {"audio": ["clips/plain.wav"], "text": "a list"},                   # 12
    ])
    with pytest.raises(DataError) as caught:
        read_manifest(manifest)
    message = str(caught.value)
    assert message.startswith(f"{manifest}: 11 bad rows:")
    expected = {
        2: "missing column 'audio'", 3: "missing column 'text'", 4: "column 'text' is empty",
        5: "column 'text' must be text, got int", 6: "absent.wav: audio file not found",
        7: "notes.wav: not readable as audio", 8: "torn.wav: not readable as audio",
        9: "no_samples.wav: the audio holds no samples", 10: "voice.m4a: unsupported audio format ('.m4a')",
        11: "column 'audio' is empty", 12: "column 'audio' must be a file path, got list",
    }
    lines = message.splitlines()[1:]
    assert len(lines) == len(expected)
    for line, (number, reason) in zip(lines, expected.items()):
        assert line.strip().startswith(f"{manifest}:{number}: "), line
        assert reason in line, line


def test_many_bad_rows_are_capped_in_the_message(tmp_path, clips):
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"audio": "clips/plain.wav", "text": ""}] * 25)
    with pytest.raises(DataError) as caught:
        read_manifest(manifest)
    assert "25 bad rows" in str(caught.value) and "... and 5 more" in str(caught.value)


def test_csv_errors_name_file_and_line(tmp_path, clips):
    no_text = tmp_path / "no_text.csv"
    no_text.write_text("audio,words\nclips/plain.wav,hi\n")
    with pytest.raises(DataError, match=r"no_text\.csv: no 'text' column for the transcript \(columns: "
                                        r"'audio', 'words'\); name yours with text_column="):
        read_manifest(no_text)
    empty_cell = tmp_path / "empty_cell.csv"
    empty_cell.write_text("audio,text\nclips/plain.wav,hi\nclips/plain.wav,\nclips/absent.wav,x\n")
    with pytest.raises(DataError) as caught:
        read_manifest(empty_cell)
    message = str(caught.value)
    assert f"{empty_cell}:3: column 'text' is empty" in message
    assert f"{empty_cell}:4: " in message and "absent.wav: audio file not found" in message


def test_manifest_level_errors(tmp_path, clips):
    with pytest.raises(DataError, match="not found"):
        read_manifest(tmp_path / "nowhere.jsonl")
    with pytest.raises(DataError, match="got a folder"):
        read_manifest(clips)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"audio": "clips/plain.wav", "text": "a"}\n{"audio": \n')
    with pytest.raises(DataError, match=r"broken\.jsonl:2: malformed JSON"):
        read_manifest(broken)
    silent = write_jsonl(tmp_path / "silent.jsonl", [{"audio": "clips/silence.wav", "text": "x"}])
    with pytest.raises(DataError, match=r"silent\.jsonl: no clips left to train on: 0 of 1 clips kept"):
        read_manifest(silent)
    _, stats = read_manifest(silent, rules=ClipRules(skip_silent=False))
    assert stats.kept == 1 and stats.skipped_silent == 0


def test_confined_manifest_refuses_paths_outside_its_folder(tmp_path, clips):
    inner = tmp_path / "inner"
    inner.mkdir()
    soundfile.write(inner / "ok.wav", sine(0.5, 16000), 16000)
    manifest = write_jsonl(inner / "m.jsonl", [
        {"audio": "ok.wav", "text": "inside"},
        {"audio": "../clips/plain.wav", "text": "up and out"},
        {"audio": str(clips / "plain.wav"), "text": "absolute"},
    ])
    assert len(read_manifest(manifest)[0]) == 3
    with pytest.raises(DataError) as caught:
        read_manifest(manifest, confine_to_dir=True)
    message = str(caught.value)
    assert f"{manifest}:2: audio path '../clips/plain.wav' leads outside" in message
    assert f"{manifest}:3: audio path " in message and ":1:" not in message


def test_clip_rules_are_checked():
    with pytest.raises(ConfigError, match="long_clips"):
        ClipRules(long_clips="split")
    with pytest.raises(ConfigError, match="max_seconds"):
        ClipRules(max_seconds=0)


def test_hf_dataset_with_arrays_paths_and_bytes(tmp_path, clips):
    datasets = pytest.importorskip("datasets")
    rows = {
        "audio": [{"array": sine(0.5, 8000).tolist(), "sampling_rate": 8000, "path": None, "bytes": None},
                  {"array": None, "sampling_rate": None, "path": "clips/plain.wav", "bytes": None},
                  {"array": None, "sampling_rate": None, "path": None,
                   "bytes": (clips / "phone.flac").read_bytes()},
                  {"array": np.zeros(1600).tolist(), "sampling_rate": 16000, "path": None, "bytes": None}],
        "text": ["array", "path", "bytes", "silent"],
    }
    examples, stats = read_audio_dataset(datasets.Dataset.from_dict(rows), base_dir=tmp_path, name="train")
    assert [e.text for e in examples] == ["array", "path", "bytes"]
    assert [e.origin for e in examples] == ["train row 0", "train row 1", "train row 2"]
    assert [e.duration_s for e in examples] == [0.5, 1.0, 0.5]
    assert (stats.rows, stats.kept, stats.skipped_silent, stats.resampled) == (4, 3, 1, 2)
    lazy, _ = read_audio_dataset(datasets.Dataset.from_dict(rows), base_dir=tmp_path,
                                 rules=ClipRules(keep_audio=False))
    for a, b in zip(examples, lazy):
        assert b.audio is None
        np.testing.assert_array_equal(a.load(), b.load())


def test_hf_dataset_with_an_audio_feature_column(tmp_path, clips):
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict({"speech": [str(clips / "plain.wav"), str(clips / "stereo.wav")],
                                        "sentence": ["one", "two"]})
    table = table.cast_column("speech", datasets.Audio(sampling_rate=16000))
    examples, stats = read_audio_dataset(table, audio_column="speech", text_column="sentence")
    assert [e.text for e in examples] == ["one", "two"] and stats.mixed_down == 1 and stats.resampled == 1
    plain = datasets.Dataset.from_dict({"audio": ["clips/plain.wav"], "text": ["relative path"]})
    assert read_audio_dataset(plain, base_dir=tmp_path)[0][0].duration_s == 1.0


def test_hf_dataset_errors_name_the_row(tmp_path, clips):
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict({
        "audio": ["clips/plain.wav", "clips/absent.wav", "clips/notes.wav", "clips/plain.wav"],
        "text": ["fine", "missing", "not audio", ""],
    })
    with pytest.raises(DataError) as caught:
        read_audio_dataset(table, base_dir=tmp_path, name="speech-set")
    lines = str(caught.value).splitlines()
    assert lines[0] == "speech-set: 3 bad rows:"
    assert lines[1].strip().startswith("speech-set row 1: ") and "absent.wav: audio file not found" in lines[1]
    assert lines[2].strip().startswith("speech-set row 2: ") and "not readable as audio" in lines[2]
    assert lines[3].strip() == "speech-set row 3: column 'text' is empty: every clip needs its transcript"
    arrays = datasets.Dataset.from_dict({"audio": [{"array": [0.1, 0.2], "sampling_rate": None}], "text": ["x"]})
    with pytest.raises(DataError, match=r"^dataset: 1 bad row:\n  dataset row 0: .*without its 'sampling_rate'"):
        read_audio_dataset(arrays)
    garbage = datasets.Dataset.from_dict({"audio": [{"bytes": b"not audio", "path": None}], "text": ["x"]})
    with pytest.raises(DataError, match=r"\n  dataset row 0: not readable as audio"):
        read_audio_dataset(garbage)
    with pytest.raises(DataError, match=r"dataset: no 'text' column \(columns: audio, words\)"):
        read_audio_dataset(datasets.Dataset.from_dict({"audio": ["a.wav"], "words": ["x"]}))
    with pytest.raises(DataError, match="pick a split: train"):
        read_audio_dataset(datasets.DatasetDict({"train": table}))


def test_stats_start_at_zero():
    assert AudioStats().summary().startswith("0 of 0 clips kept")

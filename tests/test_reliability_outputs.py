"""What velotune writes: an overwrite replaces only the entries velotune wrote itself (merged, GGUF, adapters),
two single-file GGUF exports share a folder without sharing a Modelfile, outputs follow the umask, and the
temporaries of an interrupted write are removed on the next start."""
from __future__ import annotations

import json
import os
import stat

import pytest
import torch

import velotune as vt
from export_fixtures import load_with_lora, make_tokenized_checkpoint
from velotune.errors import CheckpointError
from velotune.models.checkpoint import MANIFEST_NAME, atomic_dir, remove_stale_temporaries

DEAD_PID = 999999


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    path, tok = make_tokenized_checkpoint(tmp_path_factory.mktemp("base"), "llama")
    model, _ = load_with_lora(path)
    return path, model, tok


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _names(directory) -> set[str]:
    return {p.name for p in directory.iterdir()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- overwrite keeps what we did not write ------------------------------------------------------------------

def test_gguf_directory_overwrite_keeps_other_files(tuned, tmp_path, capsys):
    from velotune.cli import main
    path, model, tok = tuned
    vt.save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "m"
    out.mkdir()
    (out / "other.gguf").write_text("x")
    args = ["export", str(path), "--adapter", str(tmp_path / "adapter"), "--format", "gguf", "--quant", "f32",
            "--out", str(out), "--overwrite"]
    assert main(args) == 0, capsys.readouterr().err
    assert (out / "other.gguf").read_text() == "x"
    assert _names(out) == {"other.gguf", "model.gguf", "Modelfile", MANIFEST_NAME}
    assert json.loads((out / MANIFEST_NAME).read_text())["entries"] == ["Modelfile", "model.gguf"]
    assert main(args) == 0  # again: ours replaced, the other file still kept
    assert (out / "other.gguf").read_text() == "x" and _names(out) == {"other.gguf", "model.gguf", "Modelfile",
                                                                         MANIFEST_NAME}


def test_two_single_file_ggufs_in_one_folder_get_a_modelfile_each(tuned, tmp_path):
    _, model, tok = tuned
    folder = tmp_path / "m"
    vt.export(model, tok, folder / "a.gguf", format="gguf", quant="f16")
    vt.export(model, tok, folder / "b.gguf", format="gguf", quant="q8_0")
    assert _names(folder) == {"a.gguf", "a.Modelfile", "b.gguf", "b.Modelfile"}
    assert (folder / "a.Modelfile").read_text().startswith("FROM ./a.gguf\n")
    assert (folder / "b.Modelfile").read_text().startswith("FROM ./b.gguf\n")


def test_merged_overwrite_keeps_user_files_and_drops_our_previous_shards(tuned, tmp_path):
    from safetensors import safe_open
    _, model, tok = tuned
    out = tmp_path / "merged"
    vt.export(model, tok, out, format="merged", max_shard_bytes=60_000)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    (out / "notes.md").write_text("my notes")
    (out / "eval").mkdir()
    (out / "eval" / "scores.json").write_text("{}")
    vt.export(model, tok, out, format="merged", dtype="float16", overwrite=True)
    assert (out / "notes.md").read_text() == "my notes" and (out / "eval" / "scores.json").read_text() == "{}"
    assert not list(out.glob("model-*.safetensors")) and not (out / "model.safetensors.index.json").exists()
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float16
    reloaded, _ = vt.load(out, device="cpu", dtype="float16")  # the new file is read, not the old shards
    assert torch.equal(reloaded.model.embed_tokens.weight, model.model.embed_tokens.weight.half())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left beside it


def test_save_adapter_into_a_folder_with_user_files(tuned, tmp_path):
    _, model, _ = tuned
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "README.md").write_text("trained on my data")
    (out / "adapter_config.json").write_text("{}")  # no manifest: a same-named file is replaced
    vt.save_adapter(model, out, overwrite=True)
    assert (out / "README.md").read_text() == "trained on my data"
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    vt.save_adapter(model, out, overwrite=True)
    assert _names(out) == {"README.md", "adapter_config.json", "adapter_model.safetensors", MANIFEST_NAME}


def test_vt_save_into_a_folder_with_user_files(tmp_path):
    from hf_reference import make_checkpoint
    path, _ = make_checkpoint(tmp_path, "llama_tied")
    model, _ = vt.load(path, dtype="float32", device="cpu")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    vt.save(model, None, out, overwrite=True)
    assert (out / "keep.txt").read_text() == "user data" and (out / "model.safetensors").is_file()
    assert "keep.txt" not in json.loads((out / MANIFEST_NAME).read_text())["entries"]


def test_atomic_dir_swaps_a_directory_holding_only_our_entries(tmp_path):
    final = tmp_path / "d"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x").write_text("x")
    inode = final.stat().st_ino
    with atomic_dir(final, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert _names(final) == {"b.txt", MANIFEST_NAME} and final.stat().st_ino != inode  # a new directory
    with pytest.raises(CheckpointError, match="already exists and is not empty"):
        with atomic_dir(final) as tmp:
            (tmp / "c.txt").write_text("3")
    assert _names(final) == {"b.txt", MANIFEST_NAME} and _names(tmp_path) == {"d"}


def test_atomic_dir_replaces_a_directory_entry_beside_foreign_files(tmp_path):
    final = tmp_path / "d"
    with atomic_dir(final) as tmp:
        (tmp / "sharded").mkdir()
        (tmp / "sharded" / "old.bin").write_text("old")
    (final / "mine.txt").write_text("keep")
    with atomic_dir(final, overwrite=True) as tmp:
        (tmp / "sharded").mkdir()
        (tmp / "sharded" / "new.bin").write_text("new")
    assert _names(final) == {"sharded", "mine.txt", MANIFEST_NAME} and _names(final / "sharded") == {"new.bin"}
    assert _names(tmp_path) == {"d"}


def test_failed_write_leaves_the_directory_as_it_was(tmp_path):
    final = tmp_path / "d"
    final.mkdir()
    (final / "mine.txt").write_text("keep")
    with pytest.raises(RuntimeError):
        with atomic_dir(final, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("1")
            raise RuntimeError("interrupted")
    assert _names(final) == {"mine.txt"} and _names(tmp_path) == {"d"}


# ---- modes follow the umask -----------------------------------------------------------------------------------

def test_outputs_follow_the_umask(tuned, tmp_path, umask_022):
    _, model, tok = tuned
    merged = vt.export(model, tok, tmp_path / "merged", format="merged")
    assert _mode(merged) == 0o755 and _mode(merged / "model.safetensors") == 0o644
    assert _mode(merged / MANIFEST_NAME) == 0o644
    gguf_dir = vt.export(model, tok, tmp_path / "g", format="gguf", quant="f16").parent
    assert _mode(gguf_dir) == 0o755 and _mode(gguf_dir / "model.gguf") == 0o644
    single = vt.export(model, tok, tmp_path / "s" / "one.gguf", format="gguf", quant="f16")
    assert _mode(single) == 0o644 and _mode(single.with_name("one.Modelfile")) == 0o644
    adapter = vt.save_adapter(model, tmp_path / "adapter")
    assert _mode(adapter) == 0o755 and _mode(adapter / "adapter_model.safetensors") == 0o644
    os.umask(0o027)
    other = vt.export(model, tok, tmp_path / "s" / "two.gguf", format="gguf", quant="f16")
    assert _mode(other) == 0o640 and _mode(vt.save_adapter(model, tmp_path / "adapter2")) == 0o750


# ---- temporaries of an interrupted write ----------------------------------------------------------------------

def test_stale_temporaries_are_removed_on_the_next_export(tuned, tmp_path):
    assert not _alive(DEAD_PID)
    _, model, tok = tuned
    folder = tmp_path / "out"
    folder.mkdir()
    dead = folder / f".model.gguf.tmp-{DEAD_PID}-abc"
    dead.write_bytes(b"half a file")
    ours = folder / f".x.tmp-{os.getpid()}-abc"
    ours.write_text("being written by this process")
    vt.export(model, tok, folder / "model.gguf", format="gguf", quant="f16")
    assert not dead.exists() and ours.exists()
    assert _names(folder) == {"model.gguf", "model.Modelfile", ours.name}


def test_stale_directory_temporaries_are_removed_by_atomic_dir(tuned, tmp_path):
    _, model, tok = tuned
    stale = tmp_path / f".merged.tmp-{DEAD_PID}-k2j3"
    stale.mkdir()
    (stale / "model.safetensors").write_text("partial")
    old = tmp_path / f".merged.old-{DEAD_PID}-zz"
    old.mkdir()
    vt.export(model, tok, tmp_path / "merged", format="merged")
    assert not stale.exists() and not old.exists()


def test_remove_stale_temporaries_keeps_live_writers_and_other_names(tmp_path):
    import subprocess
    import sys
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        names = [f".a.tmp-{DEAD_PID}-x1", f".b.old-{DEAD_PID}-x2", f".c.tmp-{live.pid}-x3",
                 f".d.tmp-{os.getpid()}-x4", f"e.tmp-{DEAD_PID}-x5", ".f.tmp-abc-x6", "notes.txt"]
        for name in names:
            (tmp_path / name).write_text("x")
        removed = remove_stale_temporaries(tmp_path)
    finally:
        live.kill()
        live.wait()
    assert sorted(p.name for p in removed) == [f".a.tmp-{DEAD_PID}-x1", f".b.old-{DEAD_PID}-x2"]
    assert _names(tmp_path) == set(names[2:])
    assert remove_stale_temporaries(tmp_path / "missing") == []

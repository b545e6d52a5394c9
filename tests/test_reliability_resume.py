"""Resuming never runs code from a checkpoint, and a checkpoint that does not fit the run is a clear error.

Checkpoints used to hold pickles (optimizer.pt, trainer.pt, torch.distributed.checkpoint's .metadata): a planted
pickle ran its payload on `train.resume=true`. They now hold JSON + safetensors only (training/state_codec.py).
"""
import json
import math
import os
import pickle
import random
import shutil
import socket

import pytest
import torch

import velotune as vt
from train_fixtures import base_config, chat_records, make_model_dir, write_jsonl
from velotune.errors import CheckpointError

STEP2 = ("checkpoints", "step-000002")


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def plant_pickle(path, marker):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"optimizer": Payload(marker)}))  # torch.load and pickle.load both run it


def torchrun_env(monkeypatch):
    """The environment torchrun gives a one-process job: the trainer joins a one-rank gloo group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A plain run and an FSDP2 (one-rank group) run of 4 steps with checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("resume")
    model_dir = make_model_dir(tmp)
    data = write_jsonl(tmp / "chat.jsonl", chat_records(8))
    train = {"max_steps": 4, "save_every": 2, "lr": 1e-2}
    vt.train(base_config(model_dir, data, tmp / "plain", train=train))
    with pytest.MonkeyPatch.context() as mp:
        torchrun_env(mp)
        sharded = vt.train(base_config(model_dir, data, tmp / "sharded", train={**train, "distributed": "fsdp2"}))
    return {"root": tmp, "model_dir": model_dir, "data": data, "sharded_losses": sharded.losses}


def copy_run(runs, tmp_path, name):
    """A copy of run `name` that keeps its step-2 checkpoint only (the one a resume then starts from)."""
    out = tmp_path / name
    shutil.copytree(runs["root"] / name, out)
    shutil.rmtree(out / "checkpoints" / "step-000004")
    return out


def resume_run(runs, out, **sections):
    train = {"max_steps": 4, "save_every": 2, "lr": 1e-2, "resume": True, **sections.pop("train", {})}
    return vt.train(base_config(runs["model_dir"], runs["data"], out, train=train, **sections))


# ---- (1), (2): a planted pickle never runs -------------------------------------------------------------------

@pytest.mark.parametrize("victim", ["optimizer.pt", "optimizer.json", "optimizer.safetensors",
                                    "trainable.safetensors", "state.json"])
def test_pickle_planted_in_a_checkpoint_is_never_run(runs, tmp_path, victim):
    out = copy_run(runs, tmp_path, "plain")
    ckpt, marker = out.joinpath(*STEP2), tmp_path / "pwned"
    if victim == "optimizer.pt":  # an old-format checkpoint: its optimizer file is a pickle
        for name in ("optimizer.json", "optimizer.safetensors"):
            (ckpt / name).unlink(missing_ok=True)
    plant_pickle(ckpt / victim, marker)
    expected = "written by an older velotune in a format that can run code; not read" \
        if victim == "optimizer.pt" else "cannot read|not valid JSON"
    with pytest.raises(CheckpointError, match=f"{victim}.*({expected})"):
        resume_run(runs, out)
    assert not marker.exists()


@pytest.mark.parametrize("victim", ["sharded/.metadata", "trainer.pt", "sharded/index.json",
                                    "sharded/rank-00000.safetensors", "trainer.json", "trainer.safetensors"])
def test_pickle_planted_in_a_sharded_checkpoint_is_never_run(runs, tmp_path, victim):
    out = copy_run(runs, tmp_path, "sharded")
    ckpt, marker = out.joinpath(*STEP2), tmp_path / "pwned"
    old_format = {"sharded/.metadata": ["sharded/index.json"], "trainer.pt": ["trainer.json", "trainer.safetensors"]}
    for name in old_format.get(victim, []):  # the old format had this pickle instead of the new files
        (ckpt / name).unlink(missing_ok=True)
    plant_pickle(ckpt / victim, marker)
    expected = "written by an older velotune in a format that can run code; not read" \
        if victim in old_format else "cannot read|not valid JSON"
    with pytest.raises(CheckpointError, match=f"{victim}.*({expected})"):
        resume_run(runs, out)
    assert not marker.exists()


def test_sharded_checkpoint_resumes_in_one_process_and_in_a_group(runs, tmp_path, monkeypatch):
    """The FSDP2 run's step-2 checkpoint (pickle-free files) resumes bit for bit in its own layout, and in a plain
    process (the same losses up to AdamW's fused / per-tensor round-off)."""
    ckpt = copy_run(runs, tmp_path, "sharded").joinpath(*STEP2)
    assert sorted(p.name for p in (ckpt / "sharded").iterdir()) == ["index.json", "rank-00000.safetensors"]
    assert not list(ckpt.rglob("*.pt")) and not list(ckpt.rglob(".metadata"))
    plain = resume_run(runs, ckpt.parents[1])
    assert plain.steps == 4 and plain.losses == pytest.approx(runs["sharded_losses"][2:], rel=1e-6)
    again = copy_run(runs, tmp_path / "again", "sharded")
    torchrun_env(monkeypatch)
    sharded = resume_run(runs, again, train={"distributed": "fsdp2"})
    assert sharded.losses == runs["sharded_losses"][2:]


def test_8bit_adamw_run_resumes_exactly(runs, tmp_path):
    """bitsandbytes' quantized states (uint8 + absmax + qmap; r=64 makes LoRA A 4096 elements, enough for 8-bit)
    go through the JSON + safetensors checkpoint and resume bit for bit."""
    from safetensors import safe_open
    sections = {"lora": {"r": 64, "alpha": 64}, "train": {"optimizer": "adamw8bit", "max_steps": 3, "save_every": 2}}
    full = vt.train(base_config(runs["model_dir"], runs["data"], tmp_path / "run", **sections))
    with safe_open(str(tmp_path / "run" / "checkpoints" / "step-000002" / "optimizer.safetensors"), "pt") as f:
        assert any(f.get_slice(k).get_dtype() == "U8" for k in f.keys() if "state1" in k)
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-000003")
    sections["train"]["resume"] = True
    resumed = vt.train(base_config(runs["model_dir"], runs["data"], tmp_path / "run", **sections))
    assert resumed.steps == 3 and resumed.losses == full.losses[2:]


# ---- (3): a checkpoint of other settings ---------------------------------------------------------------------

@pytest.mark.parametrize("name,file", [("plain", "trainable.safetensors"), ("sharded", "index.json")])
def test_resume_with_another_lora_rank_names_the_tensor_and_both_shapes(runs, tmp_path, name, file):
    out = copy_run(runs, tmp_path, name)
    before = (out.joinpath(*STEP2) / "state.json").read_text()
    with pytest.raises(CheckpointError, match=rf"{file}: tensor model\.layers\.0\.\S+\.lora_A\.weight has shape "
                                              r"\[4, 64\] in the checkpoint but \[8, 64\] in the model; .*lora\.r"):
        resume_run(runs, out, lora={"r": 8})
    assert (out.joinpath(*STEP2) / "state.json").read_text() == before


@pytest.mark.parametrize("name", ["plain", "sharded"])
def test_resume_with_other_targets_or_optimizer_is_refused(runs, tmp_path, name):
    out = copy_run(runs, tmp_path, name)
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint \(e\.g\. \S+\).*lora\.targets"):
        resume_run(runs, out, lora={"targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj", "lm_head"]})
    with pytest.raises(CheckpointError, match=r"not in the model \(e\.g\. \S+mlp\S+\)"):
        resume_run(runs, out, lora={"targets": ["q_proj", "v_proj"]})
    if name == "plain":  # fsdp2 refuses adamw8bit by itself
        with pytest.raises(CheckpointError, match="the checkpoint's optimizer is AdamW, this run's AdamW8bit"):
            resume_run(runs, out, train={"optimizer": "adamw8bit"})


# ---- (4): the codec round-trips every state we save ----------------------------------------------------------

def assert_same(a, b, path="state"):
    """Equal values of the same types all the way down (tuples stay tuples, int keys stay ints)."""
    assert type(a) is type(b), (path, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b) and all(type(x) is type(y) for x, y in zip(a, b)), path
        for key in a:
            assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}.{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, path


def stepped(optimizer_class, **kwargs):
    big = torch.nn.Parameter(torch.randn(300, 20))  # above bitsandbytes' 4096 elements: 8-bit states
    small = torch.nn.Parameter(torch.randn(5))
    optimizer = optimizer_class([{"params": [big], "weight_decay": 0.1}, {"params": [small], "weight_decay": 0.0}],
                                lr=1e-3, betas=(0.9, 0.99), **kwargs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for _ in range(2):
        scaler.scale((big.square().sum() + small.sum()).float()).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad()
    return optimizer, scheduler, scaler


def test_codec_round_trips_optimizer_scheduler_scaler_and_rng_states(tmp_path):
    import bitsandbytes as bnb
    from velotune.training.state import rng_state
    from velotune.training.state_codec import read_state, write_state
    adamw, scheduler, scaler = stepped(torch.optim.AdamW, fused=True)
    adamw8bit, _, _ = stepped(bnb.optim.AdamW8bit)
    assert adamw8bit.state_dict()["state"][0]["__bnb_optimizer_quant_state__"]["state1"].dtype == torch.uint8
    random.gauss(0, 1)  # leaves a float in Python's RNG state
    torch.rand(3)
    rng = rng_state()
    state = {"adamw": adamw.state_dict(), "adamw8bit": adamw8bit.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "rng": {**rng, "per_rank": [rng, rng_state()]},
             "odd": {"inf": math.inf, "-inf": -math.inf, "nan": math.nan, "empty": {}, "nested": ((1, "a"), [])}}
    write_state(tmp_path, "state", state)
    back = read_state(tmp_path, "state")
    assert_same(back, state)
    assert type(back["rng"]["python"]) is tuple and type(back["rng"]["python"][2]) is float
    assert list(back["adamw"]["state"]) == [0, 1] and back["adamw"]["param_groups"][0]["betas"] == (0.9, 0.99)
    doc = json.loads((tmp_path / "state.json").read_text())  # plain JSON: no NaN / Infinity literals
    assert doc["state"]["dict"]["odd"]["dict"]["nan"] == {"float": "nan"}


def test_codec_refuses_values_it_cannot_store_by_path():
    from velotune.training.state_codec import encode
    with pytest.raises(CheckpointError, match=r"cannot save optimizer\.state\.0\.extra: set values"):
        encode({"optimizer": {"state": {0: {"extra": {1, 2}}}}})
    with pytest.raises(CheckpointError, match=r"cannot save groups: its keys must be all str or all int"):
        encode({"groups": {0: 1, "a": 2}})


# ---- (5): a tampered file is a clear error -------------------------------------------------------------------

def edit_json(path, change):
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def optimizer_dict(doc):
    return doc["state"]["dict"]["optimizer"]["dict"]


def set_lr(doc):
    optimizer_dict(doc)["param_groups"][0]["dict"]["lr"] = "fast"


def rename_tensor(doc):
    optimizer_dict(doc)["state"]["int_dict"]["0"]["dict"]["exp_avg"] = {"tensor": "nowhere"}


def unknown_tag(doc):
    optimizer_dict(doc)["state"]["int_dict"]["0"]["dict"]["step"] = {"pickle": "cos\nsystem"}


def drop_param(doc):
    optimizer_dict(doc)["param_groups"][0]["dict"]["params"].pop()


def short_python_rng(doc):
    doc["state"]["dict"]["rng"]["dict"]["python"]["tuple"][1]["tuple"].pop()


@pytest.mark.parametrize("change,message", [
    (set_lr, r"optimizer\.json: optimizer\.param_groups\.0\.lr: expected a number, found a str \('fast'\)"),
    (rename_tensor, r"optimizer\.json: optimizer\.state\.0\.exp_avg: tensor 'nowhere' is missing from "
                    r"optimizer\.safetensors"),
    (unknown_tag, r"optimizer\.json: optimizer\.state\.0\.step: not a stored value"),
    (drop_param, r"optimizer\.json: optimizer\.param_groups\.0: holds 27 parameters, this run trains 28 there"),
    (short_python_rng, r"optimizer\.json: rng\.python: not a state of Python's random module"),
])
def test_tampered_optimizer_json_is_a_clear_error(runs, tmp_path, change, message):
    out = copy_run(runs, tmp_path, "plain")
    edit_json(out.joinpath(*STEP2) / "optimizer.json", change)
    with pytest.raises(CheckpointError, match=message):
        resume_run(runs, out)


def test_tampered_state_json_and_tensor_shapes_are_clear_errors(runs, tmp_path):
    from safetensors.torch import load_file, save_file
    out = copy_run(runs, tmp_path, "plain")
    ckpt = out.joinpath(*STEP2)
    original = (ckpt / "state.json").read_text()
    edit_json(ckpt / "state.json", lambda doc: doc.update(step="2"))
    with pytest.raises(CheckpointError, match=r"state\.json: step: unexpected value '2'"):
        resume_run(runs, out)
    (ckpt / "state.json").write_text(original)
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    tensors["optimizer.state.0.exp_avg"] = tensors["optimizer.state.0.exp_avg"][:2].clone()
    save_file(tensors, str(ckpt / "optimizer.safetensors"))
    with pytest.raises(CheckpointError, match=r"optimizer state of \S+lora_A\.weight: exp_avg is \[2, 64\], the "
                                              r"parameter has shape \[4, 64\]"):
        resume_run(runs, out)


def test_tampered_sharded_index_is_a_clear_error(runs, tmp_path):
    out = copy_run(runs, tmp_path, "sharded")
    index = out.joinpath(*STEP2) / "sharded" / "index.json"
    original = index.read_text()
    key = "params.model.layers.0.self_attn.q_proj.lora_A.weight"
    edit_json(index, lambda doc: doc["tensors"][key].update(shape=[3, 64]))
    with pytest.raises(CheckpointError, match=rf"index\.json: tensors\.{key}: pieces cover 4 rows of 3"):
        resume_run(runs, out)
    index.write_text(original)
    edit_json(index, lambda doc: doc["tensors"][key].update(shape=[3, 64], pieces=[{"rank": 0, "rows": [0, 3]}]))
    with pytest.raises(CheckpointError, match=rf"rank-00000\.safetensors: {key} holds F32 \[4, 64\], where "
                                              rf"index\.json expects shape \[3, 64\]"):
        resume_run(runs, out)


def test_sharded_rows_are_read_across_uneven_pieces(tmp_path):
    """5 rows saved by 3 ranks (2 + 2 + 1, FSDP2's chunking): any row range reads back, across pieces; an index
    whose pieces leave a gap is refused."""
    from safetensors.torch import save_file
    from velotune.training.sharded import ShardedFiles
    from velotune.training.state_codec import encode
    whole = torch.arange(15, dtype=torch.float32).reshape(5, 3)
    bounds = [[0, 2], [2, 4], [4, 5]]
    for rank, (a, b) in enumerate(bounds):
        save_file({"params.w": whole[a:b].clone()}, str(tmp_path / f"rank-{rank:05d}.safetensors"))
    tree, _ = encode({"params": {"w": whole}, "optimizer": {"state": {}, "param_groups": []},
                      "optimizer_class": "AdamW"})
    index = {"format": "velotune-sharded-1", "ranks": 3, "state": tree,
             "tensors": {"params.w": {"shape": [5, 3], "pieces": [{"rank": r, "rows": rows}
                                                                   for r, rows in enumerate(bounds)]}}}
    (tmp_path / "index.json").write_text(json.dumps(index))
    with ShardedFiles(tmp_path) as files:
        stand_in = files.state["params"]["w"]
        assert stand_in.is_meta and list(stand_in.shape) == [5, 3]
        for start, stop in [(0, 5), (1, 4), (3, 5), (4, 5), (2, 2)]:
            assert torch.equal(files.read(stand_in, (start, stop)), whole[start:stop])
        assert torch.equal(files.read(stand_in, None), whole)
    index["tensors"]["params.w"]["pieces"][1]["rows"] = [3, 4]
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"index\.json: tensors\.params\.w: pieces must hold consecutive rows "
                                              r"from 2"):
        ShardedFiles(tmp_path)

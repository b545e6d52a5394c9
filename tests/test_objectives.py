"""The objectives seam: an objective written here, in the test, trains through vt.train without touching the loop;
the loop's events reach callbacks; a stop request ends a run with a checkpoint that resumes exactly."""
import json
import threading

import pytest
import torch

import velotune as vt
from train_fixtures import base_config, chat_records, make_model_dir, write_jsonl
from velotune.errors import ConfigError
from velotune.training.objectives import SFT, make_objective


class SequenceMean(SFT):
    """Each sequence's mean next-token loss, summed over sequences: the units are sequences, not tokens. A loss
    the loop has never heard of: if the loop normalised by tokens itself, the update would differ."""
    name = "sequence-mean"
    unit_name = "sequence"

    def units(self, batch):
        return int((batch["labels"][:, 1:] != -100).any(dim=1).sum())

    def loss(self, model, batch):
        total = torch.zeros((), device=batch["input_ids"].device)
        for row in range(batch["input_ids"].shape[0]):
            ids, labels = batch["input_ids"][row:row + 1], batch["labels"][row:row + 1]
            if (labels[:, 1:] != -100).any():
                total = total + model(ids, labels=labels, reduction="mean").loss
        return total, self.units(batch)


@pytest.fixture
def setup(tmp_path):
    model_dir = make_model_dir(tmp_path)
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(16))
    return model_dir, data, tmp_path


def test_an_objective_defined_here_trains_through_vt_train(setup):
    model_dir, data, tmp = setup
    seen = []
    objective = SequenceMean()
    real_loss = objective.loss
    objective.loss = lambda model, batch: seen.append(batch["input_ids"].shape[0]) or real_loss(model, batch)
    cfg = base_config(model_dir, data, tmp / "seqmean", train={"max_steps": 8, "lr": 3e-2, "batch_size": 4})
    result = vt.train(cfg, objective=objective)
    assert result.steps == 8 and seen and all(rows == 4 for rows in seen)
    assert sum(result.losses[-3:]) / 3 < sum(result.losses[:3]) / 3  # it learns
    run = json.loads((tmp / "seqmean" / "run.json").read_text())
    assert run["objective"] == "sequence-mean"
    # The first step's loss is the mean over its 4 sequences of their mean token losses, as the loop reports it.
    model, _ = vt.load(model_dir, dtype="float32", device="cpu")
    vt.add_lora(model, r=4, alpha=8, seed=3)
    from velotune.training.plan import plan_run
    plan = plan_run({**cfg, "train": {**cfg["train"], "output_dir": str(tmp / "plan")}}, objective=SequenceMean())
    first_rows = plan.objective.epoch_rows(plan.data.train, epoch=0, **plan.batch_kwargs())[0]
    batch = plan.objective.collate([[plan.data.train[i] for i in row] for row in first_rows], pad_id=0,
                                   packing=False)
    with torch.no_grad():
        total, units = SequenceMean().loss(model.train(), batch)
    assert result.losses[0] == pytest.approx(total.item() / units, rel=1e-5)


def test_padding_free_batches_are_for_losses_that_read_document_ids():
    """data.padding_free null: velotune's own losses get rows of documents; a loss written elsewhere (this file's,
    which loops over rows) keeps one sample per row unless the config says otherwise."""
    assert SFT().padding_free_for(None) and not SFT().padding_free_for(False)
    assert not SequenceMean().padding_free_for(None) and SequenceMean().padding_free_for(True)


def test_a_registered_objective_is_named_in_the_config(setup):
    model_dir, data, tmp = setup
    vt.register_objective("sequence-mean", SequenceMean)
    cfg = base_config(model_dir, data, tmp / "named", train={"max_steps": 2})
    cfg["objective"] = "sequence-mean"
    assert vt.train(cfg).steps == 2
    with pytest.raises(ConfigError, match=r"unknown objective 'sequence-meen' \(did you mean 'sequence-mean'\?\)"):
        make_objective("sequence-meen")


def test_sft_objective_gives_the_same_run_as_before(setup):
    """objective: sft is the default, and naming it changes nothing (bit for bit)."""
    model_dir, data, tmp = setup
    default = vt.train(base_config(model_dir, data, tmp / "default"))
    named = base_config(model_dir, data, tmp / "named")
    named["objective"] = "sft"
    assert vt.train(named).losses == default.losses


def test_callbacks_hear_the_run_and_a_stop_request_ends_it_resumably(setup):
    model_dir, data, tmp = setup
    extra = {"train": {"max_steps": 6, "save_every": 4, "log_every": 2}}
    full = vt.train(base_config(model_dir, data, tmp / "full", **extra))

    stop, events = threading.Event(), []

    def listen(event):
        events.append((event.kind, event.step))
        if event.kind == "step" and event.step == 2:
            stop.set()  # as a Stop button would, from any thread

    first = vt.train(base_config(model_dir, data, tmp / "split", **extra), callbacks=[listen], stop=stop)
    assert first.interrupted and first.steps == 2  # seen at the next step boundary: step 3 never starts
    assert events[0] == ("start", 0) and ("step", 2) in events and events[-1] == ("stopped", 2)
    assert first.checkpoint.name == "step-000002"
    seen = []
    second = vt.train(base_config(model_dir, data, tmp / "split", **extra), ["train.resume=true"],
                      callbacks=[lambda e: seen.append((e.kind, e.step, dict(e.metrics)))])
    assert second.steps == 6 and first.losses + second.losses == full.losses  # exact resume
    kinds = [k for k, _, _ in seen]
    assert kinds[0] == "start" and kinds[-1] == "finished" and "checkpoint" in kinds
    logged = [(step, m["loss"]) for kind, step, m in seen if kind == "step"]
    assert [step for step, _ in logged] == [4, 6] and logged[-1][1] == pytest.approx(full.losses[-1])


def test_a_failing_callback_is_dropped_not_fatal(setup, caplog):
    model_dir, data, tmp = setup

    def broken(event):
        raise RuntimeError("observer bug")
    result = vt.train(base_config(model_dir, data, tmp / "cb"), callbacks=[broken])
    assert result.steps == 4 and "observer bug" in caplog.text
    with pytest.raises(TypeError, match="not callable"):
        vt.train(base_config(model_dir, data, tmp / "cb2"), callbacks=["nope"])

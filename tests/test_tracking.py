"""Experiment tracking (``report_to``) and the ``trainer_args`` pass-through reach every trainer
through :func:`closedloop.training.trainer_args`."""

import csv
import struct

import pytest

from closedloop import config, paths, training
from closedloop.stages import data, sft


def read_scalars(event_file) -> dict[str, list[tuple[int, float]]]:
    """Scalars of a TensorBoard event file (TFRecord framing: length, its CRC, the Event, its CRC)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    blob = event_file.read_bytes()
    at = 0
    while at < len(blob):
        (length,) = struct.unpack("<Q", blob[at:at + 8])
        event = event_pb2.Event.FromString(blob[at + 12:at + 12 + length])
        at += 12 + length + 4
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_trainer_args_pass_through_is_checked_against_the_dataclass(tmp_path):
    section = config.load().sft
    section.trainer_args = {"gradient_checkpointing": True, "max_grad_norm": 0.5}
    args = training.trainer_args("sft", section, tmp_path / "trainer", 0, False)
    assert args.gradient_checkpointing is True and args.max_grad_norm == 0.5 and args.report_to == []
    section.trainer_args = {"gradient_checkpoint": True}
    with pytest.raises(config.ConfigError) as err:
        training.trainer_args("sft", section, tmp_path / "trainer", 0, False)
    assert str(err.value) == ("key 'sft.trainer_args.gradient_checkpoint': not a field of TRL's SFTConfig / "
                              "TrainingArguments")
    section.trainer_args = {"learning_rate": 1.0}
    with pytest.raises(config.ConfigError) as err:
        training.trainer_args("dpo", section, tmp_path / "trainer", 0, False, section="vlm.vdpo")
    assert str(err.value) == ("key 'vlm.vdpo.trainer_args.learning_rate': set by the section's own keys "
                              "(closedloop.training.trainer_args)")


def test_report_to_is_validated_by_the_schema(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("dpo:\n  report_to: neptune\n")
    with pytest.raises(config.ConfigError, match=r"key 'dpo.report_to': Invalid value 'neptune', expected one of "
                                                 r"\[none, tensorboard, mlflow, wandb\]"):
        config.load([path])


@pytest.mark.slow
def test_smoke_sft_reports_its_loss_to_tensorboard_files_in_the_artifact(smoke_cfg, monkeypatch):
    pytest.importorskip("tensorboardX", reason="tensorboardX is installed by scripts/bootstrap.sh")
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    smoke_cfg.sft.report_to = config.Tracker.tensorboard
    smoke_cfg.sft.max_steps = 2
    smoke_cfg.job.task = smoke_cfg.sft.task
    data.main(smoke_cfg)
    sft.main(smoke_cfg)
    out = paths.sft_dir(smoke_cfg)
    events = sorted((out / "tracking" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1, list((out / "tracking").rglob("*"))
    logged = read_scalars(events[0])["train/loss"]
    with open(out / "train_log.csv") as fh:
        expected = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(fh)]
    assert [step for step, _ in logged] == [1, 2] == [step for step, _ in expected]
    assert [loss for _, loss in logged] == pytest.approx([loss for _, loss in expected], rel=1e-4)

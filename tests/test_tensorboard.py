"""Live curves (train.py --tensorboard): the TensorBoard scalars are the numbers of metrics.jsonl at their steps,
under tags that name them, readable while the run goes, and a resumed run's folder holds the whole curve."""

import json
import os
import sys

import pytest

from conftest import tiny_training_args, train_in_process
from core.errors import UserError
from training.live_curves import TensorBoardCurves

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def read_scalars(folder):
    """{tag: {step: value}} of the TensorBoard event files in folder, as TensorBoard reads them."""
    accumulator = event_accumulator.EventAccumulator(folder, size_guidance={event_accumulator.SCALARS: 0})
    accumulator.Reload()
    return {tag: {event.step: event.value for event in accumulator.Scalars(tag)}
            for tag in accumulator.Tags()[event_accumulator.SCALARS]}


def read_metrics(run_folder):
    with open(os.path.join(run_folder, "metrics.jsonl")) as file:
        return [json.loads(line) for line in file]


def validation_record(step, recall1, loss):
    """A record as train.py's validate() writes it, with the kinds of fields that are not numbers."""
    return {"epoch": 0, "iteration": step, "step": step, "images_seen": 8 * step, "group": 0, "lr": 1e-5,
            "classifiers_lr": 0.01, "train_images_per_s": None if step == 0 else 123.4, "validation_time_s": 0.5,
            "peak_memory_mb": 321.0, "run_time_s": 2.0 + step, "loss": loss, "ssl_loss": None,
            "val_R@1": recall1, "val_R@5": recall1 + 10, "note": "not a number", "recalls": [1.0, 2.0]}


def test_records_become_scalars_at_their_steps_readable_before_the_writer_closes(tmp_path):
    curves = TensorBoardCurves(str(tmp_path))
    curves.add(validation_record(0, 25.0, None))
    assert read_scalars(str(tmp_path))["val/R@1"] == {0: 25.0}  # flushed: live, not at close
    curves.add(validation_record(10, 41.666666, 8.25))
    curves.close()
    scalars = read_scalars(str(tmp_path))
    assert set(scalars) == {"val/R@1", "val/R@5", "train/loss", "lr/model", "lr/classifiers",
                            "speed/train_images_per_s", "speed/peak_memory_mb", "time/validation_time_s",
                            "time/run_time_s", "progress/epoch", "progress/iteration", "progress/images_seen",
                            "progress/group"}
    assert scalars["val/R@1"] == {0: 25.0, 10: pytest.approx(41.666666)}  # float32 in the event file
    assert scalars["val/R@5"] == {0: 35.0, 10: pytest.approx(51.666666)}
    assert scalars["train/loss"] == {10: 8.25} and scalars["speed/train_images_per_s"] == {10: pytest.approx(123.4)}
    assert scalars["lr/model"] == {0: pytest.approx(1e-5), 10: pytest.approx(1e-5)}


def test_without_tensorboard_installed_the_flag_is_a_one_line_error_naming_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were missing
    with pytest.raises(UserError, match="pip install tensorboard") as error:
        TensorBoardCurves(str(tmp_path))
    assert "\n" not in str(error.value)


def assert_curves_equal_metrics(run_folder):
    """Every record of the run's metrics.jsonl, every val recall, at its step in the run's TensorBoard curves."""
    records = read_metrics(run_folder)
    scalars = read_scalars(os.path.join(run_folder, "tensorboard"))
    recall_fields = [field for field in records[0] if field.startswith("val_R@")]
    assert recall_fields and "val/R@1" in scalars
    for field in recall_fields:
        assert scalars["val/" + field[len("val_"):]] == {record["step"]: pytest.approx(record[field])
                                                          for record in records}
    assert scalars["train/loss"] == {record["step"]: pytest.approx(record["loss"])
                                     for record in records if record["loss"] is not None}


def test_a_training_run_and_its_resumed_run_each_hold_the_whole_curve(synthetic_dataset, tmp_path):
    flags = ["--image_size", "32", "--test_image_size", "32", "--val_every", "2", "--tensorboard"]
    first = train_in_process(*tiny_training_args(synthetic_dataset, tmp_path, *flags))
    assert [record["step"] for record in read_metrics(first)] == [0, 2, 3]
    assert_curves_equal_metrics(first)
    resumed = train_in_process(*tiny_training_args(synthetic_dataset, tmp_path, *flags, "--epochs_num", "2",
                                                   "--resume_train", os.path.join(first, "last_checkpoint.pth")))
    assert [record["step"] for record in read_metrics(resumed)] == [0, 2, 3, 4, 6]
    assert_curves_equal_metrics(resumed)

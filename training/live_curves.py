"""Live curves (--tensorboard): each metrics.jsonl record also written as TensorBoard scalars, so that a run of hours
can be watched while it goes (`tensorboard --logdir logs/`). TensorBoard is optional: it is imported only here,
when a run asks for it."""

import numbers

from core.errors import UserError

# Fields whose tag does not follow from their name (see scalar_tag)
RENAMED_FIELDS = {"lr": "lr/model", "classifiers_lr": "lr/classifiers",
                  "train_images_per_s": "speed/train_images_per_s", "peak_memory_mb": "speed/peak_memory_mb"}


def scalar_tag(field):
    """The TensorBoard tag of a metrics record's field, in one section per kind: val/R@N (val_R@N), train/ (the loss
    terms and accuracies), lr/, speed/ (images/s, peak memory), time/ (the *_time_s), progress/ (epoch, images seen,
    group...)."""
    if field in RENAMED_FIELDS:
        return RENAMED_FIELDS[field]
    if field.startswith("val_"):
        return "val/" + field[len("val_"):]
    if field.endswith(("loss", "accuracy")):
        return "train/" + field
    if field.endswith("_time_s"):
        return "time/" + field
    return "progress/" + field


class TensorBoardCurves:
    """Writes metrics records as TensorBoard scalars in folder, at their global step (the record's "step"), flushed
    after each record so that TensorBoard shows them at once."""

    def __init__(self, folder):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(log_dir=folder)

    def add(self, record):
        """The numbers of record as scalars (None, text and lists are left out; the step is the x axis)."""
        for field, value in record.items():
            if field != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                self.writer.add_scalar(scalar_tag(field), value, global_step=record["step"])
        self.writer.flush()

    def close(self):
        self.writer.close()

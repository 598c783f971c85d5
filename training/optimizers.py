"""Optimizers and per-epoch learning-rate schedules, as registries.

OPTIMIZERS maps --optimizer to a constructor (parameters, lr, OptimizerSettings) -> torch optimizer; SCHEDULES maps
--scheduler to a constructor (optimizer, ScheduleSettings) -> torch scheduler (or None for a constant lr).
EpochScheduler adds the linear warm-up and is stepped once per epoch, after validation, with the validation R@1.
The defaults (Adam, no weight decay, constant lr) reproduce CosPlace.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OptimizerSettings:
    """--optimizer and what it takes besides the learning rate (--weight_decay, --momentum)."""
    name: str = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.9


@dataclass(frozen=True)
class ScheduleSettings:
    """--scheduler over epochs_num epochs after warmup_epochs of linear warm-up (--scheduler_step_size,
    --scheduler_gamma, --scheduler_patience)."""
    name: str = "none"
    epochs_num: int = 50
    warmup_epochs: int = 0
    step_size: int = 10
    gamma: float = 0.1
    patience: int = 2


OPTIMIZERS = {
    "adam": lambda parameters, lr, settings: torch.optim.Adam(parameters, lr=lr, weight_decay=settings.weight_decay),
    "adamw": lambda parameters, lr, settings: torch.optim.AdamW(parameters, lr=lr,
                                                                weight_decay=settings.weight_decay),
    "sgd": lambda parameters, lr, settings: torch.optim.SGD(parameters, lr=lr, momentum=settings.momentum,
                                                            weight_decay=settings.weight_decay),
    "asgd": lambda parameters, lr, settings: torch.optim.ASGD(parameters, lr=lr, weight_decay=settings.weight_decay),
}

SCHEDULES = {  # each counts its epochs from the end of the warm-up
    "none": lambda optimizer, settings: None,
    "cosine": lambda optimizer, settings: torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, settings.epochs_num - settings.warmup_epochs)),
    "step": lambda optimizer, settings: torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=settings.step_size, gamma=settings.gamma),
    "plateau": lambda optimizer, settings: torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=settings.gamma, patience=settings.patience),
}


def get_optimizer(parameters, lr, settings):
    """The optimizer of parameters named by settings (OptimizerSettings), with learning rate lr."""
    if settings.name not in OPTIMIZERS:
        raise ValueError(f"Unknown --optimizer {settings.name}: choose one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[settings.name](parameters, lr, settings)


class EpochScheduler:
    """The lr of epoch e < W (--warmup_epochs) is base_lr * (e + 1) / (W + 1); from epoch W on, the --scheduler
    schedule starts from base_lr. step(val_recall1) is called once at the end of each epoch."""

    def __init__(self, optimizer, settings):
        if settings.name not in SCHEDULES:
            raise ValueError(f"Unknown --scheduler {settings.name}: choose one of {sorted(SCHEDULES)}")
        warmup_epochs = settings.warmup_epochs
        # Made first and never stepped past epoch W: the chainable schedules below then start from base_lr
        self.warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: min(1.0, (e + 1) / (warmup_epochs + 1)))
        self.warmup_epochs = warmup_epochs
        self.schedule = SCHEDULES[settings.name](optimizer, settings)

    def step(self, val_recall1):
        if self.warmup.last_epoch < self.warmup_epochs:
            self.warmup.step()
        elif isinstance(self.schedule, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.schedule.step(val_recall1)
        elif self.schedule is not None:
            self.schedule.step()

    def state_dict(self):
        return {"warmup": self.warmup.state_dict(),
                "schedule": None if self.schedule is None else self.schedule.state_dict()}

    def load_state_dict(self, state):
        self.warmup.load_state_dict(state["warmup"])
        if self.schedule is not None:
            self.schedule.load_state_dict(state["schedule"])

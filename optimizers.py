"""Optimizers and per-epoch learning-rate schedules, as registries.

OPTIMIZERS maps --optimizer to a constructor (parameters, lr, args) -> torch optimizer; SCHEDULES maps
--scheduler to a constructor (optimizer, args) -> torch scheduler (or None for a constant lr). EpochScheduler
adds the linear warm-up and is stepped once per epoch, after validation, with the validation R@1.
The defaults (Adam, no weight decay, constant lr) reproduce CosPlace.
"""

import torch

OPTIMIZERS = {
    "adam": lambda parameters, lr, args: torch.optim.Adam(parameters, lr=lr, weight_decay=args.weight_decay),
    "adamw": lambda parameters, lr, args: torch.optim.AdamW(parameters, lr=lr, weight_decay=args.weight_decay),
    "sgd": lambda parameters, lr, args: torch.optim.SGD(parameters, lr=lr, momentum=args.momentum,
                                                        weight_decay=args.weight_decay),
    "asgd": lambda parameters, lr, args: torch.optim.ASGD(parameters, lr=lr, weight_decay=args.weight_decay),
}

SCHEDULES = {  # each counts its epochs from the end of the warm-up
    "none": lambda optimizer, args: None,
    "cosine": lambda optimizer, args: torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, args.epochs_num - args.warmup_epochs)),
    "step": lambda optimizer, args: torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=args.scheduler_step_size, gamma=args.scheduler_gamma),
    "plateau": lambda optimizer, args: torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=args.scheduler_gamma, patience=args.scheduler_patience),
}


def get_optimizer(parameters, lr, args):
    """The --optimizer optimizer of parameters, with learning rate lr."""
    if args.optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown --optimizer {args.optimizer}: choose one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[args.optimizer](parameters, lr, args)


class EpochScheduler:
    """The lr of epoch e < W (--warmup_epochs) is base_lr * (e + 1) / (W + 1); from epoch W on, the --scheduler
    schedule starts from base_lr. step(val_recall1) is called once at the end of each epoch."""

    def __init__(self, optimizer, args):
        if args.scheduler not in SCHEDULES:
            raise ValueError(f"Unknown --scheduler {args.scheduler}: choose one of {sorted(SCHEDULES)}")
        warmup_epochs = args.warmup_epochs
        # Made first and never stepped past epoch W: the chainable schedules below then start from base_lr
        self.warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: min(1.0, (e + 1) / (warmup_epochs + 1)))
        self.warmup_epochs = warmup_epochs
        self.schedule = SCHEDULES[args.scheduler](optimizer, args)

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

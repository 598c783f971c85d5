"""Self-supervised auxiliary losses between the descriptors of two augmented views of the training batch.

The classification batch is the first view; a second TrainAugmentation (--ssl_augmentations) of the same
images makes the other. SSL_LOSSES maps each --ssl_loss name to a constructor of a
(descriptors, view_descriptors, class labels) -> loss module, built on pytorch-metric-learning.
"""

import torch
from pytorch_metric_learning import losses
from torch import nn


class VICReg(nn.Module):
    """VICReg (Bardes et al., 2022): invariance between the views, variance and decorrelation of each."""

    def __init__(self):
        super().__init__()
        self.loss = losses.VICRegLoss()

    def forward(self, descriptors, view_descriptors, labels):
        return self.loss(descriptors, ref_emb=view_descriptors)


class NTXent(nn.Module):
    """NT-Xent (SimCLR): each image's positive is its other view, the 2B-2 other views are negatives."""

    def __init__(self):
        super().__init__()
        self.loss = losses.SelfSupervisedLoss(losses.NTXentLoss())

    def forward(self, descriptors, view_descriptors, labels):
        return self.loss(descriptors, view_descriptors)


class SupCon(nn.Module):
    """Supervised contrastive loss (Khosla et al., 2020): positives are all views of the same class."""

    def __init__(self):
        super().__init__()
        self.loss = losses.SupConLoss()

    def forward(self, descriptors, view_descriptors, labels):
        return self.loss(torch.cat([descriptors, view_descriptors]), torch.cat([labels, labels]))


SSL_LOSSES = {
    "vicreg": VICReg,
    "ntxent": NTXent,
    "supcon": SupCon,
}


class SelfSupervisedLoss(nn.Module):
    """An auxiliary loss of train.py: weight * SSL loss between the batch's descriptors and those of a second
    augmented view of it (extra_images makes the view from the batch's uint8 images)."""

    def __init__(self, name, weight, view_augmentation):
        super().__init__()
        self.loss, self.weight, self.view_augmentation = SSL_LOSSES[name](), weight, view_augmentation

    def extra_images(self, images, step):
        return self.view_augmentation(images)

    def logged_terms(self, value):
        """The terms of this loss logged apart (metrics.jsonl, info.log)."""
        return {"ssl_loss": value}

    def forward(self, descriptors, view_descriptors, labels):
        return self.weight * self.loss(descriptors.float(), view_descriptors.float(), labels)


def build_ssl_loss(name, weight, view_augmentation):
    """The --ssl_loss auxiliary loss of that weight (view_augmentation makes the second view), or None for none."""
    if name == "none":
        return None
    return SelfSupervisedLoss(name, weight, view_augmentation)

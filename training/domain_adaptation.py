"""Adaptation to a target domain (night, another city...) from its unlabeled images.

DANN (Ganin et al., 2016), --da_target_folder: a domain classifier learns to tell the descriptors of
training (source) images from those of target images, and a gradient reversal layer makes the network
learn descriptors that fool it, i.e. that do not depend on the domain.
AdaBN (Li et al., 2017), --adabn_folder: before evaluation, the BatchNorm running statistics are recomputed
on target images, so that the features are normalised as the target domain needs.
"""

import logging
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from datasets.dataset_utils import DatasetError, find_images
from datasets.image_loading import normalized_batches


class GradientReversal(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by -lambda_ in the backward pass."""

    @staticmethod
    def forward(ctx, inputs, lambda_):
        ctx.lambda_ = lambda_
        return inputs.view_as(inputs)

    @staticmethod
    def backward(ctx, grad_output):
        return -ctx.lambda_ * grad_output, None


def dann_lambda(progress):
    """DANN's reversal strength over the training progress p in [0, 1]: 2 / (1 + exp(-10 p)) - 1, from 0 (the
    domain classifier's first, random gradients do not reach the network) towards 1."""
    return 2 / (1 + math.exp(-10 * progress)) - 1


class DomainClassifier(nn.Sequential):
    """A small MLP: descriptor -> logit of 'this descriptor comes from a target image'."""

    def __init__(self, in_features, hidden_features=256):
        super().__init__(nn.Linear(in_features, hidden_features), nn.ReLU(inplace=True),
                         nn.Linear(hidden_features, hidden_features), nn.ReLU(inplace=True),
                         nn.Linear(hidden_features, 1))


class DANN(nn.Module):
    """An auxiliary loss of train.py: weight * binary cross-entropy of the domain classifier on the batch's
    descriptors (domain 0) and those of a batch of target images (domain 1), seen through the gradient
    reversal layer. The target images go through the training augmentation, as the source images do, so the
    augmentation is no cue of the domain. make_target_batches(start_step, device) gives the stream of uint8
    target batches from training step start_step on (the caller owns the dataset and its loader)."""

    def __init__(self, weight, augmentation, descriptors_dim, total_steps, make_target_batches):
        super().__init__()
        self.domain_classifier = DomainClassifier(descriptors_dim)
        self.weight, self.augmentation, self.total_steps = weight, augmentation, total_steps
        self.make_target_batches = make_target_batches
        self.lambda_ = 0.0
        self.target_batches = None
        self.domain_accuracy = None  # of the last batch, a 0-dim tensor on the device (logged apart)

    def extra_images(self, images, step):
        """The augmented target batch of training step `step` (counted over the whole training); also sets
        the reversal strength from the training progress."""
        self.lambda_ = dann_lambda(step / self.total_steps)
        if self.target_batches is None:  # made at the first step of this process (a resumed run's first)
            self.target_batches = self.make_target_batches(step, images.device)
        target_images, _ = next(self.target_batches)
        return self.augmentation(target_images.to(images.device, non_blocking=True))

    def logged_terms(self, value):
        """The terms of this loss logged apart (metrics.jsonl, info.log): its value and the domain accuracy."""
        return {"dann_loss": value, "dann_domain_accuracy": self.domain_accuracy}

    def forward(self, descriptors, target_descriptors, labels):
        features = GradientReversal.apply(torch.cat([descriptors, target_descriptors]).float(), self.lambda_)
        domains = torch.cat([torch.zeros(len(descriptors)), torch.ones(len(target_descriptors))]).to(features.device)
        logits = self.domain_classifier(features).squeeze(1).float()
        self.domain_accuracy = ((logits > 0).float() == domains).float().mean().detach()
        return self.weight * F.binary_cross_entropy_with_logits(logits, domains)


def build_dann(target_folder, weight, augmentation, descriptors_dim, total_steps, make_target_batches):
    """The DANN auxiliary loss towards the target folder (--da_target_folder, --da_weight; its lambda ramps up over
    total_steps), or None without a folder; logs the target folder and its number of images (a wrong folder, or one
    of a few images, shows at once)."""
    if target_folder is None:
        return None
    if not os.path.isdir(target_folder):
        raise DatasetError(f"--da_target_folder {target_folder} does not exist: give a folder of target "
                           f"images (any names, e.g. the night queries of a test set)")
    logging.info(f"DANN: target domain {target_folder} ({len(find_images(target_folder)):,} images), "
                 f"weight {weight}")
    return DANN(weight, augmentation, descriptors_dim, total_steps, make_target_batches)


@torch.no_grad()
def adapt_batchnorm(model, dataset, device, batch_size=16, num_workers=0):
    """AdaBN: replaces the running statistics of every BatchNorm layer by the mean and (unbiased) variance of its
    inputs over all the images of dataset (an ImageListDataset of the target domain, resized as the test images),
    in one pass in which the BatchNorm layers
    normalise with the batch statistics (as in training). The sums are accumulated exactly over every image, so
    the first layer gets the population statistics of the folder, whatever the batches (an average of per-batch
    variances would miss the spread between batches). The weights do not change."""
    batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not batchnorms:
        logging.warning(f"AdaBN ({dataset}): the model has no BatchNorm layer, nothing to adapt")
        return model
    # count, mean and sum of squared deviations of each channel, merged batch by batch (Chan et al.) in float64 from
    # each batch's var_mean: a single pass over the input, with no float64 copy of it (hundreds of MB per layer of a
    # batch at 512 px)
    sums = {bn: [0, 0.0, 0.0] for bn in batchnorms}

    def accumulate(bn, inputs):
        values = inputs[0].detach()
        dims = [d for d in range(values.dim()) if d != 1]
        batch_count = values.numel() // values.shape[1]
        batch_var, batch_mean = torch.var_mean(values, dim=dims, correction=0)
        batch_mean, batch_squares = batch_mean.double(), batch_var.double() * batch_count
        count, mean, squares = sums[bn]
        delta, total = batch_mean - mean, count + batch_count
        sums[bn] = [total, mean + delta * batch_count / total,
                    squares + batch_squares + delta.square() * count * batch_count / total]

    was_training = model.training
    model.eval()
    hooks = [bn.register_forward_pre_hook(accumulate) for bn in batchnorms]
    for bn in batchnorms:
        bn.train()
    try:
        for images, _ in normalized_batches(dataset, device, batch_size, num_workers, description="AdaBN statistics"):
            model(images)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    for bn, (count, mean, squares) in sums.items():
        if count < 2:
            raise ValueError(f"AdaBN: {dataset} gave {count} values to a BatchNorm layer: use more images")
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(squares / (count - 1))
    logging.info(f"AdaBN: recomputed the statistics of {len(batchnorms)} BatchNorm layers on {dataset}")
    return model

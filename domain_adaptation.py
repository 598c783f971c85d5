"""Adaptation to a target domain (night, another city...) from its unlabeled images.

DANN (Ganin et al., 2016), --da_target_folder: a domain classifier learns to tell the descriptors of
training (source) images from those of target images, and a gradient reversal layer makes the network
learn descriptors that fool it, i.e. that do not depend on the domain.
AdaBN (Li et al., 2017), --adabn_folder: before evaluation, the BatchNorm running statistics are recomputed
on target images, so that the features are normalised as the target domain needs.
"""

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

import test
from datasets.unlabeled_dataset import RandomBatchSampler, UnlabeledDataset


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
    augmentation is no cue of the domain."""

    def __init__(self, target_folder, weight, augmentation, descriptors_dim, image_size, batch_size,
                 total_steps, seed=0, rank=0, num_workers=0):
        super().__init__()
        self.domain_classifier = DomainClassifier(descriptors_dim)
        self.target_dataset = UnlabeledDataset(target_folder, image_size)
        self.weight, self.augmentation, self.total_steps = weight, augmentation, total_steps
        self.batch_size, self.seed, self.rank, self.num_workers = batch_size, seed, rank, num_workers
        self.lambda_ = 0.0
        self.target_batches = None

    def extra_images(self, images, step):
        """The augmented target batch of training step `step` (counted over the whole training); also sets
        the reversal strength from the training progress."""
        self.lambda_ = dann_lambda(step / self.total_steps)
        if self.target_batches is None:  # made at the first step of this process (a resumed run's first)
            sampler = RandomBatchSampler(len(self.target_dataset), self.batch_size, self.seed, step, self.rank)
            self.target_batches = iter(torch.utils.data.DataLoader(
                self.target_dataset, batch_sampler=sampler, num_workers=self.num_workers,
                pin_memory=images.device.type == "cuda"))
        target_images, _ = next(self.target_batches)
        return self.augmentation(target_images.to(images.device, non_blocking=True))

    def forward(self, descriptors, target_descriptors, labels):
        features = GradientReversal.apply(torch.cat([descriptors, target_descriptors]).float(), self.lambda_)
        domains = torch.cat([torch.zeros(len(descriptors)), torch.ones(len(target_descriptors))])
        logits = self.domain_classifier(features).squeeze(1).float()
        return self.weight * F.binary_cross_entropy_with_logits(logits, domains.to(logits.device))


def build_dann(args, augmentation, descriptors_dim, rank=0):
    """The DANN auxiliary loss towards --da_target_folder, or None without it."""
    if args.da_target_folder is None:
        return None
    return DANN(args.da_target_folder, args.da_weight, augmentation, descriptors_dim, args.image_size,
                args.batch_size, args.epochs_num * args.iterations_per_epoch, args.seed, rank, args.num_workers)


@torch.no_grad()
def adapt_batchnorm(model, folder, args):
    """AdaBN: replaces the running statistics of every BatchNorm layer by their cumulative average (momentum
    None: every batch weighs the same) over the images of folder, resized as the test images
    (--test_image_size). Only the BatchNorm layers are put in train mode; the weights do not change."""
    batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not batchnorms:
        logging.warning(f"AdaBN (--adabn_folder {folder}): the model has no BatchNorm layer, nothing to adapt")
        return model
    dataset = UnlabeledDataset(folder, args.test_image_size)
    was_training, momenta = model.training, [bn.momentum for bn in batchnorms]
    model.eval()
    for bn in batchnorms:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    for images, _ in test.normalized_batches(dataset, args.device, args.infer_batch_size, args.num_workers,
                                             description="AdaBN statistics"):
        model(images)
    for bn, momentum in zip(batchnorms, momenta):
        bn.momentum = momentum
    model.train(was_training)
    logging.info(f"AdaBN: recomputed the statistics of {len(batchnorms)} BatchNorm layers on {dataset}")
    return model

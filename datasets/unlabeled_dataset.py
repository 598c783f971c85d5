"""Images of any folder, without labels or name format: target-domain images for DANN and AdaBN."""

import itertools
import os

import numpy as np
import torch

from datasets.dataset_utils import find_images
from datasets.image_loading import ImageListDataset, own_generator


class UnlabeledDataset(ImageListDataset):
    """All images under a folder (recursively). Items are (uint8 image, index) as TestDataset's, resized the
    same way (test_resize, see ImageListDataset), so the same size-bucketed batching (batches_by_size) works.
    AdaBN resizes them as the test images; DANN needs test_resize='square', as its batches are stacked with
    the training images."""

    def __init__(self, folder, image_size=None, test_resize="shorter_side"):
        super().__init__(find_images(folder), image_size, name=os.path.basename(os.path.normpath(folder)),
                         test_resize=test_resize)
        self.folder = folder

    def __repr__(self):
        return f"< {self.dataset_name} - {len(self)} unlabeled images >"


class RandomBatchSampler(torch.utils.data.Sampler):
    """Infinite stream of batches of random images. Batch `step` is a pure function of (seed, step, rank),
    so a run resumed at any step sees the batches of an uninterrupted run."""

    def __init__(self, images_num, batch_size, seed, start_step=0, rank=0):
        self.images_num, self.batch_size, self.seed = images_num, batch_size, seed
        self.start_step, self.rank = start_step, rank

    def batch(self, step):
        rng = np.random.default_rng([self.seed, step, self.rank])
        return rng.choice(self.images_num, self.batch_size, replace=self.images_num < self.batch_size).tolist()

    def __iter__(self):
        return map(self.batch, itertools.count(self.start_step))


def folder_batches(folder, image_size, batch_size, seed, start_step, device, rank=0, num_workers=0):
    """The endless batches (uint8 images resized to image_size square, indices) of RandomBatchSampler over the images
    of folder from training step start_step on, loaded for device: DANN's target batches."""
    dataset = UnlabeledDataset(folder, image_size, test_resize="square")  # stacked as the training images
    return iter(torch.utils.data.DataLoader(dataset, batch_sampler=RandomBatchSampler(
        len(dataset), batch_size, seed, start_step, rank), num_workers=num_workers,
        pin_memory=torch.device(device).type == "cuda", generator=own_generator()))

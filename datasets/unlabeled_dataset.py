"""Images of any folder, without labels or name format: target-domain images for DANN and AdaBN."""

import itertools
import os

import numpy as np
import torch

from datasets.dataset_utils import find_images
from datasets.image_loading import ImageListDataset


class UnlabeledDataset(ImageListDataset):
    """All images under a folder (recursively). Items are (uint8 image, index) as TestDataset's, so the
    same size-bucketed batching (test.batches_by_size) works when image_size is None (original sizes)."""

    def __init__(self, folder, image_size=None):
        super().__init__(find_images(folder), image_size, name=os.path.basename(os.path.normpath(folder)))
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

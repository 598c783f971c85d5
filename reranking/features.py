"""Local features of images for re-ranking, each computed once, when first asked for, and kept in a cache file
whose name hashes all they depend on (the matcher, the images, the image size and keypoints)."""

import logging
import os
import zipfile

import numpy as np
from tqdm import tqdm

from core import files
from datasets.image_loading import ImageListDataset
from evaluation.descriptors import cache_file_path
from reranking.matchers import FEATURES_CACHE_VERSION


class FeatureStore:
    """The local features (reranking.matchers.Matcher.features) of the images at paths as the matcher sees them
    (rerank: RerankSettings: its image size), each computed at most once, when first asked for; with cache_folder,
    read from and added to a cache file there whose name hashes the matcher, the images and the settings (an .npz of
    every field's arrays concatenated, with each image's row counts). Nothing is read before the first request."""

    def __init__(self, matcher, rerank, paths, name, cache_folder=None):
        self.matcher, self.rerank, self.paths, self.name, self.cache_folder = matcher, rerank, paths, name, cache_folder
        self.images, self.cache_path, self.features = None, None, None
        self.computed = 0  # features computed (not read from the cache) by this store

    def open(self):
        """At the first request: the images (resized as the matcher sees them), the cache file and what it holds."""
        self.images = ImageListDataset(self.paths, self.rerank.image_size, name=self.name)
        if self.cache_folder:
            flags = {"rerank_image_size": self.rerank.image_size, "rerank_keypoints": self.rerank.keypoints,
                     "version": FEATURES_CACHE_VERSION}
            self.cache_path = cache_file_path(self.cache_folder, self.images, self.matcher, flags,
                                              f"local_features_{self.rerank.name}", "npz")
        self.features = self.read_cache() if self.cache_path else {}

    def read_cache(self):
        if not os.path.exists(self.cache_path):
            return {}
        try:
            with np.load(self.cache_path) as stored:
                fields = [key for key in stored.files if key not in ("indices", "version") and
                          not key.endswith("_counts")]
                offsets = {field: np.concatenate([[0], np.cumsum(stored[f"{field}_counts"])]) for field in fields}
                arrays = {field: stored[field] for field in fields}
                return {int(index): {field: arrays[field][offsets[field][i]: offsets[field][i + 1]]
                                     for field in fields} for i, index in enumerate(stored["indices"])}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            logging.warning(f"The local features cache {self.cache_path} cannot be read ({type(error).__name__}: "
                            f"{error}): computing them again")
            return {}

    def write_cache(self):
        indices = sorted(self.features)
        fields = list(self.features[indices[0]])
        arrays = {field: np.concatenate([self.features[i][field] for i in indices]) for field in fields}
        counts = {f"{field}_counts": np.array([len(self.features[i][field]) for i in indices]) for field in fields}
        try:
            files.remove_stale_temporary_files(os.path.dirname(os.path.abspath(self.cache_path)))
            files.atomic_write(self.cache_path, lambda file: np.savez(file, indices=np.array(indices), **arrays,
                                                                      **counts))
        except files.UnwritableError as error:
            logging.warning(f"The local features cache is not written ({error}): they are computed again next time")
            self.cache_path = None  # one warning, not one per query

    def __getitem__(self, index):
        return self.get([index])[0]

    def get(self, indices):
        """The features of the images at indices, computing (and caching) those not known yet."""
        if self.features is None:
            self.open()
        missing = sorted({int(i) for i in indices} - set(self.features))
        for index in tqdm(missing, ncols=100, desc=f"local features ({self.rerank.name})", leave=False,
                          disable=len(missing) < 2):  # minutes for a database with a learned matcher on a CPU
            image = self.images[index][0]
            self.features[index] = {**self.matcher.features(image), "image_size": np.array(image.shape[1:])}
        self.computed += len(missing)
        if missing and self.cache_path:
            self.write_cache()
        return [self.features[int(i)] for i in indices]

"""CosPlace training set: classes are UTM cells of M metres x heading bins of alpha degrees, split into
groups so that classes of the same group are at least M*(N-1) metres (or alpha*(L-1) degrees) apart."""

import logging
import os
from collections import defaultdict

import numpy as np
import torch

from datasets.dataset_utils import DatasetError
from datasets.image_loading import ImageLoadError, collate_images, load_encoded_image, load_image_tensor

GROUPS_ORDERS = ("upstream", "size")


def get_class_id_and_group_id(utm_east, utm_north, heading, M, alpha, N, L):
    """Returns class_id = (east, north, heading) rounded down to M metres / alpha degrees, and
    group_id = (east_cell mod N, north_cell mod N, heading_cell mod L), as defined by CosPlace."""
    rounded_utm_east = int(utm_east // M * M)
    rounded_utm_north = int(utm_north // M * M)
    rounded_heading = int(heading // alpha * alpha)
    class_id = (rounded_utm_east, rounded_utm_north, rounded_heading)
    group_id = (rounded_utm_east % (M * N) // M,
                rounded_utm_north % (M * N) // M,
                rounded_heading % (alpha * L) // alpha)
    return class_id, group_id


def compute_groups(paths, utms, headings, M, alpha, N, L, min_images_per_class, groups_order="upstream"):
    """Returns a list of groups; each group is a list of classes (sorted by class id), each class a list of paths.

    groups_order='upstream' keeps CosPlace's order, in which training uses the first --groups_num groups: the
    order in which the groups first appear in the file list (sorted paths) among the images of kept classes.
    'size' puts the groups with the most classes first (ties by group id).
    """
    if groups_order not in GROUPS_ORDERS:
        raise ValueError(f"groups_order must be one of {GROUPS_ORDERS}, not {groups_order!r}")
    ids = [get_class_id_and_group_id(east, north, heading, M, alpha, N, L)
           for (east, north), heading in zip(utms, headings)]
    images_per_class = defaultdict(list)
    for path, (class_id, _) in zip(paths, ids):
        images_per_class[class_id].append(path)
    kept_classes = {c for c, images in images_per_class.items() if len(images) >= min_images_per_class}
    classes_per_group = {}  # insertion order: as upstream, the first image of a kept class places its group
    for class_id, group_id in ids:
        if class_id in kept_classes:
            classes_per_group.setdefault(group_id, set()).add(class_id)
    group_ids = list(classes_per_group)
    if groups_order == "size":
        group_ids.sort(key=lambda g: (-len(classes_per_group[g]), g))
    return [[images_per_class[c] for c in sorted(classes_per_group[g])] for g in group_ids]


class ClassPaths:
    """The image paths of a group's classes in three numpy arrays (the UTF-8 bytes of every path back to back,
    where each path starts, where each class starts) instead of lists of str: loader workers forked from the
    main process share these pages, whereas reading an item of a list of str writes its reference count, which
    copies the page into every worker, until each holds its own copy of millions of paths. Reads like a list of
    classes, each a list of paths (joined to root)."""

    def __init__(self, data, path_starts, class_starts, root=""):
        self.data, self.path_starts, self.class_starts, self.root = data, path_starts, class_starts, root

    @classmethod
    def from_lists(cls, classes, root=""):
        encoded = [path.encode() for paths in classes for path in paths]
        path_starts = np.cumsum([0] + [len(path) for path in encoded], dtype=np.int64)
        class_starts = np.cumsum([0] + [len(paths) for paths in classes], dtype=np.int64)
        return cls(np.frombuffer(b"".join(encoded), dtype=np.uint8), path_starts, class_starts, root)

    def rooted(self, root):
        """The same arrays (not copied), with paths joined to root."""
        return ClassPaths(self.data, self.path_starts, self.class_starts, root)

    def sizes(self):
        return np.diff(self.class_starts)

    def path(self, class_index, image_index):
        index = self.class_starts[class_index] + image_index
        path = self.data[self.path_starts[index]: self.path_starts[index + 1]].tobytes().decode()
        return os.path.join(self.root, path)

    def __len__(self):
        return len(self.class_starts) - 1

    def __getitem__(self, class_index):
        if not -len(self) <= class_index < len(self):
            raise IndexError(f"class {class_index} of {len(self)}")
        class_index %= len(self)
        return [self.path(class_index, i) for i in range(self.class_starts[class_index + 1]
                                                         - self.class_starts[class_index])]

    def __eq__(self, other):
        return list(self) == [list(paths) for paths in other]

    __hash__ = None


def check_groups(groups, groups_num, min_images_per_class, folder, batch_size, groups_order="upstream"):
    """Clear errors for the ways a training set can be too small for the requested recipe, found before
    training starts (a group too small for the batch would otherwise stop the run at its first epoch).
    groups is in groups_order (load_groups); training uses its first groups_num."""
    if len(groups) == 0:
        raise DatasetError(f"No class of {folder} has at least --min_images_per_class {min_images_per_class} images: "
                           f"lower --min_images_per_class or increase --M / --alpha")
    if len(groups) < groups_num:
        raise DatasetError(f"{folder} has {len(groups)} group(s) with classes of at least {min_images_per_class} "
                           f"images, but --groups_num is {groups_num}: use --groups_num {len(groups)}")
    smallest = min(len(group) for group in groups[:groups_num])
    if smallest < batch_size:
        which = f"the {groups_num} largest" if groups_order == "size" else f"the first {groups_num}, upstream order"
        other_order = "" if groups_order == "size" else ", or use --groups_order size (largest groups first)"
        raise DatasetError(f"{folder}: a group used for training ({which}) has {smallest} classes, "
                           f"fewer than the batch size {batch_size} (--batch_size x processes): lower --batch_size "
                           f"to at most {smallest}, or --groups_num{other_order}, or lower --min_images_per_class")


class TrainDataset(torch.utils.data.Dataset):
    """One CosPlace group. Items are indexed by (class_index, image_index) pairs chosen by ClassBatchSampler,
    so that which images a batch holds depends only on (seed, epoch, iteration): resuming is exact."""

    def __init__(self, classes, image_size, on_bad_image="error", decode_on_gpu=False):
        """classes: a ClassPaths (load_groups), or lists of paths."""
        super().__init__()
        self.classes = classes if isinstance(classes, ClassPaths) else ClassPaths.from_lists(classes)
        self.classes_sizes = self.classes.sizes()
        self.image_size = image_size
        self.on_bad_image = on_bad_image
        self.load_image = load_encoded_image if decode_on_gpu else load_image_tensor  # see images_to_device
        self.skipped_paths = set()  # per loader process

    def __len__(self):
        return len(self.classes)

    def __getitem__(self, index):
        class_index, image_index = index
        class_size = self.classes_sizes[class_index]
        for attempt in range(class_size):
            path = self.classes.path(class_index, (image_index + attempt) % class_size)
            try:
                return self.load_image(path, self.image_size), class_index
            except ImageLoadError as error:
                if self.on_bad_image == "error":
                    raise
                if path not in self.skipped_paths:
                    self.skipped_paths.add(path)
                    logging.warning(f"Skipping unreadable image {path} ({error.__cause__}): "
                                    f"{len(self.skipped_paths)} skipped so far by this loader process "
                                    f"(--check_images finds them all before training)")
        raise ImageLoadError(f"No image of class {class_index} can be read, e.g. {self.classes.path(class_index, 0)}")

    @property
    def images_num(self):
        return int(self.classes_sizes.sum())

    def describe(self, group_num, images_per_epoch):
        """One log line: the group's classes and images, and how often an epoch of images_per_epoch sees a class."""
        sizes = self.classes_sizes
        return (f"Group {group_num}: {len(self)} classes, {self.images_num} images, images per class min/mean/max "
                f"{sizes.min()}/{sizes.mean():.1f}/{sizes.max()}; each class is seen "
                f"{images_per_epoch / len(self):.1f} times in an epoch that trains this group")

    def loader(self, batch_size, seed, epoch, start_iteration=0, rank=0, world_size=1, num_workers=0, pin_memory=False):
        """The DataLoader of an epoch of this group from start_iteration on (ClassBatchSampler's batches)."""
        sampler = ClassBatchSampler(self.classes_sizes, batch_size, seed, epoch, start_iteration, rank,
                                    world_size)
        return torch.utils.data.DataLoader(self, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                                           collate_fn=collate_images, prefetch_factor=4 if num_workers else None,
                                           generator=torch.Generator().manual_seed(seed))

    def first_batches(self, images_num, batch_size, seed):
        """The uint8 image batches of at least images_num images that epoch 0 of this seed starts with (the
        data-dependent initialisation of an aggregator, e.g. NetVLAD's clusters)."""
        sampler = ClassBatchSampler(self.classes_sizes, batch_size, seed, epoch=0)
        return [collate_images([self[i] for i in sampler.batch(b)])[0] for b in range(-(-images_num // batch_size))]


class ClassBatchSampler(torch.utils.data.Sampler):
    """Infinite stream of batches of distinct classes, one random image each, as CosPlace samples.

    Each pass over the group is a random permutation of its classes cut into batches (the remainder is
    dropped, as upstream's drop_last). Batch `iteration` of `epoch` is a pure function of the seed, so a
    run resumed at any iteration sees exactly the batches of an uninterrupted run. With several processes
    (DDP) each rank takes its own slice of the global batch.
    """

    def __init__(self, classes_sizes, batch_size, seed, epoch, start_iteration=0, rank=0, world_size=1):
        self.classes_sizes = np.asarray(classes_sizes)
        self.batch_size, self.seed, self.epoch = batch_size, seed, epoch
        self.start_iteration, self.rank, self.world_size = start_iteration, rank, world_size
        global_batch = batch_size * world_size
        if global_batch > len(classes_sizes):
            raise DatasetError(f"The group has {len(classes_sizes)} classes, fewer than the batch size "
                               f"{global_batch} (--batch_size x processes): lower --batch_size")
        self.batches_per_pass = len(classes_sizes) // global_batch

    def batch(self, iteration):
        pass_num, batch_num = divmod(iteration, self.batches_per_pass)
        permutation = np.random.default_rng([self.seed, self.epoch, pass_num]).permutation(len(self.classes_sizes))
        start = (batch_num * self.world_size + self.rank) * self.batch_size
        classes = permutation[start: start + self.batch_size]
        image_rng = np.random.default_rng([self.seed, self.epoch, pass_num, batch_num, self.rank])
        images = (image_rng.random(len(classes)) * self.classes_sizes[classes]).astype(np.int64)
        return [(int(c), int(i)) for c, i in zip(classes, images)]

    def __iter__(self):
        iteration = self.start_iteration
        while True:
            yield self.batch(iteration)
            iteration += 1

    def __len__(self):  # infinite; DataLoader only needs it for len(dataloader)
        return 2 ** 62

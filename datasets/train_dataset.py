"""CosPlace training set: classes are UTM cells of M metres x heading bins of alpha degrees, split into
groups so that classes of the same group are at least M*(N-1) metres (or alpha*(L-1) degrees) apart."""

import hashlib
import json
import logging
import os
import pickle
import time
from collections import defaultdict

import numpy as np
import torch

from core.errors import UserError
from core.files import atomic_write, remove_stale_temporary_files
from datasets.dataset_utils import DatasetError, read_utms, scan_images, tree_changes
from datasets.image_loading import ImageLoadError, collate_images, load_encoded_image, load_image_tensor

CACHE_VERSION = 2
IMAGES_PATHS_SUFFIX = "_images_paths.txt"
RACY_SECONDS = 2  # coarser than the clock of any common file system (FAT: 2 s)
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


def cache_key(folder, listing, M, alpha, N, L, min_images_per_class, groups_order="upstream"):
    """A hash of everything the groups depend on: the dataset's absolute path, the parameters (the order of the
    groups included), and the file list: listing is the list itself or a cheap fingerprint of it (load_groups)."""
    digest = hashlib.sha256()
    digest.update(json.dumps([CACHE_VERSION, os.path.abspath(folder), M, alpha, N, L, min_images_per_class,
                              groups_order, listing]).encode())
    return digest.hexdigest()[:24]


def images_paths_file(folder):
    """`<folder>_images_paths.txt`: the images of folder, one path relative to it per line, as upstream CosPlace
    reads it instead of globbing (SF-XL ships it)."""
    return os.path.normpath(folder) + IMAGES_PATHS_SUFFIX


def read_images_paths_file(path):
    with open(path, encoding="utf-8") as file:
        paths = file.read().splitlines()
    if not paths:
        raise DatasetError(f"{path} lists no image: delete it, and the folder's images are listed again")
    return paths


def write_images_paths_file(path, relative_paths):
    """Writes the list (atomically) unless its folder is read-only; returns whether it was written."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.access(folder, os.W_OK) or not os.stat(folder).st_mode & 0o222:  # root may write in a read-only tree
        logging.debug(f"{folder} is read-only: {path} is not written")
        return False
    try:
        atomic_write(path, lambda file: file.write("".join(p + "\n" for p in relative_paths)), mode="w")
    except UserError as error:
        logging.warning(f"{error}: the folder will be scanned again at every start")
        return False
    return True


def file_identity(path):
    """(inode, size, modification time) of the list file: rewriting it (atomically: a new inode) or editing it
    changes it. None when there is none (its folder is read-only)."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    return [status.st_ino, status.st_size, status.st_mtime_ns]


def scan(folder):
    """(relative paths, tree record) of folder: scan_images' paths, and its folders' modification times. A
    record whose newest folder changed less than RACY_SECONDS before the scan is not trusted, since a change in
    the same tick of the file system's clock would keep that time: the next start scans again."""
    started = time.time_ns()
    relative_paths, directories = scan_images(folder)
    return relative_paths, {"directories": directories,
                            "trusted": max(directories.values()) < started - RACY_SECONDS * 10 ** 9}


def current_listing(folder, list_file):
    """(relative paths, tree record) of folder after a scan, reconciled with its list file, which is written when
    there is none or the folder changed after it. The list is kept (and used in its own order, as upstream)
    when it names the same images, or when it is newer than every change of the folder (written by hand)."""
    scanned, tree = scan(folder)
    if not os.path.exists(list_file):
        write_images_paths_file(list_file, scanned)
        return scanned, tree
    listed = read_images_paths_file(list_file)
    if sorted(listed) == scanned:
        return listed, tree
    if max(tree["directories"].values()) < os.stat(list_file).st_mtime_ns:
        logging.warning(f"{list_file} lists {len(listed)} images and {folder} holds {len(scanned)}: training uses the "
                        f"list, as upstream (it is newer than every change of the folder); delete it to train on "
                        f"every image of the folder")
        return listed, tree
    logging.info(f"{folder} changed after {list_file} was written ({len(listed)} images listed, {len(scanned)} "
                 f"found): writing the list again")
    write_images_paths_file(list_file, scanned)
    return scanned, tree


def load_groups(folder, M, alpha, N, L, min_images_per_class, cache_folder="cache", on_bad_name="error",
                image_check=None, groups_order="upstream"):
    """The groups of a training folder in groups_order (see compute_groups), each a ClassPaths, computed or read
    from an on-disk cache that cannot be stale.

    The images are those of `<folder>_images_paths.txt` (images_paths_file), which is written
    after a scan when it does not exist (unless its folder is read-only: then every start scans). The cache is
    keyed by the folder's absolute path, the parameters and the list file's identity, and it records the
    modification times of the folder's directories: at every start a stat per directory tells whether a file
    was added, removed or renamed since; only then is the folder scanned again (current_listing), otherwise
    the cache is read without listing a single file. Images that image_check leaves out (--check_images) are
    in no class (the key holds their names); names without a heading field are bad names (on_bad_name)."""
    list_file = images_paths_file(folder)
    relative_paths, tree = current_listing(folder, list_file) if not os.path.exists(list_file) else (None, None)
    while True:
        identity = file_identity(list_file) or hashlib.sha256("\n".join(relative_paths).encode()).hexdigest()
        kept_paths, left_out = None, []
        if image_check is not None:
            relative_paths = relative_paths or read_images_paths_file(list_file)
            kept_paths = image_check([os.path.join(folder, p) for p in relative_paths])
            left_out = sorted(set(relative_paths) - {os.path.relpath(p, folder) for p in kept_paths})
        key = cache_key(folder, [identity, left_out], M, alpha, N, L, min_images_per_class, groups_order)
        cache_path = os.path.join(cache_folder, f"groups_{os.path.basename(os.path.normpath(folder))}_{key}.pt")
        cached_tree, groups = read_class_cache(cache_path)
        if tree is not None:  # the folder was scanned in this call: this is the key of its list as it is now
            break
        if groups is not None:
            changed = tree_changes(folder, cached_tree["directories"])
            if cached_tree["trusted"] and not changed:
                logging.debug(f"Classes of {folder} read from the cache {cache_path}")
                return [group.rooted(folder) for group in groups]
            logging.info(f"{len(changed)} folder(s) of {folder} changed since its classes were computed (e.g. "
                         f"{os.path.join(folder, changed[0])}): scanning it again" if changed else
                         f"Scanning {folder} again: its last scan was less than {RACY_SECONDS} s after a change")
        relative_paths, tree = current_listing(folder, list_file)
    if groups is None:
        relative_paths = relative_paths or read_images_paths_file(list_file)
        paths = kept_paths if kept_paths is not None else [os.path.join(folder, p) for p in relative_paths]
        logging.info(f"Computing the classes of {folder} ({len(paths)} images, M={M}, alpha={alpha}, N={N}, L={L})")
        kept_paths, utms, headings = read_utms(paths, on_bad_name, need_heading=True)
        prefix = len(os.path.join(folder, ""))  # the cache holds paths relative to the folder
        groups = [ClassPaths.from_lists([[p[prefix:] for p in c] for c in group])
                  for group in compute_groups(kept_paths, utms, headings, M, alpha, N, L, min_images_per_class,
                                              groups_order)]
    if tree != cached_tree:
        write_class_cache(cache_path, tree, groups, cache_folder)
    return [group.rooted(folder) for group in groups]


def read_class_cache(path):
    """(tree record, groups) of a class cache, or (None, None) when there is none or it cannot be read."""
    if not os.path.exists(path):
        return None, None
    try:
        with open(path, "rb") as file:
            version, tree, groups = pickle.load(file), pickle.load(file), pickle.load(file)
        if version == CACHE_VERSION:
            return tree, groups
        logging.info(f"The class cache {path} is of another version of this code: computing the classes again")
    except (EOFError, OSError, pickle.UnpicklingError, AttributeError, ImportError, TypeError, ValueError) as error:
        logging.warning(f"The class cache {path} cannot be read ({type(error).__name__}: {error}): computing the "
                        f"classes again")
    return None, None


def write_class_cache(path, tree, groups, cache_folder):
    """Three pickles in a row (version, tree record, groups: numpy arrays, read at the speed of the disk). The
    paths are relative to the folder, so the cache stays small."""
    os.makedirs(cache_folder, exist_ok=True)
    remove_stale_temporary_files(cache_folder)  # left by a run killed while writing its cache

    def write(file):
        for part in (CACHE_VERSION, tree, groups):
            pickle.dump(part, file, protocol=pickle.HIGHEST_PROTOCOL)
    atomic_write(path, write)


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

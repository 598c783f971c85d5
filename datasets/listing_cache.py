"""The cached start of a training folder: its image list (`<folder>_images_paths.txt`, as upstream) and its classes,
computed once and kept in a cache keyed by everything they depend on, re-scanned only when a folder changed, so that
SF-XL's 5.6 million images start in seconds without listing a file."""

import hashlib
import json
import logging
import os
import pickle
import time

from core.errors import UserError
from core.files import atomic_write, remove_stale_temporary_files
from datasets.dataset_utils import DatasetError, read_utms, scan_images, tree_changes
from datasets.train_dataset import ClassPaths, compute_groups

CACHE_VERSION = 2
IMAGES_PATHS_SUFFIX = "_images_paths.txt"
RACY_SECONDS = 2  # coarser than the clock of any common file system (FAT: 2 s)


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
    paths are relative to the folder, so the cache stays small. A cache that cannot be written (read-only, full
    disk) is a warning: the classes are computed, the next start computes them again."""

    def write(file):
        for part in (CACHE_VERSION, tree, groups):
            pickle.dump(part, file, protocol=pickle.HIGHEST_PROTOCOL)
    try:
        os.makedirs(cache_folder, exist_ok=True)
        remove_stale_temporary_files(cache_folder)  # left by a run killed while writing its cache
        atomic_write(path, write)
    except (OSError, UserError) as error:
        logging.warning(f"The class cache is not written ({error}): the next start computes the classes again "
                        f"(--cache_folder chooses where it goes)")

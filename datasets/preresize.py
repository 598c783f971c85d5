"""A one-off copy of a training folder with its large images resized to the training size.

When the originals are larger than --image_size (SF-XL's are 512 px only after processing; raw crops or
other datasets are often 1-4 Mpx), every epoch decodes and downsizes each of them again: the copy makes
each load a decode at the final size.

    python -m datasets.preresize --src data/sf_xl/processed/train --size 512 --out data/preresized
prints the folder to give as --train_set_folder; `train.py --preresize_cache DIR` does the same by itself.

The copy is OUT/<name>_<size>px_<key>, where key hashes the source's absolute path, the size and, for every
image, its relative path, byte size and modification time: a changed dataset gets a new copy, never a stale
one. File names are kept (they hold the '@' metadata). Images with more pixels than size x size are resized
as training resizes them (datasets.image_loading.load_pil_image) and saved in their own format; the others
are hard-linked (copied across file systems). Files are written atomically one by one, so an interrupted
run resumes where it stopped; the folder gets its final name only when complete.
"""

import argparse
import hashlib
import logging
import os
import shutil
from multiprocessing import Pool

from PIL import Image
from tqdm import tqdm

from datasets.dataset_utils import find_images
from datasets.image_loading import load_pil_image

CACHE_VERSION = 1
JPEG_QUALITY = 95


def cache_folder_name(source_folder, paths, size):
    """<name>_<size>px_<key>, key a hash of everything the copy depends on."""
    digest = hashlib.sha256(f"{CACHE_VERSION} {os.path.abspath(source_folder)} {size} {JPEG_QUALITY}".encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{os.path.relpath(path, source_folder)} {stat.st_size} {stat.st_mtime_ns}\0".encode())
    return f"{os.path.basename(os.path.normpath(source_folder))}_{size}px_{digest.hexdigest()[:16]}"


def write_one(task):
    """Writes one image of the copy (atomically: a temporary file renamed into place); skips it when done."""
    source, destination, size = task
    if os.path.exists(destination):
        return
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    temporary = f"{destination}.{os.getpid()}.tmp"
    try:
        with Image.open(source) as image:
            larger = image.width * image.height > size * size
        if larger:
            load_pil_image(source, (size, size)).save(
                temporary, format=Image.registered_extensions()[os.path.splitext(source)[1].lower()],
                quality=JPEG_QUALITY)
    except (OSError, Image.DecompressionBombError):  # unreadable: kept as it is, for --on_bad_image to handle
        larger = False
        if os.path.exists(temporary):
            os.remove(temporary)
    if not larger:
        try:
            os.link(source, temporary)
        except OSError:  # another file system, or no hard links there
            shutil.copy2(source, temporary)
    os.replace(temporary, destination)


def preresize_folder(source_folder, size, cache_root, num_workers=0):
    """The folder of the resized copy of source_folder under cache_root, written first if it does not exist."""
    paths = find_images(source_folder)
    final_folder = os.path.join(cache_root, cache_folder_name(source_folder, paths, size))
    if os.path.isdir(final_folder):
        logging.info(f"Training images resized to {size} px found in {final_folder}")
        return final_folder
    partial_folder = final_folder + ".partial"
    logging.info(f"Writing {len(paths)} training images resized to {size} px into {final_folder} (once)")
    tasks = [(path, os.path.join(partial_folder, os.path.relpath(path, source_folder)), size) for path in paths]
    if num_workers > 0:
        with Pool(num_workers) as pool:
            for _ in tqdm(pool.imap_unordered(write_one, tasks, chunksize=64), total=len(tasks), ncols=100,
                          desc="pre-resizing"):
                pass
    else:
        for task in tqdm(tasks, ncols=100, desc="pre-resizing"):
            write_one(task)
    try:
        os.rename(partial_folder, final_folder)
    except OSError:
        if not os.path.isdir(final_folder):  # not a concurrent run that finished first
            raise
    return final_folder


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="training folder (images named in the '@' format)")
    parser.add_argument("--size", type=int, default=512, help="the --image_size of the trainings")
    parser.add_argument("--out", required=True, help="cache root: the copy goes in a subfolder named by its key")
    parser.add_argument("--num_workers", type=int, default=os.cpu_count() or 1, help="processes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(preresize_folder(args.src, args.size, args.out, args.num_workers))


if __name__ == "__main__":
    main()

"""A quick pass over a dataset's images before training or testing (--check_images), so that a corrupt or
truncated file is reported by name at the start instead of being met by a loader worker hours into a run.

Each file is decoded at 1/8 scale (JPEG DCT scaling: every byte is still read, so truncation is found, at a
fraction of the cost of a full decode), in threads: Pillow releases the GIL while it decodes.
"""

import functools
import logging
from multiprocessing.pool import ThreadPool

from tqdm import tqdm

from datasets.image_loading import ImageLoadError, load_pil_image

CHECK_SIZE = (1, 1)  # Pillow's draft mode then picks its smallest scale, 1/8
LISTED_BAD_FILES = 5  # how many bad files an error or warning names


def image_problem(path):
    """None if the file decodes as an image, else why it does not."""
    try:
        load_pil_image(path, CHECK_SIZE)
    except ImageLoadError as error:
        return str(error.__cause__ or error)
    return None


def check_images(paths, on_bad_image="error", num_threads=1):
    """The paths whose image decodes. A bad file stops the run (on_bad_image='error', naming the first few) or
    is dropped with a warning ('skip'); a folder where no image decodes is always an error."""
    with ThreadPool(max(1, num_threads)) as pool:
        problems = list(tqdm(pool.imap(image_problem, paths, chunksize=32), total=len(paths), ncols=100,
                             desc="checking images", leave=False))
    bad = [(path, problem) for path, problem in zip(paths, problems) if problem is not None]
    if not bad:
        logging.debug(f"Checked {len(paths)} images: all can be read")
        return list(paths)
    listed = "; ".join(f"{path} ({problem})" for path, problem in bad[:LISTED_BAD_FILES])
    listed += f"; and {len(bad) - LISTED_BAD_FILES} more" if len(bad) > LISTED_BAD_FILES else ""
    if on_bad_image == "error" or len(bad) == len(paths):
        raise ImageLoadError(f"{len(bad)} of {len(paths)} images cannot be read: {listed}. Remove them"
                             + (", or use --on_bad_image skip to leave them out" if len(bad) < len(paths) else ""))
    logging.warning(f"Leaving out {len(bad)} of {len(paths)} images that cannot be read: {listed}")
    return [path for path, problem in zip(paths, problems) if problem is None]


def make_image_check(check_all, on_bad_image="error", num_threads=1, test_set=False):
    """The check that find_images applies to a folder's images (--check_images, --on_bad_image), or None. A bad
    training image can still be skipped while loading (another image of its class is taken); a test image cannot
    (it has its place among the descriptors), so with --on_bad_image skip test sets are always checked first."""
    if check_all or (test_set and on_bad_image == "skip"):
        return functools.partial(check_images, on_bad_image=on_bad_image, num_threads=num_threads)
    return None

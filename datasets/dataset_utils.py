"""File-name format of the geo-localization benchmarks (SF-XS, SF-XL, Tokyo-XS, Pitts30k...).

Every image is named `@east@north@zone@letter@lat@lon@pano@tile@heading@pitch@roll@height@yyyymm@note@.jpg`:
splitting on '@' gives UTM east in field 1, UTM north in field 2 and the heading in field 9.
"""

import logging
import os
from dataclasses import dataclass

import numpy as np

from core.errors import UserError

EXPECTED_FORMAT = "@utm_east@utm_north@zone@letter@lat@lon@pano_id@tile@heading@pitch@roll@height@yyyymm@note@.jpg"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
QUERY_FOLDER_NAMES = ("queries", "queries_v1")


class DatasetError(UserError, ValueError):
    """A problem with the user's dataset, with a message that says what to fix."""


@dataclass(frozen=True)
class ImageMetadata:
    utm_east: float
    utm_north: float
    heading: float
    zone: str = ""
    letter: str = ""
    lat: str = ""
    lon: str = ""
    date: str = ""


def parse_image_name(path, need_heading=False):
    """Reads UTM east/north and heading from a file name; raises DatasetError naming the file otherwise.

    Only training classes need the heading (need_heading=True): there a name too short to have field 9 is an
    error, as heading 0 would silently put the image in the wrong class. Test sets and geo-localization only use
    fields 1 and 2, so there such a short name is accepted, with heading 0. An empty field 9 (database images of
    some datasets) counts as 0 in both cases.
    """
    fields = os.path.basename(path).split("@")
    if len(fields) < 3:
        raise DatasetError(f"{path}: file name does not follow the '@' format, expected {EXPECTED_FORMAT}")
    if need_heading and len(fields) < 10:
        raise DatasetError(f"{path}: file name has {len(fields) - 1} '@' fields, too few for the heading (field 9) "
                           f"that training classes need, expected {EXPECTED_FORMAT}")
    try:
        utm_east, utm_north = float(fields[1]), float(fields[2])
        heading = float(fields[9]) if len(fields) > 9 and fields[9] != "" else 0.0
    except ValueError:
        raise DatasetError(f"{path}: UTM east (field 1), UTM north (field 2) and heading (field 9) must be numbers, "
                           f"expected {EXPECTED_FORMAT}") from None
    if not (np.isfinite(utm_east) and np.isfinite(utm_north) and np.isfinite(heading)):
        raise DatasetError(f"{path}: UTM coordinates and heading must be finite numbers, expected {EXPECTED_FORMAT}")
    get = lambda i: fields[i] if len(fields) > i else ""
    return ImageMetadata(utm_east, utm_north, heading, zone=get(3), letter=get(4), lat=get(5), lon=get(6), date=get(13))


def format_image_name(utm_east, utm_north, zone="", letter="", lat="", lon="", pano_id="", heading=0.0,
                      date="", note="", prefix=""):
    """Builds a file name in the benchmark format (the inverse of parse_image_name)."""
    fields = [prefix, f"{utm_east:.2f}", f"{utm_north:.2f}", str(zone), str(letter),
              f"{lat:.5f}" if isinstance(lat, float) else str(lat), f"{lon:.5f}" if isinstance(lon, float) else str(lon),
              pano_id, "", f"{heading:g}", "", "", "", str(date), note, ".jpg"]
    return "@".join(fields)


def find_images(folder, image_check=None):
    """All images under folder (recursively), sorted, or a DatasetError if there are none. image_check
    (datasets/image_check.py, --check_images) maps the paths to those that can be read."""
    paths = [os.path.join(folder, path) for path in scan_images(folder)[0]]
    return image_check(paths) if image_check is not None else paths


def scan_images(folder):
    """(relative paths, directories): the images under folder (recursively, following links to folders and
    leaving out hidden names, as glob does), sorted, and the modification time of every folder scanned, read
    before it is listed. A file added, removed or renamed changes its folder's time: these times are a
    fingerprint of the file list that a stat per folder checks (tree_changes), without listing the files.
    One os.scandir per folder: several times faster than glob at a million files."""
    if not os.path.isdir(folder):
        what = "is a file, not a folder of images" if os.path.exists(folder) else "does not exist"
        raise DatasetError(f"Folder {folder} {what}: a dataset folder holds train/ (images) and val/, "
                           f"test/ (each with database/ and queries/)")
    paths, directories, pending = [], {}, [""]
    while pending:
        relative_folder = pending.pop()
        absolute_folder = os.path.join(folder, relative_folder)
        directories[relative_folder] = os.stat(absolute_folder).st_mtime_ns
        with os.scandir(absolute_folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                path = os.path.join(relative_folder, entry.name)
                if entry.is_dir():
                    pending.append(path)
                elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(path)
    if len(paths) == 0:
        raise DatasetError(f"Folder {folder} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    paths.sort()
    return paths, directories


def tree_changes(folder, directories):
    """The folders of scan_images' directories whose modification time is no longer the recorded one (or that
    are gone): where a file was added, removed or renamed since the scan."""
    changed = []
    for relative_folder, mtime_ns in directories.items():
        try:
            if os.stat(os.path.join(folder, relative_folder)).st_mtime_ns != mtime_ns:
                changed.append(relative_folder)
        except OSError:
            changed.append(relative_folder)
    return changed


def find_queries_folder(dataset_folder):
    """The queries of a test set are in `queries/` (most datasets) or `queries_v1/` (SF-XL val/test)."""
    for name in QUERY_FOLDER_NAMES:
        if os.path.isdir(os.path.join(dataset_folder, name)):
            return os.path.join(dataset_folder, name)
    raise DatasetError(f"{dataset_folder} has no queries folder: expected one of {', '.join(QUERY_FOLDER_NAMES)}")


def read_utms(paths, on_bad_name="error", need_heading=False):
    """Returns (kept_paths, utms[N,2], headings[N]) parsed from file names (need_heading: see parse_image_name).

    on_bad_name='skip' drops files whose name does not parse and logs how many; 'error' raises on the first.
    """
    kept, utms, headings, bad = [], [], [], []
    for path in paths:
        try:
            metadata = parse_image_name(path, need_heading)
        except DatasetError:
            if on_bad_name == "error":
                raise
            bad.append(path)
            continue
        kept.append(path)
        utms.append((metadata.utm_east, metadata.utm_north))
        headings.append(metadata.heading)
    if bad:
        logging.warning(f"Skipped {len(bad)} of {len(paths)} files whose name does not follow {EXPECTED_FORMAT}, "
                        f"e.g. {bad[0]}")
    if len(kept) == 0:
        raise DatasetError(f"None of the {len(paths)} files in {os.path.dirname(paths[0]) if paths else 'the folder'} "
                           f"has a name in the format {EXPECTED_FORMAT}")
    return kept, np.array(utms, dtype=np.float64).reshape(-1, 2), np.array(headings, dtype=np.float64)

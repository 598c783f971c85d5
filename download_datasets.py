"""Downloads SF-XS and Tokyo-XS (the small versions of SF-XL and Tokyo 24/7) and lays them out for train.py / eval.py.

    python download_datasets.py --datasets sf_xs tokyo_xs --out data
    python download_datasets.py --datasets sf_xs --archive sf_xs=~/Downloads/sf_xs.zip --out data

Gives <out>/sf_xs/{train,val,test} and <out>/tokyo_xs/test. The links (DATASETS in this file) are the public Google
Drive files published with the course's starting code (Simple_VPR_codebase); they could not be checked from the
machine this was written on. If one has moved, pass --url NAME=URL (a Google Drive link:
https://drive.google.com/uc?id=FILE_ID, or its /file/d/FILE_ID/view form with gdown >= 6; or any http(s) URL of a
zip or tar), or get the archive yourself and pass --archive NAME=PATH. Google Drive links need gdown (pip install
gdown).

Each archive is checked (a zip or a tar, with a CRC check of every zip member; with --sha256 NAME=HEX its checksum)
and extracted next to its destination; the layout is checked (train/ holds images, val/ and test/ hold database/ and
queries/ with images) before the dataset is moved into place and marked complete. A dataset already complete is
skipped, and an interrupted run leaves nothing half-made at the destination, so running the command again is safe.
"""

import gzip
import json
import lzma
import os
import shutil
import socket
import tarfile
import urllib.parse
import urllib.request
import zipfile
import zlib

import parser
from core import files
from core.errors import UserError, exit_on_user_error
from datasets.dataset_utils import DatasetError, find_images, find_queries_folder

DATASETS = {
    "sf_xs": {"url": "https://drive.google.com/uc?id=1tQqEyt3go3vMh4fj_LZrRcahoTbzzH-y",
              "splits": ("train", "val", "test")},
    "tokyo_xs": {"url": "https://drive.google.com/uc?id=15QB3VNKj93027UAQWv7pzFQO1JDCdZj2", "splits": ("test",)},
}
COMPLETE_MARKER = ".download_complete.json"


class DownloadError(UserError, RuntimeError):
    """A download, archive or layout problem, with what to do about it."""


def assignments(values, flag):
    """{'sf_xs': 'value'} from ['sf_xs=value'], with an error naming the flag for a bad item or an unknown name."""
    result = {}
    for item in values or []:
        name, separator, value = item.partition("=")
        if not separator or not value:
            raise DownloadError(f"{flag} {item}: expected NAME=VALUE, e.g. {flag} sf_xs=...")
        if name not in DATASETS:
            raise DownloadError(f"{flag} {item}: unknown dataset {name}, choose one of {', '.join(DATASETS)}")
        result[name] = os.path.expanduser(value) if flag == "--archive" else value
    return result


def layout_problems(folder, splits):
    """What is missing for folder to be a usable dataset with these splits (empty when complete)."""
    problems = []
    for split in splits:
        split_folder = os.path.join(folder, split)
        try:
            if split == "train":
                find_images(split_folder)
            else:
                find_images(os.path.join(split_folder, "database"))
                find_images(find_queries_folder(split_folder))
        except DatasetError as e:
            problems.append(str(e))
    return problems


def check_network(url):
    """A DownloadError naming the network when url's host cannot be resolved: the download errors of a machine
    without DNS blamed the link ('moved, private or over its quota?')."""
    host = urllib.parse.urlparse(url).hostname
    try:
        socket.getaddrinfo(host, 443)
    except (socket.gaierror, UnicodeError) as e:
        raise DownloadError(f"Cannot resolve {host} ({e}): this machine has no network (or no DNS), the link is not "
                            f"at fault; connect it, or download the archive elsewhere and pass --archive NAME=PATH") \
            from None


def download(url, path):
    """Downloads url to path: Google Drive through gdown (imported only then), anything else with urllib."""
    check_network(url)
    if "drive.google.com" in url or "docs.google.com" in url:
        try:
            import gdown
        except ImportError:
            raise DownloadError("Google Drive links need gdown: pip install gdown (or download the archive in a "
                                "browser and pass --archive NAME=PATH)") from None
        try:
            if gdown.download(url, path, quiet=False) is None:
                raise OSError("no file came back")
        except Exception as e:  # gdown's own exceptions differ between its versions
            raise DownloadError(f"gdown could not download {url} ({type(e).__name__}: {e}; moved, private or over "
                                f"its quota?): pass --url NAME=URL or --archive NAME=PATH") from None
        return
    try:
        urllib.request.urlretrieve(url, path)
    except (OSError, ValueError) as e:
        raise DownloadError(f"Could not download {url} ({e}): pass --url NAME=URL or --archive NAME=PATH") from None


def check_archive(path, expected_sha256=None):
    """Raises DownloadError unless path is a non-empty zip or tar (and has the expected checksum)."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise DownloadError(f"{path}: missing or empty archive")
    if expected_sha256 and (actual := files.sha256_of(path)) != expected_sha256.lower():
        raise DownloadError(f"{path}: sha256 {actual} differs from the expected {expected_sha256}: the download is "
                            f"corrupt or another file; remove it and run again")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            bad_member = archive.testzip()
        if bad_member is not None:
            raise DownloadError(f"{path}: {bad_member} fails its CRC check: the archive is corrupt, download it again")
    elif not tarfile.is_tarfile(path):
        raise DownloadError(not_an_archive(path))


# The first bytes of the archives this script extracts: a file that starts as one but cannot be opened is cut short
ARCHIVE_MAGIC = {b"PK\x03\x04": "zip", b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz"}


def truncated_archive_error(path, kind, reason=None):
    return DownloadError(f"{path} ({os.path.getsize(path)} bytes) is a truncated or corrupt {kind} archive"
                         + (f" ({reason})" if reason else "") + ": the download was cut short; delete it and "
                         "download it again (or pass --archive NAME=PATH of a complete copy)")


def not_an_archive(path):
    """Why path, which neither zipfile nor tarfile opens, is not a usable archive: cut short (it starts as one), a
    web page (it starts as HTML), or another file."""
    with open(path, "rb") as file:
        head = file.read(512)
    kind = next((kind for magic, kind in ARCHIVE_MAGIC.items() if head.startswith(magic)), None)
    if kind is not None or head[257:262] == b"ustar":  # a tar that ends before its first member's data
        return str(truncated_archive_error(path, kind or "tar"))
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html", b"<?xml")):
        return (f"{path} ({os.path.getsize(path)} bytes) is neither a zip nor a tar archive but a web page (a moved "
                f"or private link, or a quota page?): delete it, and pass --url NAME=URL or --archive NAME=PATH")
    return (f"{path} ({os.path.getsize(path)} bytes) is neither a zip nor a tar archive: delete it, and pass "
            f"--url NAME=URL or --archive NAME=PATH")


def extract(path, folder):
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            archive.extractall(folder)  # zipfile drops absolute paths and '..' from member names
        return
    if not hasattr(tarfile, "data_filter"):
        raise DownloadError(f"{path}: extracting tar archives safely needs Python >= 3.11.4 (tarfile filters)")
    try:
        with tarfile.open(path) as archive:
            archive.extractall(folder, filter="data")
    except (EOFError, tarfile.ReadError, zlib.error, lzma.LZMAError, gzip.BadGzipFile) as e:  # cut short inside
        raise truncated_archive_error(path, "tar", f"{type(e).__name__}: {e}") from e


def dataset_root(folder, splits):
    """The folder of the extracted archive that holds the splits (the archive's top folder, or itself)."""
    for root, subfolders, _ in os.walk(folder):
        if all(split in subfolders for split in splits):
            return root
    raise DownloadError(f"The archive has no folder with {', '.join(s + '/' for s in splits)} inside")


def prepare(name, out_folder, url=None, archive=None, sha256=None, keep_archive=False):
    """Makes out_folder/name complete; returns what it did ('already complete', 'extracted from ...')."""
    splits, target = DATASETS[name]["splits"], os.path.join(out_folder, name)
    marker = os.path.join(target, COMPLETE_MARKER)
    if os.path.isdir(target):
        problems = layout_problems(target, splits)
        if problems:
            raise DownloadError(f"{target} exists but is incomplete ({problems[0]}): remove it and run again")
        if not os.path.isfile(marker):  # put there by hand: complete, so it is kept as it is
            with open(marker, "w") as file:
                json.dump({"source": "found in place"}, file)
        return "already complete"
    os.makedirs(out_folder, exist_ok=True)
    downloaded = archive is None
    if downloaded:
        archive = os.path.join(out_folder, f".{name}.download")
        url = url or DATASETS[name]["url"]
        if not os.path.isfile(archive):  # a finished download of an earlier run is reused
            print(f"Downloading {name} from {url}")
            download(url, archive + ".part")
            os.replace(archive + ".part", archive)
    check_archive(archive, sha256)
    staging = os.path.join(out_folder, f".{name}.extracting")
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
    print(f"Extracting {archive}")
    try:
        extract(archive, staging)
        root = dataset_root(staging, splits)
        problems = layout_problems(root, splits)
        if problems:
            raise DownloadError(f"{archive} does not hold a complete {name}: " + "; ".join(problems))
        with open(os.path.join(root, COMPLETE_MARKER), "w") as file:
            json.dump({"source": url if downloaded else os.path.abspath(archive), "sha256": sha256}, file)
        os.replace(root, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if downloaded and not keep_archive:
        os.remove(archive)
    return f"extracted from {archive}"


def main(argv=None):
    arguments = parser.ArgumentParser(description=__doc__)
    arguments.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS),
                           help="datasets to prepare")
    arguments.add_argument("--out", default="data", help="folder that receives one folder per dataset")
    arguments.add_argument("--url", nargs="+", metavar="NAME=URL", default=[],
                           help="download NAME from URL instead of the link in DATASETS (e.g. when it has moved)")
    arguments.add_argument("--archive", nargs="+", metavar="NAME=PATH", default=[],
                           help="use a local zip/tar of NAME instead of downloading it (it is never deleted)")
    arguments.add_argument("--sha256", nargs="+", metavar="NAME=HEX", default=[],
                           help="expected sha256 of NAME's archive")
    arguments.add_argument("--keep_archives", action="store_true", help="keep the downloaded archives once extracted")
    args = arguments.parse_args(argv)
    urls, archives = assignments(args.url, "--url"), assignments(args.archive, "--archive")
    checksums = assignments(args.sha256, "--sha256")
    for name in args.datasets:
        outcome = prepare(name, args.out, urls.get(name), archives.get(name), checksums.get(name), args.keep_archives)
        print(f"{name}: {outcome} -> {os.path.join(args.out, name)}")


if __name__ == "__main__":
    exit_on_user_error(main)

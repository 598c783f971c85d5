"""Files that survive kills and full disks: atomic writes, append-only logs, run folders that are never shared,
and the clean-up of what a killed write left behind. Imports no torch (make_report.py uses it)."""

import errno
import glob
import hashlib
import json
import os
import secrets
import shutil
import subprocess
from datetime import datetime

import numpy as np

from core.errors import UserError

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DISK_FULL_BYTES = 1 << 20  # less free space than this after a failed write: the disk is full


class UnwritableError(UserError):
    """A file could not be written: the disk is full, or the folder is read-only."""


def make_unique_folder(parent, name):
    """Creates parent/name, or parent/name_1, _2... if it exists: two runs started in the same second never
    share (or overwrite) a folder. os.makedirs(exist_ok=False) is atomic, so concurrent runs cannot race."""
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as error:
        raise unwritable_error(parent, error) from None
    candidate, suffix = os.path.join(parent, name), 0
    while True:
        try:
            os.makedirs(candidate)
            return candidate
        except FileExistsError:
            suffix += 1
            candidate = os.path.join(parent, f"{name}_{suffix}")
        except OSError as error:
            raise unwritable_error(candidate, error) from None


def make_output_folder(save_dir, logs_root="logs"):
    return make_unique_folder(os.path.join(logs_root, save_dir), datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))


def unwritable_error(path, error, previous=None):
    """The UnwritableError of a write to path that failed with error (an OSError, or torch's RuntimeError that
    hides the errno); previous: the file that is still good, named in the message."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    code = getattr(error, "errno", None)
    kept = f"; the last good file, {previous}, is untouched" if previous and os.path.exists(previous) else ""
    # the errno decides first (a read-only mount may report 0 bytes free); free space only when it names neither
    # cause (torch's RuntimeError hides it)
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return UnwritableError(f"cannot write {path}: {existing} is read-only or not yours ({os.strerror(code)}){kept};"
                               f" choose another --logs_root / cache folder")
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)) or \
            shutil.disk_usage(existing).free < DISK_FULL_BYTES:
        return UnwritableError(f"the disk is full: could not write {path} ({shutil.disk_usage(existing).free >> 20} "
                               f"MB free in {existing}){kept}; free some space (or choose another --logs_root / "
                               f"cache folder) and run again")
    return UnwritableError(f"could not write {path}: {error}{kept}")


def atomic_write(path, write_function, mode="wb"):
    """Writes through a temporary file in the same folder, then renames it over path: a kill at any moment
    leaves either the previous file or the new one, never a truncated one. The temporary file's name holds the
    writer's process id, so that remove_stale_temporary_files can tell an abandoned one from a live one."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        file_descriptor, temporary_path = create_temporary_file(path)
    except OSError as error:
        raise unwritable_error(path, error, path) from None
    try:
        with os.fdopen(file_descriptor, mode) as file:
            write_function(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary_path, path)
    except BaseException as error:
        if os.path.exists(temporary_path):
            os.remove(temporary_path)
        if isinstance(error, OSError) or (isinstance(error, RuntimeError) and "write" in str(error)):
            raise unwritable_error(path, error, path) from error  # torch.save hides the errno in a RuntimeError
        raise
    directory_descriptor = os.open(folder, os.O_RDONLY)
    try:  # the rename itself survives a power cut only once the folder is synced
        os.fsync(directory_descriptor)
    finally:
        os.close(directory_descriptor)


def create_temporary_file(path):
    """(file descriptor, path) of a new empty file beside path, .NAME.RANDOM.PID.tmp, created with the permissions
    open() gives a new file (the kernel applies the umask; tempfile.mkstemp's 0600 would hide results from other
    users)."""
    folder, name = os.path.split(os.path.abspath(path))
    while True:
        temporary_path = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.{os.getpid()}.tmp")
        try:
            return os.open(temporary_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), temporary_path
        except FileExistsError:
            continue


def remove_stale_temporary_files(folder):
    """Removes the temporary files that atomic_write left in folder when its process was killed (their writer's
    process id is gone); returns their paths. Those of a live writer (another run) are left alone."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(folder), ".*.tmp")):
        pid = path.rsplit(".", 2)[-2]
        if pid.isdigit() and not process_exists(int(pid)):
            try:
                os.remove(path)
                removed.append(path)
            except OSError:
                pass
    return removed


def process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class ChecksumError(ValueError):
    """A file whose bytes are not those that were written."""


def array_sha256(array):
    """The SHA-256 of a numpy array's bytes, read in place (no copy of a contiguous array)."""
    return hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


def save_checksummed(path, array):
    """array (numpy) in the .npz file path, written atomically with the SHA-256 of its bytes (load_checksummed);
    the temporary files of killed writes in that folder are removed first."""
    checksum = array_sha256(array)
    remove_stale_temporary_files(os.path.dirname(os.path.abspath(path)))
    atomic_write(path, lambda file: np.savez(file, array=array, sha256=checksum))


def load_checksummed(path):
    """The array of save_checksummed, or ChecksumError when its bytes changed since it was written."""
    with np.load(path) as stored:
        array, checksum = stored["array"], str(stored["sha256"])
    if array_sha256(array) != checksum:
        raise ChecksumError(f"{path}: its checksum differs from the one written with it")
    return array


def atomic_json_dump(obj, path):
    atomic_write(path, lambda file: json.dump(obj, file, indent=2, default=str), mode="w")


def atomic_copy(source, destination):
    with open(source, "rb") as source_file:
        atomic_write(destination, lambda file: shutil.copyfileobj(source_file, file))


def append_jsonl(record, path):
    """One JSON object per line; appending a line is safe for logs that must never be overwritten."""
    try:
        with open(path, "a") as file:
            file.write(json.dumps(record, default=float) + "\n")
    except OSError as error:
        raise unwritable_error(path, error) from None


def sha256_of(path):
    """The SHA-256 of a file's content, read in blocks of 1 MB."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_commit():
    """The project's git commit (with '-dirty' when there are uncommitted changes), or 'unknown'."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (commit + ("-dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def test_set_label(folder):
    """'sf_xs/val' for .../sf_xs/val: a test set's dataset and split, unique where its basename is not."""
    return "/".join(os.path.normpath(os.path.abspath(folder)).split(os.sep)[-2:])


def label_folder(label):
    """'tokyo_xs_test_night' for the label 'tokyo_xs/test/night': the folder of a query set's predictions in a run
    (eval.py, train.py; make_report.py looks for them there)."""
    return label.replace("/", "_")

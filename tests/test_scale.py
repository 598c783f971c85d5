"""The start-up that scales to SF-XL (datasets/listing_cache.load_groups): the groups equal a direct computation over
every file of the folder, `<folder>_images_paths.txt` is written and honoured, a cached start lists no file yet any
file added, removed or renamed is seen, and ClassPaths reads like the lists of paths it replaces."""

import glob
import logging
import os
import pickle
import stat

import numpy as np
import pytest

from datasets import dataset_utils
from datasets.dataset_utils import format_image_name, read_utms
from datasets.listing_cache import images_paths_file, load_groups
from datasets.train_dataset import ClassPaths, TrainDataset, compute_groups

PARAMETERS = dict(M=10, alpha=30, N=5, L=2, min_images_per_class=2)
LONG_AGO_NS = 10 ** 18  # 2001: a tree older than any racy-clock window


def make_tree(folder, seed=0, images=300, subfolders=3, side=60):
    """images empty files named like SF-XL training images, in subfolders, places in a square of side metres so
    that classes hold several images; every folder's time set in the past, as a dataset unpacked long ago."""
    rng = np.random.default_rng(seed)
    for i in range(images):
        sub = os.path.join(folder, f"part{i % subfolders}")
        os.makedirs(sub, exist_ok=True)
        name = format_image_name(500000 + rng.uniform(0, side), 4100000 + rng.uniform(0, side), 10, "S",
                                 pano_id=f"p{i}", heading=float(rng.integers(0, 12) * 30))
        open(os.path.join(sub, name), "w").close()
    age_folders(folder)
    return folder


def age_folders(folder):
    for root in [folder, *glob.glob(os.path.join(folder, "**", ""), recursive=True)]:
        os.utime(root, ns=(LONG_AGO_NS, LONG_AGO_NS))


def direct_groups(folder, paths=None):
    """compute_groups over a glob of the folder (or over paths), sorted: what the groups must equal."""
    paths = sorted(glob.glob(os.path.join(folder, "**", "*.jpg"), recursive=True)) if paths is None else paths
    kept, utms, headings = read_utms(paths, need_heading=True)
    return compute_groups(kept, utms, headings, **{k: PARAMETERS[k] for k in ("M", "alpha", "N", "L")},
                          min_images_per_class=PARAMETERS["min_images_per_class"])


def load(folder, tmp_path, **options):
    return load_groups(folder, cache_folder=str(tmp_path / "cache"), **PARAMETERS, **options)


def forbid_scans(monkeypatch):
    def scan_images(folder):
        raise AssertionError(f"{folder} was listed")
    monkeypatch.setattr("datasets.listing_cache.scan_images", scan_images)


def test_groups_equal_a_direct_computation_and_a_cached_start_lists_no_file(tmp_path, monkeypatch):
    folder = make_tree(str(tmp_path / "train"))
    expected = direct_groups(folder)
    assert len(expected) > 3 and sum(len(c) for g in expected for c in g) > 150  # many groups, most images kept
    groups = load(folder, tmp_path)
    assert groups == expected and all(isinstance(g, ClassPaths) for g in groups)
    with open(images_paths_file(folder)) as file:  # written on the first start, relative paths, sorted
        assert file.read().splitlines() == sorted(os.path.relpath(p, folder) for p in glob.glob(
            os.path.join(folder, "**", "*.jpg"), recursive=True))
    forbid_scans(monkeypatch)
    assert load(folder, tmp_path) == expected  # read from the cache with a stat per folder
    assert len(os.listdir(tmp_path / "cache")) == 1


def test_groups_equal_those_of_upstream_cosplace(tmp_path):
    """The algorithm of upstream's TrainDataset.initialize (benchmarks/scale.py), with its defaults (M=10, alpha=30,
    N=5, L=2, 10 images per class): the same groups in the same order, each the same classes."""
    from benchmarks.scale import upstream_initialize
    folder = make_tree(str(tmp_path / "train"), images=800, side=20)
    classes_per_group, images_per_class = upstream_initialize(folder, str(tmp_path / "upstream.torch"))
    groups = load_groups(folder, 10, 30, 5, 2, 10, str(tmp_path / "cache"))
    assert len(groups) == len(classes_per_group) > 4
    for ours, upstream in zip(groups, classes_per_group):
        assert ({frozenset(os.path.relpath(p, folder) for p in paths) for paths in ours}
                == {frozenset(images_per_class[c]) for c in upstream})


@pytest.mark.parametrize("change", ["add", "remove", "rename", "new_folder"])
def test_a_file_added_removed_or_renamed_is_seen_at_the_next_start(tmp_path, caplog, change):
    folder = make_tree(str(tmp_path / "train"))
    first = load(folder, tmp_path)
    part, victim = os.path.split(first[0][0][0])  # an image of a class trained: removing it changes the groups
    east, north = 500005.0, 4100005.0  # a class of its own after a rename or an addition: two images
    if change == "add":
        for pano in ("new1", "new2"):
            open(os.path.join(part, format_image_name(east, north, 10, "S", pano_id=pano, heading=90.0)), "w").close()
    elif change == "remove":
        os.remove(os.path.join(part, victim))
    elif change == "rename":
        os.rename(os.path.join(part, victim), os.path.join(part, format_image_name(east, north, 10, "S",
                                                                                   pano_id="moved", heading=0.0)))
    else:
        os.makedirs(os.path.join(folder, "part9"))
        for pano in ("new1", "new2"):
            open(os.path.join(folder, "part9", format_image_name(east, north, 10, "S", pano_id=pano)), "w").close()
    with caplog.at_level(logging.INFO):
        groups = load(folder, tmp_path)
    assert groups == direct_groups(folder) != first
    changed = os.path.join(folder, "" if change == "new_folder" else os.path.basename(part))
    assert f"1 folder(s) of {folder} changed since its classes were computed (e.g. {changed}" in caplog.text
    with open(images_paths_file(folder)) as file:  # the list is written again
        assert len(file.read().splitlines()) == len(glob.glob(os.path.join(folder, "**", "*.jpg"), recursive=True))


def test_a_list_naming_a_subset_trains_on_the_subset_with_a_warning(tmp_path, caplog, monkeypatch):
    folder = make_tree(str(tmp_path / "train"))
    relative = sorted(os.path.relpath(p, folder) for p in glob.glob(os.path.join(folder, "**", "*.jpg"),
                                                                    recursive=True))
    subset = [p for p in relative if not p.startswith("part2")]
    with open(images_paths_file(folder), "w") as file:  # written after the folder: by hand, as SF-XL ships it
        file.write("\n".join(subset) + "\n")
    with caplog.at_level(logging.WARNING):
        groups = load(folder, tmp_path)
    assert groups == direct_groups(folder, [os.path.join(folder, p) for p in subset]) != direct_groups(folder)
    assert f"lists {len(subset)} images and {folder} holds {len(relative)}: training uses the list" in caplog.text
    forbid_scans(monkeypatch)
    assert load(folder, tmp_path) == groups


def test_a_read_only_folder_works_without_a_list_file(tmp_path):
    parent = tmp_path / "readonly"
    folder = make_tree(str(parent / "train"))
    for path in (parent, *glob.glob(os.path.join(parent, "**", ""), recursive=True)):
        os.chmod(path, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    try:
        expected = direct_groups(folder)
        assert load(folder, tmp_path) == expected
        assert not os.path.exists(images_paths_file(folder))
        assert load(folder, tmp_path) == expected and len(os.listdir(tmp_path / "cache")) == 1
    finally:
        for path in (parent, *glob.glob(os.path.join(parent, "**", ""), recursive=True)):
            os.chmod(path, 0o755)


def test_class_paths_read_like_lists_of_paths():
    classes = [["a/x.jpg", "a/y.jpg"], ["b/é€😀.jpg"], ["c/1.jpg", "c/2.jpg", "c/3.jpg"]]  # multi-byte UTF-8 too
    paths = ClassPaths.from_lists(classes)
    assert len(paths) == 3 and list(paths) == classes and paths == classes
    assert paths[1] == ["b/é€😀.jpg"] and paths[-1] == classes[-1] and paths.path(2, 1) == "c/2.jpg"
    with pytest.raises(IndexError):
        paths[3]
    assert list(paths.sizes()) == [2, 1, 3]
    rooted = paths.rooted("/data")
    assert rooted[0] == ["/data/a/x.jpg", "/data/a/y.jpg"] and rooted.data is paths.data  # shared, not copied
    assert pickle.loads(pickle.dumps(rooted)) == rooted
    assert paths.data.dtype == np.uint8 and paths.path_starts.dtype == np.int64  # no Python object per path
    dataset = TrainDataset(classes, 32)
    assert dataset.classes == classes and len(dataset) == 3 and dataset.images_num == 6


def test_scan_images_matches_a_glob(tmp_path):
    folder = make_tree(str(tmp_path / "train"), images=30)
    open(os.path.join(folder, "part0", "notes.txt"), "w").close()
    os.makedirs(os.path.join(folder, ".hidden"))
    open(os.path.join(folder, ".hidden", "@1@2@3@4@5@6@7@8@9@.jpg"), "w").close()
    paths, directories = dataset_utils.scan_images(folder)
    assert paths == sorted(os.path.relpath(p, folder) for p in glob.glob(os.path.join(folder, "**", "*.jpg"),
                                                                         recursive=True))
    assert sorted(directories) == ["", "part0", "part1", "part2"]
    assert dataset_utils.tree_changes(folder, directories) == []
    os.remove(os.path.join(folder, "part0", "notes.txt"))
    assert dataset_utils.tree_changes(folder, directories) == ["part0"]

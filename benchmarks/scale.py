"""Start-up and loader memory at SF-XL scale, against upstream CosPlace's algorithm, on a tree of empty files.

    python benchmarks/scale.py --names 1000000 [--tree /tmp/scale_tree --workers 8 --batches 2000]

Generates once, in --tree/<names>/train, an SF-XL-like tree of --names empty files (random panoramas, 12 headings
each, at a density of 1M names per km2, as 1M in 1 km2 gives about SF-XL's classes of 10 images and more; named by
dataset_utils.format_image_name, one folder per 100 m square) and prints one table:
  - first class computation (no list file, no cache) and its peak RSS: ours is load_groups (a scan with os.scandir,
    `train_images_paths.txt` written, the pickle cache); upstream's is its TrainDataset.initialize, re-implemented
    here line for line (a sorted recursive glob, '@' split, classes and groups in dicts, torch.save of one file);
  - cached start: a fresh Python process from its start to the groups loaded, i.e. what train.py does before
    "Start training" besides the model: ours imports train.py and calls load_groups; upstream's imports the
    libraries that its train.py imports (torch, torchvision, faiss, scikit-learn, ...; not cv2, nor its own
    small modules) and torch.loads its cache once (one group: it loads the whole file once per group trained);
  - the memory of --workers forked loader workers indexing every training path as TrainDataset does, after
    1, 1/4, 1/2 and all of --batches batches of --batch_size: ours (ClassPaths, numpy arrays shared by the
    workers) against lists of str (upstream's images_per_class), private memory (USS) per worker.
Each case runs in its own process, so that each peak RSS is its own. Run it alone: the times are wall-clock.
"""

import argparse
import gc
import glob
import os
import resource
import shutil
import subprocess
import sys
import time
from collections import defaultdict

import numpy as np
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from datasets.dataset_utils import format_image_name  # noqa: E402
from datasets.listing_cache import images_paths_file  # noqa: E402

M, ALPHA, N, L, MIN_IMAGES_PER_CLASS = 10, 30, 5, 2, 10  # CosPlace's defaults
UPSTREAM_IMPORTS = "import torch, torchvision, faiss, sklearn.neighbors, numpy, PIL, tqdm"  # its train.py's libraries


def generate_tree(root, names, seed=0):
    """root/train with names empty files (names // 12 panoramas of 12 headings); a marker says it is complete."""
    train, marker = os.path.join(root, "train"), os.path.join(root, "complete")
    if os.path.exists(marker):
        return train
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    panoramas, side = names // 12, 1000 * np.sqrt(names / 1e6)  # the density of 1M names per km2 at any size
    east, north = 549000 + rng.uniform(0, side, panoramas), 4180000 + rng.uniform(0, side, panoramas)
    first_heading = rng.uniform(0, 30, panoramas)
    start = time.time()
    for p in range(panoramas):
        folder = os.path.join(train, f"{int(east[p] // 100)}_{int(north[p] // 100)}")
        if p < 100 or not os.path.isdir(folder):
            os.makedirs(folder, exist_ok=True)
        for h in range(12):
            name = format_image_name(east[p], north[p], 10, "S", lat=37.7 + north[p] % 1000 / 1e5,
                                     lon=-122.4 + east[p] % 1000 / 1e5, pano_id=f"pano{p:07d}",
                                     heading=round(first_heading[p] + 30 * h, 2), date="201811")
            os.close(os.open(os.path.join(folder, name), os.O_CREAT | os.O_WRONLY, 0o644))
    open(marker, "w").close()
    print(f"Generated {panoramas * 12} names in {train} in {time.time() - start:.0f} s", flush=True)
    return train


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def upstream_initialize(dataset_folder, filename):
    """Upstream CosPlace's TrainDataset.initialize and read_images_paths (no list file), as written there."""
    images_paths = sorted(glob.glob(f"{dataset_folder}/**/*.jpg", recursive=True))
    images_paths = [p[len(dataset_folder) + 1:] for p in images_paths]
    images_metadatas = [p.split("@") for p in images_paths]
    utmeast_utmnorth_heading = np.array([(m[1], m[2], m[9]) for m in images_metadatas]).astype(np.float64)

    def class_and_group(utm_east, utm_north, heading):
        rounded_utm_east, rounded_utm_north = int(utm_east // M * M), int(utm_north // M * M)
        rounded_heading = int(heading // ALPHA * ALPHA)
        return ((rounded_utm_east, rounded_utm_north, rounded_heading),
                (rounded_utm_east % (M * N) // M, rounded_utm_north % (M * N) // M,
                 rounded_heading % (ALPHA * L) // ALPHA))
    class_id__group_id = [class_and_group(*m) for m in utmeast_utmnorth_heading]
    images_per_class = defaultdict(list)
    for image_path, (class_id, _) in zip(images_paths, class_id__group_id):
        images_per_class[class_id].append(image_path)
    images_per_class = {k: v for k, v in images_per_class.items() if len(v) >= MIN_IMAGES_PER_CLASS}
    classes_per_group = defaultdict(set)
    for class_id, group_id in class_id__group_id:
        if class_id in images_per_class:
            classes_per_group[group_id].add(class_id)
    classes_per_group = [list(c) for c in classes_per_group.values()]
    os.makedirs(os.path.dirname(filename), exist_ok=True)
    torch.save((classes_per_group, images_per_class), filename)
    return classes_per_group, images_per_class


def run_case(args, case):
    """One case in a fresh process: (wall seconds from process start to exit, the child's last output line)."""
    start = time.time()
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--case", case, "--names", str(args.names),
                             "--tree", args.tree, "--workers", str(args.workers), "--batches", str(args.batches),
                             "--batch_size", str(args.batch_size)],
                            cwd=REPO_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"case {case} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.time() - start, result.stdout.strip().splitlines()[-1]


def cached_start(code):
    """Wall seconds of a fresh `python -c code` (process start included) and its peak RSS in MB."""
    start = time.time()
    result = subprocess.run([sys.executable, "-c", code + "; import resource; "
                             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"],
                            cwd=REPO_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"cached start failed:\n{result.stderr[-3000:]}")
    return time.time() - start, float(result.stdout.strip().splitlines()[-1])


def worker_memory(dataset_kind, train, cache_folder, workers, batches, batch_size):
    """Mean private memory (USS, MB) of the loader workers after 1, 1/4, 1/2 and all batches."""
    from datasets.listing_cache import load_groups
    from datasets.train_dataset import ClassBatchSampler, ClassPaths, TrainDataset
    groups = load_groups(train, M, ALPHA, N, L, MIN_IMAGES_PER_CLASS, cache_folder)
    classes = [paths for group in groups for paths in group]  # every class of every group, as upstream holds them
    if dataset_kind == "ours":
        dataset = TrainDataset(ClassPaths.from_lists(classes), 32)
        dataset.load_image = lambda path, size: len(path)  # the files are empty: the indexing alone is measured
    else:
        dataset = ListPaths(classes)
    del classes, groups
    gc.collect()
    sampler = ClassBatchSampler(dataset.classes_sizes, batch_size, seed=0, epoch=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers, prefetch_factor=2)
    iterator = iter(loader)
    checkpoints, measured = {1, batches // 4, batches // 2, batches}, []
    for batch_num in range(1, batches + 1):
        next(iterator)
        if batch_num in checkpoints:
            measured.append(np.mean([private_mb(w.pid) for w in iterator._workers]))
    return measured


class ListPaths(torch.utils.data.Dataset):
    """The baseline: TrainDataset's indexing over lists of str."""

    def __init__(self, classes):
        self.classes, self.classes_sizes = classes, np.array([len(c) for c in classes])

    def __len__(self):
        return len(self.classes)

    def __getitem__(self, index):
        class_index, image_index = index
        return len(self.classes[class_index][image_index]), class_index


def private_mb(pid):
    """Unique set size of a process (its private pages: what a forked worker copied), from /proc."""
    with open(f"/proc/{pid}/smaps_rollup") as file:
        fields = dict(line.split(":", 1) for line in file if ":" in line)
    return sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty")) / 1024


def child(args):
    """The case args.case, in this fresh process; prints its figures as the last line."""
    root = os.path.join(args.tree, str(args.names))
    train, cache_folder = os.path.join(root, "train"), os.path.join(root, f"cache_{args.case.split('_')[0]}")
    if args.case == "ours_first":
        from datasets.listing_cache import load_groups
        start = time.time()
        groups = load_groups(train, M, ALPHA, N, L, MIN_IMAGES_PER_CLASS, cache_folder)
        print(time.time() - start, peak_mb(), len(groups), sum(len(g) for g in groups))
    elif args.case == "upstream_first":
        start = time.time()
        classes_per_group, _ = upstream_initialize(train, os.path.join(cache_folder, "train.torch"))
        print(time.time() - start, peak_mb(), len(classes_per_group), sum(len(g) for g in classes_per_group))
    else:
        print(*worker_memory(args.case.split("_")[0], train, os.path.join(root, "cache_ours"), args.workers,
                             args.batches, args.batch_size))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names", type=int, default=100000, help="training images (empty files) of the tree")
    parser.add_argument("--tree", default="/tmp/scale_tree", help="where the trees are generated (once per --names)")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        return child(args)
    root = os.path.join(args.tree, str(args.names))
    train = generate_tree(root, args.names)
    for kind in ("ours", "upstream"):
        shutil.rmtree(os.path.join(root, f"cache_{kind}"), ignore_errors=True)
    if os.path.exists(images_paths_file(train)):
        os.remove(images_paths_file(train))
    rows = {}
    for kind in ("ours", "upstream"):
        _, line = run_case(args, f"{kind}_first")
        seconds, peak, groups_num, classes_num = line.split()
        rows[kind] = [f"{float(seconds):.1f} s, peak {float(peak) / 1024:.2f} GB ({groups_num} groups, "
                      f"{classes_num} classes)"]
    time.sleep(3)  # beyond load_groups' racy window, as any later start
    load = (f"from datasets.listing_cache import load_groups; load_groups({train!r}, {M}, {ALPHA}, {N}, {L}, "
            f"{MIN_IMAGES_PER_CLASS}, {os.path.join(root, 'cache_ours')!r})")
    upstream = f"{UPSTREAM_IMPORTS}; torch.load({os.path.join(root, 'cache_upstream', 'train.torch')!r})"
    for kind, code in (("ours", "import train; " + load), ("upstream", upstream)):
        cached_start(code)  # a first one warms the file cache
        seconds, peak = min(cached_start(code) for _ in range(3))
        rows[kind].append(f"{seconds:.1f} s (peak {peak / 1024:.2f} GB)")
    for kind in ("ours", "list"):
        _, line = run_case(args, f"{kind}_workers")
        rows["ours" if kind == "ours" else "upstream"].append(" / ".join(f"{float(v):.0f}" for v in line.split()))
    print(f"\n{args.names} names, {os.cpu_count()} CPUs; loader workers: {args.workers}, batches of {args.batch_size}, "
          f"private MB per worker after 1 / {args.batches // 4} / "
          f"{args.batches // 2} / {args.batches} batches\n")
    print("| | first class computation | cached start (process start to groups loaded, best of 3) | "
          "loader worker memory (MB) |")
    print("|---|---|---|---|")
    for kind, label in (("upstream", "upstream CosPlace (lists of str)"), ("ours", "this project (ClassPaths)")):
        print(f"| {label} | " + " | ".join(rows[kind]) + " |")


if __name__ == "__main__":
    main()

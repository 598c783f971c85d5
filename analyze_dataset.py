"""What a dataset holds, and which classes CosPlace will train on, before training on it.

    python analyze_dataset.py --dataset_folder data/sf_xs --out analysis/sf_xs [--M 10 --alpha 30 --N 5 --L 2 ...]

It takes train.py's class flags (--M, --alpha, --N, --L, --min_images_per_class, --groups_num, --groups_order) and
dataset folders, so the classes it shows are those of a training with the same flags. Splits that are absent
(Tokyo-XS has only test/) are left out. Writes to --out: summary.md and summary.json (images per split,
classes and groups, images per class, capture dates, distance of each query to its nearest database image),
images_per_class.png, headings.png, capture_dates.png, map.png, class_samples.jpg and query_neighbours.jpg.
"""

import json
import os

import numpy as np
from matplotlib.figure import Figure  # the object API draws with Agg and touches no global pyplot state

import parser
from core.errors import exit_on_user_error
from datasets.dataset_utils import DatasetError, find_images, find_queries_folder, parse_image_name, read_utms

TILE = 128
PAIRS_PER_ROW = 4
# Map style of each split and role, in drawing order: train underneath, each database under its queries, which are
# hollow or line markers, so a database image at a query's position stays visible
MAP_STYLES = {
    "train": {"color": "tab:gray", "marker": ".", "s": 8, "alpha": 0.4},
    "val/database": {"color": "tab:green", "marker": "o", "s": 40, "alpha": 0.5},
    "test/database": {"color": "tab:blue", "marker": "s", "s": 40, "alpha": 0.5},
    "val/queries": {"color": "tab:orange", "marker": "x", "s": 30, "alpha": 0.9},
    "test/queries": {"color": "tab:red", "marker": "+", "s": 50, "alpha": 0.9},
}
MAP_MARGIN = 0.04  # of the larger side of the data
MAP_MIN_MARGIN_M = 10
# How the groups are listed (and the first --groups_num trained), in the words of the summary
GROUPS_ORDER_WORDS = {"upstream": "in CosPlace's order, as they first appear in the sorted file list",
                      "size": "the largest first"}


def build_parser():
    arguments = parser.build_parser("analyze_dataset", __doc__)
    group = arguments.add_argument_group("Dataset analysis")
    group.add_argument("--out", type=str, required=True, help="folder of the report (created if needed)")
    group.add_argument("--sample_classes", type=parser.positive_int, default=8, help="classes shown in class_samples")
    group.add_argument("--samples_per_class", type=parser.positive_int, default=6, help="images per class shown")
    group.add_argument("--sample_queries", type=parser.positive_int, default=8,
                       help="queries of each test split shown next to their nearest database image")
    group.add_argument("--positive_dist_threshold", type=parser.positive_float, default=25,
                       help="a database image within this distance of a query is one of its positives, in metres")
    group.add_argument("--seed", type=int, default=0, help="seed of the choice of the sample classes and queries")
    return arguments


if __name__ == "__main__":  # --help and flag mistakes are answered here, before the heavy imports below
    ARGS = exit_on_user_error(parser.parse_arguments, "analyze_dataset", None, build_parser())

from sklearn.neighbors import NearestNeighbors  # noqa: E402

import visualizations  # noqa: E402
from datasets.train_dataset import compute_groups, get_class_id_and_group_id  # noqa: E402


def split_folders(args):
    """{'train': folder, 'val': folder, 'test': folder} for the splits that exist."""
    folders = {}
    for split in ("train", "val", "test"):
        folder = getattr(args, f"{split}_set_folder")
        if folder is None and args.dataset_folder is not None:
            folder = os.path.join(args.dataset_folder, split)
        if folder is not None and os.path.isdir(folder):
            folders[split] = folder
    return folders


def read_split(paths, on_bad_name, need_heading=False):
    paths, utms, headings = read_utms(paths, on_bad_name, need_heading=need_heading)
    return {"paths": paths, "utms": utms, "headings": headings, "dates": capture_dates(paths)}


def capture_dates(paths):
    """Capture date of each image as a decimal year, from field 13 (yyyymm) of its name; NaN when absent or invalid."""
    dates = np.full(len(paths), np.nan)
    for i, path in enumerate(paths):
        date = parse_image_name(path).date
        if len(date) == 6 and date.isdigit() and 1 <= int(date[4:]) <= 12:
            dates[i] = int(date[:4]) + (int(date[4:]) - 1) / 12
    return dates


def read_dataset(folders, on_bad_name):
    """{'train': split, 'val/database': split, 'val/queries': split, ...}, each with paths, utms, headings, dates."""
    data = {}
    for split, folder in folders.items():
        if split == "train":
            data["train"] = read_split(find_images(folder), on_bad_name, need_heading=True)  # as training reads it
            continue
        data[f"{split}/database"] = read_split(find_images(os.path.join(folder, "database")), on_bad_name)
        data[f"{split}/queries"] = read_split(find_images(find_queries_folder(folder)), on_bad_name)
    return data


def class_statistics(train, args):
    """The classes of the training split for the given CosPlace parameters, with compute_groups itself: all the
    classes (for the histogram) and the groups train.py will use (classes with enough images)."""
    all_groups = compute_groups(train["paths"], train["utms"], train["headings"], args.M, args.alpha, args.N, args.L, 1,
                                args.groups_order)
    groups = compute_groups(train["paths"], train["utms"], train["headings"], args.M, args.alpha, args.N, args.L,
                            args.min_images_per_class, args.groups_order)
    all_sizes = [len(c) for g in all_groups for c in g]
    kept_sizes = [len(c) for g in groups for c in g]
    stats = {"M": args.M, "alpha": args.alpha, "N": args.N, "L": args.L,
             "min_images_per_class": args.min_images_per_class, "groups_order": args.groups_order,
             "classes_total": len(all_sizes), "classes_kept": len(kept_sizes),
             "classes_dropped": len(all_sizes) - len(kept_sizes),
             "images_in_kept_classes": int(sum(kept_sizes)), "groups": len(groups),
             "classes_per_group": [len(g) for g in groups], "images_per_group": [sum(map(len, g)) for g in groups]}
    if kept_sizes:
        stats["images_per_kept_class"] = {"min": int(np.min(kept_sizes)), "mean": float(np.mean(kept_sizes)),
                                          "median": float(np.median(kept_sizes)), "max": int(np.max(kept_sizes))}
    return stats, all_sizes, groups


def nearest_database(data, split, threshold):
    """Distance of each query of a test split to its nearest database image, and that image's index."""
    database, queries = data[f"{split}/database"], data[f"{split}/queries"]
    distances, indices = NearestNeighbors(n_neighbors=1).fit(database["utms"]).kneighbors(queries["utms"])
    distances, indices = distances[:, 0], indices[:, 0]
    stats = {"queries": len(distances), "database": len(database["paths"]),
             "median_nearest_database_m": float(np.median(distances)),
             "max_nearest_database_m": float(np.max(distances)),
             "queries_with_positive": int(np.sum(distances <= threshold))}
    return stats, distances, indices


def plot_images_per_class(sizes, min_images_per_class, path):
    figure = Figure(figsize=(7, 4))
    axis = figure.subplots()
    bins = np.arange(0.5, max(sizes) + 1.5) if max(sizes) <= 100 else 50
    axis.hist(sizes, bins=bins, color="tab:blue")
    axis.axvline(min_images_per_class - 0.5, color="tab:red", linestyle="--",
                 label=f"--min_images_per_class {min_images_per_class}")
    axis.set(xlabel="images per class", ylabel="classes", title=f"{len(sizes)} classes (all, before dropping)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def plot_stacked_histogram(data, field, bins, xlabel, title, path):
    """One histogram of a per-image field, stacked by split (NaNs left out)."""
    figure = Figure(figsize=(7, 4))
    axis = figure.subplots()
    series = [(key, split[field][np.isfinite(split[field])]) for key, split in data.items()]
    series = [(key, values) for key, values in series if len(values)]
    if series:
        axis.hist([values for _, values in series], bins=bins, stacked=True, label=[key for key, _ in series],
                  color=[MAP_STYLES[key]["color"] for key, _ in series])  # the colours of the map
        axis.legend()
    axis.set(xlabel=xlabel, ylabel="images", title=title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def date_bins(data):
    """Yearly bins, or monthly ones when the dates span at most three years."""
    dates = np.concatenate([split["dates"] for split in data.values()])
    dates = dates[np.isfinite(dates)]
    if len(dates) == 0:
        return 1
    first, last = np.floor(dates.min()), np.floor(dates.max()) + 1
    step = 1 / 12 if last - first <= 3 else 1
    return np.arange(first, last + step / 2, step)


def map_extent(data):
    """(west, east, south, north) of all the positions, with a small margin."""
    utms = np.concatenate([split["utms"] for split in data.values()])
    low, high = utms.min(axis=0), utms.max(axis=0)
    margin = max(MAP_MIN_MARGIN_M, MAP_MARGIN * (high - low).max())
    return low[0] - margin, high[0] + margin, low[1] - margin, high[1] + margin


def map_figure(data):
    """Every split and role with its own colour and marker, at equal scale on both axes, the figure shaped like the
    data (then trimmed by savefig), so the points fill it."""
    west, east, south, north = map_extent(data)
    width = 11 if north - south < east - west else 7
    figure = Figure(figsize=(width, np.clip(width * (north - south) / (east - west), 3, 10)))
    axis = figure.subplots()
    for zorder, (key, style) in enumerate(MAP_STYLES.items(), start=2):
        if key in data:
            utms = data[key]["utms"]
            axis.scatter(utms[:, 0], utms[:, 1], label=f"{key} ({len(utms)})", zorder=zorder, linewidths=1.2,
                         **style)
    axis.set(xlim=(west, east), ylim=(south, north), xlabel="UTM east (m)", ylabel="UTM north (m)",
             title="Positions of the images")
    axis.set_aspect("equal", adjustable="box")
    axis.ticklabel_format(useOffset=False, style="plain")
    axis.grid(alpha=0.3)
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=9, markerscale=1.5, frameon=False)
    return figure


def plot_map(data, path):
    map_figure(data).savefig(path, dpi=100, bbox_inches="tight")


def class_samples_image(groups, train, args):
    """Rows of a few images of randomly chosen classes, captioned with their class id (east, north, heading)."""
    classes = [c for g in groups for c in g]
    rng = np.random.default_rng(args.seed)
    chosen = sorted(rng.choice(len(classes), min(args.sample_classes, len(classes)), replace=False))
    position = {p: (utm, heading) for p, utm, heading in zip(train["paths"], train["utms"], train["headings"])}
    rows = []
    for class_index in chosen:
        images = classes[class_index]
        (east, north), heading = position[images[0]]
        class_id, _ = get_class_id_and_group_id(east, north, heading, args.M, args.alpha, args.N, args.L)
        picked = rng.choice(len(images), min(args.samples_per_class, len(images)), replace=False)
        caption = f"{class_id[0]} {class_id[1]} {class_id[2]}"
        rows.append(visualizations.row_image([visualizations.tile(images[i], caption if n == 0 else "",
                                                                  visualizations.GREY, TILE)
                                              for n, i in enumerate(sorted(picked))]))
    return visualizations.stack_rows(rows, f"{len(chosen)} of {len(classes)} classes (class id: east north heading)")


def query_neighbours_image(data, neighbours, args):
    """For each test split, some queries (evenly spread) next to their nearest database image by UTM."""
    pages = []
    for split, (distances, indices) in neighbours.items():
        queries, database = data[f"{split}/queries"], data[f"{split}/database"]
        pairs = []
        for q in np.unique(np.linspace(0, len(distances) - 1, min(args.sample_queries, len(distances))).astype(int)):
            color = visualizations.GREEN if distances[q] <= args.positive_dist_threshold else visualizations.RED
            pairs.append([visualizations.tile(queries["paths"][q], f"query {q}", visualizations.GREY, TILE),
                          visualizations.tile(database["paths"][indices[q]], f"{distances[q]:.1f} m", color, TILE)])
        rows = [visualizations.row_image(sum(pairs[i: i + PAIRS_PER_ROW], []))
                for i in range(0, len(pairs), PAIRS_PER_ROW)]
        pages.append(visualizations.stack_rows(rows, f"{split}: each query, then its nearest database image"))
    return visualizations.stack_rows(pages)


def markdown_summary(summary):
    lines = [f"# Dataset {summary['dataset']}", "", "## Images", "", "| split | images |", "| --- | ---: |"]
    lines += [f"| {key} | {count} |" for key, count in summary["images"].items()]
    if "classes" in summary:
        c = summary["classes"]
        lines += ["", f"## Classes (M={c['M']} m, alpha={c['alpha']} deg, N={c['N']}, L={c['L']}, "
                      f"min_images_per_class={c['min_images_per_class']})", "",
                  f"- classes: {c['classes_total']} in all, {c['classes_kept']} kept, {c['classes_dropped']} dropped "
                  f"(fewer than {c['min_images_per_class']} images)",
                  f"- images in kept classes: {c['images_in_kept_classes']}",
                  f"- groups with kept classes: {c['groups']} ({GROUPS_ORDER_WORDS[c['groups_order']]}, "
                  f"--groups_order {c['groups_order']}; use --groups_num <= {c['groups']})",
                  f"- classes per group: {c['classes_per_group']}",
                  f"- images per group: {c['images_per_group']}"]
        if "images_per_kept_class" in c:
            s = c["images_per_kept_class"]
            lines.append(f"- images per kept class: min {s['min']}, mean {s['mean']:.1f}, median {s['median']:g}, "
                         f"max {s['max']}")
    if summary["nearest_database"]:
        lines += ["", "## Queries and their nearest database image (UTM)", "",
                  f"| split | queries | database | median m | max m "
                  f"| within {summary['positive_dist_threshold']:g} m |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for split, s in summary["nearest_database"].items():
            lines.append(f"| {split} | {s['queries']} | {s['database']} | {s['median_nearest_database_m']:.1f} | "
                         f"{s['max_nearest_database_m']:.1f} | {s['queries_with_positive']} |")
    lines += ["", "## Capture dates (field 13, yyyymm)", ""]
    lines += [f"- {key}: {d['first']} to {d['last']}, {d['missing']} without a date"
              for key, d in summary["capture_dates"].items()]
    lines += ["", "## Figures", ""] + [f"![{name}]({name})" for name in summary["figures"]]
    return "\n".join(lines) + "\n"


def date_range(dates):
    valid = dates[np.isfinite(dates)]
    as_text = lambda d: f"{int(d)}-{int(round((d - int(d)) * 12)) + 1:02d}"
    return {"first": as_text(valid.min()) if len(valid) else None, "last": as_text(valid.max()) if len(valid) else None,
            "missing": int(np.sum(~np.isfinite(dates)))}


def analyze(args):
    folders = split_folders(args)
    if not folders:
        raise DatasetError(f"No split found: expected train/, val/ or test/ in --dataset_folder {args.dataset_folder} "
                           f"(or give --train_set_folder / --val_set_folder / --test_set_folder)")
    data = read_dataset(folders, args.on_bad_name)
    os.makedirs(args.out, exist_ok=True)
    summary = {"dataset": args.dataset_folder or ", ".join(folders.values()), "folders": folders,
               "positive_dist_threshold": args.positive_dist_threshold,
               "images": {key: len(split["paths"]) for key, split in data.items()},
               "capture_dates": {key: date_range(split["dates"]) for key, split in data.items()},
               "nearest_database": {}, "figures": []}

    def save(name, draw, *draw_args):
        draw(*draw_args, os.path.join(args.out, name))
        summary["figures"].append(name)

    if "train" in data:
        summary["classes"], all_sizes, groups = class_statistics(data["train"], args)
        save("images_per_class.png", plot_images_per_class, all_sizes, args.min_images_per_class)
        if groups:
            save("class_samples.jpg", lambda path: class_samples_image(groups, data["train"], args).save(path))
    neighbours = {}
    for split in folders:
        if split != "train":
            stats, distances, indices = nearest_database(data, split, args.positive_dist_threshold)
            summary["nearest_database"][split], neighbours[split] = stats, (distances, indices)
    save("headings.png", plot_stacked_histogram, data, "headings", np.arange(0, 361, 10), "heading (degrees)",
         "Headings (field 9)")
    save("capture_dates.png", plot_stacked_histogram, data, "dates", date_bins(data), "capture date (year)",
         "Capture dates (field 13, yyyymm)")
    save("map.png", plot_map, data)
    if neighbours:
        save("query_neighbours.jpg", lambda path: query_neighbours_image(data, neighbours, args).save(path))
    with open(os.path.join(args.out, "summary.json"), "w") as file:
        json.dump(summary, file, indent=2)
    with open(os.path.join(args.out, "summary.md"), "w") as file:
        file.write(markdown_summary(summary))
    return summary


def report(args):
    """Writes the report to --out and prints its summary; returns the summary."""
    summary = analyze(args)
    print(markdown_summary(summary))
    print(f"Report written to {args.out}")
    return summary


def main(argv=None):
    return report(parser.parse_arguments("analyze_dataset", argv, build_parser()))


if __name__ == "__main__":
    exit_on_user_error(report, ARGS)

"""Gathers runs into the results table of the course (Markdown, LaTeX, CSV) and plots their training curves.

    python make_report.py logs/resnet18_sfxs logs/eval/* --out report

Each argument is a run folder (logs/<save_dir>/<timestamp>), a folder above run folders (all the runs below it), or a
glob of either. A train.py run gives the validation recalls of its best epoch (metrics.jsonl: the epoch whose model
is best_model.pth) and the test recalls of its best model (test_results.json); an eval.py run (results.json) gives the
recalls of every test set it evaluated, in the row of the training run its --resume_model comes from when that run
folder still exists. Where two files give the same test set, results.json wins over test_results.json, which wins
over metrics.jsonl. Rows are named after args.json's save_dir (else the folder above the run), with the run folder
added when two rows would share a name. Columns are named after the test set folders: .../sf_xs/val -> 'SF-XS val',
.../tokyo_xs/test -> 'Tokyo-XS' (a dataset evaluated only on its test split keeps its name alone).

Writes to --out: results_table.md, results_table.tex, results_table.csv (the numbers exactly as in the logs, and the
log files they come from) and training_curves.png (loss, val R@1 and learning rates per epoch).
"""

import argparse
import csv
import glob
import json
import math
import os
import sys
from dataclasses import dataclass, field

from matplotlib.figure import Figure  # the object API draws with Agg and touches no global pyplot state
from matplotlib.ticker import MaxNLocator

import commons
import parser

RUN_FILES = ("results.json", "test_results.json", "metrics.jsonl")
PRIORITY = {"results.json": 3, "test_results.json": 2, "metrics.jsonl": 1}
# Folder name -> name in the table; their order is the order of the columns (other datasets follow, sorted)
DATASET_NAMES = {"sf_xs": "SF-XS", "tokyo_xs": "Tokyo-XS", "sf_xl": "SF-XL", "tokyo247": "Tokyo 24/7",
                 "pitts30k": "Pitts30k", "pitts250k": "Pitts250k", "msls": "MSLS", "st_lucia": "St Lucia"}
SPLIT_ORDER = ("train", "val", "test")
LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


class ReportError(ValueError):
    """Nothing to report from the given folders, or a log that cannot be read."""


@dataclass
class Experiment:
    """One row: the recalls of each test set (label 'dataset/split' -> {'R@1': ...}), where they come from, and the
    per-epoch records of its training."""
    folder: str
    name: str = ""
    recalls: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)
    metrics: list = field(default_factory=list)

    def add(self, label, recalls, source):
        current = self.sources.get(label)
        if current is None or PRIORITY[os.path.basename(source)] >= PRIORITY[os.path.basename(current)]:
            self.recalls[label], self.sources[label] = recalls, source


def read_json(path):
    try:
        with open(path) as file:
            return json.load(file)
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{path} cannot be read as JSON ({e}): remove it or the run folder from the arguments") from e


def read_metrics(path):
    """The records of metrics.jsonl; a line cut by a killed run (the last one) is skipped with a warning."""
    records = []
    with open(path) as file:
        for line_number, line in enumerate(file, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    print(f"Warning: {path} line {line_number} is not valid JSON, skipped", file=sys.stderr)
    return records


def is_run_folder(folder):
    return any(os.path.isfile(os.path.join(folder, name)) for name in RUN_FILES)


def find_run_folders(patterns):
    """Run folders of the arguments, in the given order (each glob sorted), without repetitions."""
    folders = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) or ([pattern] if os.path.isdir(pattern) else [])
        if not matches:
            raise ReportError(f"{pattern}: no such folder (nor glob match)")
        for match in matches:
            below = [match] if is_run_folder(match) else sorted(
                root for root, _, _ in os.walk(match) if is_run_folder(root))
            folders += [os.path.abspath(f) for f in below if os.path.abspath(f) not in folders]
    if not folders:
        raise ReportError(f"No run folder (with one of {', '.join(RUN_FILES)}) in {' '.join(patterns)}")
    return folders


def best_epoch(metrics):
    """The record of the epoch whose model is best_model.pth: train.py saves the first epoch that reaches the
    highest val R@1, if that is above 0; otherwise it tests the last model. None without any val R@1."""
    evaluated = [record for record in metrics if "val_R@1" in record]
    if not evaluated:
        return None
    best = max(evaluated, key=lambda record: record["val_R@1"])
    return best if best["val_R@1"] > 0 else evaluated[-1]


def recalls_of(record, prefix=""):
    return {key[len(prefix):]: value for key, value in record.items() if key.startswith(prefix + "R@")}


def experiment_folder(run_folder):
    """The training run an eval.py run belongs to: the folder of its --resume_model, when that is a run folder."""
    results_path = os.path.join(run_folder, "results.json")
    if os.path.isfile(results_path):
        model = read_json(results_path).get("model")
        if model and is_run_folder(os.path.dirname(os.path.abspath(model))):
            return os.path.dirname(os.path.abspath(model))
    return run_folder


def load_experiments(run_folders):
    experiments = {}
    for run_folder in run_folders:
        folder = experiment_folder(run_folder)
        experiment = experiments.setdefault(folder, Experiment(folder))
        args_path = os.path.join(run_folder, "args.json")
        run_args = read_json(args_path) if os.path.isfile(args_path) else {}
        metrics_path = os.path.join(run_folder, "metrics.jsonl")
        if os.path.isfile(metrics_path) and (metrics := read_metrics(metrics_path)):
            experiment.metrics = metrics
            if best_epoch(metrics) is None:
                print(f"Warning: {metrics_path} has no val_R@1", file=sys.stderr)
            elif run_args.get("val_set_folder"):
                experiment.add(commons.test_set_label(run_args["val_set_folder"]),
                               recalls_of(best_epoch(metrics), "val_"), metrics_path)
            else:
                print(f"Warning: {run_folder} has no args.json naming its validation set: its val recalls are "
                      f"left out", file=sys.stderr)
        test_path = os.path.join(run_folder, "test_results.json")
        if os.path.isfile(test_path):
            test_results = read_json(test_path)
            experiment.add(commons.test_set_label(test_results["dataset"]), recalls_of(test_results), test_path)
        results_path = os.path.join(run_folder, "results.json")
        if os.path.isfile(results_path):
            for folder, recalls in read_json(results_path)["test_sets"].items():
                experiment.add(commons.test_set_label(folder), recalls, results_path)
    name_experiments(list(experiments.values()))
    return list(experiments.values())


def name_experiments(experiments):
    """save_dir of args.json, else the folder above the run; the run folder is added to names used twice."""
    for experiment in experiments:
        args_path = os.path.join(experiment.folder, "args.json")
        save_dir = read_json(args_path).get("save_dir") if os.path.isfile(args_path) else None
        experiment.name = save_dir or os.path.basename(os.path.dirname(experiment.folder))
    names = [e.name for e in experiments]
    for experiment in experiments:
        if names.count(experiment.name) > 1:
            experiment.name = f"{experiment.name}/{os.path.basename(experiment.folder)}"


def columns_of(experiments):
    """[(label, title)] of every test set, the known datasets first, validation before test."""
    labels = {label for e in experiments for label in e.recalls}
    split_of = lambda label: label.split("/")[-1] if label.split("/")[-1] in SPLIT_ORDER else ""
    dataset_of = lambda label: label.split("/")[0] if split_of(label) else label.split("/")[-1]
    order = list(DATASET_NAMES)
    labels = sorted(labels, key=lambda l: (order.index(dataset_of(l)) if dataset_of(l) in order else len(order),
                                           dataset_of(l), SPLIT_ORDER.index(split_of(l)) if split_of(l) else 0))
    columns = []
    for label in labels:
        dataset, split = dataset_of(label), split_of(label)
        splits = {split_of(other) for other in labels if dataset_of(other) == dataset}
        title = DATASET_NAMES.get(dataset, dataset)
        columns.append((label, title if splits == {"test"} or not split else f"{title} {split}"))
    return columns


def table_rows(experiments, columns, recall_values):
    """[(name, [value or None for each column and N], source files)]."""
    return [(e.name, [e.recalls.get(label, {}).get(f"R@{n}") for label, _ in columns for n in recall_values],
             sorted({os.path.relpath(e.sources[label]) for label, _ in columns if label in e.sources}))
            for e in experiments]


def markdown_table(rows, columns, recall_values):
    header = ["Experiment"] + [f"{title} R@{n}" for _, title in columns for n in recall_values]
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for name, values, _ in rows:
        lines.append("| " + " | ".join([name] + ["–" if v is None else f"{v:.1f}" for v in values]) + " |")
    return "\n".join(lines) + "\n"


def latex_escape(text):
    return "".join(LATEX_ESCAPES.get(character, character) for character in text)


def latex_table(rows, columns, recall_values):
    k = len(recall_values)
    lines = [r"% needs \usepackage{booktabs}", r"\begin{tabular}{l" + "r" * k * len(columns) + "}", r"\toprule",
             " & ".join(["Experiment"] + [rf"\multicolumn{{{k}}}{{c}}{{{latex_escape(title)}}}"
                                          for _, title in columns]) + r" \\",
             " & ".join([""] + [f"R@{n}" for _ in columns for n in recall_values]) + r" \\", r"\midrule"]
    for name, values, _ in rows:
        lines.append(" & ".join([latex_escape(name)] + ["--" if v is None else f"{v:.1f}" for v in values]) + r" \\")
    return "\n".join(lines + [r"\bottomrule", r"\end{tabular}"]) + "\n"


def write_csv(rows, columns, recall_values, path):
    with open(path, "w", newline="") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(["experiment"] + [f"{title} R@{n}" for _, title in columns for n in recall_values]
                        + ["sources"])
        for name, values, sources in rows:
            writer.writerow([name] + ["" if v is None else repr(v) for v in values] + [" ".join(sources)])


def plot_training_curves(experiments, path):
    """Loss, val R@1 and learning rates (backbone solid, classifiers dashed) per epoch, one colour per run."""
    figure = Figure(figsize=(15, 4.5))
    loss_axis, recall_axis, lr_axis = figure.subplots(1, 3)
    for index, experiment in enumerate(e for e in experiments if e.metrics):
        color = f"C{index % 10}"
        epochs = [record["epoch"] for record in experiment.metrics]
        values = lambda key: [record.get(key, math.nan) for record in experiment.metrics]  # NaN: a gap in the line
        loss_axis.plot(epochs, values("loss"), "o-", color=color, label=experiment.name)
        recall_axis.plot(epochs, values("val_R@1"), "o-", color=color)
        lr_axis.plot(epochs, values("lr"), "o-", color=color)
        lr_axis.plot(epochs, values("classifiers_lr"), "s--", color=color)
    loss_axis.set(xlabel="epoch", ylabel="mean training loss", title="Loss")
    recall_axis.set(xlabel="epoch", ylabel="R@1 (%)", title="Validation R@1")
    lr_axis.set(xlabel="epoch", ylabel="learning rate", yscale="log", title="Learning rate (--- classifiers)")
    for axis in (loss_axis, recall_axis, lr_axis):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def make_report(patterns, out_folder, recall_values=(1, 5)):
    """Writes the tables (and the curves when a run has metrics.jsonl); returns the markdown table and the rows."""
    experiments = load_experiments(find_run_folders(patterns))
    columns = columns_of(experiments)
    if not columns:
        raise ReportError(f"The runs in {' '.join(patterns)} have no recalls yet (no finished epoch or evaluation)")
    rows = table_rows(experiments, columns, recall_values)
    os.makedirs(out_folder, exist_ok=True)
    markdown = markdown_table(rows, columns, recall_values)
    with open(os.path.join(out_folder, "results_table.md"), "w") as file:
        file.write(markdown)
    with open(os.path.join(out_folder, "results_table.tex"), "w") as file:
        file.write(latex_table(rows, columns, recall_values))
    write_csv(rows, columns, recall_values, os.path.join(out_folder, "results_table.csv"))
    if any(e.metrics for e in experiments):
        plot_training_curves(experiments, os.path.join(out_folder, "training_curves.png"))
    return markdown, rows


def main(argv=None):
    arguments = argparse.ArgumentParser(description=__doc__, formatter_class=parser.HelpFormatter)
    arguments.add_argument("runs", nargs="+", help="run folders, folders above them, or globs")
    arguments.add_argument("--out", required=True, help="folder of the tables and the plot (created if needed)")
    arguments.add_argument("--recall_values", type=parser.positive_int, nargs="+", default=[1, 5],
                           help="N of the R@N columns")
    args = arguments.parse_args(argv)
    try:
        markdown, _ = make_report(args.runs, args.out, args.recall_values)
    except ReportError as e:
        sys.exit(f"make_report.py: {e}")
    print(markdown)
    print(f"Tables and curves written to {args.out}")


if __name__ == "__main__":
    main()

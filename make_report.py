"""Gathers runs into the results table of the course (Markdown, LaTeX, CSV) and plots their training curves.

    python make_report.py logs/resnet18_sfxs logs/eval/* --out report
    python make_report.py experiments/finetune_study/runs --aggregate_seeds --out report

Each argument is a run folder (logs/<save_dir>/<timestamp>), a folder above run folders, or a glob of either: one row
per model and evaluation settings. See docs/reporting.md for the rows, the columns, the seeds and the files written.
"""

import argparse
import os
import sys

from core.errors import exit_on_user_error
from parser import positive_int


def build_parser():
    arguments = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arguments.add_argument("runs", nargs="+", help="run folders, folders above them, or globs")
    arguments.add_argument("--out", required=True, help="folder of the tables and the plot (created if needed)")
    arguments.add_argument("--recall_values", type=positive_int, nargs="+", default=[1, 5],
                           help="N of the R@N columns (default: 1 5)")
    arguments.add_argument("--aggregate_seeds", action="store_true",
                           help="one row (and one curve) of mean +- std over the runs that differ only by --seed")
    arguments.add_argument("--ignore_flags", nargs="+", default=[], metavar="FLAG",
                           help="flags whose values neither split nor name rows: e.g. one added to the project after "
                                "some of the runs were made, where it cannot change their results")
    arguments.add_argument("--panels", nargs="+", metavar="METRIC",
                           help="the curves to draw, by metrics.jsonl key (default: all): loss, classification_loss, "
                                "val_R@1, lr, classifiers_lr, ssl_loss, dann_loss, dann_domain_accuracy")
    arguments.add_argument("--curves_of", nargs="+", metavar="EXPERIMENT",
                           help="the experiments whose curves are drawn, by their name in the table (default: all)")
    arguments.add_argument("--legend", nargs="+", default=[], metavar="EXPERIMENT=NAME",
                           help="the name of an experiment in the curves' legend")
    return arguments


def parse_arguments(argv=None):
    """The flags, with --legend read into args.legend_names."""
    arguments = build_parser()
    args = arguments.parse_args(argv)
    args.legend_names = dict(item.rsplit("=", 1) for item in args.legend if "=" in item)
    if len(args.legend_names) != len(args.legend):
        arguments.error(f"--legend takes EXPERIMENT=NAME items, got {' '.join(args.legend)}")
    return args


if __name__ == "__main__":  # --help and flag mistakes are answered here, before the heavy imports below
    ARGS = exit_on_user_error(parse_arguments)

from core import files  # noqa: E402
from reporting.curves import curves_markdown, plot_training_curves  # noqa: E402
from reporting.failures import failures_markdown  # noqa: E402
from reporting.rows import build_rows, columns_of, group_rows, name_groups  # noqa: E402
from reporting.runs import ReportError, find_run_folders, load_run  # noqa: E402
from reporting.tables import latex_report, latex_table, markdown_table, table_rows, write_csv  # noqa: E402


def make_report(patterns, out_folder, recall_values=(1, 5), aggregate_seeds=False, ignored_flags=(), panel_keys=None,
                shown=None, legend_names=None):
    """Writes the tables, the curves when a run has metrics.jsonl (panel_keys, shown and legend_names choose the
    panels, the experiments and their names in the legend) and the LaTeX skeleton; returns the markdown table and
    the rows."""
    load_run.cache_clear()  # runs go on writing their logs between two reports of one process
    runs = [load_run(folder) for folder in find_run_folders(patterns)]
    for flag in ignored_flags:
        if not any(flag in run.args for run in runs):
            print(f"Warning: --ignore_flags {flag}: no run has this flag", file=sys.stderr)
    rows = build_rows(runs)
    columns = columns_of(rows)
    if not columns:
        raise ReportError(f"The runs in {' '.join(patterns)} have no recalls yet (no finished epoch or evaluation)")
    groups = group_rows(rows, aggregate_seeds, ignored_flags)
    name_groups(groups, aggregate_seeds, ignored_flags)
    table = table_rows(groups, columns, recall_values)
    os.makedirs(out_folder, exist_ok=True)
    markdown = markdown_table(table, columns, recall_values, aggregate_seeds)
    files.atomic_write(os.path.join(out_folder, "results_table.md"), lambda file: file.write(markdown), mode="w")
    files.atomic_write(os.path.join(out_folder, "results_table.tex"),
                       lambda file: file.write(latex_table(table, columns, recall_values, aggregate_seeds)), mode="w")
    write_csv(table, columns, recall_values, os.path.join(out_folder, "results_table.csv"), aggregate_seeds)
    panels = []
    if any(row.metrics for row in rows):
        panels = plot_training_curves(groups, out_folder, panel_keys, shown, legend_names)
        curves = curves_markdown(groups)
        if curves:
            files.atomic_write(os.path.join(out_folder, "curves_table.md"), lambda file: file.write(curves), mode="w")
    files.atomic_write(os.path.join(out_folder, "report.tex"), lambda file: file.write(latex_report(panels)),
                       mode="w")
    failures = failures_markdown(groups, columns, out_folder=out_folder)
    if failures:
        files.atomic_write(os.path.join(out_folder, "failures.md"), lambda file: file.write(failures), mode="w")
    return markdown, table


def report(args):
    markdown, _ = make_report(args.runs, args.out, args.recall_values, args.aggregate_seeds, args.ignore_flags,
                              args.panels, args.curves_of, args.legend_names)
    print(markdown)
    print(f"Tables and curves written to {args.out}")


def main(argv=None):
    report(parse_arguments(argv))


if __name__ == "__main__":
    exit_on_user_error(report, ARGS)

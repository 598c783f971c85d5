"""The recurring mistakes of the models of the table, from the predictions.csv of their results (failures.md)."""

import collections
import csv
import os

from core import files


def predictions_file(label, source):
    """The predictions.csv of a test set's result: eval.py writes it in a folder named after the test set's label
    beside results.json, train.py beside test_results.json. None when it is missing (older or deleted runs)."""
    folder = os.path.dirname(source)
    candidates = [os.path.join(folder, files.label_folder(label), "predictions.csv")]
    if os.path.basename(source) == "test_results.json":
        candidates.append(os.path.join(folder, "predictions.csv"))
    return next((path for path in candidates if os.path.isfile(path)), None)


def read_top1(path):
    """{query path: (top-1 database path, whether it is right)} of a predictions.csv."""
    with open(path, newline="") as file:
        return {row["query_path"]: (row["database_path"], row["correct"] == "1")
                for row in csv.DictReader(file) if row["rank"] == "1"}


def failures_markdown(groups, columns, top=10, out_folder=None):
    """failures.md, the recurring mistakes of the models of the table, per test set: the database images that are
    the wrong top-1 of the most queries (summed over the models), and the queries that every model misses; with
    out_folder also their picture, failures/<test set>.jpg (night images brightened). None without any
    predictions.csv."""
    lines = []
    for label, title in columns:
        models = {}  # model name -> its top-1s
        for group in groups:
            for index, row in enumerate(group.rows):
                path = label in row.cells and predictions_file(label, row.cells[label][1])
                if path:
                    models[group.name + (f" #{index + 1}" if len(group.rows) > 1 else "")] = read_top1(path)
        if not models:
            continue
        wrong_of = {name: {database for database, right in top1.values() if not right}
                    for name, top1 in models.items()}
        wrong = collections.Counter(database for top1 in models.values() for database, right in top1.values()
                                    if not right)
        queries = set.intersection(*(set(top1) for top1 in models.values()))
        missed = sorted(query for query in queries if not any(top1[query][1] for top1 in models.values()))
        lines += [f"## {title} ({label}): {len(models)} models, {len(queries)} queries in all of them", "",
                  f"Database images that are the wrong top-1 of the most queries ({sum(wrong.values())} wrong top-1 "
                  f"in all):", "", "| database image | wrong top-1 of | models |", "| --- | ---: | ---: |"]
        lines += [f"| {database} | {count} | {sum(database in databases for databases in wrong_of.values())} |"
                  for database, count in wrong.most_common(top)]
        lines += ["", f"Queries that every model misses: {len(missed)} of {len(queries)}", ""]
        lines += [f"- {query}" for query in missed] + [""]
        if out_folder is not None:
            import visualizations  # torch and Pillow: only when a gallery is drawn (make_report needs no torch)
            picture = os.path.join(out_folder, "failures", f"{files.label_folder(label)}.jpg")
            caption = f"{title}: recurring wrong top-1 (red), missed by every model (blue)"
            if visualizations.save_failure_gallery(wrong.most_common(top), missed[:2 * top], picture, caption):
                lines += [f"![recurring mistakes of {title}](failures/{os.path.basename(picture)})", ""]
    return "\n".join(["# Recurring mistakes", ""] + lines) if lines else None

"""The results table in Markdown, LaTeX and CSV, and the LaTeX skeleton of the report."""

import csv
import math
import os
import statistics

from core import files
from reporting.rows import best_at_step_0

LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def mean_std(values):
    """(mean, sample std - None for a single value, n) of the values that are not None."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None, None, 0
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None, len(values)


def table_rows(groups, columns, recall_values):
    """[(name, test size, [[the value of each row of the group] for each column and N], log files)]; the name says
    'best = step 0' when the model of the rows (or of k of their n seeds) is the network as loaded."""
    table = []
    for group in groups:
        at_step_0 = sum(map(best_at_step_0, group.rows))
        flag = "" if not at_step_0 else " (best = step 0)" if at_step_0 == len(group.rows) else \
            f" (best = step 0 in {at_step_0} of {len(group.rows)})"
        table.append((group.name + flag, ", ".join(dict.fromkeys(row.test_size for row in group.rows)),
                      [[row.cells[label][0].get(f"R@{n}") if label in row.cells else None for row in group.rows]
                       for label, _ in columns for n in recall_values],
                      sorted({os.path.relpath(source) for row in group.rows for _, source in row.cells.values()})))
    return table


def format_cell(values, aggregate_seeds, plus_minus="+-", missing="–"):
    if not aggregate_seeds:
        return missing if values[0] is None else f"{values[0]:.1f}"
    mean, std, n = mean_std(values)
    if n == 0:
        return missing
    return f"{mean:.1f}" + (f" {plus_minus} {std:.1f}" if std is not None else "") + f" (n={n})"


def markdown_table(rows, columns, recall_values, aggregate_seeds=False):
    header = ["Experiment", "test size"] + [f"{title} R@{n}" for _, title in columns for n in recall_values]
    lines = ["| " + " | ".join(header) + " |", "| --- | --- |" + " ---: |" * (len(header) - 2)]
    for name, size, cells, _ in rows:
        lines.append("| " + " | ".join([name, size] + [format_cell(c, aggregate_seeds) for c in cells]) + " |")
    return "\n".join(lines) + "\n"


def latex_escape(text):
    return "".join(LATEX_ESCAPES.get(character, character) for character in text)


def latex_table(rows, columns, recall_values, aggregate_seeds=False):
    k = len(recall_values)
    lines = [r"% needs \usepackage{booktabs}", r"\begin{tabular}{ll" + "r" * k * len(columns) + "}", r"\toprule",
             " & ".join(["Experiment", "Test size"] + [rf"\multicolumn{{{k}}}{{c}}{{{latex_escape(title)}}}"
                                                       for _, title in columns]) + r" \\",
             " & ".join(["", ""] + [f"R@{n}" for _ in columns for n in recall_values]) + r" \\", r"\midrule"]
    for name, size, cells, _ in rows:
        lines.append(" & ".join([latex_escape(name), latex_escape(size)]
                                + [format_cell(c, aggregate_seeds, r"$\pm$", "--") for c in cells]) + r" \\")
    return "\n".join(lines + [r"\bottomrule", r"\end{tabular}"]) + "\n"


def write_csv(rows, columns, recall_values, path, aggregate_seeds=False):
    """The numbers exactly as logged (repr), or their mean, std and n."""
    titles = [f"{title} R@{n}" for _, title in columns for n in recall_values]
    number = lambda value: "" if value is None else repr(value)
    if aggregate_seeds:
        lines = [["experiment", "test size"] + [f"{t} {s}" for t in titles for s in ("mean", "std", "n")]
                 + ["sources"]]
        lines += [[name, size] + [number(v) for c in cells for v in mean_std(c)] + [" ".join(sources)]
                  for name, size, cells, sources in rows]
    else:
        lines = [["experiment", "test size"] + titles + ["sources"]]
        lines += [[name, size] + [number(c[0]) for c in cells] + [" ".join(sources)]
                  for name, size, cells, sources in rows]
    files.atomic_write(path, lambda file: csv.writer(file, lineterminator="\n").writerows(lines), mode="w")


def latex_report(panels):
    """report.tex: a skeleton of the course's report with the results table and a figure per curve (pdflatex
    report.tex in the report folder compiles it)."""
    lines = [r"\documentclass{article}", r"\usepackage{booktabs}", r"\usepackage{graphicx}", "",
             r"\title{TODO: title}", r"\author{TODO: authors}", r"\begin{document}", r"\maketitle", "",
             r"\section{Introduction}", "TODO: the task (visual place recognition) and what you tried.", "",
             r"\section{Method}", "TODO: CosPlace, the backbone, the aggregation, your extension.", "",
             r"\section{Experiments}",
             r"A query is found at N if one of its first N predictions lies within 25 m (Table~\ref{tab:results}).", "",
             r"\begin{table}[t]", r"  \centering", r"  \resizebox{\linewidth}{!}{\input{results_table.tex}}",
             r"  \caption{Recall@N (\%) of each experiment; test size: the test images' shorter side.}",
             r"  \label{tab:results}", r"\end{table}", ""]
    for key, title, _ in panels:
        lines += [r"\begin{figure}[t]", r"  \centering",
                  rf"  \includegraphics[width=0.7\linewidth]{{curves/{key}.pdf}}",
                  rf"  \caption{{{latex_escape(title)}. TODO: what it shows.}}",
                  rf"  \label{{fig:{key.replace('@', '')}}}", r"\end{figure}", ""]
    return "\n".join(lines + [r"\section{Conclusion}", "TODO", r"\end{document}", ""])

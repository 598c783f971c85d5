"""The training curves: their table (curves_table.md) and their figures (matplotlib, imported only to draw)."""

import math
import os

from matplotlib.figure import Figure  # the object API draws with Agg and touches no global pyplot state

from core import files
from reporting.runs import ReportError, best_record
from reporting.tables import mean_std

# (metrics.jsonl key, panel title, log scale); the optional ones get a panel only when some run logs them
CURVES = [("loss", "Training loss (all terms)", False), ("val_R@1", "Validation R@1 (%)", False),
          ("lr", "Backbone learning rate", True), ("classifiers_lr", "Classifiers learning rate", True)]
OPTIONAL_CURVES = [("classification_loss", "Classification loss", False), ("ssl_loss", "SSL loss", False),
                   ("dann_loss", "DANN loss", False), ("dann_domain_accuracy", "DANN domain accuracy", False)]
LINE_STYLES, MARKERS = ("-", "--", "-.", ":"), "os^Dvx*"  # 7 markers and 10 colours: 70 distinct lines


def curve(runs_metrics, key, x_key):
    """[(x, mean, std)] of one metric over the runs of a group, at each x (step or epoch) that a run logged."""
    by_x = {}
    for metrics in runs_metrics:
        for x, value in {r[x_key]: r.get(key) for r in metrics}.items():  # a resumed run's last record of each x
            by_x.setdefault(x, []).append(value)
    points = [(x, *mean_std(values)[:2]) for x, values in sorted(by_x.items())]
    return [(x, mean, std) for x, mean, std in points if mean is not None]


def curves_markdown(groups):
    """The learning curves as a table, the twin of the figure: val R@1 at each validation step (mean +- std over a
    group's seeds), and the step of each run's best_model.pth (0: no validation beat the network as loaded)."""
    series = [(group.name, [row.metrics for row in group.rows if row.metrics]) for group in groups]
    series = [(name, metrics) for name, metrics in series
              if metrics and all("step" in record for records in metrics for record in records)]
    steps = sorted({record["step"] for _, metrics in series for records in metrics for record in records
                    if "val_R@1" in record})
    lines = ["| Experiment | n | " + " | ".join(f"{step}" for step in steps) + " | best step |",
             "| --- | ---: |" + " ---: |" * len(steps) + " --- |"]
    for name, metrics in series:
        points = {x: (mean, std) for x, mean, std in curve(metrics, "val_R@1", "step")}
        cells = [f"{points[step][0]:.1f}" + (f" +- {points[step][1]:.1f}" if points[step][1] is not None else "")
                 if step in points else "–" for step in steps]
        best_steps = ", ".join(str(record["step"]) for record in map(best_record, metrics) if record)
        lines.append(f"| {name} | {len(metrics)} | " + " | ".join(cells) + f" | {best_steps} |")
    return "\n".join(lines) + "\n" if series and steps else None


def curve_panels(groups, panel_keys=None, shown=None):
    """The series [(name, [metrics of each seed])] of the groups named in shown (all by default) and the panels
    [(key, title, log scale)] of panel_keys (every metric logged by default), or a ReportError naming the choices."""
    series = [(group.name, [row.metrics for row in group.rows if row.metrics]) for group in groups]
    series = [(name, metrics) for name, metrics in series if metrics]
    unknown = sorted(set(shown or []) - {name for name, _ in series})
    if unknown:
        raise ReportError(f"--curves_of {', '.join(unknown)}: no such experiment with curves; choose among "
                          f"{', '.join(name for name, _ in series)}")
    series = [(name, metrics) for name, metrics in series if not shown or name in shown]
    logged = {key for _, metrics in series for records in metrics for record in records for key in record}
    panels = CURVES + [panel for panel in OPTIONAL_CURVES if panel[0] in logged]
    unknown = sorted(set(panel_keys or []) - {key for key, _, _ in panels})
    if unknown:
        raise ReportError(f"--panels {', '.join(unknown)}: no such curve; choose among "
                          f"{', '.join(key for key, _, _ in panels)}")
    return series, [panel for panel in panels if not panel_keys or panel[0] in panel_keys]


def draw_panel(axis, series, panel, x_key, legend_names):
    """One metric, one line per group (the mean over its seeds, with a +- std band); colours, line styles and
    markers cycled so that 30 lines stay apart."""
    key, title, log_scale = panel
    for index, (name, metrics) in enumerate(series):
        style = {"color": f"C{index % 10}", "linestyle": LINE_STYLES[index // 10 % len(LINE_STYLES)],
                 "marker": MARKERS[index % len(MARKERS)], "markersize": 4, "label": legend_names.get(name, name)}
        points = curve(metrics, key, x_key)
        if points:
            xs, means, _ = zip(*points)
            axis.plot(xs, means, **style)
            band = [(x, m - s, m + s) for x, m, s in points if s is not None]
            if band:
                axis.fill_between(*zip(*band), color=style["color"], alpha=0.15, linewidth=0)
    axis.set(title=title, xlabel="iterations" if x_key == "step" else "epoch", yscale="log" if log_scale else "linear")


def plot_training_curves(groups, out_folder, panel_keys=None, shown=None, legend_names=None):
    """training_curves.png: every panel, the legend outside them; and each panel alone, for a paper, as
    curves/<metric>.{png,pdf,svg} (legend inside). Returns the panels drawn."""
    # Imported here, so that --help answers without loading matplotlib

    series, panels = curve_panels(groups, panel_keys, shown)
    legend_names = legend_names or {}
    # iterations when every record has its step, else epochs (old runs log once an epoch)
    x_key = "step" if all("step" in r for _, metrics in series for records in metrics for r in records) else "epoch"
    columns = min(3, len(panels))
    figure = Figure(figsize=(6 * columns, 4.2 * math.ceil(len(panels) / columns)), layout="constrained")
    axes = figure.subplots(math.ceil(len(panels) / columns), columns, squeeze=False).ravel()
    for axis in axes[len(panels):]:
        axis.set_visible(False)
    for axis, panel in zip(axes, panels):
        draw_panel(axis, series, panel, x_key, legend_names)
    handles, labels = max((axis.get_legend_handles_labels() for axis in axes), key=lambda pair: len(pair[1]))
    figure.legend(handles, labels, loc="outside right upper", fontsize=8, ncols=1 + len(labels) // 40)
    files.atomic_write(os.path.join(out_folder, "training_curves.png"),
                       lambda file: figure.savefig(file, format="png", dpi=90))
    os.makedirs(os.path.join(out_folder, "curves"), exist_ok=True)
    for panel in panels:
        figure = Figure(figsize=(5, 3.6), layout="constrained")
        axis = figure.subplots()
        draw_panel(axis, series, panel, x_key, legend_names)
        if axis.get_legend_handles_labels()[1]:
            axis.legend(fontsize=7)
        for extension in ("png", "pdf", "svg"):
            files.atomic_write(os.path.join(out_folder, "curves", f"{panel[0]}.{extension}"),
                               lambda file: figure.savefig(file, format=extension, dpi=150))
    return panels

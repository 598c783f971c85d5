"""Gathers runs into the results table of the course (Markdown, LaTeX, CSV) and plots their training curves.

    python make_report.py logs/resnet18_sfxs logs/eval/* --out report
    python make_report.py experiments/finetune_study/runs --aggregate_seeds --out report

Each argument is a run folder (logs/<save_dir>/<timestamp>), a folder above run folders (all the runs below it), or a
glob of either.

One row per model and evaluation settings, so that no number ever replaces another:
  - a train.py run gives the row of its best_model.pth: the validation recalls of its best record of metrics.jsonl
    (the one best_model.pth was saved at) and the test recalls of test_results.json;
  - an eval.py run (results.json) of a training run's model with the same settings ("settings": test image size
    and resize, FAISS index and options, AdaBN folder, AMP) fills the other test sets of that row (e.g. Tokyo-XS);
    where it gives another number for a cell already filled, it gets a row of its own, '[rerun <folder>]', and a
    warning. With other settings, or another checkpoint of the run, it gets its own row, labelled with what differs
    from the training run's test: 'resnet18_sfxs [ivfpq nlist=0 nprobe=32]', '[test 64 px]', '[AdaBN val/queries]',
    '[last_checkpoint.pth]'; an old results.json without "settings" is labelled '[settings unknown]';
  - an eval.py run of no model (the untrained network) or of a model that is not in a run folder has its own rows.
Rows are named after args.json's save_dir (else the folder above the run); rows with the same name get the flags
that differ between them ('(seed=1)'), else their run folder. Runs without args.json are compared by the command on
the first line of their info.log. The untrained networks' rows come first, the others in the chronological order
of the run folder they start from.

--aggregate_seeds: the rows of runs that differ only by --seed (and by the flags that do not change results:
logs_root, num_workers, device, command, git_commit, resume_model, resume_train, flags_from_checkpoint) become one
row of mean +- sample std over the seeds and n: '83.3 +- 1.2 (n=3)' (no std with n=1). Paths (dataset, weights,
caches) are compared by their last two components, so 'data/sf_xs' and '/home/me/data/sf_xs' are the same dataset.
A flag that a run lacks (it predates the flag) differs from any value: name it in --ignore_flags when you know it
cannot change those runs' results.

Columns are named after the test set folders: .../sf_xs/val -> 'SF-XS val', .../tokyo_xs/test -> 'Tokyo-XS' (a
dataset evaluated only on its test split keeps its name alone), a second query folder after its test set:
.../tokyo_xs/test/night -> 'Tokyo-night'. So the course's table (SF-XS val, SF-XS test, Tokyo-XS, Tokyo-night) comes
first, other test sets after it. Every row says the test image size of its recalls ('native', '224', '224 square'),
and a row whose best_model.pth is the network as loaded (no validation beat the one before training, step 0: a
short --recipe cosplace run from ImageNet weights) is flagged '(best = step 0)', or '(best = step 0 in k of n)' seeds.

Writes to --out: results_table.md, results_table.tex, results_table.csv (the numbers exactly as in the logs - or
mean, std and n in separate columns - and the log files they come from) and training_curves.png: loss, val R@1 and
learning rates against iterations (epochs for old runs that log once an epoch), plus the classification loss apart
from the weighted SSL / DANN terms, those terms and the domain accuracy when a run has them; with --aggregate_seeds,
the mean over the seeds with a +- std band. With it, curves_table.md: val R@1 at each validation step (runs that log
steps), and the step of each best_model.pth. For a paper: each panel alone in curves/<metric>.{png,pdf,svg}
(--panels, --curves_of and --legend choose the panels, the experiments and their legend names), and report.tex, a
LaTeX skeleton of the report with the table and these figures. failures.md, the recurring mistakes per test set
(from the predictions.csv of the results): the database images that are the wrong top-1 of the most queries over the
models of the table, and the queries that every one of them misses.
"""

import argparse
import collections
import csv
import glob
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from functools import cache

from core import files
from core.errors import UserError, exit_on_user_error

RUN_FILES = ("results.json", "test_results.json", "metrics.jsonl")
# Folder name -> name in the table; their order is the order of the columns (other datasets follow, sorted)
DATASET_NAMES = {"sf_xs": "SF-XS", "tokyo_xs": "Tokyo-XS", "sf_xl": "SF-XL", "tokyo247": "Tokyo 24/7",
                 "pitts30k": "Pitts30k", "pitts250k": "Pitts250k", "msls": "MSLS", "st_lucia": "St Lucia"}
SPLIT_ORDER = ("train", "val", "test")
# Test set label -> column title, where the general rule ('Tokyo-XS night') is not the name the course uses
COLUMN_TITLES = {"tokyo_xs/test/night": "Tokyo-night"}
LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
# Flags that do not change the results: runs that differ only by these (and --seed) are seeds of one experiment
NOT_CONFIGURATION = {"logs_root", "command", "git_commit", "resume_model", "resume_train", "num_workers", "device",
                     "flags_from_checkpoint"}
# Flags naming a file or folder: compared by their last two path components, as test sets name the columns, so that
# runs that reached the same dataset or weights by another path (relative, absolute, moved) stay comparable
PATH_FLAGS = {"dataset_folder", "train_set_folder", "val_set_folder", "test_set_folder", "pretrained",
              "da_target_folder", "adabn_folder", "cache_folder", "preresize_cache", "descriptors_cache"}
# eval.py's settings when no flag changes them: what a row of unknown reference settings is described against
DEFAULT_SETTINGS = {"test_image_size": None, "test_resize": "shorter_side", "faiss_index": "exact",
                    "faiss_options": {}, "adabn_folder": None, "amp": "none"}
# The settings of a re-ranked test (absent from a plain one's)
RERANK_SETTINGS = ("rerank", "rerank_k", "rerank_image_size", "rerank_keypoints")
# (metrics.jsonl key, panel title, log scale); the optional ones get a panel only when some run logs them
CURVES = [("loss", "Training loss (all terms)", False), ("val_R@1", "Validation R@1 (%)", False),
          ("lr", "Backbone learning rate", True), ("classifiers_lr", "Classifiers learning rate", True)]
OPTIONAL_CURVES = [("classification_loss", "Classification loss", False), ("ssl_loss", "SSL loss", False),
                   ("dann_loss", "DANN loss", False), ("dann_domain_accuracy", "DANN domain accuracy", False)]
# The weighted auxiliary terms that train.py adds to the classification loss in "loss"
AUXILIARY_LOSSES = ("ssl_loss", "dann_loss")
LINE_STYLES, MARKERS = ("-", "--", "-.", ":"), "os^Dvx*"  # 7 markers and 10 colours: 70 distinct lines


class ReportError(UserError, ValueError):
    """Nothing to report from the given folders, or a log that cannot be read."""


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


def with_classification_loss(record):
    """The record, with the classification loss apart ("classification_loss": "loss" less its weighted auxiliary
    terms, means of the same iterations) when it has auxiliary terms: "loss" alone mixed them in."""
    auxiliary = [record[key] for key in AUXILIARY_LOSSES if record.get(key) is not None]
    if auxiliary and record.get("loss") is not None:
        return {**record, "classification_loss": record["loss"] - sum(auxiliary)}
    return record


def command_flags(info_log):
    """{flag: value} of the command on the first line of info.log ('<date> <time>   script.py --flag value...'):
    the flags of a run that has no args.json."""
    try:
        with open(info_log) as file:
            tokens = file.readline().split()
    except OSError:
        return {}
    script = next((index for index, token in enumerate(tokens) if token.endswith(".py")), len(tokens))
    flags, key = {}, None
    for token in tokens[script + 1:]:
        if token.startswith("--"):
            key = token[2:]
            flags[key] = ""
        elif key is not None:
            flags[key] = f"{flags[key]} {token}".strip()
    return flags


def comparable_path(value):
    """A path flag's value by its last two components ('sf_xs/val'), each one of a list; 'imagenet' as it is."""
    if isinstance(value, list):
        return [comparable_path(item) for item in value]
    return files.test_set_label(value) if isinstance(value, str) and os.sep in value else value


@dataclass
class Run:
    """A run folder and what its files say."""
    folder: str
    args: dict = field(default_factory=dict)
    metrics: list = field(default_factory=list)
    test_results: dict = None
    results: dict = None

    @property
    def name(self):
        return self.args.get("save_dir") or os.path.basename(os.path.dirname(self.folder))

    @property
    def time(self):
        """Sorts runs chronologically: their folders are named after the time they started."""
        return os.path.basename(self.folder), self.folder

    def flags(self, ignored=frozenset()):
        """The flags that set the run's results (paths by their last two components), but the ignored ones."""
        return {key: comparable_path(value) if key in PATH_FLAGS else value
                for key, value in self.args.items() if key not in NOT_CONFIGURATION | set(ignored)}

    def configuration(self, ignored=frozenset()):
        """What runs that are seeds of one experiment share; None when the run's flags are unknown."""
        if not self.args:
            return None
        return json.dumps(self.flags({"seed", *ignored}), sort_keys=True, default=str)

    @property
    def untrained(self):
        """An eval.py run of the network as initialised (no --resume_model): a baseline, shown first."""
        return self.results is not None and not self.results.get("model")

    @property
    def test_settings(self):
        return (self.test_results or {}).get("settings")


@cache
def load_run(folder):
    path = lambda name: os.path.join(folder, name)
    run = Run(folder)
    if os.path.isfile(path("args.json")):
        run.args = read_json(path("args.json"))
    elif os.path.isfile(path("info.log")):
        run.args = command_flags(path("info.log"))
    if os.path.isfile(path("metrics.jsonl")):
        run.metrics = [with_classification_loss(record) for record in read_metrics(path("metrics.jsonl"))]
    if os.path.isfile(path("test_results.json")):
        run.test_results = read_json(path("test_results.json"))
    if os.path.isfile(path("results.json")):
        run.results = read_json(path("results.json"))
    return run


def is_run_folder(folder):
    return any(os.path.isfile(os.path.join(folder, name)) for name in RUN_FILES)


def find_run_folders(patterns):
    """Run folders of the arguments, without repetitions."""
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


def best_record(metrics):
    """The record whose model is best_model.pth: train.py saves the first record that reaches the highest val R@1,
    if that is above 0; otherwise it tests the last model. None without any val R@1."""
    evaluated = [record for record in metrics if "val_R@1" in record]
    if not evaluated:
        return None
    best = max(evaluated, key=lambda record: record["val_R@1"])
    return best if best["val_R@1"] > 0 else evaluated[-1]


def recalls_of(record, prefix=""):
    return {key[len(prefix):]: value for key, value in record.items() if key.startswith(prefix + "R@")}


@dataclass
class Evaluation:
    """The recalls one log file gives of one model with one set of settings (None: unknown)."""
    run: Run  # where the log is
    owner: Run  # the training run of the model (else the run itself): names the row and sets its seed group
    model: str  # path of the model file, None for the untrained network
    settings: dict
    script: str  # 'train.py' or 'eval.py'
    cells: dict  # test set label ('sf_xs/val') -> ({'R@1': ...}, log file)


def evaluations_of(run):
    """The evaluation of a training run (val recalls of metrics.jsonl, test recalls of test_results.json) and
    that of an eval.py run (results.json)."""
    evaluations = []
    if run.results is None:  # a training run, perhaps killed before its first record: a row of dashes says so
        cells, metrics_path = {}, os.path.join(run.folder, "metrics.jsonl")
        if run.metrics and best_record(run.metrics) is None:
            print(f"Warning: {metrics_path} has no val_R@1", file=sys.stderr)
        elif run.metrics and not run.args.get("val_set_folder"):
            print(f"Warning: {run.folder} has no args.json naming its validation set: its val recalls are left out",
                  file=sys.stderr)
        elif run.metrics:
            cells[files.test_set_label(run.args["val_set_folder"])] = (recalls_of(best_record(run.metrics), "val_"),
                                                                      metrics_path)
        if run.test_results:
            cells.update(results_cells(run.test_results, os.path.join(run.folder, "test_results.json")))
        evaluations.append(Evaluation(run, run, os.path.join(run.folder, "best_model.pth"), run.test_settings,
                                      "train.py", cells))
    if run.results:
        model = run.results.get("model") and os.path.abspath(run.results["model"])
        owner = load_run(os.path.dirname(model)) if model and is_run_folder(os.path.dirname(model)) else run
        evaluations.append(Evaluation(run, owner, model, run.results.get("settings"), "eval.py",
                                      results_cells(run.results, os.path.join(run.folder, "results.json"))))
    return evaluations


def results_cells(results, source):
    """{test set label: (recalls, source)} of a results file: eval.py's (test_sets, and the labels of their query
    folders: 'tokyo_xs/test/night'), or a test_results.json of train.py ('dataset' and the recalls of its usual query
    folder, those of the others under 'other_query_sets', keyed by label)."""
    if "test_sets" not in results:
        others = results.get("other_query_sets", {})
        return {files.test_set_label(results["dataset"]): (recalls_of(results), source),
                **{label: (recalls_of(record), source) for label, record in others.items()}}
    labels = results.get("labels", {})  # absent before query folders: each key is then a test folder
    return {labels.get(key) or files.test_set_label(key): (recalls, source)
            for key, recalls in results["test_sets"].items()}


def describe_settings(settings, reference):
    """What settings change from reference, in words: 'test 64 px, ivfpq nlist=0 nprobe=32'."""
    if settings is None:
        return ["settings unknown"]
    differs = lambda key: settings.get(key) != reference.get(key)
    words = []
    if differs("test_image_size") or differs("test_resize"):
        size = settings.get("test_image_size")
        words.append(("test native size" if size is None else f"test {size} px")
                     + (" square" if settings.get("test_resize") == "square" else ""))
    if differs("faiss_index") or differs("faiss_options"):
        words.append(" ".join([settings.get("faiss_index") or "exact"]
                              + [f"{k}={v}" for k, v in sorted((settings.get("faiss_options") or {}).items())]))
    if differs("adabn_folder"):
        words.append(f"AdaBN {files.test_set_label(settings['adabn_folder'])}" if settings.get("adabn_folder")
                     else "no AdaBN")
    if differs("amp"):
        words.append(f"AMP {settings.get('amp')}")
    if any(differs(key) for key in RERANK_SETTINGS):
        words.append(rerank_words(settings) or "no rerank")
    return words


def rerank_words(settings):
    """'rerank sift@20 (384 px, 1024 keypoints)' for a re-ranked test (test.rerank_settings), '' for a plain one."""
    if not (settings or {}).get("rerank"):
        return ""
    return (f"rerank {settings['rerank']}@{settings['rerank_k']} ({settings['rerank_image_size']} px, "
            f"{settings['rerank_keypoints']} keypoints)")


def row_label(evaluation):
    """What sets an evaluation of a training run's model apart from the run's own test ('' for that test, unless it
    was re-ranked); an eval.py run of its own (untrained) model only says when its settings are unknown or re-ranked."""
    owner = evaluation.owner
    if evaluation.script == "train.py" or evaluation.run is owner:  # its own test: only a re-ranking is named
        return "settings unknown" if evaluation.script == "eval.py" and evaluation.settings is None else \
            rerank_words(evaluation.settings)
    words = [os.path.basename(evaluation.model)] if os.path.basename(evaluation.model) != "best_model.pth" else []
    words += describe_settings(evaluation.settings, owner.test_settings or DEFAULT_SETTINGS)
    if not words and owner.test_settings is None:  # default settings, while the owner's test ones are unknown
        words = ["eval.py"]
    return ", ".join(words)


@dataclass
class Row:
    """The recalls of one model with one set of settings, and where each comes from."""
    owner: Run
    label: str  # '' or what sets the row apart from the owner's own test: 'ivfpq nprobe=32'
    runs: list  # the runs its numbers come from, the first one places the row
    cells: dict = field(default_factory=dict)  # test set label -> (recalls, log file)
    model: str = None  # the model file, None for the untrained network
    test_size: str = "?"  # the test image size of its recalls (test_size)

    @property
    def metrics(self):
        """The training curves of the owner's own row."""
        return self.owner.metrics if any(run is self.owner for run in self.runs) else []


def test_size(settings, args):
    """The test image size of an evaluation, shown in every row (tables that mixed 224 px and native rows without
    saying so misled): 'native', '224' (the shorter side), '224 square'. From the evaluation's settings, else from the
    flags of its run (a training run not tested yet validates with them); '?' when neither says."""
    source = settings if settings is not None else args
    if "test_image_size" not in source:
        return "?"
    size = source["test_image_size"]
    return "native" if size in (None, "none") else f"{size}" + (" square" if source.get("test_resize") == "square"
                                                                 else "")


def best_at_step_0(row):
    """Whether the row's model is a best_model.pth that no validation improved on (its best record is the one before
    training): with ImageNet weights and a short --recipe cosplace run, the untrained network shown as trained."""
    record = best_record(row.owner.metrics) if os.path.basename(row.model or "") == "best_model.pth" else None
    return record is not None and record.get("step") == 0


def conflict(cells, other):
    """The first number that two sets of cells give differently: (test set, 'R@N', (value, log file), (other
    value, other log file)); None when they agree."""
    for label in cells.keys() & other.keys():
        for key in cells[label][0].keys() & other[label][0].keys():
            if cells[label][0][key] != other[label][0][key]:
                return label, key, (cells[label][0][key], cells[label][1]), (other[label][0][key], other[label][1])
    return None


def build_rows(runs):
    """One row per (model, settings), in the chronological order of the runs; an evaluation that gives another
    number for a cell already filled gets a row of its own, with a warning."""
    rows, rows_of_key = [], {}
    for evaluation in (e for run in sorted(runs, key=lambda run: run.time) for e in evaluations_of(run)):
        model_key = evaluation.model or evaluation.run.folder  # each untrained network is a model of its own
        settings_key = json.dumps(evaluation.settings, sort_keys=True) if evaluation.settings is not None \
            else evaluation.run.folder  # unknown settings equal no others
        candidates = rows_of_key.setdefault((model_key, settings_key), [])
        clashes = [conflict(row.cells, evaluation.cells) for row in candidates]
        if None in clashes:
            row = candidates[clashes.index(None)]
            row.cells.update(evaluation.cells)
            row.runs.append(evaluation.run)
            continue
        label = row_label(evaluation)
        if clashes:
            test_set, key, (value, source), (new_value, new_source) = clashes[0]
            print(f"Warning: {new_source} gives {test_set} {key} = {new_value} where {source} gives {value}: both are "
                  f"kept, in separate rows", file=sys.stderr)
            label = ", ".join(filter(None, [label, "rerun " + os.path.relpath(
                evaluation.run.folder, os.path.dirname(os.path.dirname(evaluation.run.folder)))]))
        candidates.append(Row(evaluation.owner, label, [evaluation.run], dict(evaluation.cells), evaluation.model,
                              test_size(evaluation.settings, evaluation.run.args)))
        rows.append(candidates[-1])
    return rows


@dataclass
class Group:
    """Rows that differ only by seed (one row without --aggregate_seeds)."""
    rows: list
    name: str = ""


def group_rows(rows, aggregate_seeds, ignored_flags=()):
    """Rows whose owners have the same flags but --seed, and the same label, are seeds of one experiment; runs of
    unknown flags are experiments of their own. The untrained networks come first, the rest in the order run."""
    if not aggregate_seeds:
        groups = [Group([row]) for row in rows]
    else:
        groups = {}
        for row in rows:
            key = (row.owner.configuration(ignored_flags) or row.owner.folder, row.label)
            groups.setdefault(key, Group([])).rows.append(row)
        groups = list(groups.values())
    return sorted(groups, key=lambda group: not group.rows[0].owner.untrained)  # stable: else chronological


def name_groups(groups, aggregate_seeds, ignored_flags=()):
    """save_dir [label]; groups with the same name get the flags that differ between them, else their run folder."""
    for group in groups:
        row = group.rows[0]
        group.name = row.owner.name + (f" [{row.label}]" if row.label else "")
    for name in {group.name for group in groups}:
        same = [group for group in groups if group.name == name]
        if len(same) < 2:
            continue
        flags = [group.rows[0].owner.flags({*ignored_flags, *(["seed"] if aggregate_seeds else [])})
                 for group in same]
        differing = sorted({k for f in flags for k in f if any(f.get(k) != other.get(k) for other in flags)})
        for group, group_flags in zip(same, flags):
            described = ", ".join(f"{k}={group_flags.get(k, '-')}" for k in differing)
            group.name += f" ({described})" if all(flags) and differing else ""
        names = [group.name for group in same]
        for group in [group for group in same if names.count(group.name) > 1]:
            group.name += f" ({os.path.basename(group.rows[0].runs[0].folder)})"


def label_parts(label):
    """(dataset, split, query folder) of a test set label: 'tokyo_xs/test/night' -> ('tokyo_xs', 'test', 'night'),
    'sf_xs/val' -> ('sf_xs', 'val', ''), 'x/my_set' -> ('my_set', '', '')."""
    parts = label.split("/")
    if len(parts) == 3:
        return tuple(parts)
    return (parts[0], parts[1], "") if parts[-1] in SPLIT_ORDER else (parts[-1], "", "")


def columns_of(rows):
    """[(label, title)] of every test set: the known datasets first (the course's: SF-XS val, SF-XS test, Tokyo-XS,
    Tokyo-night), validation before test, each split's queries/ before its other query folders."""
    labels = {label for row in rows for label in row.cells}
    order = list(DATASET_NAMES)
    sort_key = lambda label: (order.index(label_parts(label)[0]) if label_parts(label)[0] in order else len(order),
                              label_parts(label)[0], SPLIT_ORDER.index(label_parts(label)[1])
                              if label_parts(label)[1] else 0, label_parts(label)[2])
    columns = []
    for label in sorted(labels, key=sort_key):
        dataset, split, queries = label_parts(label)
        splits = {label_parts(other)[1] for other in labels if label_parts(other)[0] == dataset}
        title = DATASET_NAMES.get(dataset, dataset)
        title = title if splits == {"test"} or not split else f"{title} {split}"
        columns.append((label, COLUMN_TITLES.get(label, f"{title} {queries}".strip())))
    return columns


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
    from matplotlib.figure import Figure

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
            import visualizations  # Pillow pictures: only when there are predictions to show
            picture = os.path.join(out_folder, "failures", f"{files.label_folder(label)}.jpg")
            caption = f"{title}: recurring wrong top-1 (red), missed by every model (blue)"
            if visualizations.save_failure_gallery(wrong.most_common(top), missed[:2 * top], picture, caption):
                lines += [f"![recurring mistakes of {title}](failures/{os.path.basename(picture)})", ""]
    return "\n".join(["# Recurring mistakes", ""] + lines) if lines else None


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


def positive_int(value):
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return int(value)


def main(argv=None):
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
    args = arguments.parse_args(argv)
    legend_names = dict(item.rsplit("=", 1) for item in args.legend if "=" in item)
    if len(legend_names) != len(args.legend):
        arguments.error(f"--legend takes EXPERIMENT=NAME items, got {' '.join(args.legend)}")
    markdown, _ = make_report(args.runs, args.out, args.recall_values, args.aggregate_seeds, args.ignore_flags,
                              args.panels, args.curves_of, legend_names)
    print(markdown)
    print(f"Tables and curves written to {args.out}")


if __name__ == "__main__":
    exit_on_user_error(main)

"""Reading run folders: the flags, metrics and results of each run, and the evaluations they hold."""

import glob
import json
import os
import sys
from dataclasses import dataclass, field
from functools import cache

from core import files
from core.errors import UserError

RUN_FILES = ("results.json", "test_results.json", "metrics.jsonl")
# Flags that do not change the results: runs that differ only by these (and --seed) are seeds of one experiment
NOT_CONFIGURATION = {"logs_root", "command", "git_commit", "resume_model", "resume_train", "num_workers", "device",
                     "flags_from_checkpoint", "tensorboard"}
# Flags naming a file or folder: compared by their last two path components, as test sets name the columns, so that
# runs that reached the same dataset or weights by another path (relative, absolute, moved) stay comparable
PATH_FLAGS = {"dataset_folder", "train_set_folder", "val_set_folder", "test_set_folder", "pretrained",
              "da_target_folder", "adabn_folder", "cache_folder", "preresize_cache", "descriptors_cache"}
# The weighted auxiliary terms that train.py adds to the classification loss in "loss"
AUXILIARY_LOSSES = ("ssl_loss", "dann_loss")


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

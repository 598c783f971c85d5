"""The rows of the table (one per model and evaluation settings), their groups of seeds, names and columns."""

import json
import os
import sys
from dataclasses import dataclass, field

from core import files
from reporting.runs import Run, best_record, evaluations_of

# Folder name -> name in the table; their order is the order of the columns (other datasets follow, sorted)
DATASET_NAMES = {"sf_xs": "SF-XS", "tokyo_xs": "Tokyo-XS", "sf_xl": "SF-XL", "tokyo247": "Tokyo 24/7",
                 "pitts30k": "Pitts30k", "pitts250k": "Pitts250k", "msls": "MSLS", "st_lucia": "St Lucia"}
SPLIT_ORDER = ("train", "val", "test")
# Test set label -> column title, where the general rule ('Tokyo-XS night') is not the name the course uses
COLUMN_TITLES = {"tokyo_xs/test/night": "Tokyo-night"}
# eval.py's settings when no flag changes them: what a row of unknown reference settings is described against
DEFAULT_SETTINGS = {"test_image_size": None, "test_resize": "shorter_side", "faiss_index": "exact",
                    "faiss_options": {}, "adabn_folder": None, "amp": "none"}
# The settings of a re-ranked test (absent from a plain one's)
RERANK_SETTINGS = ("rerank", "rerank_k", "rerank_image_size", "rerank_keypoints")


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

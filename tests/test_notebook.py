"""notebooks/course.ipynb: stored without outputs, Colab-first (one repository address in its badge, in REPO_URL and
in the README's badge), and executed end to end on the demo data (synthetic SF-XS and Tokyo-XS, a few iterations at
64 px) with its parameters injected after the cell tagged 'parameters', as papermill does: every step of the course
runs, and the table it shows holds the recalls of the evaluations it ran. Off Colab its Colab cell is a no-op. A
second execution on the same LOGS, as after a Colab disconnect, trains nothing again: a finished training and its
evaluation are reused, and a training cut off (its run folder without 'Experiment finished') resumes from its
last_checkpoint.pth."""

import json
import os
import re
import time

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO_ROOT

NOTEBOOK = os.path.join(REPO_ROOT, "notebooks", "course.ipynb")
COURSE_COLUMNS = ["SF-XS val", "SF-XS test", "Tokyo-XS", "Tokyo-night"]
SAVE_DIRS = ("resnet18_gem", "resnet18_gem_eval", "resnet18_gem_night", "resnet18_gem_night_eval")
COLAB_BADGE = re.compile(r"\[!\[Open In Colab\]\(https://colab\.research\.google\.com/assets/colab-badge\.svg\)\]"
                         r"\(https://colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/main/"
                         r"notebooks/course\.ipynb\)")


def read_notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def execute(tmp_path):
    """The notebook executed on the demo data with DATA and LOGS in tmp_path; returns it with its outputs."""
    notebook = read_notebook()
    position = next(index for index, cell in enumerate(notebook.cells)
                    if "parameters" in cell.metadata.get("tags", []))
    notebook.cells.insert(position + 1, nbformat.v4.new_code_cell(
        f"DEMO = True\nDATA = {str(tmp_path / 'data')!r}\nLOGS = {str(tmp_path / 'logs')!r}",
        metadata={"tags": ["injected-parameters"]}))
    start = time.time()
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()
    print(f"notebook executed in {time.time() - start:.0f} s")
    return notebook


def shown(notebook, kind="text/markdown"):
    """Everything the cells displayed as kind ('text' for what they printed)."""
    return "".join(output.get("text", "") if kind == "text" else output.get("data", {}).get(kind, "")
                   for cell in notebook.cells for output in cell.get("outputs", []))


def listing(logs):
    return {save_dir: sorted(os.listdir(logs / save_dir)) for save_dir in SAVE_DIRS}


@pytest.fixture(scope="module")
def first_execution(tmp_path_factory):
    """The notebook executed once on the demo data, and what it left, read at once (the resume test changes LOGS)."""
    tmp_path = tmp_path_factory.mktemp("course")
    notebook = execute(tmp_path)
    logs = tmp_path / "logs" / "course_demo"
    with open(logs / "report" / "results_table.md") as file:
        table = file.read()
    results = {}
    for save_dir in ("resnet18_gem", "resnet18_gem_night"):
        [run] = os.listdir(logs / f"{save_dir}_eval")
        with open(logs / f"{save_dir}_eval" / run / "results.json") as file:
            results[save_dir] = json.load(file)
    return {"tmp_path": tmp_path, "logs": logs, "notebook": notebook, "table": table, "results": results,
            "runs": listing(logs), "curves_size": os.path.getsize(logs / "report" / "training_curves.png")}


def test_the_notebook_is_stored_without_outputs():
    notebook = read_notebook()
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells and all(cell.outputs == [] and cell.execution_count is None for cell in code_cells)
    assert [cell for cell in code_cells if "parameters" in cell.metadata.get("tags", [])]


def test_the_colab_badges_and_repo_url_name_one_repository():
    notebook = read_notebook()
    [notebook_badge] = COLAB_BADGE.findall(notebook.cells[0].source)
    with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as file:
        [readme_badge] = COLAB_BADGE.findall(file.read())
    [parameters] = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    [repo_url] = re.findall(r'^REPO_URL = "([^"]*)"', parameters.source, flags=re.M)
    assert notebook_badge == readme_badge and repo_url == f"https://github.com/{notebook_badge}", \
        "the badges (notebook's first cell, README) and REPO_URL must name the same repository"
    colab_cells = [cell.source for cell in notebook.cells if "google.colab" in cell.source]
    assert len(colab_cells) == 1 and 'ON_COLAB = "google.colab" in sys.modules' in colab_cells[0]
    body = colab_cells[0].split("if ON_COLAB:", 1)[1]  # what runs on Colab only: indented under the test
    assert "from google.colab import drive" in body and all(line.startswith("    ") for line in body.splitlines()[1:]
                                                             if line.strip())


# the first execution (the fixture) counts in this test's time: 47 s on 2 idle cores, 530 s measured on 2 busy
# shared ones (pytest.ini's 300 s is for hangs)
@pytest.mark.timeout(900)
def test_the_notebook_runs_on_the_demo_data(first_execution):
    table = first_execution["table"]
    assert table in shown(first_execution["notebook"])  # the notebook shows the table make_report wrote
    header, _, *rows = table.splitlines()
    assert header == "| Experiment | test size | " + " | ".join(f"{column} R@{n}" for column in COURSE_COLUMNS
                                                             for n in (1, 5)) + " |"
    for save_dir, results in first_execution["results"].items():
        assert sorted(results["labels"].values()) == ["sf_xs/test", "sf_xs/val", "tokyo_xs/test",
                                                      "tokyo_xs/test/night"]
        recalls = {label: results["test_sets"][key] for key, label in results["labels"].items()}
        [row] = [row for row in rows if row.startswith(f"| {save_dir} ")]  # '(best = step 0)' may follow the name
        cells = [cell.strip() for cell in row.strip("|").split("|")][2:]
        expected = [f"{recalls[label][f'R@{n}']:.1f}" for label in ("sf_xs/val", "sf_xs/test", "tokyo_xs/test",
                                                                     "tokyo_xs/test/night") for n in (1, 5)]
        assert cells[2:] == expected[2:]  # SF-XS val in the table is the training's own validation record
    assert first_execution["curves_size"] > 0
    assert all(len(runs) == 1 for runs in first_execution["runs"].values())


@pytest.mark.timeout(900)
def test_run_all_after_a_disconnect_resumes_and_trains_nothing_twice(first_execution):
    """A disconnect during the night training, faked on the first execution's LOGS: its run folder keeps
    last_checkpoint.pth but loses the 'Experiment finished' of its info.log. Run all again: the baseline and its
    evaluation are reused, the night training continues from that checkpoint (a new run folder, not from scratch)."""
    logs = first_execution["logs"]
    [cut_off] = first_execution["runs"]["resnet18_gem_night"]
    cut_off = logs / "resnet18_gem_night" / cut_off
    with open(cut_off / "info.log") as file:
        kept = [line for line in file if "Experiment finished" not in line]
    with open(cut_off / "info.log", "w") as file:
        file.writelines(kept)
    before = listing(logs)

    notebook = execute(first_execution["tmp_path"])
    after = listing(logs)
    for save_dir in ("resnet18_gem", "resnet18_gem_eval"):
        assert after[save_dir] == before[save_dir], f"{save_dir} ran again"
    printed = shown(notebook, "text")
    assert "finished training: reused" in printed and "evaluated" in printed and ": reused" in printed
    [resumed] = set(after["resnet18_gem_night"]) - set(before["resnet18_gem_night"])
    resumed = logs / "resnet18_gem_night" / resumed
    with open(resumed / "args.json") as file:
        assert os.path.samefile(json.load(file)["resume_train"], cut_off / "last_checkpoint.pth")
    with open(resumed / "info.log") as file:
        assert "Resuming from epoch 1, iteration 0" in file.read()  # the one epoch was done: only the test is left
    with open(cut_off / "metrics.jsonl") as file, open(resumed / "metrics.jsonl") as resumed_file:
        assert resumed_file.read().startswith(file.read())  # the whole history, not a new one
    [night_eval] = set(after["resnet18_gem_night_eval"]) - set(before["resnet18_gem_night_eval"])
    with open(logs / "resnet18_gem_night_eval" / night_eval / "results.json") as file:
        assert json.load(file)["model"] == str(resumed / "best_model.pth")
    with open(logs / "report" / "results_table.md") as file:
        table = file.read()
    assert table in shown(notebook) and len([row for row in table.splitlines()[2:] if row.startswith("| ")]) == 2

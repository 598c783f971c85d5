"""notebooks/course.ipynb: stored without outputs, and executed end to end on the demo data (synthetic SF-XS and
Tokyo-XS, a few iterations at 64 px) with its parameters injected after the cell tagged 'parameters', as papermill
does: every step of the course runs, and the table it shows holds the recalls of the evaluations it ran."""

import json
import os
import time

import nbformat
from nbclient import NotebookClient

from conftest import REPO_ROOT

NOTEBOOK = os.path.join(REPO_ROOT, "notebooks", "course.ipynb")
COURSE_COLUMNS = ["SF-XS val", "SF-XS test", "Tokyo-XS", "Tokyo-night"]


def read_notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def test_the_notebook_is_stored_without_outputs():
    notebook = read_notebook()
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells and all(cell.outputs == [] and cell.execution_count is None for cell in code_cells)
    assert [cell for cell in code_cells if "parameters" in cell.metadata.get("tags", [])]


def test_the_notebook_runs_on_the_demo_data(tmp_path):
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
    logs = tmp_path / "logs" / "course_demo"
    with open(logs / "report" / "results_table.md") as file:
        table = file.read()
    shown = "".join(output.get("data", {}).get("text/markdown", "") for cell in notebook.cells
                    for output in cell.get("outputs", []))
    assert table in shown  # the notebook shows the table make_report wrote
    header, _, *rows = table.splitlines()
    assert header == "| Experiment | test size | " + " | ".join(f"{column} R@{n}" for column in COURSE_COLUMNS
                                                             for n in (1, 5)) + " |"
    for save_dir in ("resnet18_gem", "resnet18_gem_night"):
        [run] = os.listdir(logs / f"{save_dir}_eval")
        with open(logs / f"{save_dir}_eval" / run / "results.json") as file:
            results = json.load(file)
        assert sorted(results["labels"].values()) == ["sf_xs/test", "sf_xs/val", "tokyo_xs/test",
                                                      "tokyo_xs/test/night"]
        recalls = {label: results["test_sets"][key] for key, label in results["labels"].items()}
        [row] = [row for row in rows if row.startswith(f"| {save_dir} ")]  # '(best = step 0)' may follow the name
        cells = [cell.strip() for cell in row.strip("|").split("|")][2:]
        expected = [f"{recalls[label][f'R@{n}']:.1f}" for label in ("sf_xs/val", "sf_xs/test", "tokyo_xs/test",
                                                                     "tokyo_xs/test/night") for n in (1, 5)]
        assert cells[2:] == expected[2:]  # SF-XS val in the table is the training's own validation record
    assert os.path.getsize(logs / "report" / "training_curves.png") > 0

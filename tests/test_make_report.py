"""make_report.py on run folders written by hand in the formats of train.py and eval.py: the numbers of the tables
are those of the logs, one row per model and evaluation settings, and means +- std over seeds."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import make_report
from reporting.curves import curve
from reporting.runs import ReportError, load_run

SETTINGS = {"test_image_size": None, "test_resize": "shorter_side", "faiss_index": "exact", "faiss_options": {},
            "adabn_folder": None, "amp": "none"}
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_run(folder, args=None, metrics=None, test_results=None, results=None, info_log=None):
    os.makedirs(folder)
    for name, content in (("args.json", args), ("test_results.json", test_results), ("results.json", results)):
        if content is not None:
            with open(os.path.join(folder, name), "w") as file:
                json.dump(content, file)
    if metrics is not None:
        with open(os.path.join(folder, "metrics.jsonl"), "w") as file:
            file.writelines(json.dumps(record) + "\n" for record in metrics)
    if info_log is not None:
        with open(os.path.join(folder, "info.log"), "w") as file:
            file.write(info_log)
    return folder


def record(step, loss, recall1, recall5, **extra):
    """A metrics.jsonl record of train.py (250 iterations an epoch)."""
    return {"epoch": step // 250, "iteration": step % 250, "step": step, "images_seen": 32 * step, "group": 0,
            "loss": loss, "val_R@1": recall1, "val_R@5": recall5, "val_R@10": 99.0, "lr": 1e-5,
            "classifiers_lr": 0.01, "elapsed_s": step / 10, **extra}


def train_args(save_dir, seed=0, **flags):
    return {"save_dir": save_dir, "seed": seed, "val_set_folder": "/data/sf_xs/val", "lr": 1e-5,
            "backbone": "resnet18", "logs_root": "logs", "num_workers": 4, "device": "cuda",
            "git_commit": f"abc{seed}", "command": f"train.py --seed {seed}", **flags}


def training_test_results(recall1, recall5, settings=SETTINGS):
    return {"dataset": "/data/sf_xs/test", "model": "best_model.pth", "R@1": recall1, "R@5": recall5,
            "settings": settings}


def eval_results(model, test_sets, settings=SETTINGS):
    results = {"model": model, "model_sha256": None, "git_commit": "abc", "test_sets": test_sets}
    if settings is not None:
        results["settings"] = settings
    return results


def read_text(path):
    with open(path) as file:
        return file.read()


def read_csv(path):
    with open(path, newline="") as file:
        return {row["experiment"]: row for row in csv.DictReader(file)}


def report(tmp_path, *arguments):
    out = str(tmp_path / "report")
    make_report.main([str(tmp_path / "logs"), "--out", out, *arguments])
    return out, read_csv(os.path.join(out, "results_table.csv")), read_text(os.path.join(out, "results_table.md"))


def test_numbers_equal_the_logs(tmp_path):
    logs = tmp_path / "logs"
    hand = write_run(str(logs / "resnet18_gem" / "2024-01-01_00-00-00"), args=train_args("resnet18_gem"),
                     metrics=[record(0, None, 40.1, 55.2), record(250, 9.5, 52.123456789, 66.6),
                              record(500, 6.0, 51.0, 70.0)],
                     test_results=training_test_results(48.75, 61.0))
    # An eval.py run of that model with the same settings on Tokyo-XS fills the Tokyo-XS cells of its row
    write_run(str(logs / "eval_tokyo" / "2024-01-02_00-00-00"),
              results=eval_results(os.path.join(hand, "best_model.pth"),
                                   {"data/tokyo_xs/test": {"R@1": 33.3333, "R@5": 50.5}}))
    # A run killed during its first epoch (no recalls), and an old run that logs once an epoch (no "step")
    write_run(str(logs / "killed" / "2024-01-03_00-00-00"), args=train_args("killed"), metrics=[])
    write_run(str(logs / "old" / "2023-06-01_00-00-00"), args=train_args("old"),
              metrics=[{"epoch": 0, "loss": 9.0, "val_R@1": 30.0, "val_R@5": 40.0, "lr": 1e-5}])
    out, rows, markdown = report(tmp_path)
    for name in ("results_table.md", "results_table.tex", "results_table.csv", "training_curves.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    assert list(rows) == ["old", "resnet18_gem", "killed"]  # the chronological order of the run folders
    row = rows["resnet18_gem"]
    # The best record (highest val R@1) is that of step 250: its R@1 and R@5, exactly as logged
    assert float(row["SF-XS val R@1"]) == 52.123456789 and float(row["SF-XS val R@5"]) == 66.6
    assert float(row["SF-XS test R@1"]) == 48.75 and float(row["SF-XS test R@5"]) == 61.0
    assert float(row["Tokyo-XS R@1"]) == 33.3333 and float(row["Tokyo-XS R@5"]) == 50.5
    assert set(row["sources"].split()) == {os.path.relpath(os.path.join(hand, name)) for name in (
        "metrics.jsonl", "test_results.json")} | {os.path.relpath(logs / "eval_tokyo" / "2024-01-02_00-00-00" /
                                                                  "results.json")}
    assert all(rows["killed"][key] == "" for key in rows["killed"] if key.startswith(("SF-XS", "Tokyo")))
    assert "| resnet18_gem | native | 52.1 | 66.6 | 48.8 | 61.0 | 33.3 | 50.5 |" in markdown
    header = markdown.splitlines()[0]
    assert header.index("SF-XS val") < header.index("SF-XS test") < header.index("Tokyo-XS")
    latex = read_text(os.path.join(out, "results_table.tex"))
    assert r"resnet18\_gem & native & 52.1 & 66.6 & 48.8 & 61.0 & 33.3 & 50.5 \\" in latex


def test_other_settings_get_their_own_labelled_rows(tmp_path, capsys):
    logs = tmp_path / "logs"
    model_run = write_run(str(logs / "resnet18_sfxs" / "2024-01-01_00-00-00"), args=train_args("resnet18_sfxs"),
                          metrics=[record(250, 7.0, 50.0, 60.0)], test_results=training_test_results(48.75, 61.0))
    model = os.path.join(model_run, "best_model.pth")
    other_settings = [("ivfpq nlist=1024 nprobe=32", {"faiss_index": "ivfpq",
                                                      "faiss_options": {"nlist": 1024, "nprobe": 32}}),
                      ("test 64 px", {"test_image_size": 64}),
                      ("AdaBN val/queries", {"adabn_folder": "/data/night/val/queries"}),
                      ("AMP fp16", {"amp": "fp16"})]
    for index, (_, changes) in enumerate(other_settings):
        write_run(str(logs / "evals" / f"2024-01-02_00-00-0{index}"),
                  results=eval_results(model, {"/data/sf_xs/test": {"R@1": 40.0 + index, "R@5": 55.0}},
                                       {**SETTINGS, **changes}))
    # The same settings and another number for SF-XS test (a different test set, say): both stay, with a warning
    rerun = write_run(str(logs / "evals" / "2024-01-03_00-00-00"),
                      results=eval_results(model, {"/data/sf_xs/test": {"R@1": 47.0, "R@5": 61.0},
                                                   "/data/tokyo_xs/test": {"R@1": 20.0, "R@5": 30.0}}))
    # An old results.json without settings, and an eval of another checkpoint of the run
    write_run(str(logs / "evals" / "2024-01-04_00-00-00"),
              results=eval_results(model, {"/data/sf_xs/test": {"R@1": 48.75, "R@5": 61.0}}, settings=None))
    write_run(str(logs / "evals" / "2024-01-05_00-00-00"),
              results=eval_results(os.path.join(model_run, "last_checkpoint.pth"),
                                   {"/data/sf_xs/test": {"R@1": 45.5, "R@5": 58.0}}))
    _, rows, _ = report(tmp_path)
    warning = capsys.readouterr().err
    assert f"{os.path.join(rerun, 'results.json')} gives sf_xs/test R@1 = 47.0" in warning
    assert f"{os.path.join(model_run, 'test_results.json')} gives 48.75" in warning
    test_r1 = {name: float(row["SF-XS test R@1"]) for name, row in rows.items()}
    assert test_r1 == {"resnet18_sfxs": 48.75,
                       **{f"resnet18_sfxs [{label}]": 40.0 + index for index, (label, _) in enumerate(other_settings)},
                       "resnet18_sfxs [rerun evals/2024-01-03_00-00-00]": 47.0,
                       "resnet18_sfxs [settings unknown]": 48.75,
                       "resnet18_sfxs [last_checkpoint.pth]": 45.5}
    assert rows["resnet18_sfxs"]["Tokyo-XS R@1"] == ""  # the rerun's Tokyo-XS is in the rerun's row only
    assert float(rows["resnet18_sfxs [rerun evals/2024-01-03_00-00-00]"]["Tokyo-XS R@1"]) == 20.0
    assert rows["resnet18_sfxs [test 64 px]"]["sources"] == os.path.relpath(
        logs / "evals" / "2024-01-02_00-00-01" / "results.json")


def tokyo_results(model, day, night, settings=SETTINGS):
    """eval.py's results.json of a Tokyo-XS test folder with queries/ and night/: one entry per query folder."""
    results = eval_results(model, {"/data/tokyo_xs/test": {"R@1": day, "R@5": day + 10},
                                   "/data/tokyo_xs/test/night": {"R@1": night, "R@5": night + 10}}, settings)
    results["labels"] = {"/data/tokyo_xs/test": "tokyo_xs/test", "/data/tokyo_xs/test/night": "tokyo_xs/test/night"}
    return results


def test_the_course_table(tmp_path):
    """Columns SF-XS val, SF-XS test, Tokyo-XS, Tokyo-night (other test sets after them), the test size in every row,
    seeds aggregated, and the rows whose best_model.pth is the network as loaded flagged."""
    logs = tmp_path / "logs"
    at_224 = {**SETTINGS, "test_image_size": 224}
    # A short --recipe cosplace run from ImageNet weights: the validation before training (step 0) stays the best
    cosplace = write_run(str(logs / "cosplace" / "2024-01-01_00-00-00"),
                         args=train_args("cosplace", test_image_size=224),
                         metrics=[record(0, None, 70.0, 80.0), record(100, 8.0, 60.0, 75.0)],
                         test_results=training_test_results(50.0, 60.0, at_224))
    write_run(str(logs / "eval" / "2024-01-02_00-00-00"), results=tokyo_results(
        os.path.join(cosplace, "best_model.pth"), 40.0, 20.0, at_224))
    # Two seeds of --recipe finetune at the native size: the first one's best is step 0 too, the second's step 100
    for seed, (recall0, recall100) in enumerate([(70.0, 65.0), (70.0, 74.0)]):
        folder = write_run(str(logs / "finetune" / f"2024-01-03_00-0{seed}-00"),
                           args=train_args("finetune", seed, recipe="finetune"),
                           metrics=[record(0, None, recall0, 80.0), record(100, 7.0, recall100, 85.0)],
                           test_results=training_test_results(55.0 + seed, 65.0))
        write_run(str(logs / "eval" / f"2024-01-04_00-0{seed}-00"), results=tokyo_results(
            os.path.join(folder, "best_model.pth"), 44.0 + 2 * seed, 30.0 + 2 * seed))
    # Another test set keeps its column, after the course's
    write_run(str(logs / "eval" / "2024-01-05_00-00-00"),
              results=eval_results(os.path.join(cosplace, "best_model.pth"),
                                   {"/data/pitts30k/test": {"R@1": 33.0, "R@5": 44.0}}, at_224))
    out, rows, markdown = report(tmp_path, "--aggregate_seeds")
    lines = markdown.splitlines()
    assert lines[0] == ("| Experiment | test size | SF-XS val R@1 | SF-XS val R@5 | SF-XS test R@1 | "
                        "SF-XS test R@5 | Tokyo-XS R@1 | Tokyo-XS R@5 | Tokyo-night R@1 | Tokyo-night R@5 | "
                        "Pitts30k R@1 | Pitts30k R@5 |")
    assert lines[2:] == [
        "| cosplace (best = step 0) | 224 | 70.0 (n=1) | 80.0 (n=1) | 50.0 (n=1) | 60.0 (n=1) | 40.0 (n=1) | "
        "50.0 (n=1) | 20.0 (n=1) | 30.0 (n=1) | 33.0 (n=1) | 44.0 (n=1) |",
        "| finetune (best = step 0 in 1 of 2) | native | 72.0 +- 2.8 (n=2) | 82.5 +- 3.5 (n=2) | "
        "55.5 +- 0.7 (n=2) | 65.0 +- 0.0 (n=2) | 45.0 +- 1.4 (n=2) | 55.0 +- 1.4 (n=2) | 31.0 +- 1.4 (n=2) | "
        "41.0 +- 1.4 (n=2) | – | – |"]
    night = rows["finetune (best = step 0 in 1 of 2)"]
    assert float(night["Tokyo-night R@1 mean"]) == pytest.approx(np.mean([30.0, 32.0]))
    assert night["test size"] == "native" and rows["cosplace (best = step 0)"]["test size"] == "224"
    latex = read_text(os.path.join(out, "results_table.tex"))
    assert r"\multicolumn{2}{c}{Tokyo-XS} & \multicolumn{2}{c}{Tokyo-night}" in latex
    assert r"cosplace (best = step 0) & 224 & 70.0 (n=1) &" in latex


def seed_runs(logs, recalls, save_dir="resnet18", first_minute=10, **flags):
    """Training runs that differ only by seed and by the flags that do not change results."""
    folders = []
    for seed, recall1 in enumerate(recalls):
        folders.append(write_run(
            str(logs / save_dir / f"2024-01-01_00-{first_minute + seed:02d}-00"),
            args=train_args(save_dir, seed, num_workers=seed, **flags),
            metrics=[record(0, None, 10.0, 20.0), record(100, 8.0 - seed, recall1 - 5, 90.0),
                     record(200, 6.0 - seed, recall1 - 1, 91.0, ssl_loss=1.0 + seed)],
            test_results=training_test_results(recall1, 90.0 + seed)))
    return folders


def test_aggregate_seeds(tmp_path):
    logs = tmp_path / "logs"
    seed_runs(logs, [80.0, 82.0, 84.0])
    seed_runs(logs, [70.0], first_minute=20, lr=1e-4)  # another learning rate: another experiment
    # Evaluations of the untrained network, run last and without args.json (their flags come from info.log's
    # command line): the baseline rows still come first
    for seed, recall1 in enumerate([5.0, 7.0]):
        write_run(str(logs / "untrained" / f"2024-01-01_00-3{seed}-00"),
                  results=eval_results(None, {"/data/sf_xs/val": {"R@1": recall1, "R@5": 9.0}}),
                  info_log=f"2024-01-01 00:3{seed}:00   /x/eval.py --backbone resnet18 --seed {seed} --num_workers "
                           f"{seed} --save_dir untrained\n2024-01-01 00:00:01   Arguments: ...\n")
    _, rows, markdown = report(tmp_path)
    assert list(rows) == ["untrained (seed=0)", "untrained (seed=1)", "resnet18 (lr=1e-05, seed=0)",
                          "resnet18 (lr=1e-05, seed=1)", "resnet18 (lr=1e-05, seed=2)", "resnet18 (lr=0.0001, seed=0)"]
    assert [float(row["SF-XS test R@1"]) for name, row in rows.items() if "1e-05" in name] == [80.0, 82.0, 84.0]

    out, rows, markdown = report(tmp_path, "--aggregate_seeds")
    assert list(rows) == ["untrained", "resnet18 (lr=1e-05)", "resnet18 (lr=0.0001)"]
    assert "| resnet18 (lr=1e-05) | native | 81.0 +- 2.0 (n=3) | 91.0 +- 0.0 (n=3) | 82.0 +- 2.0 (n=3) | " \
           "91.0 +- 1.0 (n=3) |" in markdown
    assert "| resnet18 (lr=0.0001) | native | 69.0 (n=1) | 91.0 (n=1) | 70.0 (n=1) | 90.0 (n=1) |" in markdown
    assert "| untrained | native | 6.0 +- 1.4 (n=2) | 9.0 +- 0.0 (n=2) | – | – |" in markdown
    seeds = rows["resnet18 (lr=1e-05)"]
    assert float(seeds["SF-XS test R@1 mean"]) == pytest.approx(np.mean([80.0, 82.0, 84.0]))
    assert float(seeds["SF-XS test R@1 std"]) == pytest.approx(np.std([80.0, 82.0, 84.0], ddof=1))
    assert float(seeds["SF-XS test R@5 std"]) == pytest.approx(np.std([90.0, 91.0, 92.0], ddof=1))
    assert seeds["SF-XS test R@1 n"] == "3" and len(seeds["sources"].split()) == 6
    other = rows["resnet18 (lr=0.0001)"]
    assert (float(other["SF-XS test R@1 mean"]), other["SF-XS test R@1 std"], other["SF-XS test R@1 n"]) \
           == (70.0, "", "1")
    assert float(rows["untrained"]["SF-XS val R@1 std"]) == pytest.approx(np.std([5.0, 7.0], ddof=1))
    latex = read_text(os.path.join(out, "results_table.tex"))
    assert r"resnet18 (lr=1e-05) & native & 81.0 $\pm$ 2.0 (n=3) &" in latex
    # The curves as a table: val R@1 at each step (records 10, R@1 - 5, R@1 - 1 of seed_runs), the best steps
    curves = read_text(os.path.join(out, "curves_table.md")).splitlines()
    assert curves[0] == "| Experiment | n | 0 | 100 | 200 | best step |"
    assert curves[2:] == ["| resnet18 (lr=1e-05) | 3 | 10.0 +- 0.0 | 77.0 +- 2.0 | 81.0 +- 2.0 | 200, 200, 200 |",
                          "| resnet18 (lr=0.0001) | 1 | 10.0 | 65.0 | 69.0 | 200 |"]


def test_seeds_reached_by_other_paths_or_made_before_a_flag_existed(tmp_path, capsys):
    """A dataset and weights given by relative or absolute path are the same; a flag that an older run lacks keeps
    the runs apart, named by it, until --ignore_flags says that it cannot change them."""
    logs = tmp_path / "logs"
    seed_runs(logs, [80.0], dataset_folder="/home/me/data/sf_xs", pretrained="/home/me/weights/r18.pth")
    seed_runs(logs, [82.0], first_minute=21, dataset_folder="../data/sf_xs", pretrained="weights/r18.pth",
              groups_order="upstream", flags_from_checkpoint={})
    _, rows, _ = report(tmp_path, "--aggregate_seeds")
    assert list(rows) == ["resnet18 (groups_order=-)", "resnet18 (groups_order=upstream)"]
    _, rows, markdown = report(tmp_path, "--aggregate_seeds", "--ignore_flags", "groups_order", "grups_order")
    assert "| resnet18 | native | 80.0 +- 1.4 (n=2) | 91.0 +- 0.0 (n=2) | 81.0 +- 1.4 (n=2) | 90.0 +- 0.0 (n=2) |" \
           in markdown
    assert "--ignore_flags grups_order: no run has this flag" in capsys.readouterr().err
    # Other datasets or weights stay other experiments
    seed_runs(logs, [60.0], first_minute=40, dataset_folder="/home/me/data/tokyo_xs", pretrained="weights/r18.pth",
              groups_order="upstream")
    _, rows, _ = report(tmp_path, "--aggregate_seeds", "--ignore_flags", "groups_order")
    assert list(rows) == ["resnet18 (dataset_folder=data/sf_xs)", "resnet18 (dataset_folder=data/tokyo_xs)"]


def test_curves_average_the_seeds_at_each_step(tmp_path):
    folders = seed_runs(tmp_path / "logs", [80.0, 82.0, 84.0])
    metrics = [load_run(folder).metrics for folder in folders]
    metrics[2] = metrics[2][:2]  # a run still going: the last step has two seeds only
    losses = curve(metrics, "loss", "step")
    assert [x for x, _, _ in losses] == [100, 200]  # the record of step 0 has no loss yet
    assert losses[0][1:] == pytest.approx((np.mean([8.0, 7.0, 6.0]), np.std([8.0, 7.0, 6.0], ddof=1)))
    assert losses[1][1:] == pytest.approx((np.mean([6.0, 5.0]), np.std([6.0, 5.0], ddof=1)))
    assert curve(metrics[:1], "val_R@1", "step") == [(0, 10.0, None), (100, 75.0, None), (200, 79.0, None)]


def test_curves_for_a_paper_each_panel_alone_chosen_runs_and_names(tmp_path, monkeypatch):
    import matplotlib
    monkeypatch.setitem(matplotlib.rcParams, "svg.fonttype", "none")  # the legend as text, to be read back
    logs = tmp_path / "logs"
    folders = seed_runs(logs, [80.0, 82.0, 84.0])
    seed_runs(logs, [70.0], first_minute=20, lr=1e-4)
    # "loss" is the classification loss plus the weighted SSL term: the classification loss comes apart
    metrics = [load_run(folder).metrics for folder in folders]
    classification = curve(metrics, "classification_loss", "step")
    assert classification == [(200, pytest.approx(np.mean([6.0 - 1.0, 5.0 - 2.0, 4.0 - 3.0])),
                               pytest.approx(np.std([5.0, 3.0, 1.0], ddof=1)))]  # only step 200 has an SSL term
    out, _, _ = report(tmp_path, "--aggregate_seeds", "--panels", "val_R@1", "classification_loss", "--curves_of",
                       "resnet18 (lr=1e-05)", "--legend", "resnet18 (lr=1e-05)=CosPlace, 3 seeds")
    assert sorted(os.listdir(os.path.join(out, "curves"))) == [
        f"{key}.{extension}" for key in ("classification_loss", "val_R@1") for extension in ("pdf", "png", "svg")]
    svg = read_text(os.path.join(out, "curves", "val_R@1.svg"))
    assert "CosPlace, 3 seeds" in svg and "lr=0.0001" not in svg and "Validation R@1" in svg
    latex = read_text(os.path.join(out, "report.tex"))
    assert r"\input{results_table.tex}" in latex and latex.count(r"\includegraphics") == 2
    assert r"\includegraphics[width=0.7\linewidth]{curves/classification_loss.pdf}" in latex
    with pytest.raises(ReportError, match="--panels recall: no such curve; choose among loss, val_R@1"):
        report(tmp_path, "--panels", "recall")
    with pytest.raises(ReportError, match="--curves_of resnet: no such experiment"):
        report(tmp_path, "--curves_of", "resnet")


def write_top1(folder, top1):
    """predictions.csv of eval.py from {query: (top-1 database image, right)}, with a rank-2 row each (not a top-1)."""
    os.makedirs(folder)
    with open(os.path.join(folder, "predictions.csv"), "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["query_index", "query_path", "rank", "database_index", "database_path", "distance_m",
                         "correct"])
        for index, (query, (database, right)) in enumerate(top1.items()):
            writer.writerow([index, query, 1, 0, database, 5.0 if right else 300.0, int(right)])
            writer.writerow([index, query, 2, 1, "d9", 1.0, 1])


def test_recurring_mistakes_over_the_models_of_the_table(tmp_path):
    logs = tmp_path / "logs"
    top1s = {"a": {"q1": ("d1", False), "q2": ("d1", False), "q3": ("d2", True)},
             "b": {"q1": ("d1", False), "q2": ("d3", True), "q3": ("d2", False)}}
    for minute, (save_dir, top1) in enumerate(top1s.items()):
        run = write_run(str(logs / save_dir / f"2024-01-01_00-0{minute}-00"), results={
            **eval_results(None, {"/data/tokyo_xs/test/night": {"R@1": 0.0, "R@5": 0.0}}),
            "labels": {"/data/tokyo_xs/test/night": "tokyo_xs/test/night"}})
        write_top1(os.path.join(run, "tokyo_xs_test_night"), top1)
    out, _, _ = report(tmp_path)
    failures = read_text(os.path.join(out, "failures.md")).splitlines()
    assert "## Tokyo-night (tokyo_xs/test/night): 2 models, 3 queries in all of them" in failures
    table = failures.index("| database image | wrong top-1 of | models |")
    assert failures[table + 2:table + 4] == ["| d1 | 3 | 2 |", "| d2 | 1 | 1 |"]  # d3 is a right top-1
    assert "Queries that every model misses: 1 of 3" in failures and "- q1" in failures and "- q2" not in failures


def test_recurring_mistakes_are_pictured_with_night_images_brightened(tmp_path):
    from PIL import Image
    import visualizations
    images = {}
    for name, level in (("d1", 150), ("q1", 20)):  # q1: a night query, dark but with some contrast
        pixels = np.full((64, 64, 3), level, dtype=np.uint8)
        pixels[:, 32:] = level + 12
        images[name] = str(tmp_path / f"{name}.png")
        Image.fromarray(pixels).save(images[name])
    for minute, save_dir in enumerate(("a", "b")):
        run = write_run(str(tmp_path / "logs" / save_dir / f"2024-01-01_00-0{minute}-00"), results={
            **eval_results(None, {"/data/tokyo_xs/test/night": {"R@1": 0.0, "R@5": 0.0}}),
            "labels": {"/data/tokyo_xs/test/night": "tokyo_xs/test/night"}})
        write_top1(os.path.join(run, "tokyo_xs_test_night"), {images["q1"]: (images["d1"], False)})
    out, _, _ = report(tmp_path)
    assert "![recurring mistakes of Tokyo-night](failures/tokyo_xs_test_night.jpg)" in read_text(
        os.path.join(out, "failures.md"))
    gallery = Image.open(os.path.join(out, "failures", "tokyo_xs_test_night.jpg"))
    assert gallery.height > 2 * visualizations.SUMMARY_TILE_SIZE  # a row of wrong top-1s, a row of missed queries
    for path, expected in ((images["d1"], (150, 162)), (images["q1"], (100, 255))):  # only the dark one brightened
        shown = np.asarray(visualizations.tile(path, "", visualizations.BLUE, 160, brighten=True).convert("L"))
        assert expected[0] <= shown[40:120, 40:120].mean() <= expected[1]


def test_without_runs(tmp_path):
    with pytest.raises(ReportError, match="no such folder"):
        make_report.main([str(tmp_path / "missing"), "--out", str(tmp_path / "r")])
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ReportError, match="No run folder"):
        make_report.main([str(tmp_path / "empty"), "--out", str(tmp_path / "r")])
    # From the command line: one line, exit status 1, and no torch to load
    process = subprocess.run([sys.executable, "make_report.py", str(tmp_path / "missing"), "--out", "r"],
                             cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert process.returncode == 1 and process.stderr.count("\n") == 1 and "no such folder" in process.stderr
    process = subprocess.run([sys.executable, "-c", "import sys, make_report; print('torch' in sys.modules)"],
                             cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert process.stdout.strip() == "False"

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
    assert "| resnet18_gem | 52.1 | 66.6 | 48.8 | 61.0 | 33.3 | 50.5 |" in markdown
    header = markdown.splitlines()[0]
    assert header.index("SF-XS val") < header.index("SF-XS test") < header.index("Tokyo-XS")
    latex = read_text(os.path.join(out, "results_table.tex"))
    assert r"resnet18\_gem & 52.1 & 66.6 & 48.8 & 61.0 & 33.3 & 50.5 \\" in latex


def test_other_settings_get_their_own_labelled_rows(tmp_path, capsys):
    logs = tmp_path / "logs"
    model_run = write_run(str(logs / "resnet18_sfxs" / "2024-01-01_00-00-00"), args=train_args("resnet18_sfxs"),
                          metrics=[record(0, None, 50.0, 60.0)], test_results=training_test_results(48.75, 61.0))
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
    assert "| resnet18 (lr=1e-05) | 81.0 +- 2.0 (n=3) | 91.0 +- 0.0 (n=3) | 82.0 +- 2.0 (n=3) | 91.0 +- 1.0 (n=3) |" \
           in markdown
    assert "| resnet18 (lr=0.0001) | 69.0 (n=1) | 91.0 (n=1) | 70.0 (n=1) | 90.0 (n=1) |" in markdown
    assert "| untrained | 6.0 +- 1.4 (n=2) | 9.0 +- 0.0 (n=2) | – | – |" in markdown
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
    assert r"resnet18 (lr=1e-05) & 81.0 $\pm$ 2.0 (n=3) &" in latex
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
    assert "| resnet18 | 80.0 +- 1.4 (n=2) | 91.0 +- 0.0 (n=2) | 81.0 +- 1.4 (n=2) | 90.0 +- 0.0 (n=2) |" in markdown
    assert "--ignore_flags grups_order: no run has this flag" in capsys.readouterr().err
    # Other datasets or weights stay other experiments
    seed_runs(logs, [60.0], first_minute=40, dataset_folder="/home/me/data/tokyo_xs", pretrained="weights/r18.pth",
              groups_order="upstream")
    _, rows, _ = report(tmp_path, "--aggregate_seeds", "--ignore_flags", "groups_order")
    assert list(rows) == ["resnet18 (dataset_folder=data/sf_xs)", "resnet18 (dataset_folder=data/tokyo_xs)"]


def test_curves_average_the_seeds_at_each_step(tmp_path):
    folders = seed_runs(tmp_path / "logs", [80.0, 82.0, 84.0])
    metrics = [make_report.load_run(folder).metrics for folder in folders]
    metrics[2] = metrics[2][:2]  # a run still going: the last step has two seeds only
    losses = make_report.curve(metrics, "loss", "step")
    assert [x for x, _, _ in losses] == [100, 200]  # the record of step 0 has no loss yet
    assert losses[0][1:] == pytest.approx((np.mean([8.0, 7.0, 6.0]), np.std([8.0, 7.0, 6.0], ddof=1)))
    assert losses[1][1:] == pytest.approx((np.mean([6.0, 5.0]), np.std([6.0, 5.0], ddof=1)))
    assert make_report.curve(metrics[:1], "val_R@1", "step") == [(0, 10.0, None), (100, 75.0, None),
                                                                  (200, 79.0, None)]


def test_without_runs(tmp_path):
    with pytest.raises(make_report.ReportError, match="no such folder"):
        make_report.main([str(tmp_path / "missing"), "--out", str(tmp_path / "r")])
    os.makedirs(tmp_path / "empty")
    with pytest.raises(make_report.ReportError, match="No run folder"):
        make_report.main([str(tmp_path / "empty"), "--out", str(tmp_path / "r")])
    # From the command line: one line, exit status 1, and no torch to load
    process = subprocess.run([sys.executable, "make_report.py", str(tmp_path / "missing"), "--out", "r"],
                             cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert process.returncode == 1 and process.stderr.count("\n") == 1 and "no such folder" in process.stderr
    process = subprocess.run([sys.executable, "-c", "import sys, make_report; print('torch' in sys.modules)"],
                             cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert process.stdout.strip() == "False"

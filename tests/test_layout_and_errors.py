"""The house rules that keep the code base easy to change and its errors easy to read: a layered import graph with
no circle, each script with only its own flags and a fast --help, one error style (one line naming the flag or
file and the fix, exit status 1, the traceback only in debug.log), and files that survive full disks and kills."""

import ast
import errno
import os
import shutil
import signal
import subprocess
import sys

import pytest

import parser
from conftest import REPO_ROOT, run_folders, run_script, tiny_training_args
from core import errors, files

SCRIPTS = ["train.py", "eval.py", "geolocalize.py", "analyze_dataset.py", "preview_augmentations.py",
           "make_report.py", "make_dataset.py", "download_datasets.py", "publish_model.py"]


PACKAGES = ("core", "datasets", "model", "training", "evaluation", "retrieval", "reranking", "reporting")


def project_modules():
    """{module name: path} of the project's code (not tests, benchmarks, experiments)."""
    modules = {}
    for folder, subfolders, names in os.walk(REPO_ROOT):
        subfolders[:] = [s for s in subfolders if s in PACKAGES or folder != REPO_ROOT]
        for name in names:
            if name.endswith(".py") and name != "__init__.py":
                path = os.path.relpath(os.path.join(folder, name), REPO_ROOT)
                modules[path[:-3].replace(os.sep, ".")] = path
    return modules


def import_graph(registries=True):
    """{module: project modules it imports}, counting imports inside functions and, with registries, the modules
    that parser.py imports by name after parsing (REGISTRY_FLAGS, the settings' owners)."""
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        with open(os.path.join(REPO_ROOT, path)) as file:
            tree = ast.parse(file.read())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {m for m in imported if m in modules and m != name}
    if registries:
        graph["parser"] |= {module for module, _, _ in parser.REGISTRY_FLAGS.values()} | {"model.backbones",
                                                                                          "augmentations"}
    return graph


def layers(graph):
    """A module is one layer above the highest module it imports (a module importing none is layer 1); raises
    on a circle."""
    level = {}

    def level_of(module, path=()):
        assert module not in path, f"import circle: {' -> '.join(path + (module,))}"
        if module not in level:
            level[module] = 1 + max((level_of(m, path + (module,)) for m in graph[module]), default=0)
        return level[module]
    for module in graph:
        level_of(module)
    return level


def rooms_graph(graph):
    """The import graph between rooms: a package (core/, training/ ...) or a top-level module each; imports inside a
    package are its own business."""
    room = {module: module.split(".")[0] for module in graph}
    rooms = {}
    for module, imported in graph.items():
        rooms.setdefault(room[module], set()).update(room[m] for m in imported if room[m] != room[module])
    return rooms


def test_import_graph_has_no_circle_and_at_most_five_layers():
    """No circle between modules, the registries that parser.py imports by name included; at most 5 layers of rooms
    (the imports written as such), the scripts on top."""
    layers(import_graph())
    level = layers(rooms_graph(import_graph(registries=False)))
    assert max(level.values()) <= 5, sorted(level.items(), key=lambda item: item[1])
    assert all(level[script[:-3]] > level["parser"] for script in SCRIPTS)  # the scripts on top


def test_model_and_datasets_import_nothing_from_the_top_level_and_registries_do_not_import_the_parser():
    graph = import_graph()
    for module, imported in graph.items():
        if module.startswith(("model.", "datasets.", "core.")):
            assert all(m.startswith(("model.", "datasets.", "core.")) for m in imported), (module, imported)
    for module, _, _ in parser.REGISTRY_FLAGS.values():
        assert "parser" not in graph[module]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_needs_no_torch(script):
    """--help answers before torch, timm or faiss are imported (each takes seconds to import)."""
    code = (f"import sys, runpy; sys.argv = [{script!r}, '--help']\n"
            f"try:\n    runpy.run_path({script!r}, run_name='__main__')\nexcept SystemExit:\n    pass\n"
            f"print('HEAVY:', sorted(m for m in ('torch', 'timm', 'faiss', 'kornia') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert "usage:" in result.stdout and "HEAVY: []" in result.stdout, result.stdout[-500:] + result.stderr[-2000:]


@pytest.mark.parametrize("script, flags", [
    ("eval.py", ["--lr", "5"]), ("eval.py", ["--da_target_folder", "/nonexistent"]),
    ("geolocalize.py", ["--epochs_num", "3"]), ("analyze_dataset.py", ["--backbone", "resnet50"]),
])
def test_scripts_refuse_the_flags_of_others(script, flags):
    required = {"eval.py": ["--dataset_folder", "d"], "geolocalize.py": ["photo.jpg", "--database_folder", "d"],
                "analyze_dataset.py": ["--dataset_folder", "d", "--out", "o"]}[script]
    result = run_script(script, *required, *flags, check=False)
    [line] = result.stderr.splitlines()
    assert result.returncode == 2 and "error: unrecognized arguments:" in line and flags[0] in line


@pytest.mark.parametrize("flags, message", [
    (["--backbone", "resnet19"], "--backbone resnet19 is unknown: choose one of resnet18"),
    (["--augmentations", "nigth"], "--augmentations nigth: unknown augmentation nigth; choose among color_jitter"),
    (["--augmentations", "night:7"], "augmentation night:7.0: the strength must be in [0, 1]"),
    (["--optimizer", "adamm"], "--optimizer adamm is unknown: choose one of adam, adamw, sgd, asgd"),
    (["--trainable_stages", "9"], "--trainable_stages 9: this backbone has 5 stages"),
])
def test_user_mistakes_end_in_one_line_before_the_class_computation(flags, message, synthetic_dataset, tmp_path):
    result = run_script("train.py", *tiny_training_args(synthetic_dataset, tmp_path, *flags), check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output and message in output, output[-3000:]
    assert "Computing the classes" not in output
    error_lines = [line for line in output.splitlines() if "ERROR" in line]
    assert len(error_lines) == 1, output[-3000:]


@pytest.mark.parametrize("flags, message", [(["--lr", "-1"], "argument --lr: expected a number > 0, got -1"),
                                            (["--seed", "-2"], "argument --seed: expected a seed >= 0, or -1")])
def test_parser_refuses_impossible_numbers(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_arguments("train", ["--dataset_folder", "d", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_seed_minus_one_draws_a_seed_and_records_it():
    args = parser.parse_arguments("train", ["--dataset_folder", "d", "--seed", "-1"])
    assert args.seed >= 0 and args.seed_drawn


def test_recall_values_are_sorted():
    assert parser.parse_arguments("eval", ["--dataset_folder", "d", "--recall_values", "5", "1", "5"]
                                  ).recall_values == [1, 5]


def test_full_disk_names_the_file_and_the_last_good_one(tmp_path, monkeypatch):
    path = tmp_path / "last_checkpoint.pth"
    path.write_bytes(b"the previous checkpoint")

    def write_without_space(file):
        file.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(files.UnwritableError) as error:
        files.atomic_write(str(path), write_without_space)
    message = errors.user_error_message(error.value)
    assert message.startswith(f"the disk is full: could not write {path}")
    assert f"the last good file, {path}, is untouched" in message
    assert path.read_bytes() == b"the previous checkpoint" and os.listdir(tmp_path) == ["last_checkpoint.pth"]
    # torch.save hides the errno in a RuntimeError: the free space tells
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10 ** 9, 10 ** 9, 1000))
    with pytest.raises(files.UnwritableError, match="the disk is full"):
        files.atomic_write(str(path), lambda file: (_ for _ in ()).throw(RuntimeError(
            "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file write "
            "failed")))


def test_unwritable_logs_root_is_one_line(synthetic_dataset, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    args = tiny_training_args(synthetic_dataset, tmp_path)
    args[args.index("--logs_root") + 1] = str(blocker / "logs")
    result = run_script("train.py", *args, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output, output[-3000:]
    assert f"ERROR: could not write {blocker / 'logs' / 'default'}" in output


def test_temporary_files_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".last_checkpoint.pth.abc.{dead.pid}.tmp"
    live = tmp_path / f".last_checkpoint.pth.def.{os.getpid()}.tmp"
    stale.write_bytes(b"x")
    live.write_bytes(b"y")
    assert files.remove_stale_temporary_files(str(tmp_path)) == [str(stale)]
    assert not stale.exists() and live.exists()


def test_ctrl_c_names_the_last_good_checkpoint_and_the_resume_command(synthetic_dataset, tmp_path):
    args = tiny_training_args(synthetic_dataset, tmp_path, "--image_size", "32", "--epochs_num", "50",
                              "--iterations_per_epoch", "2")
    # A background job (pytest run with &) inherits SIGINT ignored, and Python then installs no Ctrl-C handler:
    # the child gets the disposition of a terminal's foreground process, whatever pytest was given
    process = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    output = []
    for line in process.stdout:
        output.append(line)
        if "Checkpoint saved: epoch 1" in line:
            process.send_signal(signal.SIGINT)
            break
    output += process.stdout.readlines()
    process.wait(timeout=120)
    text = "".join(output)
    checkpoint = os.path.join(run_folders(tmp_path)[-1], "last_checkpoint.pth")
    assert process.returncode != 0 and "Traceback" not in text, text[-3000:]
    assert f"INTERRUPTED: the last good checkpoint is {checkpoint}; continue with: python train.py" in text
    assert text.rstrip().endswith(f"--resume_train {checkpoint} (traceback in "
                                  f"{os.path.join(run_folders(tmp_path)[-1], 'debug.log')})")


def test_flags_without_effect_on_the_cpu_are_named_once(synthetic_dataset, tmp_path):
    result = run_script("train.py", *tiny_training_args(synthetic_dataset, tmp_path, "--image_size", "32", "--amp",
                                                        "fp16", "--decode_on_gpu"))
    assert result.stdout.count("--amp fp16, --decode_on_gpu: no effect on the CPU") == 1
    assert result.stdout.count("CPU: ") == 1  # whether it computes bfloat16 natively, once


def test_a_huge_query_gets_a_warning_that_suggests_a_test_size(tmp_path, caplog):
    from PIL import Image

    from datasets.image_loading import ImageListDataset, batches_by_size
    small, huge = str(tmp_path / "small.jpg"), str(tmp_path / "huge.jpg")
    Image.new("RGB", (640, 480)).save(small)
    Image.new("RGB", (4000, 3000)).save(huge)
    with caplog.at_level("WARNING"):
        batches_by_size(ImageListDataset([small]), [0], 8)
        assert not caplog.records
        batches_by_size(ImageListDataset([small, huge]), [0, 1], 8)
    [record] = caplog.records
    assert record.getMessage().startswith(f"{huge} is 4000x3000 px: its descriptor needs about 2.5 GB of memory")
    assert "--test_image_size 512" in record.getMessage()
    caplog.clear()
    batches_by_size(ImageListDataset([huge], image_size=512), [0], 8)  # resized: no warning
    assert not caplog.records


def test_truncated_caches_are_recomputed_with_a_warning(synthetic_dataset, tmp_path, caplog):
    import glob

    import numpy as np

    from datasets.listing_cache import load_groups
    from core.files import save_checksummed
    from evaluation.descriptors import read_cached_descriptors
    train = os.path.join(synthetic_dataset, "train")
    groups = load_groups(train, 10, 30, 5, 2, 10, str(tmp_path))
    [cache] = glob.glob(str(tmp_path / "groups_*.pt"))
    with open(cache, "r+b") as file:
        file.truncate(os.path.getsize(cache) // 2)
    with caplog.at_level("WARNING"):
        assert load_groups(train, 10, 30, 5, 2, 10, str(tmp_path)) == groups
    assert f"The class cache {cache} cannot be read" in caplog.text and "computing the classes again" in caplog.text
    descriptors = tmp_path / "descriptors.npz"
    save_checksummed(str(descriptors), np.ones((4, 8), dtype=np.float32))
    assert read_cached_descriptors(str(descriptors), (4, 8)).shape == (4, 8)
    with open(descriptors, "r+b") as file:
        file.truncate(100)
    assert read_cached_descriptors(str(descriptors), (4, 8)) is None
    assert f"The descriptors cache {descriptors} cannot be read" in caplog.text


def test_read_only_logs_root_is_named(tmp_path, monkeypatch):
    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", path)
    monkeypatch.setattr(os, "makedirs", read_only)
    with pytest.raises(files.UnwritableError) as error:
        files.make_output_folder("default", str(tmp_path / "logs"))
    assert errors.user_error_message(error.value) == (
        f"cannot write {tmp_path / 'logs' / 'default'}: {tmp_path} is read-only or not yours (Read-only file system);"
        f" choose another --logs_root / cache folder")

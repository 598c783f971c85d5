"""Re-ranking the top-K by local feature matching, measured on real images (issue 19), in one command.

    python experiments/rerank_study.py --dataset_folder ../shared/data/sf_xs_night_mini \
        --pretrained ../shared/weights/efficientnet_lite0_imagenet_timm.pth      # writes experiments/rerank_study/

1. train: the pretrained backbone fine-tuned with --recipe finetune for --iterations (skipped when a finished run is
   in --out, so the command can be stopped and started again);
2. features: the local features of every val and test image, computed once per matcher into --out/cache (the cache
   of eval.py --descriptors_cache) and timed: the cost per image of a database that has no cache yet;
3. eval: eval.py on val and test, for the untrained and the fine-tuned network, each matcher of --matchers and each
   K of --ks; every run reads the global descriptors and the local features from --out/cache, so its time per query
   is that of matching and verification;
4. prints the table (R@1 / R@5 of the retrieval order and after re-ranking, ms per query) and writes it to
   --out/table.md. A matcher that cannot run here (learned weights not downloadable offline) gets one line saying so.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_folder", required=True, help="SF-XS layout: train/, val/, test/")
    parser.add_argument("--pretrained", required=True, help="weights file of --backbone")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "experiments", "rerank_study"))
    parser.add_argument("--matchers", nargs="+", default=None,
                        help="default: every matcher of reranking/matchers.py's MATCHERS")
    parser.add_argument("--ks", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--iterations", type=int, default=200, help="fine-tuning iterations (batch 32)")
    parser.add_argument("--image_size", type=int, default=224, help="training and retrieval test size")
    parser.add_argument("--rerank_image_size", type=int, default=384)
    parser.add_argument("--rerank_keypoints", type=int, default=1024)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    return parser.parse_args(argv)


def finished_run(args, name, result_file):
    """The folder of the finished run called name (under --out/runs), or None."""
    found = sorted(glob.glob(os.path.join(args.out, "runs", name, "*", result_file)))
    return os.path.dirname(found[-1]) if found else None


def run(args, script, name, flags, result_file):
    """Runs script as run `name` unless it has already finished; returns (run folder or None, error line or None)."""
    if finished_run(args, name, result_file):
        return finished_run(args, name, result_file), None
    command = [sys.executable, os.path.join(REPO_ROOT, script), "--dataset_folder", args.dataset_folder,
               "--backbone", args.backbone, "--test_image_size", str(args.image_size), "--num_workers",
               str(args.num_workers), "--logs_root", os.path.join(args.out, "runs"), "--save_dir", name, *flags]
    print(f"[study] {name}: {' '.join(command)}", flush=True)
    if args.dry_run:
        return None, None
    start_time = time.time()
    result = subprocess.run(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode:
        errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
        if not errors:
            sys.exit(f"[study] {name} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
        return None, errors[-1].split("ERROR: ", 1)[-1]
    print(f"[study] {name}: finished in {time.time() - start_time:.0f} s", flush=True)
    return finished_run(args, name, result_file), None


def rerank_flags(args, matcher, k):
    return ["--rerank", matcher, "--rerank_k", str(k), "--rerank_image_size", str(args.rerank_image_size),
            "--rerank_keypoints", str(args.rerank_keypoints), "--descriptors_cache", os.path.join(args.out, "cache")]


def time_local_features(args, matcher_name, test_sets):
    """Computes (or reads) the local features of every image of test_sets into the cache eval.py reads; returns the
    seconds per image when they were computed (kept in --out/local_features_<matcher>.json for the next calls), or
    the one-line reason the matcher cannot run."""
    import parser
    from core.errors import UserError
    from datasets.test_dataset import query_sets
    from reranking import matchers
    from reranking.features import FeatureStore
    eval_args = parser.parse_arguments("eval", ["--test_set_folder", *test_sets, "--pretrained", "none",
                                                *rerank_flags(args, matcher_name, 1)])
    try:
        matcher = matchers.build_matcher(matcher_name, args.rerank_keypoints)
    except UserError as error:
        return str(error)
    seconds, computed = 0.0, 0
    for folder in test_sets:
        for dataset in query_sets(folder, **parser.test_dataset_options(eval_args)):
            store = FeatureStore(matcher, parser.rerank_settings(eval_args), dataset.images_paths,
                                 dataset.dataset_name, eval_args.descriptors_cache)
            start = time.perf_counter()
            store.get(range(len(dataset)))
            seconds += time.perf_counter() - start
            computed += store.computed
    timing_path = os.path.join(args.out, f"local_features_{matcher_name}.json")
    if computed:
        with open(timing_path, "w") as file:
            json.dump({"seconds_per_image": seconds / computed, "images": computed}, file)
    if not os.path.exists(timing_path):
        return None
    with open(timing_path) as file:
        return json.load(file)["seconds_per_image"]


def table(rows):
    header = ["model", "test set", "re-ranking", "retrieval R@1 / R@5", "re-ranked R@1 / R@5", "ms per query"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_arguments(argv)
    from reranking.matchers import MATCHERS
    matcher_names = args.matchers or list(MATCHERS)
    test_sets = [os.path.join(args.dataset_folder, split) for split in ("val", "test")]
    start_time = time.time()
    trained, error = run(args, "train.py", "finetune", [
        "--pretrained", args.pretrained, "--recipe", "finetune", "--groups_num", "1", "--image_size",
        str(args.image_size), "--epochs_num", "1", "--iterations_per_epoch", str(args.iterations), "--val_every", "100",
        "--seed", "0", "--cache_folder", os.path.join(args.out, "cache"), "--preresize_cache",
        os.path.join(args.out, "cache"), "--no-keep_last_checkpoint"], "test_results.json")
    if error:
        sys.exit(f"[study] the fine-tuning failed: {error}")
    models = {"untrained": ["--pretrained", args.pretrained],
              "finetune": ["--resume_model", os.path.join(trained or "<finetune run>", "best_model.pth")]}
    rows, notes = [], []
    for matcher in matcher_names:
        feature_seconds = None if args.dry_run else time_local_features(args, matcher, test_sets)
        if isinstance(feature_seconds, str):
            notes.append(f"{matcher}: not run here: {feature_seconds}")
            continue
        if feature_seconds is not None:
            notes.append(f"{matcher}: local features {1000 * feature_seconds:.0f} ms per image "
                         f"({args.rerank_image_size} px, at most {args.rerank_keypoints} keypoints)")
        for model, model_flags in models.items():
            for k in args.ks:
                folder, error = run(args, "eval.py", f"{model}_{matcher}_k{k}",
                                    ["--test_set_folder", *test_sets, *model_flags, *rerank_flags(args, matcher, k)],
                                    "results.json")
                if error:
                    notes.append(f"{matcher}: {error}")
                    break
                if folder is None:  # --dry_run
                    continue
                with open(os.path.join(folder, "results.json")) as file:
                    results = json.load(file)
                for key, recalls in results["test_sets"].items():
                    rows.append([model, results["labels"][key], f"{matcher}@{k}",
                                 f"{recalls['retrieval_R@1']:.1f} / {recalls['retrieval_R@5']:.1f}",
                                 f"{recalls['R@1']:.1f} / {recalls['R@5']:.1f}",
                                 f"{results['rerank_ms_per_query'][key]:.0f}"])
    text = "\n".join([table(rows), "", *notes])
    print(text)
    print(f"[study] done in {time.time() - start_time:.0f} s", flush=True)
    if not args.dry_run:
        with open(os.path.join(args.out, "table.md"), "w") as file:
            file.write(text + "\n")


if __name__ == "__main__":
    main()

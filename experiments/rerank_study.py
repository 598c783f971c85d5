"""Re-ranking the top-K by local feature matching, measured on real images (issues 19 and 24), in one command.

    python experiments/rerank_study.py --dataset_folder ../shared/data/sf_xs_night_mini \
        --pretrained ../shared/weights/efficientnet_lite0_imagenet_timm.pth      # writes experiments/rerank_study/

1. train: the pretrained backbone fine-tuned with --recipe finetune for --iterations (skipped when a finished run is
   in --out, or given with --finetuned, so the command can be stopped and started again);
2. retrieval: eval.py --save_descriptors on val and test for the untrained and the fine-tuned network: the recalls
   of the retrieval order and each query's top max(--ks) predictions;
3. features: the local features of every val and test image, computed once per matcher into --out/cache (the cache
   of eval.py --descriptors_cache) and timed: the cost per image of a database that has no cache yet;
4. matching: every (query, database image) pair in some top max(--ks) of either network is verified once, and
   timed; the inlier count of a pair does not depend on K or on the network (each pair is verified on its own
   seeded random stream), so each network's re-ranked order at each K comes from the same counts, and its time
   per query is the sum of the times of its first K pairs (matching and verification: what eval.py --rerank spends
   per query once the local features are cached). One eval.py --rerank run per matcher (--check_k, the fine-tuned
   network) checks that eval.py gives the same recalls;
5. prints the table (R@1 / R@5 of the retrieval order and after re-ranking, ms per query) and writes it to
   --out/table.md. A matcher that cannot run here (learned weights neither in the torch hub cache nor downloadable)
   gets one line saying so.
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
    parser.add_argument("--check_k", type=int, default=10, help="K of the eval.py --rerank run of each matcher")
    parser.add_argument("--finetuned", default=None, help="a finished train.py run of the same recipe to use instead "
                                                          "of training one")
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


def retrieval(args, model, model_flags, test_sets):
    """{test set label: (dataset, predictions [Q, max(--ks)], retrieval recalls)} of eval.py --save_descriptors."""
    import numpy as np
    from core import files
    from datasets.test_dataset import TestDataset
    folder, error = run(args, "eval.py", f"{model}_retrieval", ["--test_set_folder", *test_sets, *model_flags,
                                                                 "--recall_values", "1", "5", str(max(args.ks)),
                                                                 "--save_descriptors", "--descriptors_cache",
                                                                 os.path.join(args.out, "cache")], "results.json")
    if error:
        sys.exit(f"[study] {model}: eval.py failed: {error}")
    with open(os.path.join(folder, "results.json")) as file:
        results = json.load(file)
    sets = {}
    for key, label in results["labels"].items():
        with np.load(os.path.join(folder, files.label_folder(label), "descriptors.npz")) as saved:
            predictions = saved["predictions"]
        sets[label] = (TestDataset(key), predictions,
                       [results["test_sets"][key][f"R@{n}"] for n in (1, 5)])
    return sets


def score_pairs(args, matcher_name, sets_by_model):
    """{label: {(query, database image): (inlier count, seconds)}} of every pair in some network's top max(--ks),
    verified once each (local features read from --out/cache)."""
    import parser
    from reranking import matchers
    from reranking.features import FeatureStore
    matcher = matchers.build_matcher(matcher_name, args.rerank_keypoints)
    eval_args = parser.parse_arguments("eval", ["--test_set_folder", "-", *rerank_flags(args, matcher_name, 1)])
    scores = {}
    for label, (dataset, _, _) in next(iter(sets_by_model.values())).items():
        store = FeatureStore(matcher, parser.rerank_settings(eval_args), dataset.images_paths, dataset.dataset_name,
                             eval_args.descriptors_cache)
        pairs = sorted({(query, int(candidate)) for sets in sets_by_model.values()
                        for query, row in enumerate(sets[label][1]) for candidate in row[:max(args.ks)]
                        if candidate >= 0})
        scores[label] = {}
        for query, candidate in pairs:
            query_features, candidate_features = store.get([dataset.database_num + query, candidate])
            start = time.perf_counter()
            [(inliers, _, _)] = matcher.verify(query_features, [candidate_features])
            scores[label][(query, candidate)] = (inliers, time.perf_counter() - start)
        print(f"[study] {matcher_name}: {len(pairs)} pairs of {label} verified", flush=True)
    return scores


def reranked_rows(args, matcher_name, sets_by_model, scores):
    """Table rows and {(model, label, k): re-ranked recalls} from the pair scores."""
    import numpy as np
    from reranking.matchers import reranked_order
    from retrieval.recalls import compute_recalls
    rows, recalls_by_run = [], {}
    for model, sets in sets_by_model.items():
        for k in args.ks:
            for label, (dataset, predictions, retrieval_recalls) in sets.items():
                inliers = np.array([[scores[label][(q, int(c))][0] if c >= 0 else 0 for c in row[:k]]
                                    for q, row in enumerate(predictions)], dtype=float)
                seconds = [sum(scores[label][(q, int(c))][1] for c in row[:k] if c >= 0)
                           for q, row in enumerate(predictions)]
                recalls = compute_recalls(reranked_order(predictions, inliers, k), dataset.get_positives(), [1, 5])
                recalls_by_run[model, label, k] = [float(r) for r in recalls]
                rows.append([model, label, f"{matcher_name}@{k}",
                             f"{retrieval_recalls[0]:.1f} / {retrieval_recalls[1]:.1f}",
                             f"{recalls[0]:.1f} / {recalls[1]:.1f}", f"{1000 * np.mean(seconds):.0f}"])
    return rows, recalls_by_run


def check_with_eval(args, matcher_name, model_flags, test_sets, recalls_by_run):
    """eval.py --rerank MATCHER --rerank_k --check_k on the fine-tuned network; a line saying whether its recalls are
    those of the pair scores."""
    folder, error = run(args, "eval.py", f"finetune_{matcher_name}_k{args.check_k}",
                        ["--test_set_folder", *test_sets, *model_flags, *rerank_flags(args, matcher_name, args.check_k)],
                        "results.json")
    if error:
        return f"{matcher_name}: eval.py --rerank failed: {error}"
    with open(os.path.join(folder, "results.json")) as file:
        results = json.load(file)
    mismatches, details = [], []
    for key, label in results["labels"].items():
        by_eval = [round(results["test_sets"][key][f"R@{n}"], 3) for n in (1, 5)]
        by_pairs = [round(r, 3) for r in recalls_by_run["finetune", label, args.check_k]]
        if by_eval != by_pairs:
            mismatches.append(f"{label}: eval.py {by_eval}, pair scores {by_pairs}")
        details.append(f"{label}: eval.py {results['rerank_ms_per_query'][key]:.0f} ms per query (features read "
                       f"from the cache)")
    return (f"{matcher_name}@{args.check_k}, fine-tuned: eval.py --rerank gives {'OTHER' if mismatches else 'the same'} "
            f"recalls as the pair scores ({'; '.join(mismatches + details)})")


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
    trained, error = args.finetuned, None
    if trained is None:
        trained, error = run(args, "train.py", "finetune", [
            "--pretrained", args.pretrained, "--recipe", "finetune", "--groups_num", "1", "--image_size",
            str(args.image_size), "--epochs_num", "1", "--iterations_per_epoch", str(args.iterations),
            "--val_every", "100", "--seed", "0", "--cache_folder", os.path.join(args.out, "cache"),
            "--preresize_cache", os.path.join(args.out, "cache"), "--no-keep_last_checkpoint"], "test_results.json")
    if error:
        sys.exit(f"[study] the fine-tuning failed: {error}")
    models = {"untrained": ["--pretrained", args.pretrained],
              "finetune": ["--resume_model", os.path.join(trained or "<finetune run>", "best_model.pth")]}
    if args.dry_run:
        for model, model_flags in models.items():
            run(args, "eval.py", f"{model}_retrieval", ["--test_set_folder", *test_sets, *model_flags], "results.json")
        return
    sets_by_model = {model: retrieval(args, model, flags, test_sets) for model, flags in models.items()}
    rows, notes = [], []
    for matcher in matcher_names:
        feature_seconds = time_local_features(args, matcher, test_sets)
        if isinstance(feature_seconds, str):
            notes.append(f"{matcher}: not run here: {feature_seconds}")
            continue
        if feature_seconds is not None:
            notes.append(f"{matcher}: local features {1000 * feature_seconds:.0f} ms per image "
                         f"({args.rerank_image_size} px, at most {args.rerank_keypoints} keypoints)")
        matcher_start = time.time()
        scores = score_pairs(args, matcher, sets_by_model)
        matcher_rows, recalls_by_run = reranked_rows(args, matcher, sets_by_model, scores)
        rows += matcher_rows
        notes.append(check_with_eval(args, matcher, models["finetune"], test_sets, recalls_by_run))
        print(f"[study] {matcher}: done in {time.time() - matcher_start:.0f} s", flush=True)
    text = "\n".join([table(sorted(rows, key=lambda row: (row[0] != "untrained", row[2].split("@")[0],
                                                           int(row[2].split("@")[1]), row[1]))), "", *notes])
    print(text)
    print(f"[study] done in {time.time() - start_time:.0f} s", flush=True)
    with open(os.path.join(args.out, "table.md"), "w") as file:
        file.write(text + "\n")


if __name__ == "__main__":
    main()

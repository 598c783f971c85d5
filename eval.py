"""Evaluates a trained model on one or more test sets and prints recall@N.

    python eval.py --resume_model logs/default/<run>/best_model.pth --test_set_folder sf_xs/val sf_xs/test tokyo_xs/test

The architecture flags (--backbone, --aggregator and its options, --fc_output_dim) are read from the args.json
beside the checkpoint; no pretrained weights are fetched. Writes, in logs/<save_dir>/<timestamp>/: args.json,
results.json (every recall with the model's path and hash and every setting that changes a recall) and, per test
set, predictions.csv (and pictures with --num_preds_to_save N).
"""

import os
import sys

import parser
from core import files
from core.errors import exit_on_user_error


def results_table(rows, recall_values):
    """A plain-text table: one row per test set, one column per recall@N."""
    header = f"{'test set':<30}" + "".join(f"{'R@' + str(n):>8}" for n in recall_values)
    lines = [header, "-" * len(header)]
    for name, recalls in rows:
        lines.append(f"{name:<30}" + "".join(f"{r:>8.1f}" for r in recalls))
    return "\n".join(lines)


def save_descriptors(dataset, descriptors, predictions, folder):
    """descriptors.npz: database/queries descriptors, their paths and UTMs, and the kNN predictions, so
    results can be re-checked or re-ranked without the model."""
    import numpy as np
    files.atomic_write(os.path.join(folder, "descriptors.npz"), lambda file: np.savez(
        file, database_descriptors=descriptors[:dataset.database_num],
        queries_descriptors=descriptors[dataset.database_num:], database_paths=np.array(dataset.database_paths),
        queries_paths=np.array(dataset.queries_paths), database_utms=dataset.database_utms,
        queries_utms=dataset.queries_utms, predictions=predictions))


def evaluate(args):
    """Evaluates the model of args on every --test_set_folder; returns the content of results.json."""
    import logging  # the heavy imports come after parsing, so that --help and flag mistakes answer at once

    import commons
    import test
    import visualizations
    from core import devices
    from datasets.image_check import make_image_check
    from datasets.test_dataset import query_sets
    from datasets.unlabeled_dataset import UnlabeledDataset
    from evaluation import results as records
    from model import network
    from reranking import matchers
    from reranking.stage import rerank_test
    from training import checkpoints, domain_adaptation

    args.device = devices.resolve_device(args.device)
    output_folder = files.make_output_folder(args.save_dir, args.logs_root)
    commons.setup_logging(output_folder, console="info")
    files.atomic_json_dump({**vars(args), "git_commit": files.git_commit(), "command": " ".join(sys.argv)},
                           os.path.join(output_folder, "args.json"))
    commons.log_arguments(args, output_folder)
    commons.make_deterministic(args.seed)  # without --resume_model, the same initialisation as train.py's
    commons.reuse_freed_memory()
    inference, index, rerank = parser.inference_settings(args), parser.index_settings(args), parser.rerank_settings(args)
    if rerank:  # a matcher without its weights fails now, not after the descriptors
        matchers.build_matcher(rerank.name, rerank.keypoints)
    model = network.GeoLocalizationNet(**parser.model_options(args))
    if args.resume_model is not None:
        logging.info(f"Loading model from {args.resume_model}")
        checkpoints.load_model_weights(model, args.resume_model)
    else:
        logging.warning("No --resume_model given: evaluating the model at its initialisation")
    model = model.to(args.device)
    if args.adabn_folder:
        domain_adaptation.adapt_batchnorm(model, UnlabeledDataset(args.adabn_folder, args.test_image_size,
                                                                  args.test_resize),
                                          args.device, args.infer_batch_size, args.num_workers)
    settings = records.evaluation_settings(index, args.eval_amp, args.test_image_size, args.test_resize,
                                           args.positive_dist_threshold, args.adabn_folder, rerank)
    results = {"model": args.resume_model and os.path.abspath(args.resume_model),
               "model_sha256": args.resume_model and files.sha256_of(args.resume_model),
               "git_commit": files.git_commit(), "settings": settings, "test_sets": {}, "labels": {}}
    image_check = make_image_check(args.check_images, args.on_bad_image, args.num_workers, test_set=True)
    rows = []
    for folder in args.test_set_folder:
        test_sets = query_sets(folder, args.query_folders, image_check, **parser.test_dataset_options(args))
        for test_ds, tested in test.test_query_sets(test_sets, model, inference, index, args.recall_values):
            test_set_output_folder = os.path.join(output_folder, files.label_folder(test_ds.label))
            if args.save_descriptors:
                save_descriptors(test_ds, tested.descriptors, tested.predictions, test_set_output_folder)
            recalls, predictions, reranked = rerank_test(rerank, test_ds, tested.predictions, tested.recalls,
                                                         args.recall_values, args.descriptors_cache)
            rows.append((test_ds.label, recalls))
            # keyed by the query folder's path, but for the usual one (queries/): the test folder, as before
            key = folder if test_ds.label == files.test_set_label(folder) else test_ds.queries_folder
            results["test_sets"][key] = records.recalls_record(recalls, args.recall_values, reranked)
            if reranked is not None:  # apart from the recalls: a rerun takes another time, not another result
                results.setdefault("rerank_ms_per_query", {})[key] = reranked.ms_per_query
            results["labels"][key] = test_ds.label
            visualizations.save_predictions_report(
                predictions, test_ds, test_set_output_folder, args.num_preds_to_save, args.save_only_wrong_preds,
                title=records.results_title(test_ds, args.resume_model, recalls, args.recall_values),
                matches=reranked and reranked.top1_matches)
    logging.info("\n" + results_table(rows, args.recall_values))
    files.atomic_json_dump(results, os.path.join(output_folder, "results.json"))
    return results


def main(argv=None):
    args = parser.parse_arguments("eval", argv, parser.build_parser("eval", __doc__))
    return evaluate(args)


if __name__ == "__main__":
    exit_on_user_error(main)

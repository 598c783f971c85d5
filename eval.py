"""Evaluates a trained model on one or more test sets and prints recall@N.

    python eval.py --resume_model logs/default/<run>/best_model.pth --test_set_folder sf_xs/val sf_xs/test tokyo_xs/test
"""

import logging
import os
import sys

import numpy as np

import commons
import domain_adaptation
import parser
import test
import visualizations
from datasets.image_check import make_image_check
from datasets.test_dataset import TestDataset
from model import network


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
    commons.atomic_write(os.path.join(folder, "descriptors.npz"), lambda file: np.savez(
        file, database_descriptors=descriptors[:dataset.database_num],
        queries_descriptors=descriptors[dataset.database_num:], database_paths=np.array(dataset.database_paths),
        queries_paths=np.array(dataset.queries_paths), database_utms=dataset.database_utms,
        queries_utms=dataset.queries_utms, predictions=predictions))


def main(argv=None):
    args = parser.parse_arguments(is_training=False, argv=argv)
    args.device = commons.resolve_device(args.device)
    output_folder = commons.make_output_folder(args.save_dir, args.logs_root)
    commons.setup_logging(output_folder, console="info")
    logging.info(" ".join(sys.argv))
    logging.info(f"Arguments: {args}")
    logging.info(f"The outputs are being saved in {output_folder}")

    commons.make_deterministic(args.seed)  # without --resume_model, the same initialisation as train.py's
    commons.reuse_freed_memory()
    model = network.build_model(args)
    if args.resume_model is not None:
        logging.info(f"Loading model from {args.resume_model}")
        network.load_model_weights(model, args.resume_model)
    else:
        logging.info("WARNING: no --resume_model given, evaluating the model at its initialisation")
    model = model.to(args.device)
    if args.adabn_folder:
        domain_adaptation.adapt_batchnorm(model, args.adabn_folder, args)

    rows, results = [], {"model": args.resume_model, "git_commit": commons.git_commit(), "test_sets": {}}
    for folder in args.test_set_folder:
        test_ds = TestDataset(folder, args.positive_dist_threshold, args.test_image_size, args.on_bad_name,
                              make_image_check(args, test_set=True), args.decode_on_gpu)
        logging.info(f"Testing on {test_ds}")
        recalls, predictions, descriptors = test.test(args, test_ds, model, return_details=True)
        logging.info(f"{test_ds}: {test.recalls_to_str(recalls, args.recall_values)}")
        name = commons.test_set_label(folder)
        test_set_output_folder = os.path.join(output_folder, name.replace("/", "_"))
        if args.save_descriptors:
            save_descriptors(test_ds, descriptors, predictions, test_set_output_folder)
        rows.append((name, recalls))
        results["test_sets"][folder] = {f"R@{n}": float(r) for n, r in zip(args.recall_values, recalls)}
        visualizations.save_predictions_report(predictions, test_ds, test_set_output_folder, args.num_preds_to_save,
                                               args.save_only_wrong_preds)
    table = results_table(rows, args.recall_values)
    logging.info("\n" + table)
    commons.atomic_json_dump(results, os.path.join(output_folder, "results.json"))
    return results


if __name__ == "__main__":
    main()

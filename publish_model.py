"""Publishes a trained run as a folder that anyone can load, and optionally uploads it to the Hugging Face Hub.

    python publish_model.py logs/default/<run> --out published/resnet18_gem_512
    python publish_model.py logs/default/<run> --out published/resnet18_gem_512 --repo_id <user>/cosplace-resnet18
    python publish_model.py logs/default/<run> --out published/last --checkpoint last

Writes in --out (a new or empty folder: nothing is ever overwritten): model.safetensors (the model's weights, tensors
only: loading them runs no code), args.json (the run's flags: the architecture), the run's result files
(test_results.json, results.json, metrics.jsonl, those it has) and README.md, a model card: architecture, training
data and flags, recalls, how to load it, citation. Then anyone loads it with

    model = torch.hub.load(REPO_DIR, "get_trained_model", source="local", checkpoint="published/resnet18_gem_512")
    model = torch.hub.load(REPO_DIR, "get_trained_model", source="local", repo_id="<user>/cosplace-resnet18")

and eval.py / geolocalize.py take --resume_model published/resnet18_gem_512/model.safetensors. --repo_id uploads
the folder (once logged in: `hf auth login`, or HF_TOKEN); see docs/publishing.md.
"""

import argparse
import os

from core.errors import UserError, exit_on_user_error

# The weights file of a run that --checkpoint names
CHECKPOINT_FILES = {"best": "best_model.pth", "last": "last_checkpoint.pth"}
# The flags of a run that the model card lists under its training (all of them are in args.json)
CARD_FLAGS = ("recipe", "pretrained", "groups_num", "M", "alpha", "N", "L", "min_images_per_class", "epochs_num",
              "iterations_per_epoch", "batch_size", "image_size", "lr", "classifiers_lr", "optimizer", "scheduler",
              "loss", "augmentations", "freeze_bn_stats", "ssl_loss", "da_target_folder", "amp", "seed")
CITATION = """@inproceedings{Berton_CVPR_2022_CosPlace,
    author    = {Berton, Gabriele and Masone, Carlo and Caputo, Barbara},
    title     = {Rethinking Visual Geo-localization for Large-Scale Applications},
    booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
    month     = {June},
    year      = {2022},
    pages     = {4878-4888}
}"""


class PublishError(UserError, ValueError):
    """A run folder that cannot be published (no args.json, no weights), an --out that holds files, a failed upload."""


def repo_id_type(value):
    """An argparse type: a Hub repository 'user/name'."""
    owner, _, name = value.partition("/")
    if not owner or not name or "/" in name:
        raise argparse.ArgumentTypeError(f"expected USER/NAME (a Hugging Face Hub repository), got {value}")
    return value


def build_parser():
    arguments = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arguments.add_argument("run", help="the run folder of train.py (logs/<save_dir>/<timestamp>)")
    arguments.add_argument("--out", required=True, help="the folder to write (new, or empty)")
    arguments.add_argument("--repo_id", type=repo_id_type, default=None, metavar="USER/NAME",
                           help="also upload the folder to this Hugging Face Hub repository (created if needed)")
    arguments.add_argument("--checkpoint", choices=list(CHECKPOINT_FILES), default="best",
                           help="the weights to publish: best_model.pth (the best validation, the weights tested), "
                                "or the model of last_checkpoint.pth (default: best)")
    return arguments


if __name__ == "__main__":  # --help and flag mistakes are answered here, before the heavy imports below
    ARGS = exit_on_user_error(build_parser().parse_args)

import parser  # noqa: E402
from core import files  # noqa: E402
from reporting import runs  # noqa: E402
from training import checkpoints  # noqa: E402


def publish(run_folder, out_folder, checkpoint="best", repo_id=None):
    """Writes the published folder of run_folder in out_folder (checkpoint: 'best' or 'last'); with repo_id, uploads
    it there. Returns out_folder."""
    weights_path = checked_weights_path(run_folder, checkpoint)
    check_empty_folder(out_folder)
    run = runs.load_run(os.path.abspath(run_folder))
    architecture = parser.parse_arguments("geolocalize", ["--resume_model", weights_path])  # as hubconf.py reads it
    checkpoints.save_safetensors(checkpoints.read_model_weights(weights_path),
                                 os.path.join(out_folder, "model.safetensors"))
    copied = [name for name in ("args.json", *runs.RUN_FILES) if os.path.isfile(os.path.join(run_folder, name))]
    for name in copied:
        files.atomic_copy(os.path.join(run_folder, name), os.path.join(out_folder, name))
    card = model_card(run, parser.model_options(architecture), os.path.basename(weights_path), repo_id)
    files.atomic_write(os.path.join(out_folder, "README.md"), lambda file: file.write(card), mode="w")
    print(f"Wrote {out_folder}: model.safetensors, {', '.join(copied)}, README.md (the model card)")
    if repo_id:
        print(f"Uploaded to {upload(out_folder, repo_id)}")
    return out_folder


def checked_weights_path(run_folder, checkpoint):
    """The weights file of run_folder that checkpoint names, once the run's args.json (the architecture) is there."""
    if not os.path.isdir(run_folder):
        raise PublishError(f"{run_folder}: no such run folder; give a run folder of train.py (logs/<save_dir>/<run>)")
    if not os.path.isfile(os.path.join(run_folder, "args.json")):
        raise PublishError(f"{run_folder} has no args.json, which gives the architecture: give a run folder of "
                           f"train.py (logs/<save_dir>/<run>)")
    path = os.path.join(run_folder, CHECKPOINT_FILES[checkpoint])
    if not os.path.isfile(path):
        other = next(name for name in CHECKPOINT_FILES if name != checkpoint)
        raise PublishError(f"{path}: no such file (--checkpoint {checkpoint}); the run was cut short, or "
                           f"{'no validation beat 0 R@1' if checkpoint == 'best' else 'it kept no last checkpoint'}: "
                           f"train again, or publish --checkpoint {other}")
    return path


def check_empty_folder(folder):
    """Refuses an --out that holds anything: a published folder is never mixed with other files, nor overwrites
    them."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise PublishError(f"--out {folder} is a file: give a new folder (or an empty one)")
    if os.path.isdir(folder) and os.listdir(folder):
        raise PublishError(f"--out {folder} is not empty: give a new folder (or an empty one); nothing is overwritten")


def model_card(run, options, weights_name, repo_id=None):
    """README.md of the published folder, in the Hugging Face model-card format (a YAML header, then Markdown);
    options: the model's (parser.model_options)."""
    flags = run.args
    aggregator_options = ", ".join(f"{key} {value}" for key, value in options["aggregator_options"].items())
    training_sets = {split: runs.comparable_path(flags[f"{split}_set_folder"]) for split in ("train", "val")
                     if flags.get(f"{split}_set_folder")}
    main_flags = " ".join(f"--{flag} {' '.join(map(str, value)) if isinstance(value, list) else value}"
                          for flag, value in flags.items() if flag in CARD_FLAGS and value is not None)
    repository = repo_id or "<user>/<name>"
    return "\n".join([
        "---", "library_name: pytorch", "license: mit", "pipeline_tag: image-feature-extraction", "tags:",
        "- visual-place-recognition", "- visual-geo-localization", "- image-retrieval", "- cosplace", "---", "",
        f"# CosPlace: {options['backbone']} + {options['aggregator']}, {options['fc_output_dim']}-D descriptors", "",
        "A visual place recognition model trained as CosPlace trains (a classification of geographic places): it "
        "maps a photo to a global descriptor; the geo-tagged database images nearest to it by descriptor are the "
        "likely places of the photo.", "",
        "## Architecture", "",
        f"- Backbone: {options['backbone']}",
        f"- Aggregation: {options['aggregator']}" + (f" ({aggregator_options})" if aggregator_options else ""),
        f"- Descriptor: {options['fc_output_dim']} dimensions, L2-normalised",
        f"- Training images: {flags.get('image_size')}x{flags.get('image_size')} px; tested at "
        f"{flags.get('test_image_size') or 'their own size'} (resize: {flags.get('test_resize')})",
        "- Input: RGB images as float tensors [B, 3, H, W] normalised with ImageNet's mean and standard deviation",
        f"- Weights: {weights_name} of the run, as model.safetensors", "",
        "## Training", "",
        "Data: " + (", ".join(f"{split} {folder}" for split, folder in training_sets.items()) or "unknown") + ".", "",
        f"Main flags: `{main_flags}`. Every flag, the code's git commit and the command are in args.json.", "",
        "## Results", "",
        *results_markdown(run, weights_name),
        "## How to load it", "",
        "With the code it was trained with (its git commit is in args.json; the entry point is `hubconf.py`), from "
        "the Hub or from a local copy of this folder:", "",
        "```python",
        "import torch",
        f'model = torch.hub.load("path/to/the/repository", "get_trained_model", source="local", '
        f'repo_id="{repository}")',
        'model = torch.hub.load("path/to/the/repository", "get_trained_model", source="local", '
        'checkpoint="path/to/this/folder")',
        "descriptors = model(images)  # eval mode; [B, 3, H, W] ImageNet-normalised -> [B, D], L2-normalised",
        "```", "",
        "or evaluate it with `python eval.py --resume_model path/to/this/folder/model.safetensors --test_set_folder "
        "...` (the architecture is read from args.json).", "",
        "## Citation", "",
        "```bibtex", CITATION, "```", "",
    ])


def results_markdown(run, weights_name):
    """The recalls of each test set in the run's result files, as Markdown lines, saying which weights they measured."""
    lines = []
    for results, file_name in ((run.test_results, "test_results.json"), (run.results, "results.json")):
        if not results:
            continue
        cells = runs.results_cells(results, file_name)
        recall_names = list(dict.fromkeys(name for recalls, _ in cells.values() for name in recalls))
        tested = os.path.basename(results.get("model") or "the untrained network")
        note = "" if tested == weights_name else f": these weights, {weights_name}, were not tested"
        lines += [f"Recalls (%) of {tested}, from {file_name}{note}:", "",
                  "| Test set | " + " | ".join(recall_names) + " |", "|---" * (len(recall_names) + 1) + "|",
                  *(f"| {label} | " + " | ".join(f"{recalls[name]:.1f}" if name in recalls else "-"
                                                for name in recall_names) + " |"
                    for label, (recalls, _) in cells.items()),
                  "", "Evaluation settings: " + ", ".join(f"{key} {value}" for key, value in
                                                         (results.get("settings") or {}).items()
                                                         if value not in (None, {})) + ".", ""]
    return lines or ["The run holds no test results (test_results.json, results.json).", ""]


def upload(folder, repo_id):
    """Uploads folder to the Hub repository repo_id (created if needed); returns its address. A missing token, an
    unreachable Hub or a refusal is one PublishError line saying what to do, the folder being written already."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError
    retry = f"then run `hf upload {repo_id} {folder}` (the folder is written)"
    if get_token() is None:
        raise PublishError(f"cannot upload to {repo_id}: no Hugging Face token; log in with `hf auth login` "
                           f"(`huggingface-cli login` before huggingface_hub 1.0) or set HF_TOKEN, {retry}")
    api = HfApi()
    try:
        url = api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload a model of publish_model.py")
    except (OSError, ValueError, *HfHubHTTPError.__bases__) as error:  # the HTTP library's errors: no OSError in httpx
        reason = " ".join(str(error).split())[:300]
        raise PublishError(f"cannot upload {folder} to {repo_id} on the Hugging Face Hub ({type(error).__name__}: "
                           f"{reason}): connect this machine to the internet and check the token (`hf auth login`, "
                           f"or HF_TOKEN) and that {repo_id} is yours, {retry}") from None
    return str(url)


if __name__ == "__main__":
    exit_on_user_error(publish, ARGS.run, ARGS.out, ARGS.checkpoint, ARGS.repo_id)

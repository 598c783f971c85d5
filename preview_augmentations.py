"""Preview of the training augmentations: one labelled row per augmentation of the list, each alone on the same
training images, then a row with the whole chain as training applies it.

    python preview_augmentations.py --dataset_folder data/sf_xs --out preview --augmentations color_jitter night:0.5

Writes OUT/augmentations.png. The augmentation flags are train.py's (--brightness, --hue, ...), so a training's
flags show what its batches look like.
"""

import os

import parser
from core.errors import exit_on_user_error


def build_parser():
    arguments = parser.build_parser("preview_augmentations", __doc__)
    group = arguments.add_argument_group("Preview")
    group.add_argument("--out", type=str, required=True, help="folder where augmentations.png is written")
    group.add_argument("--num_images", type=parser.positive_int, default=6, help="training images shown")
    group.add_argument("--image_size", type=parser.positive_int, default=512,
                       help="images are resized to SxS before the augmentations, as train.py's --image_size")
    return arguments


if __name__ == "__main__":  # --help and flag mistakes are answered here, before the heavy imports below
    ARGS = exit_on_user_error(parser.parse_arguments, "preview_augmentations", None, build_parser())

import commons  # noqa: E402
import visualizations  # noqa: E402
from augmentations import TrainAugmentation  # noqa: E402
from core import devices  # noqa: E402


def preview(args):
    """Writes OUT/augmentations.png; returns its path."""
    commons.make_deterministic(args.seed)
    device = devices.resolve_device(args.device)
    images = visualizations.preview_images(args.train_set_folder, args.num_images, args.image_size).to(device)
    defaults = parser.augmentation_defaults(args)
    path = visualizations.save_augmentations_preview(images, args.augmentations,
                                                     lambda specs: TrainAugmentation(specs, defaults),
                                                     os.path.join(args.out, "augmentations.png"))
    print(f"Saved {path}: the {len(images)} images of {args.train_set_folder} with each of "
          f"{' '.join(args.augmentations)}, then all of them in order")
    return path


def main(argv=None):
    return preview(parser.parse_arguments("preview_augmentations", argv, build_parser()))


if __name__ == "__main__":
    exit_on_user_error(preview, ARGS)

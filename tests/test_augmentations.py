"""Training augmentations: shapes and ranges, per-image random parameters, seeds, the night simulation and
the preview CLI. All in-process on tiny CPU batches."""

import pytest
import torch

import augmentations
import parser

BATCH_SIZE, SIZE = 16, 64


@pytest.fixture(scope="module")
def args():
    return parser.augmentation_defaults(parser.parse_arguments("train", argv=["--dataset_folder", "unused",
                                                                              "--image_size", str(SIZE)]))


def identical_images(dtype=torch.float32):
    """A batch of copies of one random colour image: any difference between outputs comes from per-image
    random parameters."""
    image = torch.randint(0, 256, (1, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    images = image.repeat(BATCH_SIZE, 1, 1, 1)
    return images if dtype == torch.uint8 else images.float() / 255


@pytest.mark.parametrize("name", sorted(augmentations.AUGMENTATIONS))
def test_augmentation_keeps_shape_dtype_and_range(args, name):
    """Up to float rounding: a blur's normalised kernel can give 1 + 1e-7, and TrainAugmentation clamps the
    composition to [0, 1] exactly."""
    torch.manual_seed(0)
    images = identical_images()
    augmented = augmentations.AUGMENTATIONS[name](None, args)(images)
    assert augmented.shape == images.shape and augmented.dtype == torch.float32
    assert augmented.min() >= -1e-6 and augmented.max() <= 1 + 1e-6
    composed = augmentations.TrainAugmentation([name], args).augment_chunk(images)
    assert composed.min() >= 0 and composed.max() <= 1


@pytest.mark.parametrize("name", sorted(augmentations.AUGMENTATIONS))
def test_each_image_of_a_batch_gets_its_own_parameters(args, name):
    torch.manual_seed(0)
    augmented = augmentations.AUGMENTATIONS[name](None, args)(identical_images())
    distinct = torch.unique(augmented.flatten(1), dim=0)
    # horizontal_flip and grayscale have only 2 outcomes per image, the others a continuum
    assert len(distinct) >= (2 if name in ("horizontal_flip", "grayscale") else BATCH_SIZE // 3)


@pytest.mark.parametrize("name", ["color_jitter", "night"])
def test_brightness_changes_differ_between_images(args, name):
    images = identical_images()
    torch.manual_seed(0)
    augmented = augmentations.AUGMENTATIONS[name](None, args)(images)
    brightness_changes = (augmented.mean(dim=(1, 2, 3)) - images.mean(dim=(1, 2, 3))).round(decimals=5)
    assert len(torch.unique(brightness_changes)) == BATCH_SIZE


def test_fixed_seed_reproduces_the_augmentations(args):
    pipeline = augmentations.TrainAugmentation(sorted(augmentations.AUGMENTATIONS), args)
    images = identical_images(torch.uint8)
    torch.manual_seed(3)
    first = pipeline(images)
    torch.manual_seed(3)
    second = pipeline(images)
    torch.manual_seed(4)
    third = pipeline(images)
    assert torch.equal(first, second)
    assert not torch.equal(first, third)


def test_train_augmentation_normalises_a_uint8_batch(args):
    images = identical_images(torch.uint8)
    output = augmentations.TrainAugmentation(["night", "random_resized_crop"], args)(images)
    assert output.shape == (BATCH_SIZE, 3, SIZE, SIZE) and output.dtype == torch.float32
    assert output.min() < 0  # ImageNet normalisation moves black below 0


def test_defaults_are_upstream_cosplace(args):
    default = augmentations.TrainAugmentation(parser.parse_arguments("train", ["--dataset_folder", "x"]).augmentations,
                                              args)
    expected = [augmentations.ColorJitter(0.7, 0.7, 0.7, 0.5), augmentations.RandomResizedCrop(SIZE, scale=(0.5, 1.0))]
    assert [repr(m) for m in default.augmentations] == [repr(m) for m in expected]


def test_night_darkens_and_strength_zero_is_identity(args):
    images = identical_images()
    torch.manual_seed(0)
    night = augmentations.AUGMENTATIONS["night"](None, args)(images)
    assert night.mean() < images.mean() - 0.05
    assert torch.allclose(augmentations.AUGMENTATIONS["night"](0.0, args)(images), images)


def test_strengths_and_names_are_checked(args):
    with pytest.raises(ValueError, match=r"night:2.0.*\[0, 1\]"):
        augmentations.TrainAugmentation(["night:2"], args)
    with pytest.raises(ValueError, match="unknown augmentation sepia"):
        augmentations.TrainAugmentation(["sepia"], args)
    with pytest.raises(ValueError, match="must be a number"):
        augmentations.TrainAugmentation(["grayscale:often"], args)

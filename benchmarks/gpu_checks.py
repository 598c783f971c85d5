"""The GPU code paths checked against their CPU/fp32 references on a real device (run by gpu_check.sh):
AMP training steps (fp16 with its GradScaler, bf16), the batched augmentation (the same images on the
GPU as on the CPU for the same seed), JPEG decoding with nvJPEG (the same images as Pillow's) and
channels_last (the same descriptors). Prints one row per check; with --device cpu the CUDA-only ones are
reported as skipped, which makes a dry run of this script on a machine without GPU.

    python benchmarks/gpu_checks.py --device cuda --out checks.json
"""

import argparse
import os
import sys
import tempfile
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import augmentations  # noqa: E402
from core import devices  # noqa: E402
import cosface_loss  # noqa: E402
import parser  # noqa: E402
from benchmarks.timing import synchronize  # noqa: E402
from core import files  # noqa: E402
from datasets.dataset_utils import find_images  # noqa: E402
from datasets.image_loading import collate_images, images_to_device, load_encoded_image, load_image_tensor  # noqa: E402
from datasets.synthetic import generate_dataset  # noqa: E402
from model import network  # noqa: E402


class Skipped(Exception):
    """A check that does not apply to this device."""


def project_args(device, image_size=128):
    args = parser.parse_arguments("train", argv=["--dataset_folder", "-", "--pretrained", "none",
                                                          "--image_size", str(image_size), "--device", device])
    return args


def check_amp_step(device, amp):
    """Three training steps under autocast (fp16 through a GradScaler; bf16 on CUDA or the CPU): the network computes
    in that precision, the losses are finite, the weights of the backbone and the head are updated."""
    if not device.startswith("cuda") and amp != "bf16":
        raise Skipped("fp16 autocast is for CUDA")
    args = project_args(device)
    torch.manual_seed(0)
    model = network.GeoLocalizationNet(**parser.model_options(args)).to(device)
    model = model.to(memory_format=torch.channels_last).train()
    head = cosface_loss.get_margin_head("cosface", args.fc_output_dim, 10).to(device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad] + list(head.parameters()), 1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    images = torch.rand(16, 3, 128, 128, device=device).contiguous(memory_format=torch.channels_last)
    targets = torch.arange(16, device=device) % 10
    first_layer = next(p for p in model.parameters() if p.requires_grad)
    before = [head.weight.detach().clone(), first_layer.detach().clone()]
    losses = []
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        with devices.autocast_context(device, amp):
            descriptors = model(images)
            loss = torch.nn.functional.cross_entropy(head(descriptors, targets).float(), targets)
        expected = torch.float16 if amp == "fp16" else torch.bfloat16
        assert descriptors.dtype == expected, f"the network computed in {descriptors.dtype}, not {expected}"
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    assert all(map(torch.isfinite, map(torch.tensor, losses))), f"losses {losses}"
    assert not any(map(torch.equal, before, [head.weight.detach(), first_layer.detach()])), "weights did not change"
    return f"losses {losses[0]:.3f} -> {losses[-1]:.3f}"


def check_augmentation(device, paths):
    """The default augmentation on the device gives the CPU's images for the same seed (random parameters
    are drawn on the CPU; 16 images at 128 px are one CPU chunk, so both draw them alike) but for the crops'
    outermost ring (RandomResizedCrop.crop_all on the device), and its speed on a batch of 32 at 512 px."""
    images = torch.stack([load_image_tensor(path, 128) for path in paths[:16]])
    pipeline = augmentations.TrainAugmentation(project_args(device).augmentations,
                                               parser.augmentation_defaults(project_args(device)))
    torch.manual_seed(0)
    reference = pipeline.to("cpu")(images)
    torch.manual_seed(0)
    on_device = pipeline.to(device)(images.to(device)).cpu()
    error = (on_device - reference)[..., 1:-1, 1:-1].abs().max().item()  # the crops' outer ring differs by design
    assert error < 1e-3, f"max difference {error}"
    args = project_args(device, image_size=512)
    pipeline = augmentations.TrainAugmentation(args.augmentations, parser.augmentation_defaults(args)).to(device)
    batch = torch.stack([load_image_tensor(path, 512) for path in paths]).to(device)
    pipeline(batch)
    synchronize(device)
    start_time = time.perf_counter()
    for _ in range(5):
        pipeline(batch)
    synchronize(device)
    return f"max |GPU - CPU| {error:.1e}; {5 * len(batch) / (time.perf_counter() - start_time):.0f} images/s"


def check_jpeg_decoding(device, paths):
    """--decode_on_gpu's batched nvJPEG decoding (at 512 px and resized to 128 px) against Pillow's path."""
    results = []
    for size in (512, 128):
        reference = torch.stack([load_image_tensor(path, size) for path in paths]).float()
        encoded, _ = collate_images([(load_encoded_image(path, size), 0) for path in paths])
        decoded = images_to_device(encoded, size, device)
        difference = (decoded.cpu().float() - reference).abs().mean().item()
        assert decoded.device.type == torch.device(device).type and difference < 3, f"mean difference {difference}"
        results.append(f"{size} px: mean |diff| {difference:.2f}/255")
    encoded, _ = collate_images([(load_encoded_image(path, 512), 0) for path in paths])
    images_to_device(encoded, 512, device)
    synchronize(device)
    start_time = time.perf_counter()
    for _ in range(3):
        images_to_device(encoded, 512, device)
    synchronize(device)
    results.append(f"{3 * len(paths) / (time.perf_counter() - start_time):.0f} images/s")
    return "; ".join(results)


def check_channels_last(device):
    """The same descriptors with channels_last inputs and weights as with contiguous ones."""
    args = project_args(device)
    torch.manual_seed(0)
    model = network.GeoLocalizationNet(**parser.model_options(args)).to(device).eval()
    images = torch.rand(8, 3, 128, 128, device=device)
    with torch.inference_mode():
        contiguous = model(images)
        model = model.to(memory_format=torch.channels_last)
        channels_last = model(images.contiguous(memory_format=torch.channels_last))
    similarity = torch.nn.functional.cosine_similarity(contiguous, channels_last).min().item()
    assert similarity > 0.999, f"cosine similarity {similarity}"
    return f"min cosine similarity {similarity:.6f}"


def main():
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--device", default="cuda")
    cli.add_argument("--out", default=None, help="results as JSON")
    config = cli.parse_args()
    device = devices.resolve_device(config.device)
    with tempfile.TemporaryDirectory(prefix="gpu_checks_") as folder:
        generate_dataset(folder, train_places=32, val_places=1, test_places=1, images_per_train_place=1,
                         view_size=512, seed=0)
        paths = find_images(os.path.join(folder, "train"))
        checks = [("AMP fp16 training step", lambda: check_amp_step(device, "fp16")),
                  ("AMP bf16 training step", lambda: check_amp_step(device, "bf16")),
                  ("augmentation on the device", lambda: check_augmentation(device, paths)),
                  ("JPEG decoding on the device", lambda: check_jpeg_decoding(device, paths)),
                  ("channels_last", lambda: check_channels_last(device))]
        rows = []
        for name, check in checks:
            try:
                rows.append({"check": name, "status": "ok", "detail": check()})
            except Skipped as e:
                rows.append({"check": name, "status": "skipped", "detail": str(e)})
            except Exception as e:  # noqa: BLE001 -- every failure is reported, the other checks still run
                rows.append({"check": name, "status": "FAIL", "detail": f"{type(e).__name__}: {e}"})
    for row in rows:
        print(f"{row['check']:<32} {row['status']:<8} {row['detail']}")
    if config.out:
        files.atomic_json_dump({"device": device, "checks": rows}, config.out)
    return 1 if any(row["status"] == "FAIL" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

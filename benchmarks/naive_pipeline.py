"""The naive pipeline of upstream CosPlace, for comparison only (benchmarks/bench.py, tests/test_speed.py): Pillow
decodes the full image and torchvision transforms it per image in the Dataset, the augmentation loops over the
images of a batch, queries are evaluated one at a time, kNN with a plain exact faiss index."""

import faiss
import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

from datasets.normalization import IMAGENET_MEAN, IMAGENET_STD
from retrieval.recalls import compute_recalls


class NaiveTrainDataset(torch.utils.data.Dataset):
    """Upstream's training items: Pillow full decode, ToTensor (float), at the files' 512 px (upstream
    asserts that size; its crop brings the images to the training size)."""

    def __init__(self, classes):
        super().__init__()
        self.classes = classes

    def __len__(self):
        return len(self.classes)

    def __getitem__(self, index):
        class_index, image_index = index
        image = Image.open(self.classes[class_index][image_index]).convert("RGB")
        return T.functional.to_tensor(image), class_index


class NaiveTestDataset(torch.utils.data.Dataset):
    """Upstream's test items: Pillow full decode, ToTensor and Normalize per image."""

    def __init__(self, test_dataset):
        super().__init__()
        self.images_paths = test_dataset.images_paths
        self.transform = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self):
        return len(self.images_paths)

    def __getitem__(self, index):
        return self.transform(Image.open(self.images_paths[index]).convert("RGB")), index


class NaiveAugmentation(torch.nn.Module):
    """Upstream's device augmentation: ColorJitter then RandomResizedCrop, each in a loop over the images."""

    def __init__(self, args):
        super().__init__()
        self.color_jitter = T.ColorJitter(args.brightness, args.contrast, args.saturation, args.hue)
        self.crop = T.RandomResizedCrop([args.image_size, args.image_size], scale=[1 - args.random_resized_crop, 1],
                                        antialias=True)
        self.normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def forward(self, images):
        images = torch.cat([self.color_jitter(image).unsqueeze(0) for image in images])
        images = torch.cat([self.crop(image).unsqueeze(0) for image in images])
        return self.normalize(images)


@torch.no_grad()
def naive_descriptors(model, dataset, device, batch_size, num_workers, database=None, queries=None):
    """Upstream's extraction: database images in batches, queries one at a time (all, or those indices)."""
    model = model.eval()
    descriptors = np.empty((len(dataset), model.fc_output_dim), dtype=np.float32)
    database = range(dataset.database_num) if database is None else database
    queries = range(dataset.database_num, len(dataset)) if queries is None else queries
    parts = [(database, batch_size), (queries, 1)]
    for indices, part_batch_size in parts:
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(NaiveTestDataset(dataset), indices),
                                             batch_size=part_batch_size, num_workers=num_workers,
                                             pin_memory=device.startswith("cuda"))
        for images, batch_indices in loader:
            descriptors[batch_indices.numpy()] = model(images.to(device)).cpu().numpy()
    return descriptors


def naive_retrieval(database_descriptors, queries_descriptors, positives_per_query, recall_values):
    """Upstream's kNN: an exact faiss index (its recall loop is retrieval/recalls.compute_recalls' own)."""
    index = faiss.IndexFlatL2(database_descriptors.shape[1])
    index.add(database_descriptors)
    _, predictions = index.search(queries_descriptors, max(recall_values))
    return compute_recalls(predictions, positives_per_query, recall_values)

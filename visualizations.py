"""Pictures of the predictions: each query next to its top-N predictions, framed green when a prediction is
within the positive distance and red otherwise, with its distance in metres. Pillow only."""

import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from datasets.image_loading import load_pil_image

TILE_SIZE = 256
FRAME = 8
TEXT_HEIGHT = 28
GREEN, RED, GREY = (0, 180, 0), (220, 0, 0), (90, 90, 90)


def font(size=18):
    """Pillow's bundled scalable font (no system font path needed)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        return ImageFont.load_default()


def tile(path, caption, color):
    """A framed, captioned thumbnail of one image."""
    image = load_pil_image(path)
    image.thumbnail((TILE_SIZE - 2 * FRAME, TILE_SIZE - 2 * FRAME))
    canvas = Image.new("RGB", (TILE_SIZE, TILE_SIZE + TEXT_HEIGHT), "white")
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([0, 0, TILE_SIZE - 1, TILE_SIZE - 1], fill=color)
    canvas.paste(image, ((TILE_SIZE - image.width) // 2, (TILE_SIZE - image.height) // 2))
    draw.text((FRAME, TILE_SIZE + 4), caption, fill=color, font=font())
    return canvas


def prediction_distances(predictions, dataset):
    """Distance in metres between each query and each of its predictions [queries, N]."""
    query_utms = dataset.queries_utms[:, None, :]
    return np.linalg.norm(dataset.database_utms[predictions] - query_utms, axis=2)


def make_prediction_image(query_index, query_predictions, distances, dataset):
    tiles = [tile(dataset.queries_paths[query_index], "query", GREY)]
    for rank, (prediction, distance) in enumerate(zip(query_predictions, distances), start=1):
        correct = distance <= dataset.positive_dist_threshold
        tiles.append(tile(dataset.database_paths[prediction], f"#{rank}  {distance:.0f} m", GREEN if correct else RED))
    row = Image.new("RGB", (TILE_SIZE * len(tiles) + FRAME * (len(tiles) - 1), TILE_SIZE + TEXT_HEIGHT), "white")
    for i, image in enumerate(tiles):
        row.paste(image, (i * (TILE_SIZE + FRAME), 0))
    return row


def save_preds(predictions, dataset, output_folder, num_preds_to_save, save_only_wrong_preds=False):
    """Writes output_folder/preds/<query>.jpg for every query (or only those whose top-1 is wrong)."""
    predictions = np.asarray(predictions)[:, :num_preds_to_save]
    distances = prediction_distances(predictions, dataset)
    folder = os.path.join(output_folder, "preds")
    os.makedirs(folder, exist_ok=True)
    for query_index in tqdm(range(dataset.queries_num), ncols=100, desc="saving predictions", leave=False):
        top1_correct = distances[query_index, 0] <= dataset.positive_dist_threshold
        if save_only_wrong_preds and top1_correct:
            continue
        image = make_prediction_image(query_index, predictions[query_index], distances[query_index], dataset)
        name = f"{query_index:05d}_{'correct' if top1_correct else 'wrong'}.jpg"
        image.save(os.path.join(folder, name), quality=90)
    return folder

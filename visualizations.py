"""Pictures and tables of the predictions: each query next to its top-N predictions, framed green when a prediction is
within the positive distance and red otherwise, with its distance in metres; a CSV of every query's predictions;
one summary page (PNG and HTML) of the worst failures and of some successes; a preview of the training
augmentations:
    python visualizations.py --dataset_folder D --out DIR --augmentations color_jitter night:0.5 [--num_images 6]
"""

import csv
import html
import logging
import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps
from tqdm import tqdm

from datasets.dataset_utils import find_images
from datasets.image_loading import load_image_tensor, load_pil_image

TILE_SIZE = 256
SUMMARY_TILE_SIZE = 160
FRAME = 8
TEXT_HEIGHT = 28
GREEN, RED, GREY, BLUE = (0, 180, 0), (220, 0, 0), (90, 90, 90), (0, 90, 230)
NO_POSITIVE = "no positive in the database"
THUMBNAILS_FOLDER = "summary_files"  # beside summary.html: the page and its images move together
THUMBNAIL_SIZE = 256
DARK_MEAN = 70  # mean 8-bit luminance below which brighten=True shows an image auto-contrasted (night photos)
CSV_FIELDS = ("query_index", "query_path", "rank", "database_index", "database_path", "distance_m", "correct")


def font(size=18):
    """Pillow's bundled scalable font (no system font path needed)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        return ImageFont.load_default()


def tile(path, caption, color, size=TILE_SIZE, brighten=False):
    """A framed, captioned thumbnail of one image; with path None, an empty one saying there is no positive. With
    brighten, a dark image (a night photo) is shown auto-contrasted, its caption marked with '*'."""
    text_font = font(18 if size >= 200 else 14)
    canvas = Image.new("RGB", (size, size + TEXT_HEIGHT), "white")
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([0, 0, size - 1, size - 1], fill=color)
    if path is None:
        draw.rectangle([FRAME, FRAME, size - 1 - FRAME, size - 1 - FRAME], fill="white")
        draw.multiline_text((size // 2, size // 2), NO_POSITIVE.replace(" in ", "\nin "), fill=color, font=text_font,
                            anchor="mm", align="center")
    else:
        image = ImageOps.contain(load_pil_image(path), (size - 2 * FRAME, size - 2 * FRAME))  # small ones scaled up
        if brighten and np.asarray(image.convert("L")).mean() < DARK_MEAN:
            image, caption = ImageOps.autocontrast(image, cutoff=1), caption + " *"
        canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    draw.text((FRAME, size + 4), caption, fill=color, font=text_font)
    return canvas


def row_image(tiles):
    """Tiles side by side, FRAME pixels apart."""
    row = Image.new("RGB", (sum(t.width for t in tiles) + FRAME * (len(tiles) - 1), max(t.height for t in tiles)),
                    "white")
    x = 0
    for image in tiles:
        row.paste(image, (x, 0))
        x += image.width + FRAME
    return row


def stack_rows(rows, title=None, title_size=20):
    """Rows one above the other, left-aligned, under an optional title line (the page widened to show all of it)."""
    title_font = font(title_size)
    title_height = title_size + 8 + FRAME if title else 0  # 8: room for the descenders
    title_width = 2 * FRAME + int(title_font.getlength(title)) if title else 0
    page = Image.new("RGB", (max([title_width] + [r.width for r in rows]),
                             title_height + sum(r.height + FRAME for r in rows)), "white")
    if title:
        ImageDraw.Draw(page).text((FRAME, 4), title, fill=(0, 0, 0), font=title_font)
    y = title_height
    for row in rows:
        page.paste(row, (0, y))
        y += row.height + FRAME
    return page


def prediction_distances(predictions, dataset):
    """Distance in metres between each query and each of its predictions [queries, N]; infinite where an
    approximate --faiss_index found fewer than N (prediction -1)."""
    query_utms = dataset.queries_utms[:, None, :]
    distances = np.linalg.norm(dataset.database_utms[predictions] - query_utms, axis=2)
    distances[predictions < 0] = np.inf
    return distances


def found(predictions, distances):
    """(rank, prediction, distance) of the predictions that exist (not -1), rank from 1."""
    return [(rank, p, d) for rank, (p, d) in enumerate(zip(predictions, distances), start=1) if p >= 0]


def nearest_positive(query_index, dataset):
    """(database index, distance in metres) of the positive closest to the query, or (None, inf) without one: what
    a failure should have found."""
    positives = dataset.get_positives()[query_index]
    if len(positives) == 0:
        return None, np.inf
    distances = np.linalg.norm(dataset.database_utms[positives] - dataset.queries_utms[query_index], axis=1)
    return int(positives[np.argmin(distances)]), float(distances.min())


def row_cells(query_index, query_predictions, distances, dataset, with_nearest_positive=False):
    """(path or None, caption, colour) of each image of a row: the query, its predictions, optionally its nearest
    positive. One list for the PNG and the HTML, so both show the same."""
    cells = [(dataset.queries_paths[query_index], f"query {query_index}", GREY)]
    for rank, prediction, distance in found(query_predictions, distances):
        correct = distance <= dataset.positive_dist_threshold
        cells.append((dataset.database_paths[prediction], f"#{rank}  {distance:.0f} m", GREEN if correct else RED))
    if with_nearest_positive:
        positive, distance = nearest_positive(query_index, dataset)
        cells.append((None, "nearest positive: none", BLUE) if positive is None else
                     (dataset.database_paths[positive], f"nearest positive, {distance:.0f} m", BLUE))
    return cells


def make_prediction_image(query_index, query_predictions, distances, dataset, size=TILE_SIZE,
                          with_nearest_positive=False):
    tiles = [tile(path, caption, color, size) for path, caption, color
             in row_cells(query_index, query_predictions, distances, dataset, with_nearest_positive)]
    if with_nearest_positive:  # a wider gap: the nearest positive is no prediction
        tiles.insert(-1, Image.new("RGB", (2 * FRAME, 1), "white"))
    return row_image(tiles)


def matches_image(query_path, database_path, query_points, database_points, caption, height=2 * TILE_SIZE):
    """The query and a database image side by side, height pixels high, a line between the two ends of each match
    (points as fractions of each image's width and height), captioned."""
    images = [ImageOps.contain(load_pil_image(path), (4 * height, height)) for path in (query_path, database_path)]
    canvas = Image.new("RGB", (images[0].width + FRAME + images[1].width, height + TEXT_HEIGHT), "white")
    canvas.paste(images[0], (0, 0))
    canvas.paste(images[1], (images[0].width + FRAME, 0))
    draw = ImageDraw.Draw(canvas)
    for (x0, y0), (x1, y1) in zip(query_points, database_points):
        start = (x0 * images[0].width, y0 * images[0].height)
        end = (images[0].width + FRAME + x1 * images[1].width, y1 * images[1].height)
        draw.line([start, end], fill=(255, 210, 0), width=2)
        for x, y in (start, end):
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], outline=(255, 210, 0), width=2)
    draw.text((FRAME, height + 4), caption, fill=(0, 0, 0), font=font(18))
    return canvas


def save_failure_gallery(wrong_database, missed_queries, path, title, per_row=6):
    """The picture of a test set's recurring mistakes (make_report.py's failures.md): the database images that are
    the wrong top-1 of the most queries [(path, count)], framed red, then the queries every model misses, framed
    blue; dark (night) images brightened. Images that no longer exist are left out."""
    rows = []
    for items, color in (([(p, f"wrong #1 of {n}") for p, n in wrong_database], RED),
                         ([(p, "missed by all") for p in missed_queries], BLUE)):
        tiles = [tile(p, caption, color, SUMMARY_TILE_SIZE, brighten=True) for p, caption in items if os.path.isfile(p)]
        rows += [row_image(tiles[i:i + per_row]) for i in range(0, len(tiles), per_row)]
    if rows:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        stack_rows(rows, title + " (* brightened)").save(path, quality=90)
    return bool(rows)


def save_preds(predictions, dataset, output_folder, num_preds_to_save, save_only_wrong_preds=False, matches=None):
    """Writes output_folder/preds/<query>.jpg for every query (or only those whose top-1 is wrong); with matches
    (per query, the points of the inlier matches with its top-1, from re-ranking) the picture shows them below."""
    predictions = np.asarray(predictions)[:, :num_preds_to_save]
    distances = prediction_distances(predictions, dataset)
    folder = os.path.join(output_folder, "preds")
    os.makedirs(folder, exist_ok=True)
    for query_index in tqdm(range(dataset.queries_num), ncols=100, desc="saving predictions", leave=False):
        top1_correct = distances[query_index, 0] <= dataset.positive_dist_threshold
        if save_only_wrong_preds and top1_correct:
            continue
        image = make_prediction_image(query_index, predictions[query_index], distances[query_index], dataset)
        if matches is not None:
            query_points, database_points = matches[query_index]
            image = stack_rows([image, matches_image(
                dataset.queries_paths[query_index], dataset.database_paths[predictions[query_index, 0]], query_points,
                database_points, f"{len(query_points)} verified matches with #1 (re-ranking)")])
        name = f"{query_index:05d}_{'correct' if top1_correct else 'wrong'}.jpg"
        image.save(os.path.join(folder, name), quality=90)
    return folder


def save_predictions_csv(predictions, dataset, path):
    """One row per (query, rank) with the predicted database image, its distance in metres and whether it is
    within the positive distance (the same rule as recall@N: a query is found at N if a row of rank <= N is)."""
    predictions = np.asarray(predictions)
    distances = prediction_distances(predictions, dataset)
    with open(path, "w", newline="") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(CSV_FIELDS)
        for query_index, (query_predictions, query_distances) in enumerate(zip(predictions, distances)):
            for rank, prediction, distance in found(query_predictions, query_distances):
                writer.writerow([query_index, dataset.queries_paths[query_index], rank, int(prediction),
                                 dataset.database_paths[prediction], f"{distance:.2f}",
                                 int(distance <= dataset.positive_dist_threshold)])
    return path


def failures_and_successes(top1_distances, threshold, num_failures, num_successes):
    """Indices of the queries whose top-1 is farthest (wrong ones only, farthest first) and of some queries whose
    top-1 is right (spread evenly over the queries, so the choice is deterministic)."""
    wrong = np.flatnonzero(top1_distances > threshold)
    failures = wrong[np.argsort(-top1_distances[wrong], kind="stable")][:num_failures]
    right = np.flatnonzero(top1_distances <= threshold)
    picked = np.unique(np.linspace(0, len(right) - 1, min(num_successes, len(right))).astype(int)) if len(right) else []
    return failures, right[picked]


def thumbnail(path, folder, name):
    """name in folder: a copy of the image at most THUMBNAIL_SIZE pixels wide and high, for the HTML page."""
    image = load_pil_image(path)
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    image.save(os.path.join(folder, name), quality=90)
    return name


def summary_html(sections, dataset, predictions, distances, html_folder, title):
    """A static page: one table row per query, with its own thumbnails in html_folder/THUMBNAILS_FOLDER, linked
    relatively, so that the page still shows them once moved or copied elsewhere."""
    thumbnails = os.path.join(html_folder, THUMBNAILS_FOLDER)
    os.makedirs(thumbnails, exist_ok=True)

    def cell(path, caption, color, name):
        style = f"border:4px solid rgb{color};vertical-align:top"
        if path is None:
            return f'<td style="{style}">{html.escape(NO_POSITIVE)}</td>'
        source = html.escape(f"{THUMBNAILS_FOLDER}/{thumbnail(path, thumbnails, name)}")
        return (f'<td style="{style}"><img src="{source}" height="128" title="{html.escape(os.path.basename(path))}">'
                f'<br>{html.escape(caption)}</td>')
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
             f"<body style='font-family:sans-serif'><h1>{html.escape(title)}</h1>"
             f"<p>Green: within {dataset.positive_dist_threshold:g} m of the query; red: farther; blue: the database "
             f"image within {dataset.positive_dist_threshold:g} m closest to a failed query (what it should have "
             f"found).</p>"]
    for section_title, indices, with_nearest_positive in sections:
        parts.append(f"<h2>{html.escape(section_title)}</h2><table>")
        for query_index in indices:
            cells = row_cells(query_index, predictions[query_index], distances[query_index], dataset,
                              with_nearest_positive)
            parts.append("<tr>" + "".join(cell(path, caption, color, f"{query_index:05d}_{column}.jpg")
                                          for column, (path, caption, color) in enumerate(cells)) + "</tr>")
        parts.append("</table>" if len(indices) else "</table><p>none</p>")
    return "".join(parts) + "</body></html>\n"


def save_summary_page(predictions, dataset, output_folder, num_preds, num_failures=10, num_successes=5, title=None):
    """summary.png and summary.html in output_folder, titled title (default the test set's name): the worst
    failures (top-1 farthest from the query), each with its nearest positive, and some successes, each query next
    to its top num_preds predictions."""
    title = dataset.dataset_name if title is None else title
    predictions = np.asarray(predictions)[:, :num_preds]
    distances = prediction_distances(predictions, dataset)
    failures, successes = failures_and_successes(distances[:, 0], dataset.positive_dist_threshold, num_failures,
                                                 num_successes)
    sections = [(f"Worst failures ({len(failures)}): the queries whose top-1 is farthest; blue: their nearest "
                 f"positive", failures, True),
                (f"Successes ({len(successes)}): queries whose top-1 is within {dataset.positive_dist_threshold:g} m",
                 successes, False)]
    pages = [stack_rows([make_prediction_image(q, predictions[q], distances[q], dataset, SUMMARY_TILE_SIZE,
                                               with_nearest_positive) for q in indices], section_title)
             for section_title, indices, with_nearest_positive in sections if len(indices)]
    os.makedirs(output_folder, exist_ok=True)
    png_path, html_path = os.path.join(output_folder, "summary.png"), os.path.join(output_folder, "summary.html")
    stack_rows(pages, title, title_size=26).save(png_path)
    with open(html_path, "w") as file:
        file.write(summary_html(sections, dataset, predictions, distances, output_folder, title))
    return png_path, html_path


def save_predictions_report(predictions, dataset, output_folder, num_preds_to_save=0, save_only_wrong_preds=False,
                            title=None, matches=None):
    """What eval.py and train.py keep of a test: always output_folder/predictions.csv; with num_preds_to_save > 0
    also the per-query pictures (preds/; with matches, those of each query's top-1 as save_preds says) and the
    summary page, titled title (default the test set's name)."""
    os.makedirs(output_folder, exist_ok=True)
    save_predictions_csv(predictions, dataset, os.path.join(output_folder, "predictions.csv"))
    if num_preds_to_save:
        try:
            save_preds(predictions, dataset, output_folder, num_preds_to_save, save_only_wrong_preds, matches)
            save_summary_page(predictions, dataset, output_folder, num_preds_to_save, title=title)
        except OSError as error:  # a full disk or a read-only folder: the evaluation's results still count
            logging.warning(f"The prediction pictures of {dataset.label} are not all written ({error}): "
                            f"predictions.csv and the recalls are")


def to_pil_images(images):
    """[B, 3, H, W] batch, uint8 or float in [0, 1], on any device -> B PIL images."""
    images = images if images.dtype == torch.uint8 else (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(image) for image in images.permute(0, 2, 3, 1).cpu().numpy()]


def labelled_row(label, images, label_width):
    """A row of images after a label column of label_width pixels."""
    row = row_image(images)
    canvas = Image.new("RGB", (label_width + row.width + FRAME, row.height), "white")
    ImageDraw.Draw(canvas).multiline_text((FRAME, FRAME), label, fill=(0, 0, 0), font=font(18))
    canvas.paste(row, (label_width, 0))
    return canvas


def save_augmentations_preview(images, augmentation_specs, make_augmentation, path):
    """path: a PNG of the images (uint8 batch [B, 3, H, W], on the device to augment on), one labelled row per
    augmentation of augmentation_specs ("name" or "name:strength"), each alone on the same images, then one row
    with the whole chain, as training applies it: what each one does and what they do together.
    make_augmentation(specs) -> the augmentations.TrainAugmentation of specs. Random parameters come from torch's
    global RNG."""
    rows = [("original", images)]
    rows += [(spec, make_augmentation([spec]).to(images.device).augment(images)) for spec in augmentation_specs]
    if len(augmentation_specs) > 1:
        chain = make_augmentation(augmentation_specs).to(images.device).augment(images)
        rows.append(("all, in order:\n" + "\n".join(augmentation_specs), chain))
    label_width = 2 * FRAME + max(int(font(18).getlength(line)) for label, _ in rows for line in label.split("\n"))
    page = stack_rows([labelled_row(label, to_pil_images(batch), label_width) for label, batch in rows])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    page.save(path)
    return path


def preview_images(folder, num_images, image_size):
    """num_images images spread evenly over the images of folder (its train/ when it has one), image_size square."""
    train_folder = os.path.join(folder, "train")
    paths = find_images(train_folder if os.path.isdir(train_folder) else folder)
    paths = [paths[i * len(paths) // num_images] for i in range(min(num_images, len(paths)))]
    return torch.stack([load_image_tensor(path, image_size) for path in paths])


def results_title(dataset, model_path, recalls, recall_values):
    """'sf_xs/test - logs/.../best_model.pth - R@1 52.0, R@5 66.0': the title of a summary picture (dataset.label:
    'tokyo_xs/test/night' for a second query folder)."""
    shown = [f"R@{n} {r:.1f}" for n, r in zip(recall_values, recalls)][:2]
    return f"{dataset.label} - {model_path or 'untrained model'} - {', '.join(shown)}"

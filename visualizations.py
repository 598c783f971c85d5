"""Pictures and tables of the predictions: each query next to its top-N predictions, framed green when a prediction is
within the positive distance and red otherwise, with its distance in metres; a CSV of every query's predictions;
one summary page (PNG and HTML) of the worst failures and of some successes. Pillow only."""

import csv
import html
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps
from tqdm import tqdm

from datasets.image_loading import load_pil_image

TILE_SIZE = 256
SUMMARY_TILE_SIZE = 160
FRAME = 8
TEXT_HEIGHT = 28
GREEN, RED, GREY = (0, 180, 0), (220, 0, 0), (90, 90, 90)
CSV_FIELDS = ("query_index", "query_path", "rank", "database_index", "database_path", "distance_m", "correct")


def font(size=18):
    """Pillow's bundled scalable font (no system font path needed)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        return ImageFont.load_default()


def tile(path, caption, color, size=TILE_SIZE):
    """A framed, captioned thumbnail of one image."""
    image = ImageOps.contain(load_pil_image(path), (size - 2 * FRAME, size - 2 * FRAME))  # small ones scaled up
    canvas = Image.new("RGB", (size, size + TEXT_HEIGHT), "white")
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([0, 0, size - 1, size - 1], fill=color)
    canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    draw.text((FRAME, size + 4), caption, fill=color, font=font(18 if size >= 200 else 14))
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


def stack_rows(rows, title=None):
    """Rows one above the other, left-aligned, under an optional title line."""
    title_height = TEXT_HEIGHT + FRAME if title else 0
    page = Image.new("RGB", (max(r.width for r in rows), title_height + sum(r.height + FRAME for r in rows)), "white")
    if title:
        ImageDraw.Draw(page).text((FRAME, 4), title, fill=(0, 0, 0), font=font(20))
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


def make_prediction_image(query_index, query_predictions, distances, dataset, size=TILE_SIZE):
    tiles = [tile(dataset.queries_paths[query_index], f"query {query_index}", GREY, size)]
    for rank, prediction, distance in found(query_predictions, distances):
        correct = distance <= dataset.positive_dist_threshold
        tiles.append(tile(dataset.database_paths[prediction], f"#{rank}  {distance:.0f} m", GREEN if correct else RED,
                          size))
    return row_image(tiles)


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


def summary_html(sections, dataset, predictions, distances, html_folder):
    """A static page: one table row per query, its images linked relatively to html_folder."""
    def cell(path, caption, color):
        source = html.escape(os.path.relpath(os.path.abspath(path), os.path.abspath(html_folder)))
        return (f'<td style="border:4px solid rgb{color}"><a href="{source}"><img src="{source}" height="128"></a>'
                f'<br>{html.escape(caption)}</td>')
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(dataset.dataset_name)} predictions"
             f"</title></head><body style='font-family:sans-serif'><h1>{html.escape(str(dataset))}</h1>"
             f"<p>Green: within {dataset.positive_dist_threshold:g} m of the query; red: farther.</p>"]
    for title, indices in sections:
        parts.append(f"<h2>{html.escape(title)}</h2><table>")
        for query_index in indices:
            cells = [cell(dataset.queries_paths[query_index], f"query {query_index}", GREY)]
            for rank, prediction, distance in found(predictions[query_index], distances[query_index]):
                color = GREEN if distance <= dataset.positive_dist_threshold else RED
                cells.append(cell(dataset.database_paths[prediction], f"#{rank} {distance:.0f} m", color))
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</table>" if len(indices) else "</table><p>none</p>")
    return "".join(parts) + "</body></html>\n"


def save_summary_page(predictions, dataset, output_folder, num_preds, num_failures=10, num_successes=5):
    """summary.png and summary.html in output_folder: the worst failures (top-1 farthest from the query) and some
    successes, each query next to its top num_preds predictions."""
    predictions = np.asarray(predictions)[:, :num_preds]
    distances = prediction_distances(predictions, dataset)
    failures, successes = failures_and_successes(distances[:, 0], dataset.positive_dist_threshold, num_failures,
                                                 num_successes)
    sections = [(f"Worst failures ({len(failures)}): the queries whose top-1 is farthest", failures),
                (f"Successes ({len(successes)}): queries whose top-1 is within {dataset.positive_dist_threshold:g} m",
                 successes)]
    pages = [stack_rows([make_prediction_image(q, predictions[q], distances[q], dataset, SUMMARY_TILE_SIZE)
                         for q in indices], title) for title, indices in sections if len(indices)]
    os.makedirs(output_folder, exist_ok=True)
    png_path, html_path = os.path.join(output_folder, "summary.png"), os.path.join(output_folder, "summary.html")
    stack_rows(pages, str(dataset)).save(png_path)
    with open(html_path, "w") as file:
        file.write(summary_html(sections, dataset, predictions, distances, output_folder))
    return png_path, html_path


def save_predictions_report(predictions, dataset, output_folder, num_preds_to_save=0, save_only_wrong_preds=False):
    """What eval.py and train.py keep of a test: always output_folder/predictions.csv; with num_preds_to_save > 0
    also the per-query pictures (preds/) and the summary page."""
    os.makedirs(output_folder, exist_ok=True)
    save_predictions_csv(predictions, dataset, os.path.join(output_folder, "predictions.csv"))
    if num_preds_to_save:
        save_preds(predictions, dataset, output_folder, num_preds_to_save, save_only_wrong_preds)
        save_summary_page(predictions, dataset, output_folder, num_preds_to_save)

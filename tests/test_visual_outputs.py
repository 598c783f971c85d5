"""The pictures and pages people look at: the summary page of the predictions (its title, the nearest positive of
each failure, an HTML page that survives being moved), the map of the dataset analysis and the augmentation
preview, checked on their pixels and HTML against expectations computed here."""

import os
import re
import shutil

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from PIL import Image, ImageFont

import analyze_dataset
import preview_augmentations
import visualizations
from augmentations import AugmentationDefaults, TrainAugmentation
from datasets.dataset_utils import find_images
from datasets.image_loading import load_image_tensor
from datasets.test_dataset import TestDataset as EvaluationSet  # not named Test*: pytest would collect it

TITLE = "sf_xs/test - resnet18_gem - R@1 41.7, R@5 66.7, a title wider than the rows of the page"
BLUE = (0, 90, 230)


def nearest_database_distances(dataset):
    """[queries, database] distances in metres, computed here from the positions."""
    return np.linalg.norm(dataset.queries_utms[:, None] - dataset.database_utms[None], axis=2)


def vertical_runs(column, color):
    """(start, length) of each run of pixels of exactly color in a [H, 3] column."""
    inside = np.all(column == color, axis=1).astype(int)
    edges = np.diff(np.concatenate([[0], inside, [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return list(zip(starts, ends - starts))


def test_summary_page_title_nearest_positive_and_moved_html(synthetic_dataset, tmp_path):
    folder = os.path.join(synthetic_dataset, "test")
    distances = nearest_database_distances(EvaluationSet(folder))
    nearest = np.sort(distances.min(axis=1))
    threshold = (nearest[len(nearest) // 2 - 1] + nearest[len(nearest) // 2]) / 2  # half the queries lack a positive
    dataset = EvaluationSet(folder, positive_dist_threshold=threshold)
    predictions = np.argsort(-distances, axis=1)[:, :3]  # the 3 farthest images: every query fails
    output = str(tmp_path / "run")
    visualizations.save_predictions_report(predictions, dataset, output, 3, title=TITLE)
    shown = np.argsort(-distances[np.arange(len(distances)), predictions[:, 0]], kind="stable")[:10]

    page = open(os.path.join(output, "summary.html")).read()
    assert f"<title>{TITLE}</title>" in page and f"<h1>{TITLE}</h1>" in page
    rows = re.findall(r"<tr>(.*?)</tr>", page)
    assert len(rows) == len(shown)
    for query, row in zip(shown, rows):
        last = row.split("<td")[-1]
        assert f"rgb{BLUE}" in last and f">query {query}<" in row
        if distances[query].min() <= threshold:
            expected = int(np.argmin(distances[query]))
            assert f"nearest positive, {distances[query].min():.0f} m" in last
            assert f'title="{os.path.basename(dataset.database_paths[expected])}"' in last
        else:
            assert "no positive in the database" in last and "<img" not in last
    assert "no positive in the database" in page and "nearest positive, " in page  # both cases were seen

    moved = str(tmp_path / "elsewhere" / "copy")
    shutil.move(output, moved)
    sources = re.findall(r'src="([^"]+)"', open(os.path.join(moved, "summary.html")).read())
    assert len(sources) == len(shown) * 5 - sum(distances[q].min() > threshold for q in shown)
    for source in sources:
        assert not os.path.isabs(source) and ".." not in source
        with Image.open(os.path.join(moved, source)) as image:
            assert max(image.size) <= visualizations.THUMBNAIL_SIZE

    png = np.asarray(Image.open(os.path.join(moved, "summary.png")).convert("RGB"))
    assert png.shape[1] >= ImageFont.load_default(size=26).getlength(TITLE)  # the whole title shows
    blue_columns = np.flatnonzero(np.all(png == BLUE, axis=2).any(axis=0))
    red_columns = np.flatnonzero(np.all(png == visualizations.RED, axis=2).any(axis=0))
    assert red_columns.max() < blue_columns.min()  # the nearest positive after the predictions
    size = visualizations.SUMMARY_TILE_SIZE
    blue_tiles = [run for run in vertical_runs(png[:, blue_columns.min() + 2], BLUE) if run[1] == size]
    query_tiles = [run for run in vertical_runs(png[:, 2], visualizations.GREY) if run[1] == size]
    assert len(blue_tiles) == len(shown) and [y for y, _ in blue_tiles] == [y for y, _ in query_tiles[:len(shown)]]
    for query, (top, _) in zip(shown, blue_tiles):  # an empty tile where there is no positive
        inside = png[top + 12: top + size - 12, blue_columns.min() + 12: blue_columns.min() + size - 12]
        white = np.mean(np.all(inside == 255, axis=2))
        assert (white > 0.8) == (distances[query].min() > threshold)


def blended(color, alpha):
    return np.array(to_rgb(color)) * 255 * alpha + 255 * (1 - alpha)


def test_map_roles_visible_and_fitted():
    rng = np.random.default_rng(0)
    places = np.array([[500_000.0, 4_000_000.0], [500_400.0, 4_000_100.0], [500_800.0, 4_000_200.0]])
    data = {"train": {"utms": places[0] + rng.uniform(-50, 50, (30, 2)), "paths": [""] * 30},
            "val/database": {"utms": places[1:2], "paths": [""]}, "val/queries": {"utms": places[1:2], "paths": [""]},
            "test/database": {"utms": places[2:], "paths": [""]}, "test/queries": {"utms": places[2:], "paths": [""]}}
    figure = analyze_dataset.map_figure(data)
    axis = figure.axes[0]
    assert [text.get_text() for text in axis.get_legend().get_texts()] == [
        "train (30)", "val/database (1)", "test/database (1)", "val/queries (1)", "test/queries (1)"]
    points = np.concatenate([split["utms"] for split in data.values()])
    span = np.ptp(points, axis=0).max()
    for limits, low, high in ((axis.get_xlim(), points[:, 0].min(), points[:, 0].max()),
                              (axis.get_ylim(), points[:, 1].min(), points[:, 1].max())):
        assert 0 < low - limits[0] <= 0.1 * span and 0 < limits[1] - high <= 0.1 * span
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[:, :, :3].astype(float)
    colors = {key: (style["color"], style["alpha"]) for key, style in analyze_dataset.MAP_STYLES.items()}
    assert len({color for color, _ in colors.values()}) == 5
    for place, database, queries in ((places[1], "val/database", "val/queries"),
                                     (places[2], "test/database", "test/queries")):
        x, y = axis.transData.transform(place)
        row, column = int(round(pixels.shape[0] - y)), int(round(x))
        window = pixels[row - 8: row + 9, column - 8: column + 9].reshape(-1, 3)
        near = lambda key: np.min(np.abs(window - blended(*colors[key])).max(axis=1))
        assert near(database) < 20 and near(queries) < 40  # both drawn, the database not hidden by the query


def find_exact(page, cell):
    """(row, column) of each place where cell [h, w, 3] is in page [H, W, 3] pixel for pixel."""
    height, width = cell.shape[:2]
    candidates = zip(*np.nonzero(np.all(page[: page.shape[0] - height + 1, : page.shape[1] - width + 1]
                                        == cell[0, 0], axis=2)))
    return [(y, x) for y, x in candidates if np.array_equal(page[y: y + height, x: x + width], cell)]


def test_augmentations_preview_one_row_each_then_the_chain(tmp_path):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    defaults = AugmentationDefaults(image_size=32)
    path = visualizations.save_augmentations_preview(images, ["grayscale:1", "horizontal_flip:1"],
                                                     lambda specs: TrainAugmentation(specs, defaults),
                                                     str(tmp_path / "preview.png"))
    page = np.asarray(Image.open(path).convert("RGB"))
    originals = images.permute(0, 2, 3, 1).numpy()
    flipped = originals[:, :, ::-1]
    gray = np.round(originals @ np.array([0.299, 0.587, 0.114]))[..., None].repeat(3, axis=3)
    (first,), (second,) = (find_exact(page, image) for image in originals)
    (flip_first,), (flip_second,) = (find_exact(page, image) for image in flipped)
    assert first[0] == second[0] and first[1] < second[1]  # the originals side by side
    assert (flip_first[1], flip_second[1]) == (first[1], second[1]) and flip_first[0] == flip_second[0]
    pitch = (flip_first[0] - first[0]) / 2  # grayscale is the row between: original, grayscale, flip, chain
    assert pitch >= 32
    for row, expected in ((1, gray), (3, gray[:, :, ::-1])):
        top = int(first[0] + row * pitch)
        for (_, left), image in zip((first, second), expected):
            assert np.abs(page[top: top + 32, left: left + 32] - image).max() <= 1
    assert page.shape[0] < first[0] + 4 * pitch + 32  # no fifth row
    for row in range(4):  # a label left of every row
        top = int(first[0] + row * pitch)
        assert np.any(page[top: top + 32, : first[1]] < 100)


def test_augmentations_preview_command(synthetic_dataset, tmp_path):
    path = preview_augmentations.main(["--dataset_folder", synthetic_dataset, "--out", str(tmp_path), "--augmentations",
                                        "color_jitter", "night", "--num_images", "3", "--image_size", "64"])
    assert path == str(tmp_path / "augmentations.png")
    page = np.asarray(Image.open(path).convert("RGB"))
    paths = find_images(os.path.join(synthetic_dataset, "train"))
    places = [find_exact(page, load_image_tensor(paths[i * len(paths) // 3], 64).permute(1, 2, 0).numpy())
              for i in range(3)]
    assert all(len(found) == 1 for found in places)
    (top, left), = places[0]
    assert [found[0] for found in places] == sorted(found[0] for found in places) and top < 64
    assert 4 * 64 <= page.shape[0] - top < 5 * 64  # original, color_jitter, night, the chain

"""A deterministic synthetic dataset in the SF-XS layout, for the offline demo and the tests.

Each "place" is a procedural street scene (sky, buildings with windows, ground, poles) wider than one view;
an image of the place is a crop of it from a shifted viewpoint, under some illumination. Training classes
hold views under varied daylight; database images are daytime views; queries are seen from further shifted
viewpoints and under other illumination (dusk, night, tinted), as the hard queries of Tokyo-XS are.
Places lie 50 m apart on a UTM grid (all in one CosPlace group with M=10, N=5), so a query's positives
(25 m) are the database images of its own place.

    python -m datasets.synthetic --out data/synthetic
"""

import argparse
import os

import numpy as np
import utm
from PIL import Image, ImageDraw, ImageFilter

from datasets.dataset_utils import format_image_name

PLACE_SPACING = 50.0  # metres between two places: one CosPlace group with M=10, N=5
ZONE, LETTER = 10, "S"
ORIGIN_EAST, ORIGIN_NORTH = 549000.0, 4180000.0  # San Francisco


def draw_scene(rng, view_size):
    """A street scene 2 views wide and 1.25 views high, from the place's own random generator."""
    width, height = 2 * view_size, int(1.25 * view_size)
    scene = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(scene)
    sky = rng.integers(120, 240, 3)
    horizon = int(height * rng.uniform(0.55, 0.75))
    for y in range(horizon):  # sky gradient
        shade = tuple(int(c * (0.75 + 0.25 * y / horizon)) for c in sky)
        draw.line([(0, y), (width, y)], fill=shade)
    draw.rectangle([0, horizon, width, height], fill=tuple(int(c) for c in rng.integers(40, 120, 3)))
    x = int(-rng.uniform(0, 0.2) * view_size)
    while x < width:  # a row of buildings with windows
        building_width = int(rng.uniform(0.25, 0.6) * view_size)
        top = int(rng.uniform(0.05, 0.5) * horizon)
        color = tuple(int(c) for c in rng.integers(30, 230, 3))
        draw.rectangle([x, top, x + building_width, horizon], fill=color)
        window_color = tuple(int(c) for c in rng.integers(0, 255, 3))
        rows, columns = rng.integers(2, 7), rng.integers(2, 6)
        cell_w, cell_h = building_width / columns, (horizon - top) / rows
        window_fill = rng.uniform(0.35, 0.7)
        for r in range(rows):
            for c in range(columns):
                if rng.random() < 0.85:
                    x0, y0 = x + c * cell_w + cell_w * (1 - window_fill) / 2, top + r * cell_h + cell_h * 0.2
                    draw.rectangle([x0, y0, x0 + cell_w * window_fill, y0 + cell_h * 0.55], fill=window_color)
        x += building_width + int(rng.uniform(0, 0.1) * view_size)
    for _ in range(rng.integers(1, 5)):  # poles, trees and signs in front
        px = int(rng.uniform(0, width))
        color = tuple(int(c) for c in rng.integers(0, 200, 3))
        draw.rectangle([px, int(horizon * rng.uniform(0.3, 0.8)), px + int(view_size * 0.03), height], fill=color)
        radius = int(view_size * rng.uniform(0.05, 0.15))
        cy = int(horizon * rng.uniform(0.2, 0.7))
        draw.ellipse([px - radius, cy - radius, px + radius, cy + radius], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return scene


def illuminate(image, rng, kind):
    """Daylight variations for 'day'; dark, tinted, noisy images for 'night'; warm low light for 'dusk'."""
    pixels = np.asarray(image, dtype=np.float32) / 255
    if kind == "day":
        gain, gamma, tint, noise = rng.uniform(0.75, 1.2), rng.uniform(0.8, 1.25), rng.uniform(0.9, 1.1, 3), 0.01
    elif kind == "dusk":
        gain, gamma, tint, noise = rng.uniform(0.5, 0.75), rng.uniform(1.1, 1.5), np.array([1.15, 0.9, 0.7]), 0.03
    else:
        gain, gamma, tint, noise = rng.uniform(0.25, 0.45), rng.uniform(1.3, 1.8), np.array([0.7, 0.8, 1.2]), 0.05
    pixels = np.clip(gain * tint * pixels ** gamma + rng.normal(0, noise, pixels.shape), 0, 1)
    return Image.fromarray((pixels * 255).astype(np.uint8))


def view(scene, rng, view_size, max_shift, kind):
    """A crop of the scene from a viewpoint shifted by up to max_shift (fraction of a view), zoomed a little."""
    zoom = rng.uniform(0.85, 1.0) if max_shift > 0 else 1.0
    crop = int(scene.height * zoom)
    center_x = scene.width / 2 + rng.uniform(-max_shift, max_shift) * view_size
    left = int(np.clip(center_x - crop / 2, 0, scene.width - crop))
    top = int(rng.uniform(0, scene.height - crop)) if scene.height > crop else 0
    image = scene.crop((left, top, left + crop, top + crop)).resize((view_size, view_size), Image.BILINEAR)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return illuminate(image, rng, kind)


def place_position(index, row_length, origin_east, origin_north, rng):
    """UTM of place `index`: on a 50 m grid, anywhere inside its 10 m cell."""
    row, column = divmod(index, row_length)
    east = origin_east + column * PLACE_SPACING + rng.uniform(0.5, 9.5)
    north = origin_north + row * PLACE_SPACING + rng.uniform(0.5, 9.5)
    return east, north


def save_view(image, folder, east, north, position_jitter, rng, date, index):
    east, north = east + rng.uniform(-position_jitter, position_jitter), north + rng.uniform(-position_jitter, position_jitter)
    lat, lon = utm.to_latlon(east, north, ZONE, LETTER)
    name = format_image_name(east, north, ZONE, LETTER, float(lat), float(lon), pano_id=f"synth{index:07d}",
                             heading=0, date=date, prefix="synthetic")
    image.save(os.path.join(folder, name), quality=92)


def generate_split(folder, first_place, places_num, images_per_place, view_size, seed, origin_east,
                   make_views):
    """Writes the images of places [first_place, first_place + places_num) with make_views(rng) -> kinds."""
    row_length = int(np.ceil(np.sqrt(places_num)))
    for p in range(places_num):
        place_id = first_place + p
        place_rng = np.random.default_rng([seed, place_id])
        scene = draw_scene(place_rng, view_size)
        east, north = place_position(p, row_length, origin_east, ORIGIN_NORTH, place_rng)
        for i, (subfolder, max_shift, kind) in enumerate(make_views(place_rng, images_per_place)):
            image = view(scene, place_rng, view_size, max_shift, kind)
            os.makedirs(os.path.join(folder, subfolder), exist_ok=True)
            date = f"{2008 + int(place_rng.integers(0, 14))}{int(place_rng.integers(1, 13)):02d}"
            save_view(image, os.path.join(folder, subfolder), east, north, 0.4, place_rng, date, place_id * 100 + i)


def generate_dataset(out_folder, train_places=120, val_places=40, test_places=40, images_per_train_place=10,
                     database_per_place=2, queries_per_place=1, view_size=96, seed=0):
    """Generates out_folder/{train, val/{database,queries}, test/{database,queries}}; the same arguments
    always give the same images. Returns out_folder."""
    def train_views(rng, n):
        return [("", 0.35, "day" if rng.random() < 0.7 else str(rng.choice(["dusk", "night"]))) for _ in range(n)]

    def test_views(rng, n):
        database = [("database", 0.15, "day") for _ in range(database_per_place)]
        queries = [("queries", 0.4, str(rng.choice(["day", "dusk", "night"], p=[0.2, 0.4, 0.4])))
                   for _ in range(queries_per_place)]
        return database + queries

    # Splits are geographically disjoint: each starts 5 km east of the previous one
    generate_split(os.path.join(out_folder, "train"), 0, train_places, images_per_train_place, view_size, seed,
                   ORIGIN_EAST, train_views)
    generate_split(os.path.join(out_folder, "val"), 10_000, val_places, None, view_size, seed,
                   ORIGIN_EAST + 5000, test_views)
    generate_split(os.path.join(out_folder, "test"), 20_000, test_places, None, view_size, seed,
                   ORIGIN_EAST + 10000, test_views)
    return out_folder


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/synthetic", help="output folder (must not exist, or be empty)")
    parser.add_argument("--train_places", type=int, default=120)
    parser.add_argument("--val_places", type=int, default=40)
    parser.add_argument("--test_places", type=int, default=40)
    parser.add_argument("--images_per_train_place", type=int, default=10)
    parser.add_argument("--view_size", type=int, default=96, help="side of the square images, in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if os.path.isdir(args.out) and os.listdir(args.out):
        parser.error(f"{args.out} already exists and is not empty: choose another --out or remove it")
    generate_dataset(args.out, args.train_places, args.val_places, args.test_places, args.images_per_train_place,
                     view_size=args.view_size, seed=args.seed)
    print(f"Synthetic dataset written to {args.out}")


if __name__ == "__main__":
    main()

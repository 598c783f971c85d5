"""Turns a folder of your own geo-tagged photos into images named in the '@' format of the benchmarks.

    python make_dataset.py --images my_photos --out data/my_city/database            # positions from EXIF GPS
    python make_dataset.py --images my_photos --csv positions.csv --out data/my_city/queries [--link]

Positions come from each photo's EXIF GPS tags, or, with --csv, from a CSV file with a header and the columns
path (relative to --images, or absolute), latitude, longitude and optionally heading (degrees); with --csv, EXIF GPS
is not read and photos not listed are skipped. The heading is the CSV's, else EXIF GPSImgDirection, else 0; the capture
month (field 13) comes from EXIF DateTimeOriginal when there is one. Each photo is copied (or symlinked with --link)
to --out as @utm_east@utm_north@zone@letter@lat@lon@<photo name>@@heading@@@@yyyymm@@.<ext>, UTM to the centimetre.
Photos that cannot be used are skipped and reported with the reason (no GPS, unreadable, bad CSV row, ...); every
photo's outcome is written to <out>/make_dataset_report.csv. --out must be empty or new.
"""

import csv
import os
import shutil
from collections import Counter
from datetime import datetime

import utm
from PIL import ExifTags, Image

import parser
from core.errors import UserError, exit_on_user_error
from datasets.dataset_utils import IMAGE_EXTENSIONS, format_image_name


def build_parser():
    arguments = parser.ArgumentParser(description=__doc__)
    arguments.add_argument("--images", required=True, help="folder of the photos (searched recursively)")
    arguments.add_argument("--csv", default=None, help="CSV with columns path, latitude, longitude[, heading]")
    arguments.add_argument("--out", required=True, help="folder of the renamed images (must be empty or new)")
    arguments.add_argument("--link", action="store_true", help="symlink the photos instead of copying them")
    return arguments


if __name__ == "__main__":  # --help and flag mistakes are answered here, before the heavy imports below
    ARGS = exit_on_user_error(build_parser().parse_args)

from datasets.image_check import image_problem  # noqa: E402

REPORT_NAME = "make_dataset_report.csv"


class MakeDatasetError(UserError):
    """A wrong --images, --csv or --out: nothing can be made, the message says what to fix."""


class SkipPhoto(ValueError):
    """A photo that cannot be put in the dataset; the message is the reason shown to the user."""


def find_photos(folder):
    if not os.path.isdir(folder):
        raise MakeDatasetError(f"make_dataset.py: --images {folder}: no such folder")
    return sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                  if name.lower().endswith(IMAGE_EXTENSIONS))


def degrees(dms, reference, what):
    """Decimal degrees from EXIF (degrees, minutes, seconds) rationals and an N/S/E/W reference."""
    try:
        value = float(dms[0]) + float(dms[1]) / 60 + float(dms[2]) / 3600
    except (TypeError, IndexError, ValueError, ZeroDivisionError):
        raise SkipPhoto(f"bad EXIF GPS {what} {dms!r}") from None
    reference = reference.decode() if isinstance(reference, bytes) else str(reference)
    return -value if reference.strip().upper() in ("S", "W") else value


def read_exif(path):
    """(latitude or None, longitude or None, heading or None, 'yyyymm' or '') of a photo; SkipPhoto if unreadable.
    The photo is first decoded by the training loader (EXIF orientation included): a truncated file fails here,
    not when training."""
    problem = image_problem(path)
    if problem is not None:
        raise SkipPhoto(f"unreadable ({problem})")
    with Image.open(path) as image:
        exif = image.getexif()
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    latitude = longitude = heading = None
    if ExifTags.GPS.GPSLatitude in gps and ExifTags.GPS.GPSLongitude in gps:
        latitude = degrees(gps[ExifTags.GPS.GPSLatitude], gps.get(ExifTags.GPS.GPSLatitudeRef, "N"), "latitude")
        longitude = degrees(gps[ExifTags.GPS.GPSLongitude], gps.get(ExifTags.GPS.GPSLongitudeRef, "E"), "longitude")
    if ExifTags.GPS.GPSImgDirection in gps:
        heading = float(gps[ExifTags.GPS.GPSImgDirection])
    taken = exif.get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.DateTimeOriginal) or exif.get(ExifTags.Base.DateTime)
    try:
        month = datetime.strptime(str(taken).strip(), "%Y:%m:%d %H:%M:%S").strftime("%Y%m") if taken else ""
    except ValueError:
        month = ""
    return latitude, longitude, heading, month


def read_positions_csv(csv_path, images_folder):
    """{absolute photo path: (latitude, longitude, heading or None)}, and the skipped rows [(row, reason)]."""
    try:
        with open(csv_path, newline="") as file:
            rows = list(csv.DictReader(file))
            columns = rows[0].keys() if rows else []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise MakeDatasetError(f"make_dataset.py: --csv {csv_path} cannot be read ({e})") from e
    missing = {"path", "latitude", "longitude"} - set(columns)
    if missing:
        raise MakeDatasetError(f"make_dataset.py: --csv {csv_path} needs a header with the columns path, latitude, "
                               f"longitude (and optionally heading); missing: {', '.join(sorted(missing))}")
    positions, skipped = {}, []
    for line_number, row in enumerate(rows, start=2):
        where = f"{csv_path} line {line_number}"
        try:
            if not (row["path"] or "").strip():
                raise SkipPhoto("bad CSV row: empty path")
            path = os.path.abspath(os.path.join(images_folder, row["path"].strip()))
            try:
                latitude, longitude = float(row["latitude"]), float(row["longitude"])
                heading = float(row["heading"]) if (row.get("heading") or "").strip() else None
            except (TypeError, ValueError):
                raise SkipPhoto(f"bad CSV row: latitude, longitude and heading must be numbers, got "
                                f"{row.get('latitude')!r}, {row.get('longitude')!r}, {row.get('heading')!r}") from None
            if path in positions:
                raise SkipPhoto(f"bad CSV row: {row['path']} is listed twice")
            positions[path] = (latitude, longitude, heading)
        except SkipPhoto as e:
            skipped.append((f"{where}: {row.get('path')}", str(e)))
    return positions, skipped


def utm_position(latitude, longitude):
    """(east, north, zone, letter); SkipPhoto outside the UTM range (latitude in [-80, 84])."""
    try:
        return utm.from_latlon(latitude, longitude)
    except (utm.error.OutOfRangeError, ValueError) as e:
        raise SkipPhoto(f"outside the UTM range: {latitude}, {longitude} ({e})") from None


def output_name(path, latitude, longitude, heading, month, taken_names):
    """The '@' name of a photo, with its own name (without '@') as the pano id, made unique among taken_names."""
    east, north, zone, letter = utm_position(latitude, longitude)
    stem, extension = os.path.splitext(os.path.basename(path))
    stem = stem.replace("@", "_")
    for attempt in range(len(taken_names) + 1):
        pano_id = stem if attempt == 0 else f"{stem}_{attempt}"
        name = format_image_name(east, north, zone, letter, float(latitude), float(longitude), pano_id=pano_id,
                                 heading=heading or 0.0, date=month)
        name = name[:-len(".jpg")] + extension.lower()  # the name keeps the photo's own format
        if name not in taken_names:
            return name


def make_dataset(images_folder, out_folder, csv_path=None, link=False):
    """Copies (or links) every usable photo; returns [(source, output name or '', reason or '')], one per photo."""
    if os.path.isdir(out_folder) and os.listdir(out_folder):
        raise MakeDatasetError(f"make_dataset.py: --out {out_folder} is not empty: choose a new folder")
    photos = find_photos(images_folder)
    positions, outcomes = {}, []
    if csv_path:
        positions, skipped_rows = read_positions_csv(csv_path, images_folder)
        outcomes += [(where, "", reason) for where, reason in skipped_rows]
        found = {os.path.abspath(p) for p in photos}
        outcomes += [(path, "", f"not an image Pillow can read here (only {', '.join(IMAGE_EXTENSIONS)} files are "
                                f"used): convert it to JPEG, or drop its CSV row") if os.path.isfile(path) else
                     (path, "", "listed in the CSV but not found under --images")
                     for path in positions if path not in found]
    os.makedirs(out_folder, exist_ok=True)
    taken_names = set()
    for photo in photos:
        try:
            latitude, longitude, heading, month = read_exif(photo)
            if csv_path:
                if os.path.abspath(photo) not in positions:
                    raise SkipPhoto("not listed in the CSV")
                latitude, longitude, csv_heading = positions[os.path.abspath(photo)]
                heading = csv_heading if csv_heading is not None else heading
            elif latitude is None:
                raise SkipPhoto("no GPS position in its EXIF (give positions with --csv)")
            name = output_name(photo, latitude, longitude, heading, month, taken_names)
        except SkipPhoto as e:
            outcomes.append((photo, "", str(e)))
            continue
        taken_names.add(name)
        target = os.path.join(out_folder, name)
        if link:
            os.symlink(os.path.abspath(photo), target)
        else:
            shutil.copy2(photo, target)
        outcomes.append((photo, name, ""))
    with open(os.path.join(out_folder, REPORT_NAME), "w", newline="") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(["source", "output_name", "skipped_because"])
        writer.writerows(outcomes)
    return outcomes


def summary(outcomes, out_folder):
    kept = [o for o in outcomes if o[1]]
    skipped = [o for o in outcomes if not o[1]]
    lines = [f"{len(kept)} photos written to {out_folder}, {len(skipped)} skipped"]
    for reason, count in Counter(reason.split(":")[0].split(" (")[0] for _, _, reason in skipped).most_common():
        lines.append(f"  {count} x {reason}")
    lines += [f"  skipped: {source}: {reason}" for source, _, reason in skipped[:20]]
    if len(skipped) > 20:
        lines.append(f"  ... the others are in {os.path.join(out_folder, REPORT_NAME)}")
    return "\n".join(lines)


def make_and_summarise(args):
    outcomes = make_dataset(args.images, args.out, args.csv, args.link)
    print(summary(outcomes, args.out))
    if not any(name for _, name, _ in outcomes):
        raise MakeDatasetError("make_dataset.py: no photo could be used (see the reasons above)")
    return outcomes


def main(argv=None):
    return make_and_summarise(build_parser().parse_args(argv))


if __name__ == "__main__":
    exit_on_user_error(make_and_summarise, ARGS)

"""Where was this photo taken? Finds the database images nearest to each photo with a trained model.

    python geolocalize.py --resume_model logs/<run>/best_model.pth --database_folder data/sf_xs/test/database \\
        photo.jpg [more photos] [--top_k 5 --out geolocalized]

The architecture flags (--backbone, --aggregator, --fc_output_dim, ...) are read from the args.json beside the
checkpoint. Optionally --test_image_size (photos and database images are used at their own size otherwise; large
phone photos are slow on a CPU), --infer_batch_size, --device, --eval_amp, --faiss_index. Database
images must be named in the '@' format (UTM in fields 1/2; latitude/longitude in fields 5/6, or UTM zone/letter in
fields 3/4). The database descriptors are computed once and cached in --descriptors_cache (here 'cache' by default),
keyed by the model's weights, the database files (names, sizes, modification times) and the flags that change
descriptors (evaluation/descriptors.py).

With --rerank sift (or a learned matcher of matchers.MATCHERS), the first --rerank_k database images found for each
photo are re-ranked by their number of local feature matches with it that a RANSAC homography verifies (the database
images' local features are cached in --descriptors_cache too); each top-k image then carries its count, and the
picture shows the verified matches of the top-1.

For each photo it prints the estimated position (the top-1's), the spread of the top-k (the largest distance of a
top-k position from the top-1: small when the top-k agree) and the top-k images with their positions; if the photo's
own name carries its position, also the error of the estimate. It writes <out>/<photo>_top<k>.jpg (framed green within
--positive_dist_threshold of the photo's true position when known, grey otherwise) and <out>/geolocalize.json.
"""

import logging
import os

import numpy as np
import utm

import parser
from core import files
from core.errors import exit_on_user_error
from datasets.dataset_utils import DatasetError, parse_image_name


def build_parser():
    arguments = parser.build_parser("geolocalize", __doc__)
    arguments.set_defaults(pretrained="none", descriptors_cache="cache")  # weights from --resume_model
    group = arguments.add_argument_group("Geo-localization of photos")
    group.add_argument("photos", nargs="+", help="the photos to geo-localize")
    group.add_argument("--database_folder", type=str, required=True,
                       help="folder of geo-tagged database images ('@' names), searched recursively")
    group.add_argument("--top_k", type=parser.positive_int, default=5, help="database images shown for each photo")
    group.add_argument("--positive_dist_threshold", type=parser.positive_float, default=25,
                       help="a top-k image within this distance of the photo's true position (when its name gives "
                            "it) is framed green")
    group.add_argument("--out", type=str, default="geolocalized", help="folder of the pictures and geolocalize.json")
    group.add_argument("--on_bad_name", choices=["error", "skip"], default="error",
                       help="database file names not in the '@' format: stop, or skip them with a count")
    return arguments


def parse_arguments(argv=None):
    """The flags, with geolocalize.py's own checks of the photos and the model."""
    arguments = build_parser()
    args = parser.parse_arguments("geolocalize", argv, arguments)
    if args.resume_model is None:
        arguments.error("--resume_model is required: the weights of the model (e.g. logs/<run>/best_model.pth)")
    folders = [photo for photo in args.photos if os.path.isdir(photo)]
    if folders:
        arguments.error(f"{', '.join(folders)}: a folder, not a photo: give photo files (the database images go in "
                        f"--database_folder)")
    missing = [photo for photo in args.photos if not os.path.exists(photo)]  # a FIFO is refused when read
    if missing:
        arguments.error(f"no such photo: {', '.join(missing)}")
    return args


if __name__ == "__main__":  # --help and flag mistakes are answered here, before the heavy imports below
    ARGS = exit_on_user_error(parse_arguments)

import visualizations  # noqa: E402
from core import devices  # noqa: E402
from datasets.dataset_utils import find_images, read_utms  # noqa: E402
from datasets.image_check import make_image_check  # noqa: E402
from datasets.image_loading import ImageListDataset  # noqa: E402
from evaluation import descriptors as extraction  # noqa: E402
from model import network  # noqa: E402
from reranking import matchers  # noqa: E402
from reranking.features import FeatureStore  # noqa: E402
from retrieval import faiss_indexes  # noqa: E402
from training import checkpoints  # noqa: E402


def latitude_longitude(metadata):
    """(lat, lon) from fields 5/6 of the name, else from the UTM with the zone/letter of fields 3/4, else None."""
    try:
        return float(metadata.lat), float(metadata.lon)
    except ValueError:
        pass
    try:
        return tuple(float(x) for x in utm.to_latlon(metadata.utm_east, metadata.utm_north, int(metadata.zone),
                                                     metadata.letter))
    except (ValueError, utm.error.OutOfRangeError):
        return None


def position(path):
    """Position of an image named in the '@' format: {'utm': [east, north], 'latitude', 'longitude'} or None."""
    try:
        metadata = parse_image_name(path)
    except DatasetError:
        return None
    latlon = latitude_longitude(metadata)
    return {"utm": [metadata.utm_east, metadata.utm_north], "latitude": latlon[0] if latlon else None,
            "longitude": latlon[1] if latlon else None}


def as_text(place):
    if place["latitude"] is None:
        return f"UTM {place['utm'][0]:.1f} E, {place['utm'][1]:.1f} N"
    return f"{place['latitude']:.6f}, {place['longitude']:.6f}"


def geolocalize_photo(photo, predictions, database_paths, database_utms, args, verified_matches=None):
    """The estimate of one photo (the top-1's position), the spread of the top-k, the error when known; with
    verified_matches ({database index: count} of the re-ranked images), each top-k image's count."""
    predictions = predictions[predictions >= 0]  # an approximate --faiss_index may find fewer than k
    top_utms = database_utms[predictions]
    from_top1 = np.linalg.norm(top_utms - top_utms[0], axis=1)
    result = {"photo": photo, **position(database_paths[predictions[0]]), "spread_m": float(from_top1.max()),
              "top_k": [{"rank": rank, "path": database_paths[p], **position(database_paths[p]),
                         "distance_from_top1_m": float(d)}
                        for rank, (p, d) in enumerate(zip(predictions, from_top1), start=1)]}
    if verified_matches is not None:
        for item, p in zip(result["top_k"], predictions):
            item["verified_matches"] = int(verified_matches[p]) if p in verified_matches else None
    truth = position(photo)
    if truth is not None:
        result["true_position"] = truth
        result["error_m"] = float(np.linalg.norm(top_utms[0] - truth["utm"]))
        for item in result["top_k"]:
            item["distance_from_photo_m"] = float(np.linalg.norm(np.array(item["utm"]) - truth["utm"]))
    return result


def save_picture(result, args, name, top1_matches=None):
    """<out>/<name>: the photo next to its top-k, captioned with their distance from the photo (when known) or from
    the top-1; with top1_matches (re-ranking's points of the verified matches with the top-1), those below."""
    tiles = [visualizations.tile(result["photo"], "photo", visualizations.GREY)]
    for item in result["top_k"]:
        if "distance_from_photo_m" in result["top_k"][0]:
            distance = item["distance_from_photo_m"]
            color = visualizations.GREEN if distance <= args.positive_dist_threshold else visualizations.RED
            caption = f"#{item['rank']}  {distance:.0f} m"
        else:
            color, caption = visualizations.GREY, f"#{item['rank']}  {item['distance_from_top1_m']:.0f} m from #1"
        tiles.append(visualizations.tile(item["path"], caption, color))
    image = visualizations.row_image(tiles)
    if top1_matches is not None:
        image = visualizations.stack_rows([image, visualizations.matches_image(
            result["photo"], result["top_k"][0]["path"], *top1_matches,
            f"{len(top1_matches[0])} verified matches with #1 (re-ranking by {args.rerank})")])
    path = os.path.join(args.out, name)
    image.save(path, quality=90)
    return path


def report(result):
    lines = [f"{result['photo']}:", f"  estimated position: {as_text(result)} (top-1); spread of the top-"
                                     f"{len(result['top_k'])}: {result['spread_m']:.0f} m"]
    if "error_m" in result:
        lines.append(f"  true position (from its name): {as_text(result['true_position'])}; "
                     f"error of the estimate: {result['error_m']:.1f} m")
    for item in result["top_k"]:
        matches = "" if item.get("verified_matches") is None else f"  {item['verified_matches']:4d} matches"
        lines.append(f"  #{item['rank']}  {as_text(item)}  {item['distance_from_top1_m']:7.1f} m from #1{matches}  "
                     f"{item['path']}")
    return "\n".join(lines)


def geolocalize(args):
    """Returns one result per photo (see geolocalize_photo) and writes the pictures and geolocalize.json."""
    args.device = devices.resolve_device(args.device)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for level, note in parser.implicit_settings(args):
        logging.log(level, note)
    # with --on_bad_image skip (or --check_images), the images that cannot be read are left out with a warning
    image_check = make_image_check(args.check_images, args.on_bad_image, args.num_workers, test_set=True)
    if image_check is not None:
        args.photos = image_check(args.photos)  # (an error when none can be read)
    database_paths, database_utms, _ = read_utms(find_images(args.database_folder, image_check), args.on_bad_name)
    model = network.GeoLocalizationNet(**parser.model_options(args))
    checkpoints.load_model_weights(model, args.resume_model)
    model = model.to(args.device)
    inference, rerank = parser.inference_settings(args), parser.rerank_settings(args)
    database = ImageListDataset(database_paths, args.test_image_size, args.decode_on_gpu,
                                name=os.path.basename(os.path.normpath(args.database_folder)),
                                test_resize=args.test_resize)
    descriptors = extraction.dataset_descriptors(database, model, inference)
    photos = ImageListDataset(args.photos, args.test_image_size, args.decode_on_gpu, name="photos",
                              test_resize=args.test_resize)
    photos_descriptors = extraction.compute_descriptors(model, photos, args.device, args.infer_batch_size,
                                                        args.num_workers, args.eval_amp, args.channels_last,
                                                        description="photos descriptors")
    predictions = faiss_indexes.knn_search(descriptors, photos_descriptors,
                                           max(args.top_k, rerank.k) if rerank else args.top_k,
                                           **parser.index_settings(args).options())
    verified, top1_matches = [None] * len(args.photos), [None] * len(args.photos)
    if rerank:
        matcher = matchers.build_matcher(rerank.name, rerank.keypoints)
        reranking_result = matchers.rerank(
            matcher, rerank.name, predictions, rerank.k, FeatureStore(matcher, rerank, args.photos, "photos"),
            FeatureStore(matcher, rerank, database_paths, database.dataset_name, args.descriptors_cache))
        logging.info(f"Re-ranked by {rerank.name}@{rerank.k}: {reranking_result.ms_per_query:.0f} ms per photo")
        verified = [dict(zip(row[:rerank.k], counts))
                    for row, counts in zip(predictions, reranking_result.inliers)]
        predictions, top1_matches = reranking_result.predictions, reranking_result.top1_matches
    predictions = predictions[:, :args.top_k]
    os.makedirs(args.out, exist_ok=True)
    results, names = [], set()
    for index, (photo, photo_predictions) in enumerate(zip(args.photos, predictions)):
        result = geolocalize_photo(photo, photo_predictions, database_paths, database_utms, args, verified[index])
        name = f"{os.path.splitext(os.path.basename(photo))[0]}_top{args.top_k}.jpg"
        name = name if name not in names else f"{index}_{name}"  # two photos of the same name in two folders
        names.add(name)
        result["picture"] = save_picture(result, args, name, top1_matches[index])
        results.append(result)
    files.atomic_json_dump({"model": args.resume_model, "database_folder": args.database_folder,
                            "rerank": rerank and rerank.record(), "photos": results},
                           os.path.join(args.out, "geolocalize.json"))
    return results


def geolocalize_and_report(args):
    results = geolocalize(args)
    for result in results:
        print(report(result))
    print(f"Pictures and geolocalize.json written to {args.out}")
    return results


def main(argv=None):
    """geolocalize.py in Python: main(["--resume_model", ..., "photo.jpg"]) returns the results of the photos."""
    return geolocalize_and_report(parse_arguments(argv))


if __name__ == "__main__":
    exit_on_user_error(geolocalize_and_report, ARGS)

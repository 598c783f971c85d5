"""Reporting tools: dataset analysis, prediction CSV and pages, results tables, geo-localization of photos, making a
dataset from geo-tagged photos, downloading datasets from (local) archives."""

import csv
import glob
import json
import os
import shutil
import socket
import tarfile
import zipfile

import numpy as np
import pytest
import utm
from PIL import ExifTags, Image
from PIL.TiffImagePlugin import IFDRational

import analyze_dataset
import download_datasets
from evaluation import descriptors
from retrieval import faiss_indexes
from retrieval.recalls import compute_recalls
import geolocalize
import make_dataset
import visualizations
from conftest import run_script, tiny_training_args, train_in_process
from datasets.dataset_utils import DatasetError, find_images, parse_image_name, read_utms
from datasets.test_dataset import TestDataset as EvaluationSet  # not named Test*: pytest would collect it
from datasets.train_dataset import get_class_id_and_group_id


@pytest.fixture(scope="module")
def trained_run(synthetic_dataset, tmp_path_factory):
    """A real training run (one epoch of 3 iterations) with its prediction pictures."""
    tmp = str(tmp_path_factory.mktemp("reporting_run"))
    return train_in_process(*tiny_training_args(synthetic_dataset, tmp, "--num_preds_to_save", "2",
                                                "--save_dir", "tiny"))


@pytest.fixture(scope="module")
def eval_run(trained_run, synthetic_dataset):
    """eval.py of the trained run's model on the synthetic val and test sets (last_checkpoint.pth: best_model.pth is
    only written when an epoch's val R@1 is above 0)."""
    logs = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(trained_run))), "eval_logs")
    run_script("eval.py", "--resume_model", os.path.join(trained_run, "last_checkpoint.pth"), "--test_set_folder",
               os.path.join(synthetic_dataset, "val"), os.path.join(synthetic_dataset, "test"), "--pretrained", "none",
               "--device", "cpu", "--num_workers", "0", "--logs_root", logs, "--save_dir", "evals",
               "--num_preds_to_save", "2")
    (folder,) = glob.glob(os.path.join(logs, "evals", "*"))
    return folder


def read_csv(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def recalls_from_csv(rows, recall_values):
    """R@N from the rows of a predictions CSV: share of queries with a correct row of rank <= N, in percent."""
    queries = {row["query_index"] for row in rows}
    return [100 * len({r["query_index"] for r in rows if int(r["rank"]) <= n and r["correct"] == "1"}) / len(queries)
            for n in recall_values]


# ---------------------------------------------------------------- analyze_dataset

def test_analyze_dataset_synthetic(synthetic_dataset, tmp_path):
    out = str(tmp_path / "analysis")
    summary = analyze_dataset.main(["--dataset_folder", synthetic_dataset, "--out", out])
    for name in ("summary.md", "summary.json", "images_per_class.png", "headings.png", "capture_dates.png", "map.png",
                 "class_samples.jpg", "query_neighbours.jpg"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    with open(os.path.join(out, "summary.json")) as file:
        assert json.load(file) == summary
    expected_counts = {"train": "train", "val/database": "val/database", "val/queries": "val/queries",
                       "test/database": "test/database", "test/queries": "test/queries"}
    for key, folder in expected_counts.items():
        assert summary["images"][key] == len(find_images(os.path.join(synthetic_dataset, folder)))
    # The classes, counted independently from the file names with the CosPlace definition
    paths, utms, headings = read_utms(find_images(os.path.join(synthetic_dataset, "train")))
    class_ids = [get_class_id_and_group_id(e, n, h, 10, 30, 5, 2)[0] for (e, n), h in zip(utms, headings)]
    assert summary["classes"]["classes_total"] == len(set(class_ids)) == 40
    assert summary["classes"]["classes_kept"] == 40 and summary["classes"]["groups"] == 1
    assert summary["classes"]["images_in_kept_classes"] == 400
    assert summary["nearest_database"]["val"]["queries_with_positive"] == 12
    assert "| train | 400 |" in open(os.path.join(out, "summary.md")).read()


def test_analyze_dataset_class_flags(synthetic_dataset, tmp_path):
    """Classes of 10 images are all dropped with --min_images_per_class 11; 100 m cells merge the 50 m places."""
    summary = analyze_dataset.main(["--dataset_folder", synthetic_dataset, "--out", str(tmp_path / "a"),
                                    "--min_images_per_class", "11", "--M", "100"])
    classes = summary["classes"]
    assert classes["classes_total"] < 40 and classes["classes_kept"] == sum(classes["classes_per_group"])
    summary = analyze_dataset.main(["--dataset_folder", synthetic_dataset, "--out", str(tmp_path / "b"),
                                    "--min_images_per_class", "11"])
    assert summary["classes"]["classes_kept"] == 0 and summary["classes"]["groups"] == 0
    assert not os.path.exists(tmp_path / "b" / "class_samples.jpg")


def test_analyze_dataset_test_only_and_errors(synthetic_dataset, tmp_path):
    summary = analyze_dataset.main(["--test_set_folder", os.path.join(synthetic_dataset, "test"),
                                    "--out", str(tmp_path / "t")])
    assert set(summary["images"]) == {"test/database", "test/queries"} and "classes" not in summary
    with pytest.raises(DatasetError, match="No split found"):
        analyze_dataset.main(["--dataset_folder", str(tmp_path / "nothing"), "--out", str(tmp_path / "n")])


@pytest.mark.parametrize("order_flags, words", [
    ([], "in CosPlace's order, as they first appear in the sorted file list, --groups_order upstream"),
    (["--groups_order", "size"], "the largest first, --groups_order size")], ids=["upstream", "size"])
def test_analyze_dataset_says_the_groups_order(synthetic_dataset, tmp_path, order_flags, words):
    """The summary names the order of the groups that --groups_num keeps: 'the largest first' only with size."""
    out = tmp_path / "analysis"
    analyze_dataset.main(["--dataset_folder", synthetic_dataset, "--out", str(out), "--sample_classes", "1",
                          "--samples_per_class", "1", "--sample_queries", "1", *order_flags])
    assert f"- groups with kept classes: 1 ({words}; use --groups_num <= 1)" in (out / "summary.md").read_text()


def test_analyze_dataset_real_images(sf_xs_night_mini, tmp_path):
    summary = analyze_dataset.main(["--dataset_folder", sf_xs_night_mini, "--out", str(tmp_path / "real")])
    assert summary["images"]["train"] == len(find_images(os.path.join(sf_xs_night_mini, "train")))
    assert summary["classes"]["classes_kept"] > 0
    assert os.path.getsize(tmp_path / "real" / "class_samples.jpg") > 0


# ---------------------------------------------------------------- predictions CSV and summary page

def test_predictions_csv_matches_knn_search(synthetic_dataset, tmp_path):
    dataset = EvaluationSet(os.path.join(synthetic_dataset, "val"))
    rng = np.random.default_rng(0)
    descriptors = rng.standard_normal((len(dataset), 16)).astype(np.float32)
    predictions = faiss_indexes.knn_search(descriptors[:dataset.database_num], descriptors[dataset.database_num:], 5)
    path = visualizations.save_predictions_csv(predictions, dataset, str(tmp_path / "predictions.csv"))
    rows = read_csv(path)
    assert len(rows) == dataset.queries_num * 5
    for row in rows:
        query, rank = int(row["query_index"]), int(row["rank"])
        prediction = predictions[query][rank - 1]
        assert int(row["database_index"]) == prediction
        assert row["database_path"] == dataset.database_paths[prediction]
        assert row["query_path"] == dataset.queries_paths[query]
        distance = np.linalg.norm(dataset.database_utms[prediction] - dataset.queries_utms[query])
        assert float(row["distance_m"]) == pytest.approx(distance, abs=0.005)
        assert (row["correct"] == "1") == (prediction in dataset.get_positives()[query])
    expected = compute_recalls(predictions, dataset.get_positives(), [1, 5])
    assert recalls_from_csv(rows, [1, 5]) == pytest.approx(expected)
    predictions[0, 3:] = -1  # an approximate index that found only 3 neighbours: no row for the missing ones
    rows = read_csv(visualizations.save_predictions_csv(predictions, dataset, str(tmp_path / "partial.csv")))
    assert [int(row["rank"]) for row in rows if row["query_index"] == "0"] == [1, 2, 3]


def test_summary_page_picks_farthest_failures(synthetic_dataset, tmp_path):
    distances = np.array([3.0, 400.0, 30.0, 0.5, 120.0])
    failures, successes = visualizations.failures_and_successes(distances, 25, 2, 5)
    assert list(failures) == [1, 4] and list(successes) == [0, 3]
    dataset = EvaluationSet(os.path.join(synthetic_dataset, "test"))
    predictions = np.tile(np.arange(3), (dataset.queries_num, 1))
    png, page = visualizations.save_summary_page(predictions, dataset, str(tmp_path), 3)
    assert Image.open(png).size[0] > 0
    html = open(page).read()
    sources = [part.split('"')[0] for part in html.split('src="')[1:]]
    assert sources and all(os.path.isfile(os.path.join(tmp_path, source)) for source in sources)


def test_eval_and_train_write_predictions(trained_run, eval_run):
    with open(os.path.join(eval_run, "results.json")) as file:
        results = json.load(file)
    assert len(results["test_sets"]) == 2
    for folder, recalls in results["test_sets"].items():
        subfolder = os.path.join(eval_run, "_".join(os.path.normpath(folder).split(os.sep)[-2:]))
        rows = read_csv(os.path.join(subfolder, "predictions.csv"))
        values = [int(key[2:]) for key in recalls]
        assert recalls_from_csv(rows, values) == pytest.approx([recalls[f"R@{n}"] for n in values])
        assert {int(row["rank"]) for row in rows} == set(range(1, max(values) + 1))
        for name in ("summary.png", "summary.html"):
            assert os.path.isfile(os.path.join(subfolder, name))
        assert len(os.listdir(os.path.join(subfolder, "preds"))) == 12
    with open(os.path.join(trained_run, "test_results.json")) as file:
        test_results = json.load(file)
    rows = read_csv(os.path.join(trained_run, "predictions.csv"))
    assert recalls_from_csv(rows, [1, 5]) == pytest.approx([test_results["R@1"], test_results["R@5"]])
    assert os.path.isfile(os.path.join(trained_run, "summary.html"))


# ---------------------------------------------------------------- geolocalize

def test_geolocalize_database_image_finds_itself(trained_run, synthetic_dataset, tmp_path, monkeypatch):
    database = os.path.join(synthetic_dataset, "test", "database")
    photo = find_images(database)[5]
    renamed = str(tmp_path / "my_photo.jpg")  # a photo without a position in its name
    shutil.copy(photo, renamed)
    calls = []  # the datasets whose descriptors are computed
    compute = descriptors.compute_descriptors
    monkeypatch.setattr(descriptors, "compute_descriptors", lambda *a, **k: calls.append(a[1]) or compute(*a, **k))
    argv = ["--resume_model", os.path.join(trained_run, "last_checkpoint.pth"), "--database_folder", database, photo,
            renamed, "--top_k", "3", "--device", "cpu", "--num_workers", "0",
            "--descriptors_cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    results = geolocalize.main(argv)
    top1 = results[0]["top_k"][0]
    assert top1["path"] == photo and top1["distance_from_top1_m"] == 0 and results[0]["error_m"] == 0
    metadata = parse_image_name(photo)
    assert (results[0]["latitude"], results[0]["longitude"]) == (float(metadata.lat), float(metadata.lon))
    assert results[1]["top_k"][0]["path"] == photo and "error_m" not in results[1]
    assert results[0]["spread_m"] == max(item["distance_from_top1_m"] for item in results[0]["top_k"])
    assert all(os.path.isfile(result["picture"]) for result in results)
    assert os.path.isfile(tmp_path / "out" / "geolocalize.json")
    assert len(calls) == 2 and len(calls[0]) == len(find_images(database))  # database, then photos
    # Second run: the database descriptors come from the cache; another --test_image_size is another cache entry
    calls.clear()
    geolocalize.main(argv)
    assert len(calls) == 1 and len(os.listdir(tmp_path / "cache")) == 1
    geolocalize.main(argv + ["--test_image_size", "32"])
    assert len(os.listdir(tmp_path / "cache")) == 2


def test_geolocalize_latitude_from_utm_when_names_lack_it():
    metadata = parse_image_name("@549100.00@4180200.00@10@S@@@pano@@0@@@@@@.jpg")
    latitude, longitude = geolocalize.latitude_longitude(metadata)
    assert (latitude, longitude) == pytest.approx(utm.to_latlon(549100.0, 4180200.0, 10, "S"))
    assert geolocalize.latitude_longitude(parse_image_name("@549100.00@4180200.00@@@@@.jpg")) is None


# ---------------------------------------------------------------- make_dataset

PLACES = {"sf.jpg": (37.774929, -122.419416, 123.5), "sydney.jpg": (-33.856784, 151.215297, None),
          "tokyo.jpg": (35.659500, 139.700500, 10.0)}


def to_dms(value):
    value = abs(value)
    degrees_, minutes = int(value), int((value - int(value)) * 60)
    seconds = round((value - degrees_ - minutes / 60) * 3600 * 10000)
    return IFDRational(degrees_, 1), IFDRational(minutes, 1), IFDRational(seconds, 10000)


def write_photo(path, latitude=None, longitude=None, heading=None, taken="2019:07:14 18:22:01"):
    image = Image.new("RGB", (48, 32), (120, 60, 200))
    exif = image.getexif()
    if latitude is not None:
        gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
        gps[ExifTags.GPS.GPSLatitudeRef] = "N" if latitude >= 0 else "S"
        gps[ExifTags.GPS.GPSLatitude] = to_dms(latitude)
        gps[ExifTags.GPS.GPSLongitudeRef] = "E" if longitude >= 0 else "W"
        gps[ExifTags.GPS.GPSLongitude] = to_dms(longitude)
        if heading is not None:
            gps[ExifTags.GPS.GPSImgDirection] = IFDRational(int(heading * 10), 10)
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] = taken
    image.save(path, exif=exif)


def assert_round_trip(name, latitude, longitude):
    """The UTM of the name is the photo's within a centimetre, and converts back to its latitude/longitude."""
    metadata = parse_image_name(name)
    east, north, zone, letter = utm.from_latlon(latitude, longitude)
    assert (metadata.zone, metadata.letter) == (str(zone), letter)
    assert abs(metadata.utm_east - east) <= 0.01 and abs(metadata.utm_north - north) <= 0.01
    back_latitude, back_longitude = utm.to_latlon(metadata.utm_east, metadata.utm_north, zone, letter)
    metres_per_degree = 111_320
    assert abs(back_latitude - latitude) * metres_per_degree < 0.01
    assert abs(back_longitude - longitude) * metres_per_degree * np.cos(np.radians(latitude)) < 0.01


def test_make_dataset_from_exif(tmp_path):
    images = tmp_path / "photos"
    os.makedirs(images / "sub")
    for name, (latitude, longitude, heading) in PLACES.items():
        write_photo(str(images / "sub" / name), latitude, longitude, heading)
    write_photo(str(images / "no_gps.jpg"))
    (images / "broken.jpg").write_bytes(b"not a jpeg at all")
    out = str(tmp_path / "dataset")
    outcomes = make_dataset.main(["--images", str(images), "--out", out])
    written = {os.path.basename(source): name for source, name, _ in outcomes if name}
    assert set(written) == set(PLACES)
    for source, name in written.items():
        latitude, longitude, heading = PLACES[source]
        assert_round_trip(name, latitude, longitude)
        metadata = parse_image_name(os.path.join(out, name))
        assert metadata.heading == (heading or 0) and metadata.date == "201907"
    report = {os.path.basename(row["source"]): row["skipped_because"]
              for row in read_csv(os.path.join(out, make_dataset.REPORT_NAME))}
    assert report["no_gps.jpg"].startswith("no GPS") and report["broken.jpg"].startswith("unreadable")
    paths, _, _ = read_utms(find_images(out))  # a folder train.py / eval.py can read
    assert len(paths) == 3
    with pytest.raises(make_dataset.MakeDatasetError, match="not empty"):
        make_dataset.main(["--images", str(images), "--out", out])


def test_make_dataset_from_csv_with_links(tmp_path):
    images = tmp_path / "photos"
    os.makedirs(images)
    for name in ("a.jpg", "b.jpg", "c.jpg", "unlisted.jpg"):
        write_photo(str(images / name))  # no GPS in the EXIF: the CSV gives the positions
    (tmp_path / "positions.csv").write_text("path,latitude,longitude,heading\n"
                                            "a.jpg,37.774929,-122.419416,90\n"
                                            f"{images / 'b.jpg'},-33.856784,151.215297,\n"
                                            "c.jpg,abc,151.2,\n"
                                            "missing.jpg,10,10,\n")
    out = str(tmp_path / "dataset")
    outcomes = make_dataset.main(["--images", str(images), "--csv", str(tmp_path / "positions.csv"), "--out", out,
                                  "--link"])
    written = {os.path.basename(source): name for source, name, _ in outcomes if name}
    assert set(written) == {"a.jpg", "b.jpg"}
    assert_round_trip(written["a.jpg"], 37.774929, -122.419416)
    assert_round_trip(written["b.jpg"], -33.856784, 151.215297)
    assert parse_image_name(written["a.jpg"]).heading == 90
    assert os.path.islink(os.path.join(out, written["a.jpg"]))
    reasons = [reason for _, name, reason in outcomes if not name]
    assert any(r.startswith("bad CSV row") for r in reasons)
    assert any(r.startswith("listed in the CSV but not found") for r in reasons)
    assert sum(r == "not listed in the CSV" for r in reasons) == 2  # c.jpg (bad row) and unlisted.jpg
    (tmp_path / "bad.csv").write_text("file,lat,lon\na.jpg,1,2\n")
    with pytest.raises(make_dataset.MakeDatasetError, match="missing: latitude, longitude, path"):
        make_dataset.main(["--images", str(images), "--csv", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "x")])


# ---------------------------------------------------------------- download_datasets

def make_archives(synthetic_dataset, folder):
    """sf_xs.zip with a top folder sf_xs/ (as the published one), tokyo_xs.tar.gz with test/ at its top."""
    sf_zip = os.path.join(folder, "sf_xs.zip")
    with zipfile.ZipFile(sf_zip, "w") as archive:
        for path in find_images(os.path.join(synthetic_dataset, "train"))[:20] + find_images(
                os.path.join(synthetic_dataset, "val")) + find_images(os.path.join(synthetic_dataset, "test")):
            archive.write(path, os.path.join("sf_xs", os.path.relpath(path, synthetic_dataset)))
    tokyo_tar = os.path.join(folder, "tokyo_xs.tar.gz")
    with tarfile.open(tokyo_tar, "w:gz") as archive:
        archive.add(os.path.join(synthetic_dataset, "test"), "test")
    return sf_zip, tokyo_tar


def test_download_datasets_from_local_archives(synthetic_dataset, tmp_path, capsys):
    sf_zip, tokyo_tar = make_archives(synthetic_dataset, str(tmp_path))
    out = str(tmp_path / "data")
    argv = ["--datasets", "sf_xs", "tokyo_xs", "--out", out, "--archive", f"sf_xs={sf_zip}", f"tokyo_xs={tokyo_tar}"]
    download_datasets.main(argv)
    assert len(find_images(os.path.join(out, "sf_xs", "train"))) == 20
    for split in ("val", "test"):
        for part in ("database", "queries"):
            assert len(find_images(os.path.join(out, "sf_xs", split, part))) == len(
                find_images(os.path.join(synthetic_dataset, split, part)))
    assert len(find_images(os.path.join(out, "tokyo_xs", "test", "queries"))) == 12
    assert sorted(os.listdir(out)) == ["sf_xs", "tokyo_xs"]  # no archive or staging folder left
    assert os.path.isfile(sf_zip) and os.path.isfile(tokyo_tar)  # the user's archives are kept
    capsys.readouterr()
    before = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(out, "**"), recursive=True)}
    download_datasets.main(argv)
    assert capsys.readouterr().out.count("already complete") == 2
    assert before == {p: os.path.getmtime(p) for p in glob.glob(os.path.join(out, "**"), recursive=True)}


def test_download_datasets_refuses_bad_archives(synthetic_dataset, tmp_path):
    out = str(tmp_path / "data")
    (tmp_path / "page.zip").write_text("<html>Google Drive - quota exceeded</html>")
    with pytest.raises(download_datasets.DownloadError, match="neither a zip nor a tar"):
        download_datasets.main(["--datasets", "sf_xs", "--out", out, "--archive", f"sf_xs={tmp_path / 'page.zip'}"])
    _, tokyo_tar = make_archives(synthetic_dataset, str(tmp_path))
    # Tokyo-XS given as SF-XS
    with pytest.raises(download_datasets.DownloadError, match="no folder with train/, val/, test/"):
        download_datasets.main(["--datasets", "sf_xs", "--out", out, "--archive", f"sf_xs={tokyo_tar}"])
    with pytest.raises(download_datasets.DownloadError, match="sha256"):
        download_datasets.main(["--datasets", "tokyo_xs", "--out", out, "--archive", f"tokyo_xs={tokyo_tar}",
                                "--sha256", "tokyo_xs=" + "0" * 64])
    assert not os.path.exists(os.path.join(out, "sf_xs")) and not os.path.exists(os.path.join(out, "tokyo_xs"))
    with pytest.raises(download_datasets.DownloadError, match="unknown dataset"):
        download_datasets.main(["--out", out, "--url", "gsv=https://example.org/gsv.zip"])
    os.makedirs(os.path.join(out, "tokyo_xs", "test"))
    with pytest.raises(download_datasets.DownloadError, match="exists but is incomplete"):
        download_datasets.main(["--datasets", "tokyo_xs", "--out", out, "--archive", f"tokyo_xs={tokyo_tar}"])


@pytest.mark.parametrize("url, host", [("https://example.org/sf_xs.zip", "example.org"),
                                       ("https://drive.google.com/uc?id=0", "drive.google.com")])
def test_download_without_dns_blames_the_network(tmp_path, monkeypatch, url, host):
    """A host that cannot be resolved is reported as such, not as a wrong link (urllib's or gdown's error)."""
    def no_dns(*args, **kwargs):
        raise socket.gaierror(-3, "Temporary failure in name resolution")
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(download_datasets.DownloadError, match=f"^Cannot resolve {host} .*no network") as error:
        download_datasets.download(url, str(tmp_path / "archive.zip"))
    assert "\n" not in str(error.value) and "moved" not in str(error.value)
    assert not os.listdir(tmp_path)

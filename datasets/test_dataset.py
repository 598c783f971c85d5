"""A test set: database and queries, with the positives of each query (database images within a radius).

A test folder holds database/ and one or more query folders: every folder beside database/ that holds images is a
query set of its own (Tokyo-XS: queries/ and night/), queries/ or queries_v1/ first, then the others by name;
--query_folders NAME ... picks some. Each query folder is one TestDataset (one row of results), labelled
'tokyo_xs/test' for the usual query folder and 'tokyo_xs/test/night' for another.
"""

import logging
import os

from sklearn.neighbors import NearestNeighbors

from core import files
from datasets.dataset_utils import (IMAGE_EXTENSIONS, QUERY_FOLDER_NAMES, DatasetError, find_images,
                                    find_queries_folder, read_utms)
from datasets.image_loading import ImageListDataset


def holds_images(folder):
    return any(name.lower().endswith(IMAGE_EXTENSIONS) for _, _, names in os.walk(folder) for name in names)


def query_folders(dataset_folder, names=None):
    """The query folders of a test folder: the named ones (each must exist), else every folder beside database/
    that holds images, queries/ and queries_v1/ first, then the others sorted by name."""
    if names:
        missing = [name for name in names if not os.path.isdir(os.path.join(dataset_folder, name))]
        if missing:
            raise DatasetError(f"{dataset_folder} has no folder {', '.join(missing)} (--query_folders): its folders "
                               f"are {', '.join(sorted(os.listdir(dataset_folder)))}")
        return [os.path.join(dataset_folder, name) for name in names]
    if not os.path.isdir(dataset_folder):
        what = "is a file, not a folder" if os.path.exists(dataset_folder) else "does not exist"
        raise DatasetError(f"Test set folder {dataset_folder} {what}: a test set is a folder that holds database/ "
                           f"and queries/")
    found = sorted((name for name in os.listdir(dataset_folder) if name != "database"
                    and os.path.isdir(os.path.join(dataset_folder, name))
                    and holds_images(os.path.join(dataset_folder, name))),
                   key=lambda name: (name not in QUERY_FOLDER_NAMES, name))
    if not found:  # the usual error: no queries folder, or one without images (TestDataset)
        return [find_queries_folder(dataset_folder)]
    return [os.path.join(dataset_folder, name) for name in found]


def query_set_label(dataset_folder, queries_folder):
    """'tokyo_xs/test' for the usual query folder (queries/, queries_v1/), 'tokyo_xs/test/night' for another."""
    name = os.path.basename(os.path.normpath(queries_folder))
    return files.test_set_label(dataset_folder) + ("" if name in QUERY_FOLDER_NAMES else f"/{name}")


class TestDataset(ImageListDataset):
    """Items 0..database_num-1 are database images, then the queries. Returns (uint8 image, index), resized as
    image_size and test_resize say (ImageListDataset). Only UTM east/north of the names are read, so names too
    short to have a heading are accepted (dataset_utils.parse_image_name). queries_folder: one of the test folder's
    query folders (query_folders); by default queries/ or queries_v1/."""
    __test__ = False  # a dataset, not a pytest test class

    def __init__(self, dataset_folder, positive_dist_threshold=25, image_size=None, on_bad_name="error",
                 image_check=None, decode_on_gpu=False, test_resize="shorter_side", queries_folder=None):
        self.dataset_folder = dataset_folder
        database_folder = os.path.join(dataset_folder, "database")
        if not os.path.isdir(database_folder):
            raise DatasetError(f"{dataset_folder} has no database/ folder: a test set needs database/ and queries/")
        self.queries_folder = queries_folder = queries_folder or find_queries_folder(dataset_folder)
        self.label = query_set_label(dataset_folder, queries_folder)
        self.database_paths, self.database_utms, _ = read_utms(find_images(database_folder, image_check), on_bad_name)
        self.queries_paths, self.queries_utms, _ = read_utms(find_images(queries_folder, image_check), on_bad_name)
        super().__init__(self.database_paths + self.queries_paths, image_size, decode_on_gpu,
                         name=self.label.split("/", 1)[-1].replace("/", "_"), test_resize=test_resize)
        self.database_num, self.queries_num = len(self.database_paths), len(self.queries_paths)
        self.positive_dist_threshold = positive_dist_threshold
        # A KD-tree over the database positions: positives of every query in O(log n) each
        knn = NearestNeighbors(algorithm="kd_tree", n_jobs=1).fit(self.database_utms)
        self.positives_per_query = knn.radius_neighbors(self.queries_utms, radius=positive_dist_threshold,
                                                        return_distance=False)
        self.queries_without_positives = int(sum(len(p) == 0 for p in self.positives_per_query))
        if self.queries_without_positives == self.queries_num:
            logging.warning(f"{dataset_folder}: no query has a database image within {positive_dist_threshold} m: "
                            f"every recall will be 0. Are database and queries from the same area (and UTM zone)? "
                            f"Is --positive_dist_threshold right?")
        elif self.queries_without_positives:
            logging.info(f"{self.dataset_name}: {self.queries_without_positives} of {self.queries_num} queries have "
                         f"no database image within {positive_dist_threshold} m (they count as misses)")

    def __repr__(self):
        return f"< {self.dataset_name} - #q: {self.queries_num}; #db: {self.database_num} >"

    def get_positives(self):
        return self.positives_per_query


def query_sets(folder, names=None, image_check=None, **options):
    """One TestDataset per query folder of a test folder (query_folders; names: --query_folders), each with the
    TestDataset options given (parser.test_dataset_options)."""
    return [TestDataset(folder, image_check=image_check, queries_folder=queries_folder, **options)
            for queries_folder in query_folders(folder, names)]

"""A test set: database and queries, with the positives of each query (database images within a radius)."""

import logging
import os

from sklearn.neighbors import NearestNeighbors

from datasets.dataset_utils import DatasetError, find_images, find_queries_folder, read_utms
from datasets.image_loading import ImageListDataset


class TestDataset(ImageListDataset):
    """Items 0..database_num-1 are database images, then the queries. Returns (uint8 image, index), resized as
    image_size and test_resize say (ImageListDataset). Only UTM east/north of the names are read, so names too
    short to have a heading are accepted (dataset_utils.parse_image_name)."""
    __test__ = False  # a dataset, not a pytest test class

    def __init__(self, dataset_folder, positive_dist_threshold=25, image_size=None, on_bad_name="error",
                 image_check=None, decode_on_gpu=False, test_resize="shorter_side"):
        self.dataset_folder = dataset_folder
        database_folder = os.path.join(dataset_folder, "database")
        if not os.path.isdir(database_folder):
            raise DatasetError(f"{dataset_folder} has no database/ folder: a test set needs database/ and queries/")
        queries_folder = find_queries_folder(dataset_folder)
        self.database_paths, self.database_utms, _ = read_utms(find_images(database_folder, image_check), on_bad_name)
        self.queries_paths, self.queries_utms, _ = read_utms(find_images(queries_folder, image_check), on_bad_name)
        super().__init__(self.database_paths + self.queries_paths, image_size, decode_on_gpu,
                         name=os.path.basename(os.path.normpath(dataset_folder)), test_resize=test_resize)
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

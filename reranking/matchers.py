"""Second stage of retrieval: the top-K database images of each query re-ranked by the number of matches of local
features between the query and each of them that a RANSAC homography verifies (ties keep the retrieval order).
MATCHERS maps --rerank to a matcher class: "sift" needs nothing but kornia (offline); the learned ones use kornia's
pretrained weights, downloaded once into the torch hub cache, and say in one line what to do when they cannot be.

The local features of each image are computed once per evaluation, only for the images that some top-K holds
(reranking/features.FeatureStore), and kept in a cache file when one is given, so that another model or another K reuses them."""

import contextlib
import functools
import io
import os
import pickle
import socket
import time
import urllib.parse
import warnings
from dataclasses import dataclass

import kornia
import kornia.feature as KF
import numpy as np
import torch
from tqdm import tqdm

from core.errors import UserError

RANSAC_THRESHOLD_PX = 2.5  # reprojection error of an inlier, in pixels of the images the matcher sees
RANSAC_SEED = 0  # every pair is verified with the same random stream: results repeat, whatever the order
MIN_MATCHES = 4  # a homography needs 4 correspondences
FEATURES_CACHE_VERSION = 2  # 2: float16 descriptors


class WeightsUnavailableError(UserError, OSError):
    """The pretrained weights of a learned matcher cannot be downloaded (no internet) and are not in the cache."""


def internet_reachable(host, timeout=3):
    """Whether host accepts an HTTPS connection within timeout seconds (offline: False at once)."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def quiet_single_attempt_downloads():
    """Offline, kornia would still try each source of a missing weights file three times, with pauses and a warning
    each (seconds, up to a minute): one silent attempt per source still loads a file already in the cache."""
    download = kornia.core.download
    attempts = getattr(download, "_MAX_ATTEMPTS", 1)  # a private constant (kornia 0.9): without it, only slower
    download._MAX_ATTEMPTS = 1
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        download._MAX_ATTEMPTS = attempts


def pretrained(what, build, rerank_name):
    """build() (a kornia module that loads its weights from the torch hub cache, downloading them when missing), or
    one line saying what to do when they are neither in the cache nor downloadable; offline, without kornia's
    retries."""
    host = urllib.parse.urlsplit(kornia.core.download.hf_url("kornia", "weights")).hostname  # kornia's first source
    online = internet_reachable(host)
    checkpoints = os.path.join(torch.hub.get_dir(), "checkpoints")
    unloadable = []
    try:
        with contextlib.nullcontext() if online else quiet_single_attempt_downloads(), \
                failed_cache_files(unloadable):
            return build()
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:  # kornia wraps what each source
        # raised in a RuntimeError; a weights file that is in the cache but cannot be loaded is not a missing one
        damaged = [path for path in dict.fromkeys(unloadable) if os.path.isfile(path)]
        if damaged:
            path = damaged[-1]
            raise WeightsUnavailableError(
                f"--rerank {rerank_name}: the weights file of {what}, {path} ({os.path.getsize(path)} bytes), is "
                f"damaged or truncated and cannot be loaded: delete it so that it is downloaded again (with "
                f"internet), or copy a good copy there from a machine where it was downloaded, or use --rerank "
                f"sift, which needs no weights") from error
        reason = f"no connection to {host}" if not online else " ".join(str(error).split())[:200]
        raise WeightsUnavailableError(
            f"--rerank {rerank_name}: the pretrained weights of {what} are not in {checkpoints} and cannot be "
            f"downloaded ({reason}): connect to the internet once (they are then kept there), or copy that folder "
            f"from a machine where they were downloaded, or use --rerank sift, which needs no weights") from error


@contextlib.contextmanager
def failed_cache_files(paths):
    """Appends to paths the cache file of every torch.hub.load_state_dict_from_url call made inside that fails
    (kornia loads its weights through it once they are in the cache, whatever it does to download them), resolved
    as torch resolves it: <model_dir or hub dir/checkpoints>/<file_name or the URL's last segment>."""
    load = torch.hub.load_state_dict_from_url

    def recording_load(url, model_dir=None, *args, **kwargs):
        try:
            return load(url, model_dir, *args, **kwargs)
        except Exception:
            file_name = kwargs.get("file_name") or os.path.basename(urllib.parse.urlsplit(url).path)
            paths.append(os.path.join(model_dir or os.path.join(torch.hub.get_dir(), "checkpoints"), file_name))
            raise
    torch.hub.load_state_dict_from_url = recording_load
    try:
        yield paths
    finally:
        torch.hub.load_state_dict_from_url = load


def grayscale(image):
    """uint8 [3, H, W] -> float [1, 1, H, W] in [0, 1]."""
    return kornia.color.rgb_to_grayscale(image[None].float() / 255)


def compact(descriptors):
    """A descriptors tensor as stored in the features (and their cache): float16, half the size (1024 SIFT
    descriptors: 256 KB an image); RootSIFT and DISK descriptors are unit vectors, rounded by less than 1e-3."""
    return descriptors.half().numpy()


def descriptors_of(features):
    return torch.from_numpy(features["descriptors"]).float()


def verified_matches(points0, points1):
    """(inlier count, inlier points0 [M, 2], inlier points1 [M, 2]) of the correspondences points0[i] <-> points1[i]
    under the homography that RANSAC finds (seeded, so a pair always gives the same count)."""
    points0, points1 = torch.as_tensor(points0, dtype=torch.float32), torch.as_tensor(points1, dtype=torch.float32)
    if len(points0) < MIN_MATCHES:
        return 0, points0[:0].numpy(), points1[:0].numpy()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANSAC_SEED)
        _, inliers = kornia.geometry.ransac.RANSAC("homography", inl_th=RANSAC_THRESHOLD_PX)(points0, points1)
    return int(inliers.sum()), points0[inliers].numpy(), points1[inliers].numpy()


class Matcher(torch.nn.Module):
    """A local-feature matcher: features() of one image (a dict of numpy arrays, cached by FeatureStore, with its
    "keypoints" [N, 2] in pixels), correspondences() between a query's features and each candidate's; the score of a
    candidate is the number of its correspondences that verified_matches keeps."""

    def __init__(self, max_keypoints):
        super().__init__()
        self.max_keypoints = max_keypoints

    @torch.inference_mode()
    def verify(self, query, candidates):
        """[(inlier count, query points, candidate points)] of each candidate."""
        return [verified_matches(*pair) for pair in self.correspondences(query, candidates)]


class SiftMatcher(Matcher):
    """SIFT (kornia: difference-of-Gaussians keypoints, upright RootSIFT descriptors; Street View images are upright),
    mutual nearest neighbours that pass Lowe's ratio test, RANSAC homography. Needs no weights."""
    RATIO = 0.9

    def __init__(self, max_keypoints):
        super().__init__(max_keypoints)
        config = {**kornia.feature.integrated.get_default_detector_config(), "up_levels": 0, "pyramid_levels": 3}
        self.sift = KF.SIFTFeature(num_features=max_keypoints, upright=True, rootsift=True, config=config)

    @torch.inference_mode()
    def features(self, image):
        lafs, _, descriptors = self.sift(grayscale(image))  # one image at a time: kornia's detector takes no batch
        return {"keypoints": KF.get_laf_center(lafs)[0].numpy(), "descriptors": compact(descriptors[0])}

    def correspondences(self, query, candidates):
        return descriptor_pairs(query, candidates, lambda d0, d1: KF.match_smnn(d0, d1, self.RATIO)[1])


def descriptor_pairs(query, candidates, match):
    """[(query points, candidate points)] of the index pairs [M, 2] that match(query descriptors, candidate
    descriptors) returns for each candidate."""
    pairs = []
    for candidate in candidates:
        indices = match(descriptors_of(query), descriptors_of(candidate)).numpy()
        pairs.append((query["keypoints"][indices[:, 0]], candidate["keypoints"][indices[:, 1]]))
    return pairs


class XFeatMatcher(Matcher):
    """XFeat (Potje et al., CVPR 2024; kornia, weights downloaded once): keypoints and 64-D descriptors from a CNN
    light enough for a CPU, matched as mutual nearest neighbours of cosine similarity above MIN_COSINE (the XFeat
    authors' threshold: fewer outliers, a faster RANSAC), RANSAC homography."""
    rerank_name = "xfeat"
    MIN_COSINE = 0.82

    def __init__(self, max_keypoints):
        super().__init__(max_keypoints)
        self.xfeat = pretrained("XFeat", lambda: KF.XFeat.from_pretrained(top_k=max_keypoints),
                                self.rerank_name).eval()

    @torch.inference_mode()
    def features(self, image):
        found = self.xfeat.detectAndCompute(image[None].float() / 255, top_k=self.max_keypoints)[0]
        return {"keypoints": found["keypoints"].numpy(), "descriptors": compact(found["descriptors"])}

    def correspondences(self, query, candidates):
        def match(descriptors0, descriptors1):
            distances, indices = KF.match_mnn(descriptors0, descriptors1)  # unit vectors: |d0 - d1|^2 = 2 - 2 cos
            return indices[distances[:, 0] ** 2 <= 2 - 2 * self.MIN_COSINE]
        return descriptor_pairs(query, candidates, match)


class XFeatLighterGlueMatcher(XFeatMatcher):
    """XFeat's keypoints and descriptors matched by LighterGlue, the LightGlue trained for XFeat (kornia, weights
    downloaded once), RANSAC homography."""
    rerank_name = "xfeat_lighterglue"

    def __init__(self, max_keypoints):
        super().__init__(max_keypoints)
        self.lighterglue = pretrained("LighterGlue (XFeat)", lambda: KF.LightGlue("xfeat"), self.rerank_name).eval()

    @torch.inference_mode()
    def correspondences(self, query, candidates):
        def image(features):
            return {"keypoints": torch.from_numpy(features["keypoints"])[None],
                    "descriptors": descriptors_of(features)[None],
                    "image_size": torch.tensor(features["image_size"][::-1].copy())[None]}  # (width, height)
        pairs = []
        for candidate in candidates:
            indices = self.lighterglue({"image0": image(query), "image1": image(candidate)})["matches"][0].numpy()
            pairs.append((query["keypoints"][indices[:, 0]], candidate["keypoints"][indices[:, 1]]))
        return pairs


class DiskLightGlueMatcher(Matcher):
    """DISK keypoints and descriptors, matched by LightGlue (kornia; weights downloaded once), RANSAC homography."""

    def __init__(self, max_keypoints):
        super().__init__(max_keypoints)
        self.disk = pretrained("DISK", lambda: KF.DISK.from_pretrained("depth"), "disk_lightglue")
        self.lightglue = pretrained("LightGlue (DISK)", lambda: KF.LightGlueMatcher("disk"), "disk_lightglue").eval()

    @torch.inference_mode()
    def features(self, image):
        found = self.disk(image[None].float() / 255, self.max_keypoints, pad_if_not_divisible=True)[0]
        return {"keypoints": found.keypoints.numpy(), "descriptors": compact(found.descriptors)}

    def correspondences(self, query, candidates):
        def lafs(keypoints):
            keypoints = torch.from_numpy(keypoints)[None]
            return KF.laf_from_center_scale_ori(keypoints, torch.ones(1, len(keypoints[0]), 1, 1))
        pairs = []
        for candidate in candidates:
            _, indices = self.lightglue(descriptors_of(query), descriptors_of(candidate), lafs(query["keypoints"]),
                                        lafs(candidate["keypoints"]), hw1=tuple(query["image_size"]),
                                        hw2=tuple(candidate["image_size"]))
            indices = indices.numpy()
            pairs.append((query["keypoints"][indices[:, 0]], candidate["keypoints"][indices[:, 1]]))
        return pairs


class LoftrMatcher(Matcher):
    """LoFTR (kornia, outdoor weights downloaded once): dense detector-free matching of a query with all its
    candidates of the same size in one batch, the max_keypoints most confident correspondences kept per pair,
    RANSAC homography. Its features are the grayscale image itself, flattened (the cache concatenates the features of
    images of any size; FeatureStore adds each one's image_size)."""

    def __init__(self, max_keypoints):
        super().__init__(max_keypoints)
        self.loftr = pretrained("LoFTR (outdoor)", lambda: KF.LoFTR(pretrained="outdoor"), "loftr").eval()

    @torch.inference_mode()
    def features(self, image):
        return {"image": (grayscale(image)[0, 0] * 255).round().to(torch.uint8).flatten().numpy()}

    def correspondences(self, query, candidates):
        pairs = [None] * len(candidates)
        by_size = {}
        for i, candidate in enumerate(candidates):
            by_size.setdefault(tuple(candidate["image_size"]), []).append(i)
        as_batch = lambda features: torch.from_numpy(np.stack(
            [f["image"].reshape(f["image_size"]) for f in features]))[:, None].float() / 255
        for indices in by_size.values():
            found = self.loftr({"image0": as_batch([query] * len(indices)),
                                "image1": as_batch([candidates[i] for i in indices])})
            for position, i in enumerate(indices):
                pair = found["batch_indexes"] == position
                best = torch.argsort(found["confidence"][pair], descending=True)[:self.max_keypoints]
                pairs[i] = (found["keypoints0"][pair][best].numpy(), found["keypoints1"][pair][best].numpy())
        return pairs


MATCHERS = {"sift": SiftMatcher, "xfeat": XFeatMatcher, "xfeat_lighterglue": XFeatLighterGlueMatcher,
            "disk_lightglue": DiskLightGlueMatcher, "loftr": LoftrMatcher}


@functools.lru_cache(maxsize=None)
def build_matcher(name, max_keypoints):
    """The matcher of --rerank name, built once per process (a script can build it first, so that unavailable
    weights stop it before any work; the test of each query set then reuses it). Built on a fork of the random
    streams: the layers it initialises before loading its weights draw nothing from the stream the model and the
    training draw from, so --rerank changes no descriptor and no trained weight."""
    # the name was checked against MATCHERS with the flags (parser.REGISTRY_FLAGS)
    with torch.random.fork_rng(devices=[]):
        return MATCHERS[name](max_keypoints).eval()


def reranked_order(predictions, scores, k):
    """The predictions with the first k of each row sorted by decreasing score; equal scores (and the rows' other
    predictions) keep the retrieval order. A prediction -1 (fewer found) stays last."""
    predictions = np.array(predictions)
    scores = np.where(predictions[:, :k] < 0, -np.inf, scores)
    order = np.argsort(-scores, axis=1, kind="stable")
    predictions[:, :k] = np.take_along_axis(predictions[:, :k], order, axis=1)
    return predictions


@dataclass
class Reranking:
    """What re-ranking did: the new predictions, the inlier count of each of the first k (in the retrieval order),
    the inlier points of each query's new top-1 (query and database image, as fractions of their width and height:
    for pictures), its time: all of it per query, and apart the local features it had to compute (those not cached)."""
    method: str
    k: int
    predictions: np.ndarray
    inliers: np.ndarray
    top1_matches: list
    seconds_per_query: float
    matching_seconds_per_query: float
    features_computed: int
    features_seconds: float
    retrieval_recalls: np.ndarray = None  # recall@N of the retrieval order, set by the caller that knows the positives

    @property
    def ms_per_query(self):
        return 1000 * self.seconds_per_query


def relative(points, features):
    """Points in pixels of the image of features -> fractions of its width and height."""
    return points / features["image_size"][::-1].astype(np.float32)


def rerank(matcher, method, predictions, k, query_store, database_store, query_offset=0):
    """Re-ranks the first k predictions of each query (row q of predictions: indices into database_store's images;
    query q is image query_offset + q of query_store, which may be database_store itself) by their verified matches
    with the query. Database features are computed only for images in some top-k; the time per query counts
    everything, the features that were not cached included."""
    start = time.perf_counter()
    stores = {id(query_store): query_store, id(database_store): database_store}.values()
    computed_before = sum(store.computed for store in stores)
    top_k = np.asarray(predictions)[:, :k]
    query_features = query_store.get(range(query_offset, query_offset + len(top_k)))
    database_store.get(np.unique(top_k[top_k >= 0]))
    features_seconds = time.perf_counter() - start
    inliers = np.zeros(top_k.shape)
    matches = []
    for query_index, candidates in enumerate(tqdm(top_k, ncols=100, desc=f"matching ({method}@{k})", leave=False)):
        found = candidates[candidates >= 0]
        verified = matcher.verify(query_features[query_index], database_store.get(found))
        inliers[query_index, :len(found)] = [count for count, _, _ in verified]
        matches.append(verified)
    new_predictions = reranked_order(predictions, inliers, k)
    queries_num = max(1, len(top_k))
    seconds_per_query = (time.perf_counter() - start) / queries_num
    top1_matches = []  # an index always finds a top-1 (-1 only pads the end of a row)
    for query_index, (top1, verified) in enumerate(zip(new_predictions[:, 0], matches)):
        _, query_points, database_points = verified[list(top_k[query_index]).index(top1)]
        top1_matches.append((relative(query_points, query_features[query_index]),
                             relative(database_points, database_store[top1])))
    return Reranking(method, k, new_predictions, inliers, top1_matches, seconds_per_query,
                     seconds_per_query - features_seconds / queries_num,
                     sum(store.computed for store in stores) - computed_before, features_seconds)

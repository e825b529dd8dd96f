"""The reference statistics file: Inception feature moments of a real image set, made once (tools.fid_reference)
and read by every evaluation (tools.evaluate).

A `.npz` archive of plain arrays, read with allow_pickle=False (nothing in it is ever executed):
  mean        float64 [D]
  covariance  float64 [D, D]   unbiased (ddof=1)
  count       int64 []         number of images
  features    float32 [N, D]   optional: KID and precision/recall need the features, FID only the moments
  radii_k3    float64 [N]      optional, with the features: each feature's squared distance to its 3rd nearest
                               other one, precision/recall's real-set balls (an N^2 D computation, done once here
                               instead of at every evaluation; computed and kept in memory when a file lacks them)
  metadata    str []           JSON: format, version, resize, weights_id, weights_sha256, feature_layer, source,
                               image_size (the images' side before Inception's resize)
FID is only comparable between features made the same way, so the metadata records how: the resize method, the
Inception weights (id and the weight file's sha256) and the feature layer; `check_compatible` refuses a file
made otherwise. `source` describes the images (data set, split, count, crop) for people, and is not checked.
The file is written whole or not at all (files.write_atomically); local or gs://.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import zipfile

import numpy as np

from imagen_jax import filesystem
from imagen_jax.errors import MetricsError, MissingError
from imagen_jax.eval.metrics import FeatureStatistics, neighbour_radii
from imagen_jax.files import write_atomically

FORMAT = "imagen-jax-reference-stats"
VERSION = 1
METADATA_FIELDS = ("resize", "weights_id", "weights_sha256", "feature_layer", "source")
RADII_NEIGHBORHOOD, RADII_KEY = 3, "radii_k3"


@dataclasses.dataclass(frozen=True)
class ReferenceStats:
    """Moments (and optionally the features) of a real image set, with how its features were made."""

    mean: np.ndarray
    covariance: np.ndarray
    count: int
    resize: str
    weights_id: str
    weights_sha256: str
    feature_layer: str
    source: str
    image_size: int = 0  # side of the images before Inception's resize (samples must match; 0 = not recorded)
    features: np.ndarray | None = None
    path: str = ""  # the file it was loaded from: errors name it
    radii: np.ndarray | None = None  # metrics.neighbour_radii(features, neighborhood=RADII_NEIGHBORHOOD)
    _computed: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_statistics(
        cls, stats: FeatureStatistics, *, features: np.ndarray | None = None, **metadata: str
    ) -> ReferenceStats:
        """From accumulated statistics and the METADATA_FIELDS as keywords."""
        return cls(mean=stats.mean(), covariance=stats.covariance(), count=stats.count, features=features, **metadata)

    def neighbour_radii(self) -> np.ndarray:
        """The features' precision/recall radii (RADII_NEIGHBORHOOD): the file's, or computed once per object."""
        if self.radii is not None:
            return self.radii
        if "radii" not in self._computed:
            self._computed["radii"] = neighbour_radii(self.require_features("precision/recall"))
        return self._computed["radii"]

    def with_radii(self) -> ReferenceStats:
        """The same statistics with the radii filled in (for `save`), when the features are kept."""
        if self.features is None or len(self.features) <= RADII_NEIGHBORHOOD:
            return self
        return dataclasses.replace(self, radii=self.neighbour_radii())

    def require_features(self, metric: str) -> np.ndarray:
        """The features, or a one-line error saying `metric` needs them."""
        if self.features is None:
            raise MetricsError(
                f"{self.path or 'reference statistics'}: holds no features, which {metric} needs; "
                "make it again with the features kept (tools.fid_reference)"
            )
        return self.features


def _check_arrays(
    where: str,
    mean: np.ndarray,
    covariance: np.ndarray,
    count: int,
    features: np.ndarray | None,
    radii: np.ndarray | None = None,
):
    dim = mean.shape[0] if mean.ndim == 1 else -1
    if dim < 1 or covariance.shape != (dim, dim):
        raise MetricsError(f"{where}: mean shape {mean.shape} and covariance shape {covariance.shape} do not fit")
    if count < 2:
        raise MetricsError(f"{where}: count is {count}; statistics need at least 2 images")
    if features is not None and features.shape != (count, dim):
        raise MetricsError(f"{where}: features have shape {features.shape}, expected ({count}, {dim})")
    if radii is not None and (features is None or radii.shape != (count,)):
        raise MetricsError(f"{where}: radii_k3 has shape {radii.shape}, expected ({count},) beside the features")


def save(path: str, stats: ReferenceStats) -> None:
    """Writes `stats` to `path` (a .npz; its folder is created), replacing any file there in one rename."""
    mean, covariance = np.asarray(stats.mean, np.float64), np.asarray(stats.covariance, np.float64)
    features = None if stats.features is None else np.asarray(stats.features, np.float32)
    radii = None if stats.radii is None else np.asarray(stats.radii, np.float64)
    _check_arrays(path, mean, covariance, int(stats.count), features, radii)
    for field in METADATA_FIELDS:
        if not isinstance(getattr(stats, field), str):
            raise MetricsError(f"{path}: metadata field '{field}' must be a string, got {getattr(stats, field)!r}")
    metadata = {"format": FORMAT, "version": VERSION, **{field: getattr(stats, field) for field in METADATA_FIELDS}}
    metadata["image_size"] = int(stats.image_size)
    arrays = {"mean": mean, "covariance": covariance, "count": np.int64(stats.count), "metadata": json.dumps(metadata)}
    if features is not None:
        arrays["features"] = features
    if radii is not None:
        arrays[RADII_KEY] = radii
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.asarray(value) for name, value in arrays.items()})
    folder = os.path.dirname(path)
    if folder:
        filesystem.for_path(path).makedirs(folder)
    write_atomically(path, buffer.getvalue())


def load(path: str, *, load_features: bool = True) -> ReferenceStats:
    """Reads a file written by `save`; `load_features=False` skips the features (FID needs only the moments)."""
    if not filesystem.for_path(path).exists(path):
        raise MissingError(f"{path}: reference statistics not found (tools.fid_reference makes them)")
    try:
        with np.load(filesystem.local_copy(path), allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise ValueError("a single array, not an .npz archive")
            missing = [key for key in ("mean", "covariance", "count", "metadata") if key not in archive.files]
            if missing:
                raise ValueError(f"missing {', '.join(missing)}")
            metadata = json.loads(str(archive["metadata"]))
            mean, covariance, count = archive["mean"], archive["covariance"], int(archive["count"])
            features = archive["features"] if load_features and "features" in archive.files else None
            radii = archive[RADII_KEY] if features is not None and RADII_KEY in archive.files else None
    except (OSError, ValueError, TypeError, zipfile.BadZipFile) as e:
        raise MetricsError(f"{path}: not a readable reference statistics file ({e})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise MetricsError(f"{path}: not a reference statistics file (its metadata lacks format '{FORMAT}')")
    if metadata.get("version") != VERSION:
        version = metadata.get("version")
        raise MetricsError(f"{path}: reference statistics version {version!r}; this code reads version {VERSION}")
    for field in METADATA_FIELDS:
        if not isinstance(metadata.get(field), str):
            raise MetricsError(f"{path}: metadata field '{field}' is missing or not a string")
    image_size = metadata.get("image_size", 0)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 0:
        raise MetricsError(f"{path}: metadata field 'image_size' is {image_size!r}, not a size in pixels")
    _check_arrays(path, mean, covariance, count, features, radii)
    fields = {field: metadata[field] for field in METADATA_FIELDS}
    return ReferenceStats(
        mean=mean,
        covariance=covariance,
        count=count,
        features=features,
        path=path,
        image_size=image_size,
        radii=radii,
        **fields,
    )


def check_compatible(
    stats: ReferenceStats,
    *,
    resize: str,
    weights_id: str,
    weights_sha256: str | None = None,
    feature_layer: str | None = None,
) -> None:
    """Refuses reference statistics whose features were made differently from this evaluation's (None: not
    checked); the error names the file, the field and both values."""
    expected = {"resize": resize, "weights_id": weights_id, "weights_sha256": weights_sha256}
    for field, value in {**expected, "feature_layer": feature_layer}.items():
        if value is not None and getattr(stats, field) != value:
            raise MetricsError(
                f"{stats.path or 'reference statistics'}: made with {field} {getattr(stats, field)!r}, this "
                f"evaluation uses {value!r}; FID is only comparable with the same {field} "
                "(make the reference again with tools.fid_reference)"
            )

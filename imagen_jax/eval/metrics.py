"""FID, KID and precision/recall from Inception features ([N, D] arrays), with the references' conventions.

Each metric computes what torch-fidelity 0.4 computes (FID also as torchmetrics 1.9 and pytorch-fid 0.3, KID
as torchmetrics), so numbers are comparable with published ones; tests/test_eval_metrics.py holds the agreement
to stored reference values. The maths runs in float64 whatever the features' dtype; the references compute in
their input's dtype, so on float32 features they differ by float32 round-off (KID ~1e-5 relative).

* FID: ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2). The references take tr sqrt(S1 S2) from the
  eigenvalues of the non-symmetric product S1 S2 (torch-fidelity, torchmetrics: general eigensolver, real part
  of the complex square roots) or from scipy's sqrtm (pytorch-fid: adds 1e-6 to the diagonals when the product
  is singular, refuses a large imaginary part). Here the same eigenvalues come from the symmetric matrix
  R^T S2 R, where S1 = R R^T by pivoted Cholesky (LAPACK dpstrf), which stops at S1's numerical rank: real
  eigenvalues, no offset, no imaginary part, and cheaper than eigendecomposing S1 or S1 S2. With fewer
  samples than dimensions (singular covariances) the references add the square roots of round-off
  eigenvalues (about 1e-6 of FID at D = 2048); this drops them, matching the exact value to ~1e-12.
* Covariances are unbiased (ddof=1, as np.cov in all three references). `FeatureStatistics` accumulates
  them batch by batch in float64 (count, sum, sum of outer products, as torchmetrics does) and adds across
  hosts.
* KID: the unbiased MMD^2 estimate with the polynomial kernel (x.y / D + 1)^3, averaged over random subsets;
  mean and (population) standard deviation over subsets. Subsets are drawn as torch-fidelity draws them, from
  `np.random.RandomState(seed)` (NumPy's legacy generator, whose stream NumPy keeps fixed): per subset,
  `choice(n_generated, size, replace=False)` then `choice(n_real, size, replace=False)`. So the same seed (its
  default, 2020) gives the same subsets and the same numbers as torch-fidelity.
* Precision/recall (Kynkaanniemi et al. 2019): a sample's ball reaches its k-th nearest neighbour in its own
  set (k = 3); precision is the fraction of generated samples inside some real sample's ball, recall the
  fraction of real samples inside some generated sample's ball (a distance equal to the radius is inside).
  Distances are computed a block of rows at a time, so memory is batch_size x N, never N x N.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import lapack

from imagen_jax.errors import MetricsError

KID_SEED = 2020  # torch-fidelity's default rng_seed


def _features(features: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(features)
    if array.ndim != 2:
        raise MetricsError(f"{name} features must be an [N, D] array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise MetricsError(f"{name} features hold NaN or infinite values")
    return array


def _pair(generated: np.ndarray, real: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    g, r = _features(generated, "generated"), _features(real, "real")
    if g.shape[1] != r.shape[1]:
        raise MetricsError(
            f"generated features have {g.shape[1]} dimensions, real ones {r.shape[1]}: not the same feature layer"
        )
    return g, r


class FeatureStatistics:
    """Running count, sum and sum of outer products (float64) of feature rows: the mean and covariance of any
    number of images without keeping their features. Accumulators of parts of one set (hosts, shards) add up."""

    def __init__(self, dim: int) -> None:
        self.count = 0
        self.sum = np.zeros(dim, np.float64)
        self.sum_outer = np.zeros((dim, dim), np.float64)

    @property
    def dim(self) -> int:
        return self.sum.shape[0]

    @classmethod
    def of(cls, features: np.ndarray) -> FeatureStatistics:
        """The statistics of one [N, D] array."""
        stats = cls(np.shape(features)[-1])
        stats.update(features)
        return stats

    def update(self, features: np.ndarray) -> None:
        """Adds a batch of rows ([B, D], any float dtype)."""
        batch = _features(features, "batch of")
        if batch.shape[1] != self.dim:
            raise MetricsError(f"batch of features has {batch.shape[1]} dimensions, the statistics {self.dim}")
        batch = batch.astype(np.float64)
        self.count += batch.shape[0]
        self.sum += batch.sum(axis=0)
        self.sum_outer += batch.T @ batch

    def __add__(self, other: FeatureStatistics) -> FeatureStatistics:
        if not isinstance(other, FeatureStatistics):
            return NotImplemented
        if other.dim != self.dim:
            raise MetricsError(f"cannot add statistics of {self.dim} and {other.dim} dimensions")
        total = FeatureStatistics(self.dim)
        total.count = self.count + other.count
        total.sum = self.sum + other.sum
        total.sum_outer = self.sum_outer + other.sum_outer
        return total

    def mean(self) -> np.ndarray:
        if self.count < 1:
            raise MetricsError("no features accumulated: the mean needs at least one")
        return self.sum / self.count

    def covariance(self) -> np.ndarray:
        """The unbiased covariance (ddof=1, as np.cov)."""
        if self.count < 2:
            raise MetricsError(f"{self.count} feature row(s) accumulated: a covariance needs at least 2")
        mean = self.sum / self.count
        return (self.sum_outer - self.count * np.outer(mean, mean)) / (self.count - 1)


def frechet_distance(mean1: np.ndarray, cov1: np.ndarray, mean2: np.ndarray, cov2: np.ndarray) -> float:
    """The Frechet distance between N(mean1, cov1) and N(mean2, cov2): FID when both come from Inception pool3
    features. Accepts singular covariances (fewer samples than dimensions)."""
    mean1, mean2 = np.asarray(mean1, np.float64), np.asarray(mean2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    for i, (mean, cov) in enumerate(((mean1, cov1), (mean2, cov2)), 1):
        if mean.ndim != 1 or cov.shape != (mean.shape[0], mean.shape[0]):
            raise MetricsError(f"FID: statistics {i} have mean shape {mean.shape} and covariance shape {cov.shape}")
        if not (np.isfinite(mean).all() and np.isfinite(cov).all()):
            raise MetricsError(f"FID: statistics {i} hold NaN or infinite values")
    if mean1.shape != mean2.shape:
        raise MetricsError(f"FID: statistics of {mean1.shape[0]} and {mean2.shape[0]} dimensions cannot be compared")
    # eig(S1 S2) = eig(R^T S2 R) for S1 = R R^T; R = P L from pivoted Cholesky, L's first `rank` columns.
    lower, pivots, rank, _ = lapack.dpstrf(cov1, lower=1)  # stops at the numerical rank (tolerance D eps max S1_ii)
    root = np.empty((cov1.shape[0], rank))
    root[pivots - 1] = np.tril(lower)[:, :rank]
    inner = root.T @ cov2 @ root
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mean1 - mean2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * trace_sqrt)


def kid_subset_indices(
    n_generated: int, n_real: int, *, subsets: int = 100, subset_size: int = 1000, seed: int = KID_SEED
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(generated rows, real rows) of each KID subset, drawn as torch-fidelity draws them (module docstring)."""
    if subsets < 1 or subset_size < 2:
        raise MetricsError(f"KID needs at least 1 subset of at least 2 samples, got {subsets} of {subset_size}")
    for name, n in (("generated", n_generated), ("real", n_real)):
        if n < subset_size:
            raise MetricsError(f"KID subset size {subset_size} is larger than the {n} {name} samples; lower it")
    rng = np.random.RandomState(seed)
    return [
        (rng.choice(n_generated, subset_size, replace=False), rng.choice(n_real, subset_size, replace=False))
        for _ in range(subsets)
    ]


def polynomial_mmd2(
    x: np.ndarray, y: np.ndarray, *, degree: int = 3, gamma: float | None = None, coef0: float = 1.0
) -> float:
    """The unbiased MMD^2 estimate between samples x [m, D] and y [n, D] with the kernel (gamma x.y + coef0)^degree,
    gamma 1/D by default; the within-set sums leave out the diagonal (i = j), the cross sum keeps it."""
    x, y = (a.astype(np.float64) for a in _pair(x, y))
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise MetricsError(f"MMD needs at least 2 samples per set, got {m} and {n}")
    gamma = 1.0 / x.shape[1] if gamma is None else gamma

    def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a @ b.T * gamma + coef0) ** degree

    k_xx, k_yy = kernel(x, x), kernel(y, y)
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2 * kernel(x, y).sum() / (m * n))


def kernel_inception_distance(
    generated: np.ndarray,
    real: np.ndarray,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = KID_SEED,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
) -> tuple[float, float]:
    """KID as (mean, standard deviation) over `subsets` random subsets (torch-fidelity's defaults and draws);
    only the subsets are copied to float64."""
    g, r = _pair(generated, real)
    indices = kid_subset_indices(g.shape[0], r.shape[0], subsets=subsets, subset_size=subset_size, seed=seed)
    mmds = np.array([polynomial_mmd2(g[i], r[j], degree=degree, gamma=gamma, coef0=coef0) for i, j in indices])
    return float(mmds.mean()), float(mmds.std())


def _squared_distances(a: np.ndarray, b: np.ndarray, b_norms: np.ndarray) -> np.ndarray:
    return np.maximum((a * a).sum(axis=1)[:, None] + b_norms[None, :] - 2 * (a @ b.T), 0)


def _blocks(n: int, batch_size: int) -> list[slice]:
    return [slice(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def _radii(points: np.ndarray, neighborhood: int, batch_size: int) -> np.ndarray:
    """Squared distance from each point to its `neighborhood`-th nearest other point (the point itself, at
    distance 0, is the 0th)."""
    norms = (points * points).sum(axis=1)
    return np.concatenate(
        [
            np.partition(_squared_distances(points[rows], points, norms), neighborhood, axis=1)[:, neighborhood]
            for rows in _blocks(points.shape[0], batch_size)
        ]
    )


def _fraction_inside(queries: np.ndarray, centres: np.ndarray, radii: np.ndarray, batch_size: int) -> float:
    norms = (centres * centres).sum(axis=1)
    inside = [
        (_squared_distances(queries[rows], centres, norms) <= radii[None, :]).any(axis=1)
        for rows in _blocks(queries.shape[0], batch_size)
    ]
    return float(np.concatenate(inside).mean())


def neighbour_radii(features: np.ndarray, *, neighborhood: int = 3, batch_size: int = 1000) -> np.ndarray:
    """Squared distance (float64) from each of `features` [N, D] to its `neighborhood`-th nearest other one: the
    real set's balls of precision/recall, the costly half for a large reference (N^2 D), so a reference file keeps
    them (reference_stats.py)."""
    x = _features(features, "features").astype(np.float64)
    if x.shape[0] <= neighborhood:
        raise MetricsError(f"precision/recall with {neighborhood} neighbours needs more than {x.shape[0]} samples")
    return _radii(x, neighborhood, batch_size)


def precision_recall(
    generated: np.ndarray,
    real: np.ndarray,
    *,
    neighborhood: int = 3,
    batch_size: int = 1000,
    real_radii: np.ndarray | None = None,
) -> tuple[float, float]:
    """(precision, recall) of the generated features against the real ones; memory is batch_size x N floats.
    `real_radii`: `neighbour_radii(real, neighborhood=...)` when already known (a reference file's)."""
    g, r = (a.astype(np.float64) for a in _pair(generated, real))
    for name, n in (("generated", g.shape[0]), ("real", r.shape[0])):
        if n <= neighborhood:
            raise MetricsError(f"precision/recall with {neighborhood} neighbours needs more than {n} {name} samples")
    if batch_size < 1:
        raise MetricsError(f"precision/recall batch size must be positive, got {batch_size}")
    if real_radii is None:
        real_radii = _radii(r, neighborhood, batch_size)
    elif real_radii.shape != (r.shape[0],):
        raise MetricsError(f"real_radii has shape {real_radii.shape}, expected ({r.shape[0]},): one per real sample")
    precision = _fraction_inside(g, r, real_radii, batch_size)
    recall = _fraction_inside(r, g, _radii(g, neighborhood, batch_size), batch_size)
    return precision, recall

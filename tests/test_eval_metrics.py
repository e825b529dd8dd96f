"""FID, KID, precision/recall and the reference statistics file, against torch-fidelity 0.4, torchmetrics 1.9 and
pytorch-fid 0.3 numbers (tests/fixtures/make_metrics_fixtures.py; the features are made again here from seeds).

Tolerances (relative unless said): against the references run in float64, FID 1e-12 with full-rank covariances
and 3e-6 with singular ones (D = 2048 > N: the references add the square roots of round-off eigenvalues; here
FID matches the exact value to 1e-10), KID mean and std 1e-10; against the references run on float32 features
(their maths in float32), FID 2e-6 and KID 3e-5; precision/recall exactly (same counts).
"""

import dataclasses
import json
import os

import numpy as np
import pytest

from imagen_jax.errors import MetricsError, MissingError
from imagen_jax.eval import reference_stats
from imagen_jax.eval.metrics import (
    FeatureStatistics,
    frechet_distance,
    kernel_inception_distance,
    kid_subset_indices,
    neighbour_radii,
    polynomial_mmd2,
    precision_recall,
)

EXPECTED = json.load(open(os.path.join(os.path.dirname(__file__), "fixtures", "metrics_expected.json")))
CASES = sorted(EXPECTED["cases"])


def make_features(seed: int, n: int, dim: int, shift: float) -> np.ndarray:
    """Keep identical to tests/fixtures/make_metrics_fixtures.py."""
    mixing = np.random.default_rng(dim).standard_normal((16, dim)) / 4
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 16)) @ mixing + 0.5 * rng.standard_normal((n, dim)) + shift
    return np.logaddexp(0, x).astype(np.float32)


@pytest.fixture(scope="module", params=CASES)
def case(request):
    """(expected numbers, generated features, real features) of one fixture case."""
    expected = EXPECTED["cases"][request.param]
    gen = make_features(1, expected["n_generated"], expected["dim"], 0.15)
    real = make_features(2, expected["n_real"], expected["dim"], 0.0)
    sums = [float(x.astype(np.float64).sum()) for x in (gen, real)]
    np.testing.assert_allclose(sums, expected["checksums"], rtol=1e-12, err_msg="features differ from the script's")
    return expected, gen, real


def _fid(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = FeatureStatistics.of(a), FeatureStatistics.of(b)
    return frechet_distance(sa.mean(), sa.covariance(), sb.mean(), sb.covariance())


def test_fid_matches_references(case):
    expected, gen, real = case
    fid, refs = _fid(gen, real), expected["fid"]
    singular = expected["dim"] > min(expected["n_generated"], expected["n_real"])
    rtol = 3e-6 if singular else 1e-12
    for name in ("torch_fidelity_float64", "torchmetrics_float64", "pytorch_fid_float64"):
        np.testing.assert_allclose(fid, refs[name], rtol=rtol, err_msg=name)
    np.testing.assert_allclose(fid, refs["torch_fidelity_float32"], rtol=2e-6)
    if singular:
        # Exact: the nonzero eigenvalues of S1 S2 are those of Xc S2 Xc^T / (n - 1) (n x n, full rank but one).
        # The one zero eigenvalue is left out: it comes back as rounding (~1e-14), whose square root (~1e-7)
        # would otherwise enter the sum (1e-9 relative, seen on an AVX-512 CPU).
        centred = (gen - gen.mean(0, dtype=np.float64)) / np.sqrt(len(gen) - 1)
        cov2 = np.cov(real.astype(np.float64), rowvar=False)
        trace_sqrt = np.sqrt(np.linalg.eigvalsh(centred @ cov2 @ centred.T)[1:]).sum()
        diff = gen.mean(0, dtype=np.float64) - real.mean(0, dtype=np.float64)
        exact = diff @ diff + np.trace(np.cov(gen.astype(np.float64), rowvar=False)) + np.trace(cov2) - 2 * trace_sqrt
        np.testing.assert_allclose(fid, exact, rtol=1e-10)


def test_fid_of_gaussians_in_closed_form():
    """Commuting covariances Q diag(a) Q^T and Q diag(b) Q^T: FID = |m1 - m2|^2 + sum (sqrt a - sqrt b)^2."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    a, b = rng.uniform(0.1, 4, 32), rng.uniform(0.1, 4, 32)
    m1, m2 = rng.standard_normal(32), rng.standard_normal(32)

    def check(a, b, rtol):
        cov1, cov2 = (q * a) @ q.T, (q * b) @ q.T
        expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
        np.testing.assert_allclose(frechet_distance(m1, cov1, m2, cov2), expected, rtol=rtol)
        np.testing.assert_allclose(frechet_distance(m2, cov2, m1, cov1), expected, rtol=rtol)

    check(a, b, rtol=1e-12)
    a[:5], b[3:9] = 0, 0
    # Singular: Q diag(a) Q^T holds its zeros only to round-off (~1e-15), whose square roots count (~3e-8 each).
    check(a, b, rtol=1e-8)
    assert abs(frechet_distance(m1, (q * a) @ q.T, m1, (q * a) @ q.T)) < 1e-6
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9 + 1, rel=1e-12)  # 3^2 + (2 - 3)^2


def test_kid_matches_references(case):
    expected, gen, real = case
    refs, sampled = expected["kid"], EXPECTED["kid_sampled"]
    mean, std = kernel_inception_distance(
        gen, real, subsets=sampled["kid_subsets"], subset_size=sampled["kid_subset_size"], seed=sampled["rng_seed"]
    )
    np.testing.assert_allclose([mean, std], refs["sampled_torch_fidelity_float64"], rtol=1e-10)
    np.testing.assert_allclose([mean, std], refs["sampled_torch_fidelity_float32"], rtol=3e-5)
    # All samples in one subset, where the draw does not matter: the estimator alone.
    n = min(len(gen), len(real))
    full, zero_std = kernel_inception_distance(gen[:n], real[:n], subsets=1, subset_size=n)
    assert zero_std == 0
    mmd_real_first = polynomial_mmd2(real[:n], gen[:n])  # torchmetrics' argument order
    for name in ("torch_fidelity_float64", "torchmetrics_float64"):
        np.testing.assert_allclose([full, mmd_real_first], refs[f"full_{name}"], rtol=1e-10, err_msg=name)
    for name in ("torch_fidelity_float32", "torchmetrics_float32"):
        np.testing.assert_allclose(full, refs[f"full_{name}"], rtol=3e-5, err_msg=name)


def test_kid_subsets_are_seeded():
    first = kid_subset_indices(50, 60, subsets=3, subset_size=20, seed=7)
    again = kid_subset_indices(50, 60, subsets=3, subset_size=20, seed=7)
    other = kid_subset_indices(50, 60, subsets=3, subset_size=20, seed=8)
    for (g1, r1), (g2, r2) in zip(first, again):
        np.testing.assert_array_equal(g1, g2)
        np.testing.assert_array_equal(r1, r2)
    assert not np.array_equal(first[0][0], other[0][0])
    assert all(len(set(g)) == 20 and g.max() < 50 and len(set(r)) == 20 and r.max() < 60 for g, r in first)


def test_precision_recall_matches_torch_fidelity(case):
    expected, gen, real = case
    for batch_size in (1000, 64, 37):
        precision, recall = precision_recall(gen, real, batch_size=batch_size)
        for name in ("torch_fidelity_float32", "torch_fidelity_float64"):
            np.testing.assert_allclose([precision, recall], expected["precision_recall"][name], rtol=0, atol=1e-7)
    assert precision_recall(real, real) == (1.0, 1.0)
    # the real set's radii, computed once (a reference file keeps them), give the same figures
    radii = neighbour_radii(real, neighborhood=3)
    assert precision_recall(gen, real, real_radii=radii) == precision_recall(gen, real)
    with pytest.raises(MetricsError, match=r"real_radii has shape \(5,\), expected"):
        precision_recall(gen, real, real_radii=radii[:5])


def test_a_reference_keeps_its_radii_and_computes_them_once_without(tmp_path, monkeypatch):
    from imagen_jax.eval import metrics

    stats = _stats()
    with_radii = stats.with_radii()
    np.testing.assert_array_equal(with_radii.radii, neighbour_radii(stats.features, neighborhood=3))
    path = str(tmp_path / "ref.npz")
    reference_stats.save(path, with_radii)
    loaded = reference_stats.load(path)
    np.testing.assert_array_equal(loaded.radii, with_radii.radii)
    assert loaded.radii.dtype == np.float64 and reference_stats.load(path, load_features=False).radii is None

    calls = []
    real_radii = metrics._radii
    monkeypatch.setattr(metrics, "_radii", lambda *a: calls.append(1) or real_radii(*a))
    loaded.neighbour_radii()
    assert not calls  # the file's
    older = dataclasses.replace(loaded, radii=None)  # a file written before radii were kept
    np.testing.assert_array_equal(older.neighbour_radii(), with_radii.radii)
    np.testing.assert_array_equal(older.neighbour_radii(), with_radii.radii)
    assert len(calls) == 1  # computed once per loaded reference, not once per evaluation


def test_streaming_statistics_equal_one_shot():
    rng = np.random.default_rng(3)
    features = (rng.standard_normal((300, 64)) * rng.uniform(0.1, 2, 64) + rng.uniform(0, 3, 64)).astype(np.float32)
    expected_mean = features.astype(np.float64).mean(0)
    expected_cov = np.cov(features.astype(np.float64), rowvar=False)
    streamed = FeatureStatistics(64)
    for start, stop in ((0, 1), (1, 50), (50, 177), (177, 300)):
        streamed.update(features[start:stop])
    halves = FeatureStatistics.of(features[:120]) + FeatureStatistics.of(features[120:])
    for stats in (streamed, halves, FeatureStatistics.of(features)):
        assert stats.count == 300
        np.testing.assert_allclose(stats.mean(), expected_mean, rtol=1e-12)
        np.testing.assert_allclose(stats.covariance(), expected_cov, rtol=1e-9, atol=1e-12)


def _stats(features=None, **overrides) -> reference_stats.ReferenceStats:
    rng = np.random.default_rng(4)
    features = rng.standard_normal((10, 8)).astype(np.float32) if features is None else features
    metadata = {
        "resize": "pil_bicubic",
        "weights_id": "pt_inception-2015-12-05",
        "weights_sha256": "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
        "feature_layer": "pool3",
        "source": "seeded test features, 10 rows",
    }
    return reference_stats.ReferenceStats.from_statistics(
        FeatureStatistics.of(features), features=features, **{**metadata, **overrides}
    )


def test_reference_stats_round_trip(tmp_path):
    stats = _stats()
    path = str(tmp_path / "new" / "ref.npz")
    reference_stats.save(path, stats)
    reference_stats.save(path, stats)  # replaces the file whole
    assert os.listdir(tmp_path / "new") == ["ref.npz"]
    loaded = reference_stats.load(path)
    for field in ("mean", "covariance", "features"):
        np.testing.assert_array_equal(getattr(loaded, field), getattr(stats, field))
    assert loaded.features.dtype == np.float32 and loaded.mean.dtype == np.float64
    for field in ("count", *reference_stats.METADATA_FIELDS):
        assert getattr(loaded, field) == getattr(stats, field)
    assert loaded.path == path
    assert reference_stats.load(path, load_features=False).features is None
    reference_stats.check_compatible(
        loaded, resize="pil_bicubic", weights_id="pt_inception-2015-12-05", weights_sha256=stats.weights_sha256
    )

    moments_only = str(tmp_path / "moments.npz")
    reference_stats.save(moments_only, dataclasses.replace(stats, features=None))
    with pytest.raises(MetricsError, match=r"moments\.npz: holds no features, which KID needs"):
        reference_stats.load(moments_only).require_features("KID")


@pytest.mark.parametrize(
    ("field", "stored", "asked"),
    [
        ("resize", "pil_bicubic", "tf_bilinear"),
        ("weights_id", "pt_inception-2015-12-05", "tf_inception_v3"),
        ("weights_sha256", "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2", "00ff"),
        ("feature_layer", "pool3", "logits"),
    ],
)
def test_check_compatible_refuses_other_features(tmp_path, field, stored, asked):
    path = str(tmp_path / "ref.npz")
    reference_stats.save(path, _stats())
    asked_fields = {"resize": "pil_bicubic", "weights_id": "pt_inception-2015-12-05", field: asked}
    with pytest.raises(MetricsError) as error:
        reference_stats.check_compatible(reference_stats.load(path), **asked_fields)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: made with {field} '{stored}', this evaluation uses '{asked}'")


def test_load_refuses_what_is_not_reference_stats(tmp_path):
    with pytest.raises(MissingError, match="absent.npz: reference statistics not found"):
        reference_stats.load(str(tmp_path / "absent.npz"))
    text = tmp_path / "text.npz"
    text.write_text("not an archive")
    plain = tmp_path / "plain.npz"
    np.savez(plain, mean=np.zeros(2))
    other = tmp_path / "other.npz"
    np.savez(other, mean=np.zeros(2), covariance=np.eye(2), count=5, metadata=json.dumps({"format": "x"}))
    bad_shape = tmp_path / "bad_shape.npz"
    good = {"format": reference_stats.FORMAT, "version": 1, **dict.fromkeys(reference_stats.METADATA_FIELDS, "x")}
    np.savez(bad_shape, mean=np.zeros(3), covariance=np.eye(2), count=5, metadata=json.dumps(good))
    pickled = tmp_path / "pickled.npz"
    code = np.array([{"code": "never run"}], dtype=object)
    np.savez(pickled, mean=code, covariance=np.eye(1), count=2, metadata=json.dumps(good))
    for path, why in (
        (text, "not a readable reference statistics file"),
        (pickled, "not a readable reference statistics file .*allow_pickle=False"),
        (plain, r"not a readable reference statistics file \(missing covariance, count, metadata\)"),
        (other, r"not a reference statistics file \(its metadata lacks format 'imagen-jax-reference-stats'\)"),
        (bad_shape, r"mean shape \(3,\) and covariance shape \(2, 2\) do not fit"),
    ):
        with pytest.raises(MetricsError, match=f"^{path}: {why}"):
            reference_stats.load(str(path))


def test_metrics_refuse_mismatched_or_too_few_features():
    a, b = np.ones((20, 8), np.float32), np.ones((20, 6), np.float32)
    for call, message in (
        (lambda: frechet_distance(np.zeros(8), np.eye(8), np.zeros(6), np.eye(6)), "statistics of 8 and 6 dim"),
        (lambda: frechet_distance(np.zeros(8), np.eye(6), np.zeros(8), np.eye(8)), "statistics 1 have mean shape"),
        (lambda: kernel_inception_distance(a, b, subset_size=10), "generated features have 8 dimensions, real"),
        (lambda: precision_recall(a, b), "generated features have 8 dimensions, real ones 6"),
        (lambda: kernel_inception_distance(a, a), "KID subset size 1000 is larger than the 20 generated samples"),
        (lambda: precision_recall(a[:3], a), "needs more than 3 generated samples"),
        (lambda: FeatureStatistics.of(a[:1]).covariance(), "1 feature row.* a covariance needs at least 2"),
        (lambda: FeatureStatistics(8).update(b), "batch of features has 6 dimensions, the statistics 8"),
        (lambda: FeatureStatistics(8) + FeatureStatistics(6), "cannot add statistics of 8 and 6 dimensions"),
        (lambda: precision_recall(np.full((5, 8), np.nan), a), "generated features hold NaN"),
    ):
        with pytest.raises(MetricsError, match=message):
            call()

"""tools.fid_reference and tools.evaluate end to end on a tiny exported stage, with random Inception weights and a
tiny random CLIP: statistics written and checked, per-scale FID/KID/CLIP results, resumption, refusals."""

import dataclasses
import io
import itertools
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from imagen_jax.data import demo
from imagen_jax.eval import reference_stats
from imagen_jax.eval.clip_tiny import make_tiny_clip
from imagen_jax.eval.inception_weights import make_random_inception
from imagen_jax.text.tiny import make_tiny_t5
from imagen_jax.tools import evaluate, fid_reference
from tests.processes import run_distributed

LEGACY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "legacy")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    make_tiny_t5(str(root / "t5"), demo.all_captions(), d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32)
    shutil.copytree(os.path.join(LEGACY, "base_export"), root / "base")  # an 8px base stage
    config = json.loads((root / "base" / "config.json").read_text())
    config["text"]["encoder"] = str(root / "t5")
    (root / "base" / "config.json").write_text(json.dumps(config))
    make_random_inception(str(root / "inception.safetensors"), seed=0)
    make_tiny_clip(str(root / "clip"), seed=0, captions=demo.all_captions())
    images = root / "real"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, triple in enumerate(list(itertools.product(demo.COLORS, demo.SHAPES, demo.POSITIONS))[:12]):
        buffer = io.BytesIO()
        Image.fromarray(demo.render(*triple, 24, rng)).save(buffer, format="PNG")
        (images / f"{i:02d}.png").write_bytes(buffer.getvalue())
    (root / "captions.txt").write_text("\n".join(demo.all_captions()))
    return root


def evaluate_argv(setup, stats) -> list[str]:
    """tools.evaluate's arguments for 8 captions of the tiny stage, scored with the random Inception and CLIP."""
    argv = ["--workdir", str(setup / "base"), "--captions", str(setup / "captions.txt"), "--num_images", "8"]
    argv += ["--reference", str(stats), "--inception", str(setup / "inception.safetensors")]
    return [*argv, "--clip", str(setup / "clip")]


def reference(setup, name, *extra):
    out = setup / f"{name}.npz"
    argv = ["--images", str(setup / "real"), "--image_size", "8", "--inception", str(setup / "inception.safetensors")]
    assert fid_reference.main([*argv, "--out", str(out), "--batch_size", "4", *extra]) == 0
    return out


def test_fid_reference_writes_checked_statistics(setup, capsys):
    stats = reference_stats.load(str(reference(setup, "stats")))
    assert "12 images, 8px, weights random-seed-0" in capsys.readouterr().out
    assert (stats.count, stats.image_size, stats.weights_id, stats.resize) == (
        12,
        8,
        "random-seed-0",
        "tf1_bilinear_299",
    )
    assert stats.features.shape == (12, 2048) and np.isfinite(stats.features).all()
    np.testing.assert_allclose(stats.mean, stats.features.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.covariance, np.cov(stats.features.astype(np.float64).T), rtol=1e-4, atol=1e-6)
    assert stats.features.std(0).mean() > 1e-3  # random weights still tell images apart


@pytest.mark.slow  # samples and scores twice end to end: ~25-60 s
def test_evaluate_writes_results_resumes_and_refuses_other_settings(setup, capsys):
    stats = reference(setup, "stats_for_evaluate")
    out = setup / "eval"
    argv = evaluate_argv(setup, stats)
    argv += ["--guidance_scale", "1,2", "--steps", "2", "--batch_size", "4", "--out", str(out)]
    assert evaluate.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("images sampled and scored") == 4  # 2 batches x 2 scales
    results = json.loads((out / "results.json").read_text())
    assert results["checkpoint_steps"] == [2] and results["image_size"] == 8 and results["reference_count"] == 12
    for scale in ("1", "2"):
        figures = results["guidance"][scale]
        assert figures["num_images"] == 8 and figures["kid_subset_size"] == 8
        assert figures["fid"] > 0 and np.isfinite(figures["kid"]) and 0 <= figures["precision"] <= 1
        assert 0 <= figures["clip_score"] <= 100
    assert Image.open(out / "fid_vs_clip.png").size == (640, 480)
    assert (out / "guidance_2" / "samples.png").exists()

    # Interrupted after one batch of scale 2: only the missing batch is sampled again, and the figures are the same.
    os.remove(out / "guidance_2" / "batch_00001.npz")
    assert evaluate.main(argv) == 0
    assert capsys.readouterr().out.count("images sampled and scored") == 1
    again = json.loads((out / "results.json").read_text())
    assert again["guidance"] == results["guidance"]

    # Another seed on the same folder would mix two evaluations: refused, naming the setting.
    assert evaluate.main([*argv, "--seed", "1"]) == 2
    assert "holds an evaluation made with seed=0, not 1" in capsys.readouterr().err

    # Reference statistics of other Inception weights, or of another image size, are refused.
    make_random_inception(str(setup / "other.safetensors"), seed=1)
    other = argv.copy()
    other[other.index(str(setup / "inception.safetensors"))] = str(setup / "other.safetensors")
    assert evaluate.main([*other[:-1], str(setup / "eval_other")]) == 1
    assert "made with weights_id 'random-seed-0', this evaluation uses 'random-seed-1'" in capsys.readouterr().err
    sized = setup / "stats16.npz"  # as fid_reference --image_size 16 would label it
    reference_stats.save(str(sized), dataclasses.replace(reference_stats.load(str(stats)), image_size=16))
    stats_at = argv.index(str(stats))
    wrong = [*argv[:stats_at], str(sized), *argv[stats_at + 1 : -1], str(setup / "eval_16")]
    assert evaluate.main(wrong) == 1
    assert "reference images were 16px, the samples are 8px" in capsys.readouterr().err


def test_scorer_matches_the_one_device_functions(setup):
    """The Scorer's jitted, mesh-split forms give what eval/inception.py and eval/clip_score.py give directly."""
    from imagen_jax.eval import clip_score
    from imagen_jax.eval.clip import CLIP
    from imagen_jax.eval.inception import load_inception
    from imagen_jax.eval.scorer import Scorer
    from imagen_jax.stage.model import local_mesh

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    captions = ["a red circle on the left", "a blue square at the top", "a"]
    scorer = Scorer(str(setup / "inception.safetensors"), local_mesh(), str(setup / "clip"))
    expected = np.asarray(load_inception(str(setup / "inception.safetensors"))(images))
    np.testing.assert_allclose(scorer.features(images), expected, rtol=1e-5, atol=1e-5)
    _, pairs = clip_score.clip_score(CLIP.from_pretrained(str(setup / "clip")), images, captions)
    np.testing.assert_allclose(scorer.clip_scores(images, captions), pairs, rtol=1e-5, atol=1e-4)


def test_a_scorer_not_resident_holds_its_weights_on_the_devices_only_while_loaded(setup):
    """Training's periodic evaluation: Inception and CLIP are on the devices inside `loaded()` alone (issue 29,
    point 5), and score there as a resident scorer does."""
    import gc

    import jax

    from imagen_jax.eval.scorer import Scorer
    from imagen_jax.stage.model import local_mesh

    gc.collect()
    before = {id(x) for x in jax.live_arrays()}  # what the worker holds already (other tests' threads may add more)

    def on_devices() -> int:
        """Bytes of device arrays made since `before` and shaped as the scorer's weights."""
        gc.collect()
        weights = {(x.shape, x.dtype) for x in jax.tree.leaves(scorer._host)}
        return sum(x.nbytes for x in jax.live_arrays() if id(x) not in before and (x.shape, x.dtype) in weights)

    images = np.random.default_rng(2).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    captions = ["a red circle on the left", "a"]
    scorer = Scorer(str(setup / "inception.safetensors"), local_mesh(), str(setup / "clip"), resident=False)
    host = sum(x.nbytes for x in jax.tree.leaves(scorer._host))
    assert host > 1_000_000 and on_devices() < host / 100  # the weights wait in host memory
    with pytest.raises(RuntimeError, match="not on the devices: score inside `with scorer.loaded"):
        scorer.features(images)
    resident = Scorer(str(setup / "inception.safetensors"), local_mesh(), str(setup / "clip"))
    with scorer.loaded():
        assert on_devices() > 1.9 * host  # its copy and the resident scorer's
        np.testing.assert_array_equal(scorer.features(images), resident.features(images))
        np.testing.assert_array_equal(scorer.clip_scores(images, captions), resident.clip_scores(images, captions))
    del resident
    assert on_devices() < host / 100  # freed after the block


def test_the_planner_counts_the_bytes_a_scorer_places(setup):
    """scorer.device_bytes (from the models' shapes and CLIP's config.json, nothing loaded) is what a Scorer puts
    on each device; the planner adds it beside the held state when eval.every is set."""
    import jax

    from imagen_jax import config as config_lib
    from imagen_jax.eval.scorer import Scorer, device_bytes
    from imagen_jax.stage.model import local_mesh
    from imagen_jax.train import plan

    scorer = Scorer(str(setup / "inception.safetensors"), local_mesh(), str(setup / "clip"), resident=False)
    placed = {name: sum(x.nbytes for x in jax.tree.leaves(state)) for name, state in scorer._host.items()}
    assert device_bytes(str(setup / "clip")) == placed and device_bytes(None) == {"inception": placed["inception"]}
    config = config_lib.load_config_file(os.path.join(os.path.dirname(LEGACY), "..", "..", "configs", "demo.py"))
    usable = 15 * 2**30
    assert plan.evaluation_bytes(config, 10 * 2**30, usable) == {}  # eval.every 0
    config.eval.every, config.eval.clip = 100, str(setup / "clip")
    figures = plan.evaluation_bytes(config, usable - sum(placed.values()) + 1, usable)
    assert figures == {"eval_weights_bytes": placed, "eval_held_total": usable + 1, "eval_fits": False}


@pytest.mark.slow  # two processes start, sample and score; then one process does the same: ~60-90 s
def test_two_processes_share_the_batches_and_score_what_one_process_scores(setup, tmp_path):
    """tools.evaluate --distributed over localhost: each process samples its own batches on its own devices,
    process 0 writes the results, and they are the figures one process computes alone."""
    stats = reference(setup, "stats_for_two")
    argv = evaluate_argv(setup, stats)
    argv += ["--guidance_scale", "2", "--steps", "2", "--batch_size", "4"]
    outputs = run_distributed(["-m", "imagen_jax.tools.evaluate", *argv, "--out", str(tmp_path / "two")])
    assert "guidance 2: 4/8 images sampled and scored" in outputs[0]  # batch 0 on process 0,
    assert "guidance 2: 8/8 images sampled and scored" in outputs[1]  # batch 1 on process 1,
    assert "4/8" not in outputs[1] and '"guidance"' not in outputs[1]  # which prints no results.
    two = json.loads((tmp_path / "two" / "results.json").read_text())

    assert evaluate.main([*argv, "--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    for name, value in one["guidance"]["2"].items():
        np.testing.assert_allclose(two["guidance"]["2"][name], value, rtol=1e-4, err_msg=name)
    for index in range(2):
        with np.load(tmp_path / "two" / "guidance_2" / f"batch_{index:05d}.npz") as a:
            with np.load(tmp_path / "one" / "guidance_2" / f"batch_{index:05d}.npz") as b:
                np.testing.assert_allclose(a["features"], b["features"], rtol=1e-5, atol=1e-5)


def test_references_made_another_way_or_size_are_refused(setup):
    from imagen_jax.errors import MetricsError
    from imagen_jax.eval.evaluation import check_reference
    from imagen_jax.eval.scorer import Scorer
    from imagen_jax.stage.model import local_mesh

    scorer = Scorer(str(setup / "inception.safetensors"), local_mesh())
    made = dict(resize="tf1_bilinear_299", weights_id="random-seed-0", weights_sha256=scorer.weights_sha256)
    good = reference_stats.ReferenceStats(
        np.zeros(4), np.eye(4), 2, **made, feature_layer="pool3_2048", source="s", image_size=8, path="r.npz"
    )
    check_reference(good, scorer, 8)
    with pytest.raises(MetricsError, match="r.npz: reference images were 8px, the samples are 16px"):
        check_reference(good, scorer, 16)
    for field, value in [("resize", "pil_bicubic_299"), ("weights_id", "random-seed-1"), ("feature_layer", "logits")]:
        with pytest.raises(MetricsError, match=f"r.npz: made with {field} {value!r}, this evaluation uses"):
            check_reference(dataclasses.replace(good, **{field: value}), scorer, 8)

"""The README's demo command, end to end: trains base + SR in minutes; samples follow their prompts, the SR stage
is faithful and sharp, and tools.evaluate (random Inception and CLIP weights: the demo cannot download real
ones) ranks real images, the trained model and an untrained one in that order. Its figures are the README's."""

import json
import os
import subprocess
import sys

import pytest

from imagen_jax.data import demo
from imagen_jax.eval import metrics, reference_stats
from imagen_jax.eval.clip_tiny import make_tiny_clip
from imagen_jax.eval.inception_weights import make_random_inception

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")


def command(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_demo_samples_follow_prompts(tmp_path):
    command("-m", "imagen_jax.tools.demo", "--workdir", str(tmp_path))
    results = json.load(open(tmp_path / "demo_results.json"))
    print(json.dumps(results, indent=2))
    assert results["checkpoint_step"] == 1600 and results["num_images"] == 90
    guided = results["guidance_3"]
    for name in ("color_accuracy", "shape_accuracy", "position_accuracy"):
        assert guided[name] >= 0.8, (name, results)
        assert guided["cascade"][name] >= 0.8, (name, results)  # the SR stage keeps what the base stage drew
    # The SR stage is faithful to its input, unbiased and sharper than bicubic upsampling of it.
    sr = results["super_resolution"]
    assert sr["psnr_downsampled_output_vs_input_db"] >= 28.0, sr
    assert abs(sr["brightness_shift_grey_levels"]) < 2.0, sr
    # Sharper, but not sharper than real renders, without isolated dots, and with its detail where the truth's
    # is: bicubic upsampling plus noise (sigma 0.02 to 0.2) either exceeds the bounds on high-frequency energy or
    # speckle, or correlates with the truth's detail less than bicubic does (0.35 and below against 0.48).
    assert 1.5 < sr["high_frequency_ratio_sr_vs_bicubic"] <= 1.5 * sr["high_frequency_ratio_target_vs_bicubic"], sr
    assert sr["speckle_fraction_sr"] <= 2 * sr["speckle_fraction_target"] + 0.005, sr
    assert sr["high_frequency_correlation_sr"] >= 0.9 * sr["high_frequency_correlation_bicubic"], sr
    assert (tmp_path / "samples" / "grid.png").exists() and (tmp_path / "samples" / "samples.json").exists()
    assert len(list((tmp_path / "samples" / "16px").iterdir())) == 24  # the base stage's images

    check_evaluation(tmp_path)


def check_evaluation(tmp_path) -> None:
    """FID through the public commands on a demo workdir: real vs real (disjoint shards) far below an untrained
    model's samples, the trained model in between."""
    ev = tmp_path / "evaluation"
    ev.mkdir()
    make_random_inception(str(ev / "inception.safetensors"))
    make_tiny_clip(str(ev / "clip"), captions=demo.all_captions())
    (ev / "captions.txt").write_text("\n".join(demo.all_captions()))
    common = ["--image_size", "16", "--num_images", "60", "--inception", str(ev / "inception.safetensors")]
    for name, shard in (("real_a", "00000"), ("real_b", "00003")):
        images = str(tmp_path / "data" / f"{shard}.tfrecord")
        command("-m", "imagen_jax.tools.fid_reference", "--images", images, *common, "--out", str(ev / f"{name}.npz"))
    command(
        "train.py", "--config", "configs/demo.py", "--workdir", str(ev / "untrained"), "--config.train.num_steps=1",
        f"--config.data.train_shards={tmp_path}/data/*.tfrecord", f"--config.text.encoder={tmp_path}/t5",
    )  # fmt: skip
    fid = {}
    for name, workdir in (("untrained", ev / "untrained"), ("trained", tmp_path / "train")):
        command(
            "-m", "imagen_jax.tools.evaluate", "--workdir", str(workdir), "--captions", str(ev / "captions.txt"),
            "--num_images", "60", "--reference", str(ev / "real_a.npz"), "--clip", str(ev / "clip"),
            "--inception", str(ev / "inception.safetensors"), "--guidance_scale", "3", "--steps", "32",
            "--batch_size", "30", "--out", str(ev / name),
        )  # fmt: skip
        figures = json.load(open(ev / name / "results.json"))["guidance"]["3"]
        assert 0 <= figures["clip_score"] <= 100 and figures["num_images"] == 60, figures
        fid[name] = figures["fid"]
    a, b = (reference_stats.load(str(ev / f"{name}.npz")) for name in ("real_a", "real_b"))
    fid["real_vs_real"] = metrics.frechet_distance(a.mean, a.covariance, b.mean, b.covariance)
    print(json.dumps(fid, indent=2))
    assert fid["real_vs_real"] < fid["trained"] < fid["untrained"], fid
    assert fid["real_vs_real"] < fid["untrained"] / 10, fid


def test_the_sr_bounds_refuse_bicubic_plus_noise():
    """What test_demo_samples_follow_prompts requires of the SR stage fails for bicubic upsampling plus noise, at
    every strength: too much high-frequency energy or speckle, or detail that is not where the truth's is."""
    import itertools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from imagen_jax.diffusion import augment
    from imagen_jax.tools.eval_demo import high_frequency_correlation, high_frequency_energy, speckle_fraction

    rng = np.random.default_rng(0)
    triples = list(itertools.product(demo.COLORS, demo.SHAPES, demo.POSITIONS))[::3]
    targets = np.stack([demo.render(*t, 32, rng) for t in triples]).astype(np.float32) / 127.5 - 1.0
    lowres = augment.downsample(jnp.asarray(targets), 16)
    bicubic = np.asarray(jax.image.resize(lowres, targets.shape, method="cubic")).clip(-1, 1)
    assert high_frequency_correlation(targets, targets) == pytest.approx(1.0)
    truth_ratio = high_frequency_energy(targets) / high_frequency_energy(bicubic)
    for sigma in (0.01, 0.02, 0.05, 0.08, 0.1, 0.2):
        noisy = (bicubic + rng.normal(0, sigma, bicubic.shape)).clip(-1, 1)
        ratio = high_frequency_energy(noisy) / high_frequency_energy(bicubic)
        passes = (
            1.5 < ratio <= 1.5 * truth_ratio
            and speckle_fraction(noisy) <= 2 * speckle_fraction(targets) + 0.005
            and high_frequency_correlation(noisy, targets) >= 0.9 * high_frequency_correlation(bicubic, targets)
        )
        assert not passes, sigma

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
    assert sr["high_frequency_ratio_sr_vs_bicubic"] > 1.5, sr
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

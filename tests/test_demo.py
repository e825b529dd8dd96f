"""The README's demo command, end to end: trains base + SR in minutes; samples follow their prompts and the
SR stage is faithful and sharp. Its figures are the README's."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_samples_follow_prompts(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, "-m", "imagen_jax.tools.demo", "--workdir", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.load(open(tmp_path / "demo_results.json"))
    print(json.dumps(results, indent=2))
    assert results["checkpoint_step"] == 1600 and results["num_images"] == 90
    guided = results["guidance_3"]
    assert guided["color_accuracy"] >= 0.8, results
    assert guided["position_accuracy"] >= 0.8, results
    # The SR stage is faithful to its input and sharper than bicubic upsampling of it.
    sr = results["super_resolution"]
    assert sr["psnr_downsampled_output_vs_input_db"] >= 20.0, sr
    assert sr["high_frequency_ratio_sr_vs_bicubic"] > 1.5, sr
    assert (tmp_path / "samples" / "grid.png").exists() and (tmp_path / "samples" / "samples.json").exists()
    assert len(list((tmp_path / "samples" / "16px").iterdir())) == 24  # the base stage's images

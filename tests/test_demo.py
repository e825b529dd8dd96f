"""The README's demo command, end to end: trains in minutes and its samples follow their prompts."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_samples_follow_prompts(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-m", "imagen_jax.tools.demo", "--workdir", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.load(open(tmp_path / "demo_results.json"))
    print(json.dumps(results, indent=2))
    assert results["checkpoint_step"] == 2000 and results["num_images"] == 90
    guided = results["guidance_3"]
    assert guided["color_accuracy"] >= 0.8, results
    assert guided["position_accuracy"] >= 0.8, results
    assert (tmp_path / "samples" / "grid.png").exists() and (tmp_path / "samples" / "samples.json").exists()

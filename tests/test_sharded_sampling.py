"""Sampling on a host's 8 (fake CPU) devices: T5 and both stages' weights split over them by the training rules,
the batch split over them too (5 prompts padded to 8), and the images those of one device for the same seeds,
with ddpm (noise drawn per step) and dpmpp_2m (a multistep solver's history): bit for bit on the machine this was
written on, within 1e-6 on an AMD EPYC (up to 1 ulp, 3e-8, in ~4% of pixels: XLA:CPU's kernels differ by CPU).

One device is the reference at the per-device batch (one image per call here): XLA:CPU picks its matmul and
reduction kernels by shape, so a batch of 8 on one device differs from 8 batches of 1 in the last bits."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

from imagen_jax.data import demo
from imagen_jax.stage.config import base_config
from imagen_jax.text.tiny import make_tiny_t5

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEGACY = os.path.join(REPO, "tests", "fixtures", "legacy")

SCRIPT = textwrap.dedent("""
    import sys
    import jax, ml_collections, numpy as np
    from imagen_jax.cascade import Imagen
    from imagen_jax.parallel import mesh as mesh_lib
    from imagen_jax.stage.stage import Stage
    from imagen_jax.text import T5Encoder

    base, sr = sys.argv[1:3]
    imagen = Imagen.load([base, sr])
    assert imagen.mesh.devices.size == 8 and imagen.stages[1].mesh is imagen.mesh
    for params in (imagen.encoder.state, imagen.stages[0].params, imagen.stages[1].params):
        leaves = jax.tree.leaves(params)
        split = [x for x in leaves if x.addressable_shards[0].data.size * 8 == x.size]
        assert len(split) >= len(leaves) // 3, (len(split), len(leaves))  # stored an 8th per device
    prompts = ["a red circle on the left", "a blue square", "a green triangle at the top", "a red square", "hi"]
    seeds = [3, 1, 4, 1, 5]  # one seed twice: the same image
    one = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}), jax.devices()[:1])
    config = imagen.stages[0].config
    encoder = T5Encoder.from_pretrained(config.text.encoder)
    single = Imagen(encoder, [Stage.load(w, text_dim=16, mesh=one) for w in (base, sr)], one)
    for samplers in (["ddpm", "dpmpp_2m"],):  # one stochastic sampler (its noise per step), one multistep solver
        kwargs = dict(steps=[3, 2], guidance_scales=[2.0, 1.0], samplers=samplers)
        sharded = imagen(prompts, seeds, **kwargs)
        each = [single([p], [s], **kwargs) for p, s in zip(prompts, seeds)]  # one image per call, on one device
        alone = [np.concatenate(images) for images in zip(*each)]
        for mesh_images, one_images in zip(sharded, alone):
            np.testing.assert_allclose(mesh_images, one_images, rtol=0, atol=1e-6)
            np.testing.assert_array_equal(mesh_images[1], mesh_images[3])
    print("OK")
""")


def test_eight_devices_sample_the_images_of_one(tmp_path):
    make_tiny_t5(str(tmp_path / "t5"), demo.all_captions(), d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32)
    stages = []
    for name in ("base_export", "sr_export"):
        shutil.copytree(os.path.join(LEGACY, name), tmp_path / name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        config["text"]["encoder"] = str(tmp_path / "t5")
        config["mesh"]["rules"] = [list(rule) for rule in base_config("unet").mesh.rules]  # with today's T5 rules
        config["mesh"]["replicate_below"] = 0  # tiny weights split as a real model's are
        if name == "sr_export":  # a convolutional 4 -> 8 px stage, run at 8 -> 16 px to follow the 8 px base
            config["data"]["image_size"], config["model"]["lowres_size"] = 16, 8
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        stages.append(str(tmp_path / name))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, *stages], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


def test_sampling_casts_kernels_to_the_compute_dtype_once_per_call():
    """The float32 EMA's kernels and embeddings reach the sampler's step loop in the compute dtype (cast once per
    call, as the train step casts them), vectors and integers as they are (issue 29, point 5)."""
    import jax.numpy as jnp
    import numpy as np

    from imagen_jax.stage.sampling import in_compute_dtype

    params = {
        "kernel": np.ones((3, 3, 4, 8), np.float32),
        "scale": np.ones(8, np.float32),
        "ids": np.ones((2, 2), np.int32),
    }
    cast = in_compute_dtype(params, jnp.bfloat16)
    assert {k: v.dtype for k, v in cast.items()} == {"kernel": jnp.bfloat16, "scale": jnp.float32, "ids": jnp.int32}
    assert all(v.dtype == jnp.float32 for k, v in in_compute_dtype(params, jnp.float32).items() if k != "ids")

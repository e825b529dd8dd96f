"""config.eval: FID/KID/CLIP score of the EMA weights during training, logged beside the loss; bad settings are
one-line config errors before anything is built."""

import os

import numpy as np
import pytest

from imagen_jax import config as config_lib
from imagen_jax.data import demo
from imagen_jax.eval import reference_stats
from imagen_jax.eval.clip_tiny import make_tiny_clip
from imagen_jax.eval.inception_weights import make_random_inception
from imagen_jax.tools.fid_reference import make_reference
from imagen_jax.train import setup as setup_lib
from tests.processes import run_distributed
from tests.test_train import assets, tiny_config  # noqa: F401  (the module's shards and T5)


def eval_config(assets, tmp_path):
    config = tiny_config(assets, num_steps=2, log_every=2, checkpoint_every=2, sample_every=0)
    make_random_inception(str(tmp_path / "inception.safetensors"))
    make_tiny_clip(str(tmp_path / "clip"), captions=demo.all_captions())
    stats = make_reference(
        str(assets / "data" / "*.tfrecord"),
        image_size=8,
        inception=str(tmp_path / "inception.safetensors"),
        batch_size=8,
    )
    reference_stats.save(str(tmp_path / "stats.npz"), stats)
    (tmp_path / "captions.txt").write_text("\n".join(demo.all_captions()))
    config.eval.update(
        every=2,
        num_images=8,
        batch_size=4,
        steps=2,
        guidance_scales=(1.0, 3.0),
        captions=str(tmp_path / "captions.txt"),
        reference=str(tmp_path / "stats.npz"),
        inception=str(tmp_path / "inception.safetensors"),
        clip=str(tmp_path / "clip"),
    )
    return config


@pytest.mark.slow  # trains 2 steps, builds a reference and evaluates twice: ~60 s quiet
def test_training_logs_fid_kid_and_clip_score(assets, tmp_path, capsys):
    from imagen_jax.train.loop import run

    run(eval_config(assets, tmp_path), str(tmp_path / "run"))
    out = capsys.readouterr().out
    assert "evaluating every 2 steps: 8 captions per guidance scale, batches of 4" in out
    line = next(line for line in out.splitlines() if line.endswith("(evaluation)"))
    assert line.startswith("step 2: ")
    figures = dict(item.split("=") for item in line[len("step 2: ") : -len("; (evaluation)")].split(", "))
    for scale in ("1", "3"):
        for name in ("fid", "kid", "clip_score", "precision", "recall"):
            assert np.isfinite(float(figures[f"eval/{name}_g{scale}"])), (name, scale, line)
    assert float(figures["eval/fid_g1"]) > 0


def test_eval_settings_are_checked_before_training(assets, tmp_path):
    config = tiny_config(assets)
    config.eval.every = 10
    with pytest.raises(config_lib.ConfigError, match="config.eval.captions is empty but config.eval.every=10"):
        setup_lib.validate(config)
    config.eval.update(captions="c.txt", reference="r.npz", inception="i.safetensors", num_images=1)
    with pytest.raises(config_lib.ConfigError, match=r"config.eval.num_images must be >= 2, got 1"):
        setup_lib.validate(config)
    sr = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), "..", "configs", "demo_sr.py"))
    sr.data.train_shards, sr.text.encoder = config.data.train_shards, config.text.encoder
    sr.eval.update(every=5, captions="c.txt", reference="r.npz", inception="i.safetensors")
    with pytest.raises(config_lib.ConfigError, match="eval.every is set on a super-resolution stage"):
        setup_lib.validate(sr)


@pytest.mark.slow  # two processes train 2 steps and evaluate; then one process evaluates the same weights: ~90 s
def test_two_processes_evaluate_together_and_log_what_one_process_computes(assets, tmp_path):
    """train.py --distributed over localhost with config.eval on: both processes sample and score every batch on
    the shared mesh, process 0 logs the figures, and they are what one process computes from the same EMA (whose
    batches of 3 are 4 on the two processes' two devices: each caption keeps its seed)."""
    from imagen_jax.cascade import Imagen
    from imagen_jax.train.periodic_eval import PeriodicEval

    config = eval_config(assets, tmp_path)
    config.eval.guidance_scales, config.eval.batch_size = (3.0,), 3
    (tmp_path / "two.py").write_text(
        f"import ml_collections\n\ndef get_config():\n    return ml_collections.ConfigDict({config.to_dict()!r})\n"
    )
    outputs = run_distributed(["train.py", "--config", str(tmp_path / "two.py"), "--workdir", str(tmp_path / "run")])
    assert "processes: 2" in outputs[0] and "(evaluation)" not in outputs[1]
    assert "8 captions per guidance scale, batches of 4" in outputs[0]
    line = next(line for line in outputs[0].splitlines() if line.endswith("(evaluation)"))
    logged = dict(item.split("=") for item in line[len("step 2: ") : -len("; (evaluation)")].split(", "))

    imagen = Imagen.load([str(tmp_path / "run")])  # one process, the EMA weights of step 2
    stage = imagen.stages[0]
    alone = PeriodicEval(stage.config, imagen.mesh, imagen.encoder, stage.denoiser, print)(stage.params)
    assert sorted(alone) == sorted(logged)
    for name, value in alone.items():
        np.testing.assert_allclose(float(logged[name]), value, rtol=1e-3, err_msg=name)

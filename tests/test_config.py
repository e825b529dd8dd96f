"""Config loading and strict command-line overrides."""

import json
import subprocess
import sys

import pytest

from imagen_jax import config as config_lib

DEMO = "configs/demo.py"


def test_overrides_parse_to_the_field_type():
    c = config_lib.load_config_file(DEMO)
    config_lib.apply_overrides(
        c,
        [
            "--config.train.batch_size=64",
            "--config.train.learning_rate=3",
            "--config.model.channel_mults=(1,2,4)",
            "--config.text.encoder",
            "/models/t5",
            "--config.diffusion.objective=v",
            "--config.data.precomputed_text=true",
        ],
    )
    assert c.train.batch_size == 64 and isinstance(c.train.learning_rate, float) and c.train.learning_rate == 3.0
    assert c.model.channel_mults == (1, 2, 4)
    assert c.text.encoder == "/models/t5" and c.diffusion.objective == "v" and c.data.precomputed_text is True


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--config.train.batchsize=64", "unknown config key 'train.batchsize' (did you mean 'train.batch_size'?)"),
        ("--config.trian.batch_size=64", "unknown config key 'trian'"),
        ("--config.train.batch_size=abc", "config key 'train.batch_size' expects int, got 'abc'"),
        ("--config.train.batch_size=1.5", "config key 'train.batch_size' expects int, got '1.5'"),
        ("--config.data.precomputed_text=maybe", "expects a bool"),
        ("--config.train=3", "is a section"),
        ("--workdirr=x", "unrecognised argument '--workdirr=x'"),
    ],
)
def test_bad_overrides_name_the_key_and_value(arg, message):
    c = config_lib.load_config_file(DEMO)
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.apply_overrides(c, [arg])
    assert message in str(e.value)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="does not exist"):
        config_lib.load_config_file(str(tmp_path / "nope.py"))
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(config_lib.ConfigError, match="no get_config"):
        config_lib.load_config_file(str(bad))


def test_json_round_trip_keeps_tuples():
    c = config_lib.load_config_file("configs/base64.py")
    back = config_lib.from_json(json.loads(json.dumps(config_lib.to_json(c))))
    assert back.model.channel_mults == (1, 2, 3, 4) and back.mesh.rules == c.mesh.rules
    assert back.to_dict() == c.to_dict()


def test_train_cli_rejects_unknown_key_in_one_line():
    proc = subprocess.run(
        [sys.executable, "train.py", "--config", DEMO, "--workdir", "/tmp/unused", "--config.train.nope=1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "train.py: error: unknown config key 'train.nope'"


@pytest.mark.parametrize(
    "path, text_dim, millions",
    [
        ("configs/mini_base64.py", 2048, 401.7),
        ("configs/mini_sr256.py", 2048, 151.7),
        ("configs/mini_sr1024.py", 2048, 95.7),
    ],
)
def test_mini_presets_validate_and_have_their_documented_size(path, text_dim, millions):
    """The one-TPU-VM presets (T5-XL text, 2048 wide) pass the stage's checks and have the parameter counts their
    docstrings state, counted without allocating them."""
    import math

    import jax
    from flax import nnx

    from imagen_jax.stage import config as stage_config
    from imagen_jax.stage.model import build_model

    c = config_lib.load_config_file(path)
    stage_config.validate(c)
    model = nnx.eval_shape(lambda: build_model(c, text_dim))
    count = sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert round(count / 1e6, 1) == millions

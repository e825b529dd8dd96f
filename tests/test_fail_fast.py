"""Bad input to train.py and the tools is answered in one line, before anything heavy, and leaves nothing behind.

train.py checks the whole config (choices, sizes, the shards, the T5 folder's config.json) and the workdir before
loading T5 or building the model, and creates the workdir only then. These run train.main in-process (so each
case takes milliseconds, not a process start) and check the exact line, the exit status and that no workdir
exists afterwards.
"""

import json
import os
import subprocess
import sys

import pytest

import train
from imagen_jax.data import demo
from imagen_jax.errors import UsageError
from imagen_jax.text.tiny import make_tiny_t5

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fail_fast")
    demo.write_demo_shards(str(root / "data"), num_examples=8, image_size=8, num_shards=1, seed=0)
    make_tiny_t5(str(root / "t5"), demo.all_captions(), d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32)
    (root / "bad_t5").mkdir()
    (root / "bad_t5" / "config.json").write_text("{not json")
    (root / "syntax.py").write_text("def get_config(:\n    pass\n")
    (root / "a_file").write_text("not a folder")
    return root


def _train(capsys, *args):
    status = train.main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    return status, err[-1] if err else ""


CASES = [
    (["--config.train.optimizer=sgd"], 1, "config.train.optimizer='sgd' is not one of adamw, adafactor"),
    (
        ["--config.diffusion.schedule=cosin"],
        1,
        "config.diffusion.schedule='cosin' is not one of cosine, linear, discrete_cosine",
    ),
    (["--config.diffusion.objective=x0"], 1, "config.diffusion.objective='x0' is not one of eps, v"),
    (["--config.model.kind=unet2"], 1, "config.model.kind='unet2' is not one of ['efficient_unet', 'if_unet', 'unet']"),
    (["--config.train.compute_dtype=fp16"], 1, "config.train.compute_dtype='fp16' is not one of float32, bfloat16"),
    (["--config.train.batch_size=0"], 1, "config.train.batch_size must be >= 1, got 0"),
    (
        ["--config.data.image_size=64"],
        1,
        "config.model.attn_resolutions [4] are not feature-map sizes of this U-Net [64, 32, 16] (data.image_size=64)",
    ),
    (
        ["--config.data.format=webdataset"],
        1,
        "config.data.format='webdataset' is not supported; use one of tfrecord "
        "(convert webdataset .tar shards with python -m imagen_jax.tools.convert_shards)",
    ),
    (
        ["--config.data.train_shards="],
        1,
        "config.data.train_shards is empty: set it to your shard files (a glob, "
        "brace pattern, list or .txt list file; local or gs://)",
    ),
]


@pytest.mark.parametrize("args, status, line", CASES, ids=[a[0] for a, _, _ in CASES])
def test_bad_config_values_are_one_line_before_anything_heavy(assets, tmp_path, capsys, args, status, line):
    workdir = tmp_path / "w"
    good = [f"--config.text.encoder={assets / 't5'}", f"--config.data.train_shards={assets / 'data' / '*.tfrecord'}"]
    got = _train(capsys, "--config", "configs/demo.py", "--workdir", str(workdir), *good, *args)
    assert got == (status, f"train.py: error: {line}")
    assert not workdir.exists()


def test_bad_files_and_workdirs_are_one_line_and_leave_nothing(assets, tmp_path, capsys):
    good = [f"--config.text.encoder={assets / 't5'}", f"--config.data.train_shards={assets / 'data' / '*.tfrecord'}"]
    workdir = tmp_path / "w"
    cases = [
        (
            ["--config", str(assets / "syntax.py"), "--workdir", str(workdir)],
            2,
            f"config file '{assets / 'syntax.py'}' line 1: SyntaxError: invalid syntax",
        ),
        (
            [
                "--config",
                "configs/demo.py",
                "--workdir",
                str(workdir),
                *good,
                f"--config.text.encoder={assets / 'bad_t5'}",
            ],
            1,
            f"{assets / 'bad_t5' / 'config.json'}: T5 config.json cannot be read as JSON: Expecting property name "
            "enclosed in double quotes: line 1 column 2 (char 1)",
        ),
        (
            ["--config", "configs/demo.py", "--workdir", str(assets / "a_file"), *good],
            1,
            f"--workdir '{assets / 'a_file'}' exists and is a file, not a folder",
        ),
        (
            ["--config", "configs/demo.py", "--workdir", str(assets / "a_file" / "run"), *good],
            1,
            f"--workdir '{assets / 'a_file' / 'run'}' cannot be created: {assets / 'a_file'} is a file",
        ),
        (
            ["--config", "configs/demo.py", "--workdir", "/proc/imagen_jax_test/run", *good],
            1,
            "--workdir '/proc/imagen_jax_test/run' cannot be created: ",
        ),
    ]
    for args, status, line in cases:
        got_status, got_line = _train(capsys, *args)
        assert got_status == status and got_line.startswith(f"train.py: error: {line}"), got_line
    assert not workdir.exists() and (assets / "a_file").read_text() == "not a folder"


def test_distributed_without_a_cluster_is_one_line(assets, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/demo.py", "--workdir", str(tmp_path / "w"), "--distributed"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("train.py: error: --distributed: jax.distributed.initialize() found no cluster to join")
    )
    assert not (tmp_path / "w").exists()


def test_tools_parse_arguments_before_importing_jax_or_tensorflow():
    """`--help` and argument errors answer at once: no tool imports JAX or TensorFlow before parsing."""
    script = """
import importlib, json, sys
tools = ["bench", "convert_shards", "demo", "dreambooth", "encode_text", "eval_demo", "export", "sampler_bench"]
for name in tools:
    module = importlib.import_module(f"imagen_jax.tools.{name}")
    try:
        module.main(["--help"])
    except SystemExit:
        pass
heavy = sorted(m for m in ("jax", "tensorflow", "flax") if m in sys.modules)
print(json.dumps(heavy))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_tool_errors_share_the_cli_prefix_and_exit_codes(tmp_path, capsys):
    from imagen_jax.tools import demo as demo_tool
    from imagen_jax.tools import eval_demo

    assert eval_demo.main(["--workdir", str(tmp_path / "nowhere")]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"eval_demo: error: no checkpoint in {tmp_path / 'nowhere' / 'checkpoints'} (train the stage first, or check "
        "--workdir)"
    ]
    assert demo_tool.main(["--workdir", str(tmp_path / "demo"), "--base_config", str(tmp_path / "missing.py")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"demo: error: config file '{tmp_path / 'missing.py'}' does not exist"
    ]
    assert not (tmp_path / "demo").exists()


def test_distributed_process_numbers_must_be_integers(monkeypatch):
    from imagen_jax.parallel import distributed

    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    with pytest.raises(UsageError, match=r"JAX_NUM_PROCESSES='two' and JAX_PROCESS_ID='0' must both be integers"):
        distributed.initialize()

"""Bad input to sample.py and the export tool: one-line errors naming the argument or path, exit code 2 for
usage errors and 1 for runtime ones, no traceback; stages in the wrong order are refused before any model
loads; a sample folder with a samples.json is always complete."""

import json
import os
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from imagen_jax import config as config_lib
from imagen_jax import filesystem, sample_files
from imagen_jax.cascade import Imagen
from imagen_jax.errors import UsageError
from imagen_jax.stage.model import local_mesh
from imagen_jax.stage.stage import Stage, stage_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _save_stage(config, workdir):
    """A checkpoint as the trainer writes it, with random weights (compiling a train step takes a minute)."""
    from imagen_jax.stage.checkpoint import Checkpointer
    from imagen_jax.train import optimizer as optimizer_lib
    from imagen_jax.train import state as state_lib

    tx = optimizer_lib.make_optimizer(config.train)
    abstract = jax.eval_shape(lambda: state_lib.fresh_state(config, 16, tx))
    rng = np.random.default_rng(0)
    state = jax.tree.map(
        lambda x: rng.normal(size=x.shape).astype(x.dtype) if x.dtype == np.float32 else np.zeros(x.shape, x.dtype),
        abstract,
    )
    checkpointer = Checkpointer(workdir, every=1, keep=1, async_save=False)
    checkpointer.save(1, {**state, "step": np.int32(1)}, config, {"batches_consumed": 1})
    checkpointer.close()


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Workdirs of a tiny base stage (8x8) and SR stage (8->16), an export of the SR stage, and base workdirs
    whose checkpoint has no config, an unparsable one, and one that is not a stage config. The T5 folder
    holds only config.json, so anything that loaded the encoder would fail: the errors below come first."""
    from imagen_jax.tools.export import export_workdir

    root = tmp_path_factory.mktemp("stages")
    (root / "t5").mkdir()
    t5 = {"vocab_size": 32, "d_model": 16, "d_kv": 8, "d_ff": 32, "num_layers": 1, "num_heads": 2}
    (root / "t5" / "config.json").write_text(json.dumps(t5))
    base = config_lib.load_config_file(os.path.join(REPO, "configs/demo.py"))
    base.data.image_size, base.model.dim, base.model.channel_mults = 8, 8, (1, 2)
    base.model.attn_resolutions, base.model.head_dim = (4,), 8
    sr = config_lib.load_config_file(os.path.join(REPO, "configs/demo_sr.py"))
    sr.data.image_size, sr.model.dim, sr.model.head_dim, sr.model.lowres_size = 16, 8, 8, 8
    paths = {name: str(root / name) for name in ("base", "sr", "sr_export", "no_config", "bad_config", "odd_config")}
    for config, name in ((base, "base"), (sr, "sr")):
        config.text.encoder = str(root / "t5")
        _save_stage(config, paths[name])
    export_workdir(paths["sr"], paths["sr_export"])
    for name, text in (("no_config", None), ("bad_config", "{not json"), ("odd_config", '{"seed": 0}')):
        shutil.copytree(paths["base"], paths[name])
        config_dir = os.path.join(paths[name], "checkpoints", "1", "config")
        if text is None:
            shutil.rmtree(config_dir)
        else:
            (root / name / "checkpoints" / "1" / "config" / "metadata").write_text(text)
    return paths


def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)


def _assert_one_line_error(proc, returncode, line):
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == returncode, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == line
    assert proc.stdout == ""


SAMPLE_ARGUMENT_ERRORS = [
    (["--steps", "0"], "--steps must be >= 1 for every stage, got 0"),
    (["--steps", "-3"], "--steps must be >= 1 for every stage, got -3"),
    (["--sr_workdir", "sr", "--steps", "4,0"], "--steps must be >= 1 for every stage, got 4,0"),
    (["--steps", "2.5"], "--steps '2.5': each value must be an int or a step list's name"),
    (
        ["--steps", "smart5"],
        "--steps smart5: stage 1: unknown sampling steps 'smart5'; valid names: fast27, smart27, "
        "smart50, smart100, smart185, super27, super40, super100",
    ),
    (["--sr_workdir", "sr", "--steps", "1,2,3"], "--steps has 3 values for 2 stages (give one, or one per stage)"),
    (["--guidance_scale", "strong"], "--guidance_scale 'strong': each value must be a float"),
    (
        ["--guidance_scale", "-1"],
        "--guidance_scale must be a finite number >= 0 (1: no guidance) for every stage, got -1",
    ),
    (
        ["--sr_workdir", "sr", "--guidance_scale", "3,nan"],
        "--guidance_scale must be a finite number >= 0 (1: no guidance) for every stage, got 3,nan",
    ),
    (["--sampler", "euler"], "--sampler 'euler': unknown sampler 'euler'; valid samplers: ddpm, ddim, dpmpp_2m"),
    (["--num_images", "0"], "--num_images must be >= 1, got 0"),
    (["--batch_size", "-2"], "--batch_size must be >= 1, got -2"),
    (["--sr_noise_level", "1.5"], "--sr_noise_level must be in [0, 1], got 1.5"),
    (["--sr_noise_level", "-0.1"], "--sr_noise_level must be in [0, 1], got -0.1"),
    (["--sr_noise_level", "high"], "argument --sr_noise_level: invalid float value: 'high'"),
    (
        ["--strength", "1.5"],
        "--strength 1.5: strength must be in [0, 1] (0: the input unchanged, 1: text-to-image), got 1.5",
    ),
    (["--mask", "mask.png"], "--mask needs --init_image (the image it masks)"),
    (["--guidance_interval", "3"], "--guidance_interval '3': each value must be LO:HI (two log-SNR numbers)"),
    (["--seed", "-1"], "--seed must be in [0, 4294967292] (image i uses seed + i, a uint32), got -1"),
    (
        ["--num_images", "2", "--seed", "4294967295"],
        "--seed must be in [0, 4294967294] (image i uses seed + i, a uint32), got 4294967295",
    ),
]


@pytest.mark.parametrize("args,message", SAMPLE_ARGUMENT_ERRORS, ids=[" ".join(a) for a, _ in SAMPLE_ARGUMENT_ERRORS])
def test_sample_argument_errors(tmp_path, args, message):
    """Checked before any model loads: the workdirs here do not even exist."""
    proc = _cli(
        "sample.py", "--workdir", str(tmp_path / "base"), "--prompt", "a cat", "--out", str(tmp_path / "o"), *args
    )
    _assert_one_line_error(proc, 2, f"sample.py: error: {message}")
    assert not (tmp_path / "o").exists()


def test_sample_prompts_file_and_out_errors(tmp_path):
    missing, folder = tmp_path / "missing.txt", tmp_path / "prompts"
    folder.mkdir()
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "blank.txt").write_text("\n   \n\n")
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "good.txt").write_text("a cat\n")
    cases = [
        (
            ["--prompts_file", str(missing)],
            f"cannot read --prompts_file '{missing}': [Errno 2] No such file or directory: '{missing}'",
        ),
        (
            ["--prompts_file", str(folder)],
            f"cannot read --prompts_file '{folder}': [Errno 21] Is a directory: '{folder}'",
        ),
        (
            ["--prompts_file", str(tmp_path / "latin1.txt")],
            f"cannot read --prompts_file '{tmp_path / 'latin1.txt'}': 'utf-8' codec can't decode byte 0xe9 in "
            "position 3: invalid continuation byte",
        ),
        (
            ["--prompt", "a cat", "--prompts_file", str(tmp_path / "blank.txt")],
            f"--prompts_file '{tmp_path / 'blank.txt'}' has no prompts (every line is blank)",
        ),
        (
            ["--prompts_file", str(tmp_path / "good.txt"), "--out", str(tmp_path / "file" / "samples")],
            f"--out '{tmp_path / 'file' / 'samples'}' cannot be created or written: "
            f"[Errno 20] Not a directory: '{tmp_path / 'file' / 'samples'}'",
        ),
    ]
    for args, message in cases:
        out = [] if "--out" in args else ["--out", str(tmp_path / "o")]
        proc = _cli("sample.py", "--workdir", str(tmp_path / "base"), *out, *args)
        _assert_one_line_error(proc, 2, f"sample.py: error: {message}")
    assert (tmp_path / "file").read_text() == "not a folder"


def test_wrong_stage_order_fails_before_loading(stages, tmp_path):
    base, sr, sr_export = stages["base"], stages["sr"], stages["sr_export"]
    hint = (
        "pass the base stage (making the 8x8 images it takes) first (sample.py --workdir), "
        "then the SR stages (--sr_workdir)"
    )
    for first in (sr, sr_export):
        with pytest.raises(ValueError) as error:
            Imagen.load([first])
        assert str(error.value) == (
            f"the first stage ({first}) is a super-resolution stage (efficient_unet, 8->16), not a base stage: {hint}"
        )
    with pytest.raises(ValueError) as error:
        Imagen.load([base, base])
    assert str(error.value) == (
        f"stage {base} is a base stage (unet, 8x8), not a super-resolution stage: only the first stage (sample.py "
        f"--workdir) is a base stage; the cascade given: {base} (unet, 8x8) -> {base} (unet, 8x8)"
    )
    with pytest.raises(ValueError) as error:
        Imagen.load([base, sr, sr_export])
    assert str(error.value) == (
        f"stage {sr_export} takes 8x8 input, but the stage before it ({sr}) makes 16x16 images; the cascade given: "
        f"{base} (unet, 8x8) -> {sr} (efficient_unet, 8->16) -> {sr_export} (efficient_unet, 8->16)"
    )

    # Through the CLI: a runtime error (exit 1) in one line; nothing is written.
    proc = _cli("sample.py", "--workdir", sr, "--prompt", "a cat", "--out", str(tmp_path / "out"))
    _assert_one_line_error(
        proc,
        1,
        f"sample.py: error: the first stage ({sr}) is a super-resolution stage "
        f"(efficient_unet, 8->16), not a base stage: {hint}",
    )
    proc = _cli(
        "sample.py", "--workdir", base, "--sr_workdir", base, "--prompt", "a cat", "--out", str(tmp_path / "out")
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip().splitlines()[-1].startswith(f"sample.py: error: stage {base} is a base stage (unet, 8x8)")
    )
    assert os.listdir(tmp_path / "out") == []


def test_unreadable_stage_configs_name_the_path(stages):
    from imagen_jax.tools.export import export_workdir

    expected = {
        "no_config": 'cannot read the stage config: Item "config" was not found in the checkpoint. '
        "Available items: ['ema', 'train', 'data']",
        "bad_config": "cannot read the stage config: Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1)",
        "odd_config": "not a stage config (no data.image_size)",
    }
    for name, reason in expected.items():
        message = f"{os.path.join(stages[name], 'checkpoints')}/1/config: {reason}"
        with pytest.raises(ValueError) as error:
            stage_config(stages[name])
        assert str(error.value) == message
        with pytest.raises(ValueError) as error:
            Imagen.load([stages["base"], stages[name]])
        assert str(error.value) == message
        with pytest.raises(ValueError) as error:
            export_workdir(stages[name], f"{stages[name]}_export")
        assert str(error.value) == message


def test_export_cli_errors(stages, tmp_path):
    (tmp_path / "file").write_text("x")
    cases = [
        (
            ["--workdir", str(tmp_path / "empty"), "--out", str(tmp_path / "e")],
            1,
            f"no checkpoint in {tmp_path / 'empty' / 'checkpoints'} (train the stage first, or check --workdir)",
        ),
        (
            ["--workdir", stages["base"], "--out", str(tmp_path / "file" / "e")],
            1,
            f"{tmp_path / 'file' / 'e'}: cannot be created, {tmp_path / 'file'} is a file",
        ),
        (
            ["--workdir", stages["base"], "--out", str(tmp_path / "file"), "--overwrite"],
            1,
            f"{tmp_path / 'file'}: exists and is a file, not an export folder",
        ),
        (
            ["--workdir", stages["bad_config"], "--out", str(tmp_path / "e")],
            1,
            f"{os.path.join(stages['bad_config'], 'checkpoints')}/1/config: cannot read the stage config: "
            "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
        ),
        (
            ["--workdir", stages["base"], "--out", str(tmp_path / "e"), "--text_dim", "0"],
            2,
            "--text_dim must be >= 1, got 0",
        ),
        (["--workdir", stages["base"], "--out", str(tmp_path / "e"), "--step", "-1"], 2, "--step must be >= 0, got -1"),
    ]
    for args, returncode, message in cases:
        proc = _cli("-m", "imagen_jax.tools.export", *args)
        _assert_one_line_error(proc, returncode, f"export: error: {message}")
    assert sorted(os.listdir(tmp_path)) == ["file"] and (tmp_path / "file").read_text() == "x"


class FakeImagen:
    """Stands in for the cascade (base 4x4 -> SR 8x8): the tests below are about the files, not the models."""

    def __init__(self, workdirs):
        sizes = [(4, None), (8, 4)]
        self.stages = []
        for workdir, (size, lowres) in zip(workdirs, sizes):
            model = {"kind": "efficient_unet", "lowres_size": lowres} if lowres else {"kind": "unet"}
            config = ml_collections.ConfigDict(
                {
                    "data": {"image_size": size},
                    "model": model,
                    "diffusion": {"sr_noise_level": 0.2, "schedule": "cosine"},
                    "train": {"sample_steps": 2, "sample_guidance_scale": 1.0},
                }
            )
            self.stages.append(Stage(workdir=workdir, config=config, params=None, denoiser=None, step=7, mesh=None))

    @classmethod
    def load(cls, workdirs, steps=None, *, text_encoder=None, dtype=None, adapters=()):
        return cls(workdirs)

    def __call__(self, prompts, seeds, *, steps, guidance_scales, samplers, sr_noise_level, progress, **editing):
        rng = np.random.default_rng(seeds[0])
        return [rng.uniform(-1, 1, (len(seeds), s.image_size, s.image_size, 3)) for s in self.stages]


def _sample(out, prompts=("a cat", "a dog"), overwrite=True):
    return sample_files.sample_to_folder(
        ["base", "sr"], list(prompts), out=str(out), num_images=2, seed=0, batch_size=3, overwrite=overwrite
    )


def _leftovers(out):
    return sorted(
        os.path.relpath(os.path.join(d, f), out) for d, _, files in os.walk(out) for f in files if ".partial-" in f
    )


def test_sample_folder_is_complete_or_has_no_index(tmp_path, monkeypatch):
    monkeypatch.setattr(sample_files, "Imagen", FakeImagen)
    out = tmp_path / "out"
    written = []
    write_atomic = sample_files.write_atomically
    monkeypatch.setattr(
        sample_files,
        "write_atomically",
        lambda path, data, **kw: (write_atomic(path, data, **kw), written.append(path)),
    )
    names = _sample(out)
    assert names == ["000_00_a_cat.png", "000_01_a_cat.png", "001_00_a_dog.png", "001_01_a_dog.png"]
    rel = [os.path.relpath(p, out) for p in written]
    assert rel[-2:] == ["grid.png", "samples.json"]  # the grid after the images, the index last
    assert sorted(rel[:-2]) == sorted(names + [f"4px/{n}" for n in names])
    index = json.loads((out / "samples.json").read_text())
    assert index["grid"] == "grid.png" and list(index["images"]) == names
    assert [s["file"] for s in index["images"][names[1]]["stages"]] == [f"4px/{names[1]}", names[1]]
    assert np.asarray(Image.open(out / names[0])).shape == (8, 8, 3)
    assert np.asarray(Image.open(out / "4px" / names[0])).shape == (4, 4, 3)
    monkeypatch.setattr(sample_files, "write_atomically", write_atomic)

    # Interrupted while encoding the second image: the earlier run's index is gone, nothing temporary is left.
    png, calls = sample_files._png, []

    def failing_png(image):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return png(image)

    monkeypatch.setattr(sample_files, "_png", failing_png)
    with pytest.raises(KeyboardInterrupt):
        _sample(out)
    assert not (out / "samples.json").exists() and _leftovers(out) == []
    monkeypatch.setattr(sample_files, "_png", png)

    # Interrupted between writing a file and renaming it into place: its temporary file is removed.
    rename, renames = filesystem.LOCAL.rename, []

    def failing_rename(src, dst, overwrite=False):
        renames.append(dst)
        if len(renames) == 3:
            assert os.path.exists(src) and ".partial-" in src
            raise OSError("disk full")
        return rename(src, dst, overwrite=overwrite)

    monkeypatch.setattr(filesystem.LOCAL, "rename", failing_rename)
    with pytest.raises(OSError, match="disk full"):
        _sample(out)
    assert not (out / "samples.json").exists() and _leftovers(out) == []
    monkeypatch.setattr(filesystem.LOCAL, "rename", rename)

    # A killed run's temporary files are swept by the next run, which overwrites cleanly.
    (out / "001_00_a_dog.png.partial-99999").write_bytes(b"half a png")
    (out / "4px" / "000_00_a_cat.png.partial-99999").write_bytes(b"half a png")
    assert _sample(out) == names
    assert _leftovers(out) == [] and json.loads((out / "samples.json").read_text()) == index
    assert sorted(os.listdir(out)) == sorted(["4px", "grid.png", "samples.json", *names])


def test_stage_loads_from_workdir_and_export_and_names_a_misfit(stages):
    from_workdir = Stage.load(stages["sr"], text_dim=16, mesh=local_mesh())
    from_export = Stage.load(stages["sr_export"], text_dim=16, mesh=local_mesh())
    assert (from_workdir.step, from_workdir.lowres_size, from_workdir.image_size) == (1, 8, 16)
    assert from_export.config.to_dict() == from_workdir.config.to_dict() and from_export.step == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(from_export.params), jax.device_get(from_workdir.params))
    with pytest.raises(ValueError) as error:
        Stage.load(
            stages["sr"], text_dim=24, mesh=local_mesh()
        )  # a wrong T5 width: orbax's shape error, in one line with the path
    message = str(error.value)
    assert "\n" not in message and message.startswith(
        f"{os.path.join(stages['sr'], 'checkpoints')}/1: cannot restore the EMA weights of the model its config "
        "describes (text width 24): "
    )


def test_a_folder_with_another_runs_images_is_refused_unless_overwrite(tmp_path, monkeypatch):
    """Never two runs' images in one folder: refused without --overwrite; with it, the old images go first."""
    monkeypatch.setattr(sample_files, "Imagen", FakeImagen)
    out = tmp_path / "out"
    first = _sample(out, overwrite=False)
    (out / "notes.txt").write_text("mine")  # not an image: never touched
    with pytest.raises(
        UsageError,
        match=r"already holds another run's images \(10 files, e.g. 000_00_a_cat.png\); "
        r"pass --overwrite",
    ):
        _sample(out, prompts=["a bird"], overwrite=False)
    assert sorted(os.listdir(out)) == sorted(["4px", "grid.png", "samples.json", "notes.txt", *first])
    second = _sample(out, prompts=["a bird"])
    assert sorted(os.listdir(out)) == sorted(["4px", "grid.png", "samples.json", "notes.txt", *second])
    assert sorted(os.listdir(out / "4px")) == second and "a_bird" in second[0]
    proc = _cli("sample.py", "--workdir", "base", "--prompt", "a cat", "--out", str(out))
    _assert_one_line_error(
        proc,
        2,
        f"sample.py: error: --out {str(out)!r} already holds another run's images "
        "(6 files, e.g. 000_00_a_bird.png); pass --overwrite to replace them, or choose a "
        "new folder",
    )

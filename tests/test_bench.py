"""The throughput benchmark times the real train step and the real input pipeline, with consistent figures."""

import io
import re

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from imagen_jax import config as config_lib
from imagen_jax.data.synthetic import write_synthetic_shards
from imagen_jax.tools.bench import main
from imagen_jax.tools.bench_data import benchmark_data
from imagen_jax.tools.bench_step import benchmark, model_flops, random_batch
from tests.processes import run_without_tensorflow


@pytest.mark.slow  # a benchmark run through the CLI: ~35 s
def test_bench_reports_throughput_and_flops_without_tensorflow():
    """The train-step benchmark through its CLI, with any import of TensorFlow failing (a GPU or TPU machine may
    have JAX only: issue 14's GPU had no TensorFlow): consistent figures on stdout, each long phase on stderr."""
    import json

    tiny = [
        "--config.data.image_size=8",
        "--config.model.dim=16",
        "--config.model.channel_mults=(1,2)",
        "--config.model.attn_resolutions=(4,)",
        "--config.model.head_dim=8",
        "--config.train.batch_size=4",
    ]
    args = ["-m", "imagen_jax.tools.bench", "--config", "configs/demo.py", "--steps", "2", "--text_dim", "16"]
    proc = run_without_tensorflow([*args, "--peak_tflops", "1", *tiny])
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["global_batch"] == 4 and result["image_size"] == 8 and result["unet_params_M"] > 0
    assert result["gflop_per_step"] > 0 and result["images_per_s"] > 0
    # Figures agree with each other: images/s = batch / step time; MFU = the model's FLOP/s / peak.
    assert abs(result["images_per_s"] - 4 / (result["step_ms"] / 1e3)) / result["images_per_s"] < 0.05
    assert abs(result["mfu"] - result["model_tflops"] / 1.0) < 1e-3
    assert 0 < result["model_gflop_per_step"] <= result["gflop_per_step"]
    # Each long phase is announced on stderr (minutes for a large model), so a run stopped early shows where.
    phases = [line.split(";")[0] for line in proc.stderr.splitlines() if line.startswith("bench: ")]
    i = phases.index("bench: lowering and compiling the train step")
    assert phases[i + 1] == f"bench: compiled in {result['compile_s']} s", phases
    assert phases[i + 2].startswith("bench: initialised in "), phases


def test_model_flops_for_mfu_leave_out_what_remat_recomputes():
    """MFU's FLOPs are the model's: with a remat policy the step's jaxpr holds the recomputed forward too, which
    the model count leaves out; the caller's config is not changed by counting. Without remat the step's own
    jaxpr is counted (no second trace), and gives the same figure."""
    import jax

    from imagen_jax.parallel import mesh as mesh_lib
    from imagen_jax.train import plan as plan_lib
    from imagen_jax.train import setup as setup_lib

    c = config_lib.load_config_file("configs/demo.py")
    c.data.image_size, c.model.dim, c.model.channel_mults = 8, 16, (1, 2)
    c.model.attn_resolutions, c.model.head_dim, c.train.batch_size = (4,), 8, 4
    c.data.precomputed_text, c.train.remat = True, "block"
    mesh = mesh_lib.make_mesh(c.mesh, jax.devices()[:1])
    text = setup_lib.Text(None, {}, {}, 16, "random embeddings")
    trainer = setup_lib.setup(c, mesh, text)
    batch = jax.eval_shape(lambda: random_batch(c, text, mesh))
    args = trainer.abstract_state(), text.params, batch, trainer.no_streak(abstract=True)
    with_recompute = plan_lib.matmul_flops(jax.make_jaxpr(trainer.train_step)(*args))
    counted = model_flops(c, mesh, text, jax.make_jaxpr(trainer.train_step)(*args))
    assert c.train.remat == "block"  # the caller's config is left alone
    assert 0 < 1.1 * counted < with_recompute  # the blocks' forward once more
    c.train.remat = "none"
    plain = setup_lib.setup(c, mesh, text)
    assert model_flops(c, mesh, text, plain.train_step.trace(*args).jaxpr) == counted


@pytest.mark.slow  # three train-step compiles: ~1 min
def test_bench_counts_a_real_shape_t5_and_the_precomputed_set_up(tmp_path):
    """--t5 puts a T5 of a given shape (random weights) in the step: FLOPs over the precomputed-text step are the
    T5 forward's, counted from its shape; the timed run works with it too."""
    import json

    shape = {"d_model": 64, "d_ff": 128, "num_layers": 2, "num_heads": 4, "d_kv": 16, "vocab_size": 100,
             "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
             "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(shape))
    c = config_lib.load_config_file("configs/demo.py")
    c.data.image_size, c.model.dim, c.model.channel_mults = 8, 16, (1, 2)
    c.model.attn_resolutions, c.model.head_dim, c.train.batch_size, c.text.max_length = (4,), 8, 4, 16
    c.text.dtype = "float32"
    with_t5 = benchmark(c, steps=0, text_dim=16, peak_tflops=None, t5=str(tmp_path / "config.json"))
    c.data.precomputed_text = True
    without = benchmark(c, steps=0, text_dim=16, peak_tflops=None, t5=str(tmp_path / "config.json"))
    assert without["t5_params_M"] == 0 and with_t5["t5_params_M"] > 0
    tokens, inner = 4 * 16, 4 * 16
    per_token_layer = 2 * (4 * 64 * inner + 3 * 64 * 128) + 2 * 2 * 16 * inner  # projections, gated FFN, attention
    t5_gflop = 2 * tokens * per_token_layer / 1e9
    extra = with_t5["gflop_per_step"] - without["gflop_per_step"]
    assert abs(extra - t5_gflop) < 0.15 * t5_gflop, (extra, t5_gflop)
    c.data.precomputed_text = False
    timed = benchmark(c, steps=1, text_dim=16, peak_tflops=None, t5=str(tmp_path / "config.json"))
    assert "random weights" in timed["text"] and timed["images_per_s"] > 0


# ------------------------------------------------------------------------------------------ data mode
def _records(paths):
    return [tf.train.Example.FromString(r).features.feature for r in tf.data.TFRecordDataset(paths).as_numpy_iterator()]


def test_synthetic_shards_look_like_img2dataset_keep_ratio_output(tmp_path):
    paths = write_synthetic_shards(str(tmp_path), size=16, num_images=12, num_shards=3)
    assert len(paths) == 3
    records = _records(paths)
    assert len(records) == 12
    images, ratios = [], set()
    for f in records:
        image = Image.open(io.BytesIO(f["jpg"].bytes_list.value[0]))
        assert image.format == "JPEG" and image.mode == "RGB"
        width, height = image.size
        assert min(width, height) == 20  # short side 1.25 x 16: the pipeline really resizes
        assert (f["width"].int64_list.value[0], f["height"].int64_list.value[0]) == (width, height)
        original = (f["original_width"].int64_list.value[0], f["original_height"].int64_list.value[0])
        assert original == (2 * width, 2 * height)
        assert f["status"].bytes_list.value[0] == b"success"
        assert f["txt"].bytes_list.value[0] and f["key"].bytes_list.value[0]
        ratios.add(round(max(width, height) / min(width, height), 2))
        pixels = np.asarray(image, np.float32)
        assert pixels.std() > 10  # not a flat colour, which would compress and decode unrealistically fast
        images.append(pixels[:20, :20].ravel())
    assert len(ratios) == 4  # 1:1, 4:3, 3:2, 16:9
    assert min(np.abs(a - b).mean() for i, a in enumerate(images) for b in images[i + 1 :]) > 5  # all distinct


def test_benchmark_data_gives_consistent_positive_rates_per_size_and_parallelism():
    results = benchmark_data([16, 32], [1, 2], batch_size=8, seconds=1.0, num_images=32)
    assert [(r["size"], r["parallel"]) for r in results] == [(16, 1), (16, 2), (32, 1), (32, 2)]
    for r in results:
        assert r["image_shape"] == (r["size"], r["size"], 3)
        assert r["images"] >= 3 * 8 and r["images"] % 8 == 0 and r["elapsed_s"] >= 1.0
        assert r["images_per_s"] > 0 and r["bytes_per_image"] > 0
        # images/s and ms/batch describe the same measurement.
        assert r["images_per_s"] * r["ms_per_batch"] / 1e3 == pytest.approx(8)
    # Same stored images across N; larger stored images for the larger size.
    assert results[0]["bytes_per_image"] == results[1]["bytes_per_image"] < results[2]["bytes_per_image"]


def test_cli_prints_a_table_row_per_setting_for_given_shards(tmp_path, capsys):
    paths = write_synthetic_shards(str(tmp_path), size=24, num_images=8, num_shards=2)
    mean_bytes = np.mean([len(f["jpg"].bytes_list.value[0]) for f in _records(paths)])
    main(
        [
            "--data",
            "--sizes",
            "16,24",
            "--parallel",
            "2",
            "--seconds",
            "0.3",
            "--batch_size",
            "4",
            "--shards",
            str(tmp_path / "*.tfrecord"),
        ]
    )
    out = capsys.readouterr().out
    rows = re.findall(r"^\s*(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s+[\d.]+$", out, re.M)
    assert [(int(s), int(n)) for s, n, *_ in rows] == [(16, 2), (24, 2)]
    for _, _, rate, ms, stored in rows:
        assert float(rate) > 0 and float(ms) > 0 and int(stored) == round(mean_bytes)
    assert "os.cpu_count()=" in out and re.search(r"^\s*24 px: [\d.]+ img/s per call \(N=2\)$", out, re.M)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "--sizes", "abc"], "--sizes must be comma-separated positive integers, got 'abc'"),
        (["--data", "--parallel", "0"], "--parallel must be comma-separated positive integers, got '0'"),
        (["--data", "--seconds", "0"], "--seconds (0.0) > 0"),
        (["--data", "--shards", "/nonexistent/*.tfrecord"], "no shard files match '/nonexistent/*.tfrecord'"),
        (["--data", "--config.train.steps=1"], "unknown arguments for --data: --config.train.steps=1"),
        ([], "give either --config FILE (model mode) or --data (data mode)"),
        (
            ["--config", "configs/demo.py", "--config.model.attn_resolutions=(32,)"],
            "attn_resolutions [32] are not feature-map sizes of this U-Net [16, 8, 4] (data.image_size=16)",
        ),
    ],
)
def test_cli_bad_arguments_are_one_line_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bench: error:") and message in err


def test_cli_shards_with_nothing_usable_are_a_one_line_error(tmp_path, capsys):
    """Every record undecodable: the benchmark says so instead of waiting forever for a batch."""
    with tf.io.TFRecordWriter(str(tmp_path / "bad.tfrecord")) as writer:
        for _ in range(4):
            features = {
                "jpg": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"not a jpeg"])),
                "txt": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"a caption"])),
            }
            writer.write(tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString())
    assert (
        main(
            ["--data", "--sizes", "16", "--parallel", "1", "--seconds", "0.3", "--shards", str(tmp_path / "*.tfrecord")]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"bench: error: {tmp_path}/*.tfrecord: data: epoch 0 ")
    assert "delivered no example" in err and "skipped_undecodable=" in err

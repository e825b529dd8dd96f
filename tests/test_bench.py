"""The throughput benchmark runs the real train step and reports consistent figures."""

from imagen_jax import config as config_lib
from imagen_jax.tools.bench import benchmark


def test_bench_reports_throughput_and_flops():
    c = config_lib.load_config_file("configs/demo.py")
    c.data.image_size, c.model.dim, c.model.channel_mults = 8, 16, (1, 2)
    c.model.attn_resolutions, c.model.head_dim, c.train.batch_size = (4,), 8, 4
    result = benchmark(c, steps=2, text_dim=16, peak_tflops=1.0)
    assert result["global_batch"] == 4 and result["image_size"] == 8 and result["unet_params_M"] > 0
    assert result["gflop_per_step"] > 0 and result["images_per_s"] > 0
    # Figures agree with each other: images/s = batch / step time; MFU = achieved / peak.
    assert abs(result["images_per_s"] - 4 / (result["step_ms"] / 1e3)) / result["images_per_s"] < 0.05
    assert abs(result["mfu"] - result["achieved_tflops"] / 1.0) < 1e-3

"""The side-by-side harness's own parts (benchmarks/), without torch or the peer venv: the conv/matmul FLOP rule,
the matched layouts' configs, the agreement check and the driver's errors."""

import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import layouts  # noqa: E402
import matmul_flops  # noqa: E402
import side_by_side  # noqa: E402


def _conv(x, w, padding="SAME"):
    return jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_forward_flops_are_twice_the_multiply_adds():
    x, w = jnp.zeros((2, 8, 8, 3)), jnp.zeros((3, 3, 3, 5))
    a, b = jnp.zeros((4, 6, 7)), jnp.zeros((4, 7, 9))
    assert matmul_flops.function_flops(_conv, x, w) == 2 * (2 * 8 * 8 * 5) * (3 * 3 * 3)
    assert matmul_flops.function_flops(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), a, b) == 2 * 4 * 6 * 9 * 7
    # element-wise work is not counted; nested jits and scans are (times their length)
    scanned = lambda a, b: jax.lax.scan(lambda c, _: (jax.jit(jnp.matmul)(c, b[0, :, :7]) + 1, None), a[0], None, 3)[0]  # noqa: E731
    assert matmul_flops.function_flops(scanned, a, b) == 3 * 2 * 6 * 7 * 7


def _net(params, x, padding):
    h = _conv(_conv(x, params["w1"], padding), params["w2"], padding)
    return h.reshape(h.shape[0], -1) @ params["d"]


def test_forward_matches_xla_and_backward_counts_both_gradients():
    """Forward: convolutions and matmuls only count what XLA counts (unpadded: XLA skips padding taps, which torch's
    counter and this rule count). Backward: two products per forward product (input and weight gradients), less the
    input gradient of the first conv (x is data)."""
    x = jnp.ones((2, 8, 8, 4))
    w = {"w1": jnp.ones((3, 3, 4, 8)), "w2": jnp.ones((3, 3, 8, 8))}
    valid = {**w, "d": jnp.ones((4 * 4 * 8, 16))}
    forward = matmul_flops.function_flops(lambda p, x: _net(p, x, "VALID"), valid, x)
    xla = jax.jit(lambda p, x: _net(p, x, "VALID")).lower(valid, x).compile().cost_analysis()
    assert forward == float((xla[0] if isinstance(xla, list) else xla)["flops"])
    assert forward == 2 * (2 * 6 * 6 * 8) * (3 * 3 * 4) + 2 * (2 * 4 * 4 * 8) * (3 * 3 * 8) + 2 * 2 * 16 * 128

    same = {**w, "d": jnp.ones((8 * 8 * 8, 16))}
    forward = matmul_flops.function_flops(lambda p, x: _net(p, x, "SAME"), same, x)
    loss = lambda p, x: jnp.sum(jnp.square(_net(p, x, "SAME")))  # noqa: E731
    first_conv = 2 * (2 * 8 * 8 * 8) * (3 * 3 * 4)
    assert matmul_flops.function_flops(jax.grad(loss), same, x) == 3 * forward - first_conv


def test_every_layout_builds_a_valid_stage_config_and_tiny32_counts_are_pinned():
    import ours

    layout = layouts.LAYOUTS["tiny32"]
    for name, lay in layouts.LAYOUTS.items():
        config = ours.stage_config(lay)
        assert config.data.image_size == lay["image_size"] and config.train.batch_size == lay["batch"], name
        assert config.train.compute_dtype == "float32" and config.data.precomputed_text
        assert all(config.train[key] == value for key, value in lay.get("ours_train", {}).items()), name
    counts = ours.count(dict(layout, batch=2))
    # pinned: a change to the U-Net's layout must be matched against imagen-pytorch again (side_by_side.py)
    assert counts == {"params": 3_046_595, "flops": 4_290_248_704}


def test_agreement_check_names_what_differs():
    peer = {"params": 100.0, "flops": 1000.0}
    assert side_by_side.mismatches(peer, {"params": 104.9, "flops": 951.0}) == []
    problems = side_by_side.mismatches(peer, {"params": 94.0, "flops": 1000.0})
    assert problems == ["params: peer 100, ours 94 (-6.0%)"]


def test_spread_and_report(monkeypatch):
    assert side_by_side.spread([3.0, 1.0, 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0, "n": 4}
    timing = {"peer": side_by_side.spread([2.0]), "ours": side_by_side.spread([1.0])}
    result = {"layout": {"batch": 8}, "layouts": "defaults", "counts": {"peer": {"params": 1e6, "flops": 2e9},
              "ours": {"params": 1e6, "flops": 3e9}}, "timings": {"train": timing}}  # fmt: skip
    monkeypatch.setenv("LD_PRELOAD", "/lib/libtcmalloc_minimal.so.4")
    text = side_by_side.report({"m": result}, 2)
    assert text.startswith("Allocator (both sides): /lib/libtcmalloc_minimal.so.4; 2 CPU threads each\n")
    monkeypatch.delenv("LD_PRELOAD")
    assert side_by_side.report({"m": result}, 2).startswith("Allocator (both sides): the C library malloc;")
    assert "| m | defaults | train | 2.000 (2.000-2.000) s/step (batch 8), n=1 | 1.000 (1.000-1.000)" in text
    # twice as fast in wall-clock, doing 1.5x the FLOPs: 3x as fast per FLOP
    assert text.endswith("| 2.00x | 3.00x |")


def test_defaults_keep_the_shared_architecture_and_drop_every_matching_option():
    import ours

    for name, layout in layouts.LAYOUTS.items():
        plain = layouts.defaults(layout)
        assert set(plain["peer"]) == set(layouts.PEER_SHARED) and set(plain["ours"]) == set(layouts.OURS_SHARED)
        assert all(plain["peer"][k] == layout["peer"][k] for k in layouts.PEER_SHARED), name
        assert "ours_train" not in plain and plain["image_size"] == layout["image_size"]
        config = ours.stage_config(plain)
        assert config.model.get("attn_placement", "every_block") == "every_block", name
        assert config.train.attention == "auto" and config.model.get("ffn_mult", 0) == 0, name


def test_threads_pin_the_process_to_that_many_cpus(monkeypatch):
    calls = []
    monkeypatch.setattr(side_by_side.os, "sched_getaffinity", lambda pid: {3, 1, 2})
    monkeypatch.setattr(side_by_side.os, "sched_setaffinity", lambda pid, cpus: calls.append(list(cpus)))
    assert side_by_side.pin_threads(2) == [1, 2] and calls == [[1, 2]]
    with pytest.raises(side_by_side.HarnessError, match="may run on 3 CPUs"):
        side_by_side.pin_threads(4)


def test_missing_peer_venv_is_one_line_naming_the_setup_command(tmp_path, capsys):
    assert side_by_side.main(["--models", "tiny32", "--peer_python", str(tmp_path / "python")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("side_by_side: error: peer venv missing") and "setup_peer.sh" in err


def test_bad_arguments(capsys):
    assert side_by_side.main(["--models", "tiny32,huge"]) == 1
    assert "--models: huge; choose from tiny32, base64-small" in capsys.readouterr().err
    assert side_by_side.main(["--what", "infer"]) == 1


def test_layouts_describe_the_same_network_sizes():
    """Both sides of a layout agree on width, levels and attention resolutions (the peer's per-level flags)."""
    for name, lay in layouts.LAYOUTS.items():
        peer, ours_fields = lay["peer"], lay["ours"]
        assert peer["dim"] == ours_fields["dim"] and tuple(peer["dim_mults"]) == ours_fields["channel_mults"], name
        sizes = [lay["image_size"] // 2**i for i in range(len(peer["dim_mults"]))]
        attn = tuple(size for size, on in zip(sizes, peer["layer_attns"]) if on)
        assert attn == ours_fields["attn_resolutions"] and peer["layer_cross_attns"] == peer["layer_attns"], name
        assert ours_fields["num_res_blocks"] == peer["num_resnet_blocks"] + 1, name  # a peer level: N + 1 blocks
        assert math.isclose(float(peer["ff_mult"]), 2.0) and np.isfinite(lay["guidance"])


def test_xla_options_bad_arguments_are_one_line_errors():
    """benchmarks/xla_options.py step: a bad --options or --model stops before anything is compiled."""
    import subprocess

    script = str(BENCHMARKS / "xla_options.py")
    for args, message in [
        (["--options", "{"], "xla_options: error: --options is not JSON"),
        (["--options", "[1]"], 'xla_options: error: --options must be a JSON object {"name": {"option": value}, ...}'),
        (["--options", '{"a": 1}'], "xla_options: error: --options must be a JSON object"),
        (["--model", "nope"], "xla_options: error: unknown model 'nope'; one of tiny32, base64-small"),
    ]:
        proc = subprocess.run([sys.executable, script, "step", *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr

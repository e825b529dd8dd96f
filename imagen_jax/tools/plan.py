"""Will a config train on a TPU slice? Compile its real train step for the slice on this machine (no TPU) and read
the memory and FLOPs the TPU compiler reports.

    pip install -e ".[plan]"   # libtpu, the TPU compiler (the version jax[tpu] pins)
    python -m imagen_jax.tools.plan --config configs/base64.py --topology v4-512 [--t5 xxl] [--json]
        [--config.train.batch_size=2048 ...]

--topology names a slice as Cloud TPU does: v4-N and v5p-N count TensorCores (two per chip: v4-512 is 256
chips), v5e-N and v6e-N count chips. --t5 is the shape of the frozen T5 inside the step: xxl, xl or large
(the shipped config.json of google/t5-v1_1-*), or a T5 folder or config.json of your own; no weights are read.
With --config.data.precomputed_text=True the step has no T5 (compare both set-ups).

Printed per device: parameters, optimizer state, EMA, T5 and the batch (from the arrays' shardings), the
compiler's temporaries (activations, gradients, workspace), their total against the chip's HBM (v4 32 GiB, v5e
16, v5p 95, v6e 32) with the margin; FLOPs per step from the compiled cost analysis beside a count of the
step's matmuls and convolutions from its jaxpr; a roofline step time (the larger of FLOPs / bf16 peak and
bytes accessed / HBM bandwidth) and images/s. Exit status 2 for a bad argument, 1 for a config that cannot
compile; the error is one line.
"""

from __future__ import annotations

import argparse
import json
import sys

GIB = 2**30


def format_report(config_path: str, r: dict) -> str:
    m = r["per_device_bytes"]
    per_device = r["global_batch"] / (r["mesh"]["data"] * r["mesh"]["fsdp"])
    kinds = ("params", "optimizer", "ema", "t5", "batch", "temporaries", "total")
    verdict = f"fits, {r['hbm_margin']:.1%} to spare" if r["fits"] else f"DOES NOT FIT ({-r['hbm_margin']:.1%} over)"
    if not r["compiled"]:
        verdict += "; the compiler stopped there, temporaries are what it said it needs"
    counted, xla = r["flops_per_step_counted"], r["flops_per_step_xla"]
    versus = f"{xla:.4g} (XLA cost analysis), " if xla else "no XLA cost analysis (not compiled), "
    agreement = f"; {(counted - xla) / xla:+.1%}" if xla else ""
    if xla and counted < 0.9 * xla and not r.get("flops_note"):
        agreement += (
            ": the count is matmuls and convolutions only, XLA also counts elementwise work (normalisation, "
            "activations, softmax, the optimizer), a large share in a small model"
        )
    elif xla and counted > 1.1 * xla and not r.get("flops_note"):
        agreement += ": XLA's cost analysis counts fewer multiply-adds than the step's matmuls and convolutions have"
    if r.get("flops_note"):
        agreement += f"; {r['flops_note']}"
    return "\n".join([
        f"plan: {config_path} on {r['slice']} ({r['chip']}, {r['devices']} chips, topology {r['topology']}), "
        f"mesh {r['mesh']}",
        f"U-Net {r['unet_params'] / 1e6:.1f}M params; {r['text']}: {r['t5_params'] / 1e6:.1f}M params; "
        f"global batch {r['global_batch']} ({per_device:g} per data-parallel device)",
        "per-device GiB: " + "  ".join(f"{k} {m[k] / GIB:.2f}" for k in kinds)
        + f"  / HBM {r['hbm_bytes'] / GIB:.0f} -> {verdict}",
        f"FLOPs per step: {versus}{counted:.4g} (matmuls + convolutions counted{agreement})",
        f"roofline: {r['roofline_step_s'] * 1e3:.1f} ms per step ({r['roofline_bound']}-bound), "
        f"{r['roofline_images_per_s']:.0f} images/s",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="configs/<stage>.py")
    parser.add_argument("--topology", required=True, help="TPU slice, e.g. v4-8, v4-512, v5e-8, v5e-256, v5p-128")
    parser.add_argument("--t5", default="xxl", help="T5 shape: xxl | xl | large | a T5 folder or config.json")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args, overrides = parser.parse_known_args(argv)
    from imagen_jax.cli import main_guard

    def body() -> int:
        from imagen_jax import config as config_lib
        from imagen_jax.errors import ConfigError, UsageError
        from imagen_jax.train.plan import parse_slice, plan

        parse_slice(args.topology)  # a bad name fails before the config is even read
        try:
            config = config_lib.apply_overrides(config_lib.load_config_file(args.config), overrides)
        except ConfigError as e:
            raise UsageError(str(e)) from None
        result = plan(config, args.topology, args.t5)
        print(json.dumps(result, indent=2) if args.json else format_report(args.config, result), flush=True)
        return 0

    return main_guard("plan", body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

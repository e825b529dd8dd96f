"""Will a config train on a TPU slice? Compile its real train step for the slice on this machine (no TPU) and read
the memory and FLOPs the TPU compiler reports.

    pip install -e ".[plan]"   # libtpu, the TPU compiler (the version jax[tpu] pins)
    python -m imagen_jax.tools.plan --config configs/base64.py --topology v4-512 [--slices 1] [--t5 xxl] [--json]
        [--config.train.batch_size=2048 ...]

--topology names a slice as Cloud TPU does: v4-N and v5p-N count TensorCores (two per chip: v4-512 is 256
chips), v5e-N and v6e-N count chips. --t5 is the shape of the frozen T5 inside the step: xxl, xl or large
(the shipped config.json of google/t5-v1_1-*), or a T5 folder or config.json of your own; no weights are read.
With --config.data.precomputed_text=True the step has no T5 (compare both set-ups). --slices N plans N such
slices joined over the data-center network (Multislice): the mesh's `data` axis spans them (it must be a multiple
of N), and the bytes each device sends to other slices, by kind, get their own roofline term at the chip's share of
the network (v5p 6.25 GB/s, v5e 3.125 GB/s, as published; v4 and v6e publish none: bytes only).

Printed per device: parameters, optimizer state, EMA, T5 and the batch (from the arrays' shardings), the
compiler's temporaries (activations, gradients, workspace), their total against the HBM the TPU compiler lets a
program use (v4 30.75 of 32 GiB, v5e 15.75 of 16, v5p 95.74 of 95, v6e 31.25 of 32: the compiler's own figure,
asked at each plan) with the margin; FLOPs per step from the compiled cost analysis beside a count of the
step's matmuls and convolutions from its jaxpr; the bytes each device sends for the program's collectives, by
kind (all-gather, reduce-scatter, all-reduce, ...; ring algorithms); a roofline step time (the largest of FLOPs /
bf16 peak, bytes accessed / HBM bandwidth and collective bytes / the chip's share of the interconnect, each
term printed) and images/s.

    python -m imagen_jax.tools.plan --sample --config configs/if_i_xl.py --config configs/if_ii_l.py \
        --topology v5e-8 [--batch_size 4] [--t5 xxl] [--json]

--sample plans the cascade's sampling instead, the stages' configs given in cascade order (base first): T5 and
every stage's parameters resident at once, split over all the chips as sample.py places them, it compiles T5's
encoding of --batch_size prompts (default 4) and per stage the text conditioning and the sampler's step loop
(the model on the guidance-doubled batch, and the update; steps and guidance from train.sample_steps and
train.sample_guidance_scale). Printed per device: T5's and each stage's parameters, each program's
temporaries, the peak (a program's total beside the weights it does not take) against usable HBM, and a roofline time
per sampler step per stage and for the whole cascade. --config.KEY=VALUE overrides apply to every stage. A
one-chip slice (v5p-2, v6e-1, v5e-1) gives the bytes one device needs to hold the whole cascade: the TPU
compiler's figure, the nearest there is here to what a GPU would need (no GPU compiler runs on this machine).

The last line gives the time and the host memory the plan took here (a pod's restart compiles nothing: the run's
compilation cache has the programs, train.compilation_cache).

Exit status 2 for a bad argument, 1 for a config that cannot compile; the error is one line.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

GIB = 2**30
DEFAULT_PROMPTS = 4
GPU_80GB = 81559 * 2**20  # an H100 80GB's memory as nvidia-smi reports it


def _chips(n: int) -> str:
    return f"{n} chip" if n == 1 else f"{n} chips"


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
        f"plan: {config_path} on {_slices(r)} ({r['chip']}, {_chips(r['devices'])}, topology {r['topology']}), "
        f"mesh {r['mesh']}, attention {r['attention']}",
        f"U-Net {r['unet_params'] / 1e6:.1f}M params; {r['text']}: {r['t5_params'] / 1e6:.1f}M params; "
        f"global batch {r['global_batch']} ({per_device:g} per data-parallel device), {_text_tokens(r)}",
        "per-device GiB: " + "  ".join(f"{k} {m[k] / GIB:.2f}" for k in kinds)
        + f"  / {_hbm(r)} -> {verdict}",
        f"FLOPs per step: {versus}{counted:.4g} (matmuls + convolutions counted{agreement})",
        f"roofline: {r['roofline_step_s'] * 1e3:.1f} ms per step ({r['roofline_bound']}-bound), "
        f"{r['roofline_images_per_s']:.0f} images/s; terms: compute {r['compute_s'] * 1e3:.1f} ms at peak, "
        f"memory {r['memory_s'] * 1e3:.1f} ms, communication {r['collective_s'] * 1e3:.1f} ms",
        *([_collectives_line(r["collectives_per_device"])] if r.get("collectives_per_device") else []),
        *([_dcn_line(r)] if r["slices"] > 1 else []),
        *([
            f"trainable: {r['trainable_params'] / 1e6:.2f}M of {r['all_params'] / 1e6:.1f}M params "
            f"({r['trainable_params'] / r['all_params']:.2%}); the frozen ones save "
            f"{r['optimizer_bytes_saved_by_frozen'] / GIB:.2f} GiB of optimizer state per device"
        ] if "trainable_params" in r else []),
        *([_evaluation_line(r)] if "eval_weights_bytes" in r else []),
    ])  # fmt: skip


def _text_tokens(r: dict) -> str:
    """The text length the step was planned at: with token buckets, the largest (the most memory)."""
    tokens, lengths = r["text_tokens"], r["text_lengths"]
    buckets = f", the largest bucket of {', '.join(map(str, lengths))}" if len(lengths) > 1 else ""
    return f"{tokens} text tokens{buckets}"


def _hbm(r: dict) -> str:
    return f"usable HBM {r['hbm_usable_bytes'] / GIB:.2f} (of {r['hbm_bytes'] / GIB:.0f})"


def _evaluation_line(r: dict) -> str:
    weights = r["eval_weights_bytes"]
    verdict = "fits" if r["eval_fits"] else "DOES NOT FIT"
    return (
        "while evaluating (eval.every): "
        + " + ".join(f"{name} {size / GIB:.2f}" for name, size in weights.items())
        + f" GiB per device beside the held state: {r['eval_held_total'] / GIB:.2f} / {_hbm(r)}"
        f" -> {verdict}, before the sampler's temporaries (--sample plans them)"
    )


def format_sampling_report(r: dict) -> str:
    m = r["resident_bytes_per_device"]
    verdict = f"fits, {r['hbm_margin']:.1%} to spare" if r["fits"] else f"DOES NOT FIT ({-r['hbm_margin']:.1%} over)"
    if not r["compiled"]:
        verdict += "; the compiler refused a program there, its temporaries are what it said it needs"
    guided = any(s["model_batch"] > r["rows"] for s in r["stages"])
    where = "split over the chips as sample.py places them" if r["devices"] > 1 else "all on the one chip"
    lines = [
        f"sampling plan: {' -> '.join(s['name'] for s in r['stages'])} on {r['slice']} ({r['chip']}, "
        f"{_chips(r['devices'])}, topology {r['topology']}), mesh {r['mesh']}: T5 and every stage's weights "
        f"resident, {where}",
        f"{r['text']}: {r['t5_params'] / 1e6:.1f}M params; {r['prompts']} prompts, {r['rows']} rows on the mesh"
        + (f" (padded to split over {r['devices']} devices)" if r["rows"] > r["prompts"] else "")
        + ("; guidance doubles them in each model call" if guided else ""),
        "per-device GiB resident: " + "  ".join(f"{k} {b / GIB:.2f}" for k, b in m.items()),
    ]
    for p in r["programs"]:
        lines.append(
            f"  {p['name']}: temporaries {p['temporaries'] / GIB:.2f}, with its inputs and outputs "
            f"{p['total'] / GIB:.2f}, peak beside the other weights {p['peak'] / GIB:.2f} GiB"
            + ("" if p["compiled"] else " (not compiled: out of HBM)")
        )
    lines.append(
        f"peak per device: {r['peak_bytes_per_device'] / GIB:.2f} GiB (during {r['peak_program']}) "
        f"/ {_hbm(r)} -> {verdict}"
    )
    if r["devices"] == 1:
        lines.append(
            f"one device holding everything: {r['peak_bytes_per_device'] / GIB:.2f} GiB (the TPU compiler's figure "
            f"for one {r['chip']}, a proxy for a GPU's need: no GPU compiler runs here; an 80 GB GPU has "
            f"{GPU_80GB / GIB:.1f} GiB, and JAX takes 75% of it unless XLA_PYTHON_CLIENT_MEM_FRACTION says more)"
        )
    lines.append(f"roofline: T5 encode {r['roofline_encode_s'] * 1e3:.1f} ms")
    for s in r["stages"]:
        note = ""
        if s["step_flops_note"]:  # flops_note's reasons, shortened: the counted figure is the one used
            note = (
                f" (counted; XLA's {s['step_flops_xla']:.4g} counts each of {s['windowed_loops']} windowed-einsum "
                "loops' body once)"
            )
        lines.append(
            f"  {s['name']}: {s['steps']} {r['sampler']} steps at guidance {s['guidance_scale']:g}, "
            f"{s['model_batch']} x {s['image_size']}px per model call, {s['step_flops']:.4g} FLOPs per step{note}: "
            f"{s['roofline_step_s'] * 1e3:.1f} ms per step ({s['roofline_bound']}-bound), "
            f"{s['roofline_stage_s']:.2f} s for the stage"
        )
    lines.append(f"  cascade: {r['roofline_cascade_s']:.2f} s for {r['prompts']} prompts")
    return "\n".join(lines)


def _kinds(table: dict | None) -> str:
    """A `collective_bytes` or `dcn_bytes` table as 'kind GiB (count), ...'."""
    kinds = [f"{kind} {c['bytes'] / GIB:.3f} GiB ({c['count']})" for kind, c in (table or {}).items() if c["count"]]
    return ", ".join(kinds) or "none"


def _collectives_line(collectives: dict) -> str:
    return "collectives sent per device (ring algorithms; a loop body once): " + _kinds(collectives)


def _slices(r: dict) -> str:
    return f"{r['slices']} x {r['slice']} (Multislice)" if r["slices"] > 1 else r["slice"]


def _dcn_line(r: dict) -> str:
    time = (
        f": {r['dcn_s'] * 1e3:.1f} ms at the chip's share of the network"
        if r["dcn_s"] is not None
        else f": no published data-center network bandwidth for {r['chip']}, so no time"
    )
    return f"sent per device to other slices (data-center network): {_kinds(r['dcn_per_device'])}{time}"


def _planned_here(r: dict) -> str:
    minutes, seconds = divmod(int(r["planned_here_s"]), 60)
    return (
        f"planned on this machine in {minutes}:{seconds:02d} (min:s), {r['host_peak_bytes'] / GIB:.1f} GiB of host "
        "memory at the peak; on the slice, train.py keeps what it compiles in the run's compilation "
        "cache (train.compilation_cache), so a restart loads it instead of compiling again"
    )


def _batch_size(value: str | None, sample: bool) -> int:
    from imagen_jax.errors import UsageError

    if value is None:
        return DEFAULT_PROMPTS
    if not sample:
        raise UsageError("--batch_size is the prompts of a --sample plan; a train plan's is --config.train.batch_size")
    if not value.isdigit() or int(value) < 1:
        raise UsageError(f"--batch_size {value!r}: expected a number of prompts >= 1")
    return int(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", action="append", required=True, help="configs/<stage>.py; with --sample, once per stage"
    )
    parser.add_argument("--topology", required=True, help="TPU slice, e.g. v4-8, v4-512, v5e-8, v5e-256, v5p-128")
    parser.add_argument("--slices", type=int, default=1, help="that many slices joined over DCN (Multislice)")
    parser.add_argument("--t5", default="xxl", help="T5 shape: xxl | xl | large | a T5 folder or config.json")
    parser.add_argument("--sample", action="store_true", help="plan the cascade's sampling, not a train step")
    parser.add_argument("--batch_size", default=None, help=f"--sample: prompts per batch (default {DEFAULT_PROMPTS})")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args, overrides = parser.parse_known_args(argv)
    from imagen_jax.cli import main_guard

    def body() -> int:
        from imagen_jax import config as config_lib
        from imagen_jax.errors import ConfigError, UsageError
        from imagen_jax.train.plan import parse_slice, plan, plan_sampling

        parse_slice(args.topology)  # a bad name fails before the config is even read
        if len(args.config) > 1 and not args.sample:
            raise UsageError("--config given more than once: a train plan is of one stage; --sample plans a cascade")
        batch_size = _batch_size(args.batch_size, args.sample)
        try:
            configs = [config_lib.apply_overrides(config_lib.load_config_file(c), overrides) for c in args.config]
        except ConfigError as e:
            raise UsageError(str(e)) from None
        start = time.monotonic()
        if args.sample:
            result = plan_sampling(configs, args.config, args.topology, args.t5, batch_size)
        else:
            result = plan(configs[0], args.topology, args.t5, args.slices)
        result["planned_here_s"] = round(time.monotonic() - start, 1)
        result["host_peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        if args.json:
            print(json.dumps(result, indent=2), flush=True)
        else:
            report = format_sampling_report(result) if args.sample else format_report(args.config[0], result)
            print(report + "\n" + _planned_here(result), flush=True)
        return 0

    return main_guard("plan", body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The U-Nets side_by_side.py builds in both projects, matched layer for layer where the two designs allow.

Pure data (no JAX, no torch): the driver reads it in the project venv and sends `peer` to the peer worker.

imagen-pytorch's Unet, against this project's ADM-style one, puts attention once per level (a transformer block at
the level's end; text cross-attention inside its first res block), runs each resolution's way down one level
narrower and lets its resampling convs change the width, takes skips from res blocks only (so both paths have the
same number of blocks), and adds a feed-forward to its attention. This project's `model.attn_placement`,
`resample_width`, `resample_skips` and `ffn_mult` reproduce that layout (imagen_jax/models/unet.py); a peer level
of `num_resnet_blocks` N holds N + 1 res blocks, so ours is given `num_res_blocks` N + 1. The peer's own options
are set to this project's choices where it has them: 3x3 input conv (no cross-embed), nearest + 3x3 conv
upsampling (no pixel shuffle), no global-context gating, no final res block (ours ends in GroupNorm, SiLU, conv),
text padded to the benchmark's length rather than 256.

What stays different: the peer's attention is multi-query with cosine-similarity logits, its text is pooled by a
2-layer Perceiver (ours: one attention-pooling query), it has time tokens, pixel-unshuffle downsampling (ours: a
stride-2 3x3 conv), and the res blocks of its middle level always get 8 x 64-wide cross-attention whatever
`attn_heads` says. At tiny32's widths that last one is a third of the middle block, so tiny32's feed-forward is
wider on our side (ffn_mult 8) to stand in for it; base64-small needs no such stand-in.
"""

from __future__ import annotations

COMMON = {"text_len": 64, "text_dim": 512, "sample_images": 4, "sample_steps": 50, "guidance": 3.0}

# imagen-pytorch Unet options that stand for this project's choices (module docstring).
PEER_AS_OURS = {
    "init_cross_embed": False,
    "init_conv_kernel_size": 3,
    "pixel_shuffle_upsample": False,
    "use_global_context_attn": False,
    "final_resnet_block": False,
    "max_text_len": COMMON["text_len"],
}

# This project's fields for imagen-pytorch's layout (module docstring).
OURS_AS_PEER = {"attn_placement": "level_end", "resample_width": True, "resample_skips": False}

LAYOUTS = {
    "tiny32": {
        **COMMON,
        "image_size": 32,
        "batch": 32,
        "peer": {
            **PEER_AS_OURS,
            "dim": 32,
            "dim_mults": (1, 2, 4),
            "num_resnet_blocks": 1,
            "layer_attns": (False, False, True),
            "layer_cross_attns": (False, False, True),
            "attn_heads": 4,
            "attn_dim_head": 32,
            "ff_mult": 2.0,
        },
        "ours": {
            **OURS_AS_PEER,
            "dim": 32,
            "channel_mults": (1, 2, 4),
            "num_res_blocks": 2,
            "attn_resolutions": (8,),
            "head_dim": 32,
            "ffn_mult": 8,
        },
    },
    "base64-small": {
        **COMMON,
        "image_size": 64,
        "batch": 8,
        "peer": {
            **PEER_AS_OURS,
            "dim": 128,
            "dim_mults": (1, 2, 3, 4),
            "num_resnet_blocks": 3,
            "layer_attns": (False, True, True, True),
            "layer_cross_attns": (False, True, True, True),
            "attn_heads": 8,
            "attn_dim_head": 64,
            "ff_mult": 2.0,
        },
        "ours": {
            **OURS_AS_PEER,
            "dim": 128,
            "channel_mults": (1, 2, 3, 4),
            "num_res_blocks": 4,
            "attn_resolutions": (32, 16, 8),
            "head_dim": 64,
            "ffn_mult": 2,
        },
        # How this project is best run on a CPU at this size (the same model and maths): the 32x32 self-attention
        # in blocks of 256 queries, each recomputed in the backward pass. Its [8, 4, 1024, 1024] logits whole made
        # the softmax gradient a 0.6 s YNNPACK fusion; chunked, the step was 1.12x faster (13.69 -> 12.20 s,
        # alternating in one process, 2026-12-04, AVX-512 VM; chunks of 128 and 512: 0.99x and 0.97x of 256).
        "ours_train": {"attention": "chunked", "attention_chunk": 256},
    },
}

TOLERANCE = 0.05  # parameters and FLOPs must agree this closely for the timings to compare like with like

# `side_by_side.py --layouts defaults`: each project as its users run it, at a layout's widths, blocks, attention
# levels and heads, every other option (attention form, feed-forwards, text padding, the peer's cross-embed input,
# pixel shuffle, global context, final res block...) at its own default. The FLOPs then differ: judged per FLOP.
PEER_SHARED = (
    "dim",
    "dim_mults",
    "num_resnet_blocks",
    "layer_attns",
    "layer_cross_attns",
    "attn_heads",
    "attn_dim_head",
)
OURS_SHARED = ("dim", "channel_mults", "num_res_blocks", "attn_resolutions", "head_dim")


def defaults(layout: dict) -> dict:
    """`layout` with both projects' options at their defaults but for the shared architecture (PEER_SHARED,
    OURS_SHARED)."""
    rest = {key: value for key, value in layout.items() if key not in ("peer", "ours", "ours_train")}
    peer = {key: layout["peer"][key] for key in PEER_SHARED}
    return {**rest, "peer": peer, "ours": {key: layout["ours"][key] for key in OURS_SHARED}}

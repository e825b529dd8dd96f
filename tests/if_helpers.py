"""Tiny DeepFloyd IF pipeline folders (tests/fixtures/make_if_pipeline_fixtures.py) to train and sample from."""

from __future__ import annotations

import os
import shutil

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
PIPELINE = os.path.join(FIXTURES, "if", "pipeline")


def if_pipeline_folders(root) -> tuple[str, str]:
    """Copies of the (stage1, stage2) folders under `root`, stage I's tokenizer completed with the shared
    spiece.model (the fixtures store it once)."""
    for name in ("stage1", "stage2"):
        shutil.copytree(os.path.join(PIPELINE, name), os.path.join(root, name))
    shutil.copy(os.path.join(FIXTURES, "t5", "relu", "spiece.model"), os.path.join(root, "stage1", "tokenizer"))
    return os.path.join(str(root), "stage1"), os.path.join(str(root), "stage2")

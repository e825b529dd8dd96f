"""DeepFloyd IF's cascade end to end against diffusers' own pipelines (tests/fixtures/make_if_pipeline_fixtures.py):
the folders as diffusers saves them (fp16 variant weights, a text_encoder/ beside its tokenizer/), the prompts'
T5 states, and both stages' images from the same noise."""

import os
import shutil

import numpy as np
import pytest

from imagen_jax.text import T5Encoder

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
PIPELINE = os.path.join(FIXTURES, "if", "pipeline")
GOLDEN = np.load(os.path.join(PIPELINE, "golden.npz"))
PROMPTS = ["  A Red Circle on the LEFT ", "a blue square at the bottom"]  # as the fixture script encodes them


@pytest.fixture(scope="module")
def if_folders(tmp_path_factory):
    """(stage1, stage2) pipeline folders, stage I's tokenizer completed with the shared spiece.model."""
    root = tmp_path_factory.mktemp("if")
    for name in ("stage1", "stage2"):
        shutil.copytree(os.path.join(PIPELINE, name), root / name)
    shutil.copy(os.path.join(FIXTURES, "t5", "relu", "spiece.model"), root / "stage1" / "tokenizer")
    return str(root / "stage1"), str(root / "stage2")


def test_text_encoder_of_the_pipeline_folder_matches_diffusers(if_folders):
    """text_encoder/ holds fp16-variant weights only and no tokenizer: the encoder reads the variant and takes its
    tokenizer from the sibling tokenizer/; prompts are lower-cased and stripped as diffusers' pipeline does, so
    the states (all 77 positions, padding included) are diffusers' prompt_embeds."""
    encoder = T5Encoder.from_pretrained(os.path.join(if_folders[0], "text_encoder"), lowercase=True)
    text, _ = encoder.encode(PROMPTS, 77)
    np.testing.assert_allclose(np.asarray(text), GOLDEN["prompt_embeds"], atol=2e-5)
    empty, mask = encoder.encode(["", ""], 77)
    np.testing.assert_allclose(np.asarray(empty), GOLDEN["negative_embeds"], atol=2e-5)
    assert mask.sum() == 2  # "" is EOS alone; the other 76 positions still count for IF
    plain = T5Encoder.from_pretrained(os.path.join(if_folders[0], "text_encoder"))
    assert not np.allclose(np.asarray(plain.encode(PROMPTS, 77)[0]), GOLDEN["prompt_embeds"], atol=1e-3)

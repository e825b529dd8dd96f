"""tools.compare: two cascades on the same prompts and seeds, one blind rating page; checkpoint steps chosen."""

import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from imagen_jax.data import demo
from imagen_jax.errors import MissingError, StageError
from imagen_jax.stage.model import local_mesh
from imagen_jax.stage.stage import Stage
from imagen_jax.text.tiny import make_tiny_t5
from imagen_jax.tools import compare

LEGACY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "legacy")


def test_checkpoint_flags_parse_one_step_per_stage():
    assert compare.parse_checkpoints(None, 2, "a_checkpoint") == [None, None]
    assert compare.parse_checkpoints("2000,latest", 2, "a_checkpoint") == [2000, None]
    with pytest.raises(ValueError, match="--b_checkpoint has 1 values for 2 stages"):
        compare.parse_checkpoints("5", 2, "b_checkpoint")
    with pytest.raises(ValueError, match="--a_checkpoint 'x,2': each value must be a step"):
        compare.parse_checkpoints("x,2", 2, "a_checkpoint")


def test_a_stage_loads_the_checkpoint_step_asked_for():
    stage = Stage.load(os.path.join(LEGACY, "base"), text_dim=16, mesh=local_mesh(), step=2)
    assert stage.step == 2
    with pytest.raises(MissingError, match=r"no checkpoint at step 7 in .*legacy/base/checkpoints \(steps: \[2\]\)"):
        Stage.load(os.path.join(LEGACY, "base"), text_dim=16, mesh=local_mesh(), step=7)
    with pytest.raises(StageError, match="is an export folder"):
        Stage.load(os.path.join(LEGACY, "base_export"), text_dim=16, mesh=local_mesh(), step=2)


@pytest.mark.slow  # samples two models end to end: ~12-30 s
def test_compare_writes_both_sides_and_a_blind_rating_page(tmp_path, capsys):
    make_tiny_t5(str(tmp_path / "t5"), demo.all_captions(), d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32)
    for side in "ab":  # the same exported model twice: every pair must then be two identical images
        shutil.copytree(os.path.join(LEGACY, "base_export"), tmp_path / side)
        config = json.loads((tmp_path / side / "config.json").read_text())
        config["text"]["encoder"] = str(tmp_path / "t5")
        (tmp_path / side / "config.json").write_text(json.dumps(config))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a red circle on the left\na <b>"blue"</b> square\n')
    out = tmp_path / "page"
    argv = ["--a", str(tmp_path / "a"), "--b", str(tmp_path / "b"), "--prompts_file", str(prompts)]
    argv += ["--num_images", "4", "--steps", "2", "--batch_size", "8", "--out", str(out)]
    assert compare.main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == {"page": str(out / "index.html"), "pairs": 8}
    text = (out / "index.html").read_text()
    sides = re.findall(r'data-left="(\w)" data-right="(\w)"', text)
    assert len(sides) == 8 and {("a", "b"), ("b", "a")} == set(sides)  # shown in a random order
    assert "&lt;b&gt;&quot;blue&quot;&lt;/b&gt;" in text and '<b>"blue"' not in text  # prompts are escaped
    for name, entry in json.load(open(out / "a" / "samples.json"))["images"].items():
        other = json.load(open(out / "b" / "samples.json"))["images"][name]
        assert (entry["prompt"], entry["seed"]) == (other["prompt"], other["seed"])
        np.testing.assert_array_equal(
            np.asarray(Image.open(out / "a" / name)), np.asarray(Image.open(out / "b" / name))
        )
        assert f'src="a/{name}"' in text and f'src="b/{name}"' in text
    # A second run into the same folder is refused unless --overwrite, before any model loads.
    assert compare.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err

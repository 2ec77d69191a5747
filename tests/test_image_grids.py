"""Readable image grids: upscaled small images, one named row per class, `fastdd show --scale/--classes`."""

import numpy as np
import torch
from PIL import Image
from typer.testing import CliRunner

from fastdd.cli import app
from fastdd.image_grids import default_scale, image_grid_array, labelled_grid_image
from fastdd.io import SyntheticSet

from cli_errors import assert_one_sentence_error

runner = CliRunner()


def test_small_images_are_upscaled_to_a_readable_size():
    assert [default_scale(s) for s in (8, 28, 32, 64, 224)] == [8, 3, 2, 1, 1]
    grid = image_grid_array(torch.rand(3, 1, 8, 8), nrow=3)
    assert grid.shape == (2 + 64 + 2, 3 * (64 + 2) + 2, 3)
    assert image_grid_array(torch.rand(2, 3, 8, 8), scale=1).shape == (12, 22, 3)


def test_row_names_are_written_left_of_their_rows():
    images = torch.zeros(4, 1, 8, 8)  # black images: any dark pixel left of the grid is text
    plain = Image.fromarray(image_grid_array(images, nrow=2))
    named = labelled_grid_image(images, ["zero", "one"], per_row=2)
    margin = named.width - plain.width
    assert margin > 0 and named.height == plain.height
    label_column = torch.from_numpy(np.asarray(named.crop((0, 0, margin, named.height))).copy())
    assert int((label_column < 128).sum()) > 10


def _saved_set(folder, ipc=2):
    labels = torch.arange(3).repeat_interleave(ipc)
    meta = {"dataset": "digits", "method": "real", "ipc": ipc, "mean": [0.5], "std": [0.5],
            "class_names": ["zero", "one", "two"]}
    SyntheticSet(images=torch.rand(3 * ipc, 1, 8, 8), labels=labels, meta=meta).save(folder)


def test_show_picks_classes_and_scale(tmp_path):
    _saved_set(tmp_path / "set")
    full, part = tmp_path / "full.png", tmp_path / "part.png"
    assert runner.invoke(app, ["show", str(tmp_path / "set"), "--out", str(full)]).exit_code == 0
    result = runner.invoke(app, ["show", str(tmp_path / "set"), "--out", str(part), "--classes", "two,0",
                                 "--scale", "2"])
    assert result.exit_code == 0, result.output
    full_image, part_image = Image.open(full), Image.open(part)
    assert full_image.height == 3 * (64 + 2) + 2 and part_image.height == 2 * (16 + 2) + 2
    bad = runner.invoke(app, ["show", str(tmp_path / "set"), "--classes", "cat"])
    assert_one_sentence_error(bad, "no class 'cat'", "zero, one, two")

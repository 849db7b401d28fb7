"""Channels of one case must share one voxel grid: predict refuses a case whose channels disagree, check too."""
from __future__ import annotations

import numpy as np
import pytest

from tests.test_predictor import make_workdir, tiny_plan, write_case
from voxseg.data.io import Geometry, geometry_differences, read_channels, write_image
from voxseg.errors import ImageReadError, InputError
from voxseg.infer.predictor import Predictor, find_input_cases


def _flipped(geometry: Geometry) -> Geometry:
    affine = geometry.affine.copy()
    affine[:3, 2] *= -1
    return Geometry(affine)


def _shifted(geometry: Geometry, mm: float = 25.0) -> Geometry:
    affine = geometry.affine.copy()
    affine[0, 3] += mm
    return Geometry(affine)


def test_predict_refuses_channels_with_other_direction_or_origin_and_predicts_the_rest(tmp_path):
    workdir = make_workdir(tmp_path / "work", tiny_plan(), folds=(0,))
    geometry = Geometry.from_spacing((1.0, 1.0, 1.0))
    image = np.random.default_rng(0).normal(size=(2, 16, 16, 16)).astype(np.float32)
    folder = tmp_path / "in"
    for name in ("flipped", "good", "shifted"):
        write_case(folder, name, image, geometry)
    write_image(folder / "flipped_0001.nii.gz", image[1], _flipped(geometry))
    write_image(folder / "shifted_0001.nii.gz", image[1], _shifted(geometry))
    predictor = Predictor.from_workdir(workdir, folds=0, device="cpu", mirror_axes=None)
    with pytest.raises(InputError) as info:
        predictor.predict_files(find_input_cases(folder, 2, ".nii.gz"), tmp_path / "out")
    message = str(info.value)
    assert "2 of 3 case(s) failed" in message
    assert "flipped: channel file" in message and "flipped_0001.nii.gz" in message and "direction" in message
    assert "shifted: channel file" in message and "shifted_0001.nii.gz" in message
    assert "origin (25.0, 0.0, 0.0) differs from (0.0, 0.0, 0.0)" in message
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.nii.gz"]


def test_read_channels_names_the_case_and_zero_spacing(tmp_path):
    geometry = Geometry.from_spacing((1.0, 1.0, 1.0))
    array = np.zeros((8, 8, 8), dtype=np.float32)
    write_image(tmp_path / "a_0000.nii.gz", array, geometry)
    write_image(tmp_path / "a_0001.nii.gz", array, _shifted(geometry))
    with pytest.raises(InputError, match="case 'a': channel file .*a_0001.nii.gz: origin"):
        read_channels([tmp_path / "a_0000.nii.gz", tmp_path / "a_0001.nii.gz"], case="a", error=InputError)
    with pytest.raises(ImageReadError, match="origin"):
        read_channels([tmp_path / "a_0000.nii.gz", tmp_path / "a_0001.nii.gz"])
    zero = geometry.affine.copy()
    zero[:3, 1] = 0.0
    differences = geometry_differences((8, 8, 8), Geometry(zero), (8, 8, 8), geometry)
    assert len(differences) == 1 and "spacing is zero along array axis [1]" in differences[0]
    assert not any("direction" in d for d in differences)

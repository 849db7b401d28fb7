"""`voxseg convert dicom`: DICOM series + DICOM-SEG into the nnU-Net raw layout, the same arrays and geometry as
the same volumes written as NIfTI."""
from __future__ import annotations

import json

import numpy as np
import pytest

from bad_inputs import run
from dicom_synth import (
    hounsfield_volume,
    new_study,
    oblique_orientation,
    write_enhanced_ct,
    write_rtstruct,
    write_series,
)
from test_predictor import REGIONS, tiny_plan
from voxseg.data.dicom import scan_dicom
from voxseg.data.dicom_convert import convert_dicom
from voxseg.data.io import read_image, write_image
from voxseg.errors import DatasetError
from voxseg.infer.dicom_seg import write_dicom_seg

CT_LABELS = {"background": 0, "liver": 1, "tumor": 2}


def _labels(shape, seed=0):
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    labels = (((grid - 0.1) ** 2).sum(0) < 0.5).astype(np.uint8)
    labels[((grid + 0.3) ** 2).sum(0) < 0.1] = 2
    return labels


def _annotate(folder, info, labels, plan):
    series = next(s for s in scan_dicom(folder).series if s.uid == info.uid)
    return write_dicom_seg(folder / "seg" / "seg.dcm", labels, info.geometry, series, plan)


def test_ct_with_seg_converts_to_the_same_arrays_as_nifti(tmp_path):
    hu = hounsfield_volume((12, 24, 20))
    labels = _labels(hu.shape)
    info = write_series(tmp_path / "src" / "ct", hu + 1024, orientation=oblique_orientation(), intercept=-1024.0,
                        order="shuffled", study=new_study("LIV1"))
    _annotate(tmp_path / "src", info, labels, tiny_plan(CT_LABELS, channels=1))
    write_series(tmp_path / "src" / "other", hu, study=new_study("NOSEG"))  # a study without SEG: not converted
    code, out, err = run(["convert", "dicom", tmp_path / "src", tmp_path / "dst"])
    assert code == 0, err
    assert "1 study without a DICOM-SEG not converted" in out
    write_image(tmp_path / "nifti" / "image.nii.gz", hu, info.geometry)  # the same volumes as NIfTI
    write_image(tmp_path / "nifti" / "labels.nii.gz", labels, info.geometry)
    for converted, reference in (("imagesTr/LIV1_20260101_0000.nii.gz", "image.nii.gz"),
                                 ("labelsTr/LIV1_20260101.nii.gz", "labels.nii.gz")):
        array, geometry = read_image(tmp_path / "dst" / converted)
        expected, expected_geometry = read_image(tmp_path / "nifti" / reference)
        assert array.dtype == expected.dtype and np.array_equal(array, expected), converted
        assert np.allclose(geometry.affine, expected_geometry.affine, atol=1e-5)
    dataset = json.loads((tmp_path / "dst" / "dataset.json").read_text())
    assert dataset["labels"] == CT_LABELS and dataset["channel_names"] == {"0": "CT"}
    assert dataset["numTraining"] == 1 and dataset["file_ending"] == ".nii.gz"
    code, out, err = run(["check", tmp_path / "dst"])  # the converted dataset is one voxseg plans and trains
    assert code == 0, out + err


def test_two_channels_by_rules_and_an_enhanced_ct_source(tmp_path):
    study = new_study("MR3")
    rng = np.random.default_rng(2)
    t1, flair = (rng.integers(0, 500, size=(10, 16, 14)).astype(np.int16) for _ in range(2))
    a = write_series(tmp_path / "mr" / "t1", t1, "MR", (2.0, 1.0, 1.0), description="T1", study=study)
    write_series(tmp_path / "mr" / "flair", flair, "MR", (2.0, 1.0, 1.0), description="FLAIR", study=study)
    labels = _labels(t1.shape)
    _annotate(tmp_path / "mr", a, labels, tiny_plan(CT_LABELS, channels=1))
    convert_dicom(tmp_path / "mr", tmp_path / "dst", {0: "flair", 1: "t1"})
    assert np.array_equal(read_image(tmp_path / "dst" / "imagesTr" / "MR3_20260101_0000.nii.gz")[0], flair)
    assert np.array_equal(read_image(tmp_path / "dst" / "imagesTr" / "MR3_20260101_0001.nii.gz")[0], t1)
    assert np.array_equal(read_image(tmp_path / "dst" / "labelsTr" / "MR3_20260101.nii.gz")[0], labels)
    # an Enhanced CT multi-frame file (frames stored in reverse): the SEG follows its frames, and back
    stored = hounsfield_volume((8, 12, 10)) + 1024
    enhanced = write_enhanced_ct(tmp_path / "enh" / "ct.dcm", stored, orientation=oblique_orientation(0.2))
    labels = _labels(stored.shape)
    _annotate(tmp_path / "enh", enhanced, labels, tiny_plan(CT_LABELS, channels=1))
    convert_dicom(tmp_path / "enh", tmp_path / "dst2")
    converted, geometry = read_image(tmp_path / "dst2" / "labelsTr" / "SYN001_20260101.nii.gz")
    assert np.array_equal(converted, labels) and geometry.allclose(enhanced.geometry, atol=1e-5)


def test_refusals_name_the_seg_file(tmp_path):
    hu = hounsfield_volume((8, 12, 10))
    info = write_series(tmp_path / "src" / "ct", hu)
    _annotate(tmp_path / "src", info, np.minimum(_labels(hu.shape) + 1, 3).astype(np.uint8),
              tiny_plan(REGIONS, channels=1, regions_class_order=[1, 2, 3]))  # nested regions: overlapping segments
    with pytest.raises(DatasetError, match=r"seg\.dcm: segments overlap in \d+ voxels"):
        convert_dicom(tmp_path / "src", tmp_path / "dst")
    for path in info.files:  # the annotated series is gone
        path.unlink()
    write_series(tmp_path / "src" / "ct2", hu)
    code, _, err = run(["convert", "dicom", tmp_path / "src", tmp_path / "dst"])
    assert code == 2 and f"references series {info.uid}, which is not under" in err
    (tmp_path / "noseg").mkdir()
    write_series(tmp_path / "noseg" / "ct", hu)
    with pytest.raises(DatasetError, match="no DICOM-SEG or RTSTRUCT found"):
        convert_dicom(tmp_path / "noseg", tmp_path / "dst")


def test_rtstruct_contours_are_filled_on_their_slices(tmp_path):
    """Rectangles with corners between voxel centres (so every centre is clearly inside or out), one with a hole
    (a contour inside another), on an oblique series: the filled label map is known voxel for voxel."""
    hu = hounsfield_volume((8, 16, 14))
    info = write_series(tmp_path / "src" / "ct", hu, orientation=oblique_orientation(), order="shuffled")

    def box(r0, r1, c0, c1):
        return [(r0 - 0.5, c0 - 0.5), (r0 - 0.5, c1 + 0.5), (r1 + 0.5, c1 + 0.5), (r1 + 0.5, c0 - 0.5)]

    write_rtstruct(tmp_path / "src" / "rt" / "rtstruct.dcm", info, {
        "Liver": [(2, box(3, 9, 2, 8)), (2, box(5, 6, 4, 5)), (3, box(3, 9, 2, 8))],  # slice 2 has a hole
        "Kidney": [(5, box(10, 13, 9, 12))],
        "Empty": [],
    })
    expected = np.zeros(hu.shape, dtype=np.uint8)
    expected[2:4, 3:10, 2:9] = 1
    expected[2, 5:7, 4:6] = 0
    expected[5, 10:14, 9:13] = 2
    code, out, err = run(["convert", "dicom", tmp_path / "src", tmp_path / "dst"])
    assert code == 0, err
    labels, geometry = read_image(tmp_path / "dst" / "labelsTr" / "SYN001_20260101.nii.gz")
    assert np.array_equal(labels, expected) and geometry.allclose(info.geometry, atol=1e-5)
    assert json.loads((tmp_path / "dst" / "dataset.json").read_text())["labels"] == \
        {"background": 0, "Liver": 1, "Kidney": 2, "Empty": 3}


def test_rtstruct_contours_off_the_slices_are_refused(tmp_path):
    info = write_series(tmp_path / "src" / "ct", hounsfield_volume((8, 16, 14)))
    write_rtstruct(tmp_path / "src" / "rt.dcm", info, {"Liver": [(2.5, [(1, 1), (1, 5), (5, 5)])]})
    with pytest.raises(DatasetError, match=r"rt\.dcm: a contour of ROI 'Liver' does not lie in one slice"):
        convert_dicom(tmp_path / "src", tmp_path / "dst")


def test_label_values_follow_segment_names_across_studies(tmp_path):
    hu = hounsfield_volume((8, 12, 10))
    labels = _labels(hu.shape)  # 1 and 2
    first = write_series(tmp_path / "src" / "a", hu, study=new_study("A"))
    _annotate(tmp_path / "src" / "a", first, labels, tiny_plan(CT_LABELS, channels=1))
    second = write_series(tmp_path / "src" / "b", hu, study=new_study("B"))
    swapped = {"background": 0, "tumor": 1, "liver": 2}  # the same structures, numbered the other way round
    _annotate(tmp_path / "src" / "b", second, labels, tiny_plan(swapped, channels=1))
    convert_dicom(tmp_path / "src", tmp_path / "dst")
    a = read_image(tmp_path / "dst" / "labelsTr" / "A_20260101.nii.gz")[0]
    b = read_image(tmp_path / "dst" / "labelsTr" / "B_20260101.nii.gz")[0]
    assert np.array_equal(a, labels)  # liver 1, tumor 2, as the first SEG numbers them
    assert np.array_equal(b == 1, labels == 2) and np.array_equal(b == 2, labels == 1)  # B's "tumor" is value 2
    assert json.loads((tmp_path / "dst" / "dataset.json").read_text())["labels"] == CT_LABELS


def test_channel_rules_belong_to_convert_dicom_only(tmp_path):
    code, _, err = run(["convert", "brats", tmp_path, tmp_path / "dst", "--channel", "0=T1"])
    assert code == 2 and "use them with 'convert dicom'" in err and not (tmp_path / "dst").exists()

"""`voxseg predict -i DICOM_FOLDER`: studies as cases, channels mapped to series, DICOM-SEG output equal voxel for
voxel to the NIfTI output of the same command."""
from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest

from bad_inputs import run
from dicom_synth import hounsfield_volume, new_study, oblique_orientation, write_enhanced_ct, write_series
from test_predictor import make_workdir, tiny_plan
from voxseg.data.dicom import scan_dicom
from voxseg.data.dicom_rtstruct import read_structure_set
from voxseg.data.dicom_studies import parse_channel_rules
from voxseg.data.dicom_volume import series_geometry
from voxseg.data.io import read_image, write_image
from voxseg.errors import ConfigError, InputError
from voxseg.infer.dicom_cases import dicom_input_cases

CT_LABELS = {"background": 0, "liver": 1, "tumor": 2}
MR_LABELS = {"background": 0, "edema": 1, "core": 2}
FAST = ["--device", "cpu", "--folds", "0", "--no-mirror"]


@pytest.fixture(scope="module")
def ct_model(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("ct_model"), tiny_plan(CT_LABELS, channels=1), seed=1)


@pytest.fixture(scope="module")
def mr_model(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("mr_model"), tiny_plan(MR_LABELS, channels=2), seed=2)


def _mr_study(folder, descriptions=("T1 AX", "FLAIR AX", "T2 AX"), patient_id="MR7"):
    study = new_study(patient_id)
    rng = np.random.default_rng(7)
    return {d: write_series(folder / d.replace(" ", "_"), rng.integers(0, 900, size=(12, 20, 18)).astype(np.int16),
                            "MR", (2.0, 1.1, 1.1), orientation=oblique_orientation(0.3), description=d, study=study,
                            order="shuffled") for d in descriptions}


def _seg_masks(seg_path, series_uid, folder):
    """The SEG's per-segment masks (D, H, W, S) on the source series' slices in array order, and the SEG."""
    seg = hd.seg.segread(seg_path)
    series = next(s for s in scan_dicom(folder).series if s.uid == series_uid)
    frames, _ = series_geometry(series)
    numbers = [int(item.SegmentNumber) for item in seg.SegmentSequence]
    masks = seg.get_pixels_by_source_instance(source_sop_instance_uids=[f.sop_instance_uid for f in frames],
                                              segment_numbers=numbers, combine_segments=False,
                                              assert_missing_frames_are_empty=True)
    return masks, seg


def _predict_both(model, folder, out, extra=()):
    nifti = run(["predict", "-m", model, "-i", folder, "-o", out / "nifti", *FAST, *extra])
    dicom = run(["predict", "-m", model, "-i", folder, "-o", out / "seg", *FAST, "--output-format", "dicom-seg",
                 *extra])
    assert nifti[0] == 0 and dicom[0] == 0, (nifti, dicom)
    return nifti[1], dicom[1]


def test_ct_series_to_dicom_seg_equals_the_nifti_prediction(ct_model, tmp_path):
    stored = hounsfield_volume((12, 24, 20)) + 1024
    info = write_series(tmp_path / "in" / "ct", stored, orientation=oblique_orientation(), intercept=-1024.0,
                        order="shuffled", study=new_study("CT 01/a"), description="Abdomen 2.5")
    printed, _ = _predict_both(ct_model, tmp_path / "in", tmp_path / "out")
    name = "CT_01_a_20260101"  # PatientID_StudyDate, characters outside [A-Za-z0-9._-] as _
    assert "wrote 1 prediction(s)" in printed
    labels, geometry = read_image(tmp_path / "out" / "nifti" / f"{name}.nii.gz")
    assert geometry.allclose(info.geometry, atol=1e-4) and labels.shape == (12, 24, 20)
    masks, seg = _seg_masks(tmp_path / "out" / "seg" / f"{name}.dcm", info.uid, tmp_path / "in")
    assert [item.SegmentLabel for item in seg.SegmentSequence] == ["liver", "tumor"]
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Liver"
    assert seg.SegmentSequence[1].SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == \
        "Morphologically Abnormal Structure"
    for number, value in enumerate((1, 2)):
        assert np.array_equal(masks[..., number].astype(bool), labels == value), value
    assert 0 < (labels > 0).sum() < labels.size  # the comparison is not between two empty masks
    # only frames holding a segment are stored: one per (slice, label) pair present
    assert seg.NumberOfFrames == sum(int((labels[k] == v).any()) for k in range(12) for v in (1, 2))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == info.uid
    # highdicom's own reading of where the SEG's frames lie: each of its voxels maps onto the same voxel of ours
    volume = seg.get_volume(combine_segments=False)  # only the slices holding a segment, in its own axis order
    to_ours = np.linalg.inv(geometry.affine) @ volume.affine
    assert np.allclose(to_ours[:3, 1:3], [[0, 0], [1, 0], [0, 1]], atol=1e-4)  # rows and columns as ours
    assert np.isclose(abs(to_ours[0, 0]), 1, atol=1e-4) and np.allclose(to_ours[1:3, 3], 0, atol=1e-4)
    for i in range(volume.array.shape[0]):
        k = to_ours[0, 0] * i + to_ours[0, 3]
        assert np.isclose(k, round(k), atol=1e-4)
        for number, value in enumerate((1, 2)):
            assert np.array_equal(volume.array[i, ..., number].astype(bool), labels[round(k)] == value)
    assert seg.FrameOfReferenceUID == info.frame_of_reference_uid and seg.StudyInstanceUID == info.study_uid
    assert np.allclose(seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing, [0.8, 0.9])


def test_mr_study_channels_by_series_description(mr_model, tmp_path):
    written = _mr_study(tmp_path / "in")
    printed, _ = _predict_both(mr_model, tmp_path / "in", tmp_path / "out",
                               ["--channel", "0=t1*", "--channel", "1=FLAIR AX"])
    assert f"case MR7_20260101: channel 0 = 'T1 AX' (MR, 12 images, series {written['T1 AX'].uid}), channel 1 = " \
        f"'FLAIR AX' (MR, 12 images, series {written['FLAIR AX'].uid})" in printed
    labels, geometry = read_image(tmp_path / "out" / "nifti" / "MR7_20260101.nii.gz")
    assert geometry.allclose(written["T1 AX"].geometry, atol=1e-4)
    masks, seg = _seg_masks(tmp_path / "out" / "seg" / "MR7_20260101.dcm", written["T1 AX"].uid, tmp_path / "in")
    assert masks.shape == (12, 20, 18, 2) and [s.SegmentLabel for s in seg.SegmentSequence] == ["edema", "core"]
    for number, value in enumerate((1, 2)):
        assert np.array_equal(masks[..., number].astype(bool), labels == value)
    # the channel order is the rules', not the folder's: swapping them changes the prediction
    swapped = run(["predict", "-m", mr_model, "-i", tmp_path / "in", "-o", tmp_path / "swap", *FAST,
                   "--channel", "1=t1*", "--channel", "0=FLAIR AX"])
    assert swapped[0] == 0 and not np.array_equal(read_image(tmp_path / "swap" / "MR7_20260101.nii.gz")[0], labels)


def test_a_missing_channel_lists_the_series_found(mr_model, tmp_path):
    _mr_study(tmp_path / "in", descriptions=("T1 AX", "T2 AX"))
    code, _, err = run(["predict", "-m", mr_model, "-i", tmp_path / "in", "-o", tmp_path / "out", *FAST,
                        "--channel", "0=T1 AX", "--channel", "1=FLAIR*"])
    assert code == 2 and "Traceback" not in err
    assert "no series matches channel 1 'FLAIR*'" in err and "'T1 AX' (MR, 12 images" in err and "'T2 AX'" in err
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_channel_rules_and_study_grouping(mr_model, tmp_path):
    plan = tiny_plan(MR_LABELS, channels=2)
    _mr_study(tmp_path / "a", descriptions=("ch0", "ch1"), patient_id="P1")
    _mr_study(tmp_path / "b", descriptions=("ch0", "ch1"), patient_id="P1")  # same patient and date: 2nd study
    cases = dicom_input_cases(tmp_path, plan)  # no rules: the model's channel names are the patterns
    assert len(cases) == 2 and all(name.startswith("P1_20260101_") for name, _ in cases)
    assert all([s.description for s in series] == ["ch0", "ch1"] for _, series in cases)
    assert parse_channel_rules(["1=FLAIR", "0=T1"]) == {1: "FLAIR", 0: "T1"}
    (tmp_path / "map.json").write_text('{"0": "ch1", "1": "ch0"}')
    assert parse_channel_rules(map_file=tmp_path / "map.json") == {0: "ch1", 1: "ch0"}
    for bad in (["0T1"], ["0=T1", "0=T2"], ["x=T1"]):
        with pytest.raises(ConfigError, match="--channel"):
            parse_channel_rules(bad)
    with pytest.raises(ConfigError, match="the model has 2 channel"):
        dicom_input_cases(tmp_path, plan, {0: "ch0"})
    with pytest.raises(InputError, match="2 series match channel 0"):
        dicom_input_cases(tmp_path / "a", plan, {0: "ch*", 1: "ch1"})


def test_one_channel_model_needs_a_rule_when_a_study_has_several_series(ct_model, tmp_path):
    study = new_study("CT2")
    for kernel in ("soft", "lung"):
        write_series(tmp_path / "in" / kernel, hounsfield_volume(), description=kernel, study=study)
    code, _, err = run(["predict", "-m", ct_model, "-i", tmp_path / "in", "-o", tmp_path / "out", *FAST])
    assert code == 2 and "2 of its 2 image series look like volumes" in err and "--channel 0=" in err
    assert run(["predict", "-m", ct_model, "-i", tmp_path / "in", "-o", tmp_path / "out", *FAST,
                "--channel", "0=lung"])[0] == 0


def test_dicom_seg_output_needs_dicom_input_and_bad_series_fail_by_name(ct_model, tmp_path):
    write_image(tmp_path / "nifti" / "case_0000.nii.gz", hounsfield_volume().astype(np.float32),
                write_series(tmp_path / "ct", hounsfield_volume()).geometry)
    code, _, err = run(["predict", "-m", ct_model, "-i", tmp_path / "nifti", "-o", tmp_path / "out", *FAST,
                        "--output-format", "dicom-seg"])
    assert code == 2 and "--output-format dicom-seg needs DICOM input" in err and not (tmp_path / "out").exists()
    info = write_series(tmp_path / "gap", hounsfield_volume(), drop=4, description="gappy")
    code, _, err = run(["predict", "-m", ct_model, "-i", tmp_path / "gap", "-o", tmp_path / "out", *FAST])
    assert code == 2 and "missing slice(s)" in err and info.uid in err and "Traceback" not in err


def test_torchrun_ranks_share_dicom_cases_by_their_files_size(mr_model, tmp_path, monkeypatch):
    from voxseg.infer.casefiles import my_share

    plan = tiny_plan(MR_LABELS, channels=2)
    for patient in ("A", "B", "C"):
        _mr_study(tmp_path / patient, descriptions=("ch0", "ch1"), patient_id=patient)
    cases = dicom_input_cases(tmp_path, plan)
    monkeypatch.setenv("WORLD_SIZE", "2")
    shares = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        shares.append([name for name, _ in my_share(cases)])
    assert sorted(shares[0] + shares[1]) == ["A_20260101", "B_20260101", "C_20260101"] and all(shares)


def test_rtstruct_output_fills_back_to_the_nifti_prediction(ct_model, tmp_path):
    stored = hounsfield_volume((12, 24, 20)) + 1024
    info = write_series(tmp_path / "in" / "ct", stored, orientation=oblique_orientation(), intercept=-1024.0,
                        order="shuffled", study=new_study("RT1"))
    assert run(["predict", "-m", ct_model, "-i", tmp_path / "in", "-o", tmp_path / "nifti", *FAST])[0] == 0
    code, _, err = run(["predict", "-m", ct_model, "-i", tmp_path / "in", "-o", tmp_path / "rt", *FAST,
                        "--output-format", "rtstruct"])
    assert code == 0, err
    labels, geometry = read_image(tmp_path / "nifti" / "RT1_20260101.nii.gz")
    structure = read_structure_set(tmp_path / "rt" / "RT1_20260101.dcm")
    assert structure.names == ["liver", "tumor"] and structure.series_uids == [info.uid]
    assert sum(len(polygons) for polygons in structure.contours) > 0
    masks = structure.masks(labels.shape, info.geometry)
    for number, value in enumerate((1, 2)):
        assert np.array_equal(masks[..., number], labels == value), value
    ds = pydicom.dcmread(tmp_path / "rt" / "RT1_20260101.dcm")
    assert ds.Modality == "RTSTRUCT" and ds.StudyInstanceUID == info.study_uid and ds.PatientID == "RT1"
    referenced = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    sops = {pydicom.dcmread(path).SOPInstanceUID for path in info.files}
    assert {item.ReferencedSOPInstanceUID for item in referenced.ContourImageSequence} == sops


def test_one_channel_model_passes_over_scouts_and_localizers(ct_model, tmp_path):
    study = new_study("CT3")
    ct = write_series(tmp_path / "in" / "ct", hounsfield_volume(), description="Abdomen", study=study)
    write_series(tmp_path / "in" / "scout", hounsfield_volume()[:1], description="Scout", study=study)
    localizer = write_series(tmp_path / "in" / "loc", hounsfield_volume()[:2], description="Localizer", study=study)
    ds = pydicom.dcmread(localizer.files[0])  # a second plane: AP and lateral in one series
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.save_as(localizer.files[0])
    cases = dicom_input_cases(tmp_path / "in", tiny_plan(CT_LABELS, channels=1))
    assert [(name, [s.uid for s in series]) for name, series in cases] == [("CT3_20260101", [ct.uid])]


def test_a_broken_study_is_reported_by_name_and_the_others_are_written(ct_model, tmp_path):
    good = write_series(tmp_path / "in" / "good", hounsfield_volume(), study=new_study("GOOD"))
    bad = write_series(tmp_path / "in" / "bad", hounsfield_volume(), study=new_study("BAD"), duplicate=2,
                       description="two acquisitions")
    code, _, err = run(["predict", "-m", ct_model, "-i", tmp_path / "in", "-o", tmp_path / "out", *FAST,
                        "--output-format", "dicom-seg"])
    assert code == 2 and "1 of 2 case(s) failed" in err and "BAD_20260101: " in err and bad.uid in err
    assert "lie at the same position" in err and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["GOOD_20260101.dcm"]
    assert hd.seg.segread(tmp_path / "out" / "GOOD_20260101.dcm").ReferencedSeriesSequence[0].SeriesInstanceUID == \
        good.uid


def test_one_dicom_file_given_as_input_is_told_to_give_its_folder(ct_model, tmp_path):
    info = write_series(tmp_path / "ct", hounsfield_volume())
    code, _, err = run(["predict", "-m", ct_model, "-i", info.files[0], "-o", tmp_path / "out", *FAST])
    assert code == 2 and "it is a DICOM file: give the folder holding its series" in err


def test_enhanced_ct_source_to_seg_and_rtstruct(ct_model, tmp_path):
    stored = hounsfield_volume((10, 20, 16)) + 1024
    info = write_enhanced_ct(tmp_path / "in" / "ct.dcm", stored, orientation=oblique_orientation(0.2),
                             study=new_study("ENH"))
    assert run(["predict", "-m", ct_model, "-i", tmp_path / "in", "-o", tmp_path / "nifti", *FAST])[0] == 0
    labels, geometry = read_image(tmp_path / "nifti" / "ENH_20260101.nii.gz")
    assert geometry.allclose(info.geometry, atol=1e-4) and 0 < (labels > 0).sum() < labels.size
    for output_format in ("dicom-seg", "rtstruct"):
        code, _, err = run(["predict", "-m", ct_model, "-i", tmp_path / "in", "-o", tmp_path / output_format, *FAST,
                            "--output-format", output_format])
        assert code == 0, err
    frames, _ = series_geometry(scan_dicom(tmp_path / "in").series[0])  # frames stored in reverse spatial order
    seg = hd.seg.segread(tmp_path / "dicom-seg" / "ENH_20260101.dcm")
    masks = seg.get_pixels_by_source_frame(frames[0].sop_instance_uid, [f.index + 1 for f in frames],
                                           segment_numbers=[1, 2], combine_segments=False,
                                           assert_missing_frames_are_empty=True)
    structure = read_structure_set(tmp_path / "rtstruct" / "ENH_20260101.dcm")
    filled = structure.masks(labels.shape, info.geometry)
    for number, value in enumerate((1, 2)):
        assert np.array_equal(masks[..., number].astype(bool), labels == value)
        assert np.array_equal(filled[..., number], labels == value)
    ds = pydicom.dcmread(tmp_path / "rtstruct" / "ENH_20260101.dcm")
    images = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert sorted(int(item.ReferencedFrameNumber) for item in images.ContourImageSequence) == list(range(1, 11))


def test_output_format_is_an_infer_config_choice_and_excludes_a_file_ending():
    from voxseg.infer.config import InferConfig, infer_config

    assert InferConfig().output_format == "nifti"
    assert infer_config(["output_format=rtstruct"]).output_format == "rtstruct"
    with pytest.raises(ConfigError, match="output_format"):
        InferConfig(output_format="png")
    with pytest.raises(ConfigError, match="writes OUT/CASE.dcm: drop --file-ending"):
        InferConfig(output_format="dicom-seg", file_ending=".nii")

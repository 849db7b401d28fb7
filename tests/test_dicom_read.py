"""DICOM series reading: grouping, spatial slice order, geometry equal to SimpleITK's, rescale, refusals."""
from __future__ import annotations

import numpy as np
import pytest

from dicom_synth import (
    hounsfield_volume,
    new_study,
    oblique_orientation,
    sitk_series,
    write_enhanced_ct,
    write_series,
)
from voxseg.data.dicom import scan_dicom
from voxseg.data.dicom_volume import read_series
from voxseg.errors import ConfigError, ImageReadError


def _only_series(folder):
    scan = scan_dicom(folder)
    assert len(scan.series) == 1
    return scan.series[0]


@pytest.mark.parametrize("order", ["forward", "reverse", "shuffled"])
@pytest.mark.parametrize("orientation", ["axial", "oblique"])
def test_ct_series_matches_simpleitk_whatever_the_file_order(tmp_path, order, orientation):
    stored = hounsfield_volume() + 1024  # stored values; HU = stored - 1024
    iop = oblique_orientation() if orientation == "oblique" else (1, 0, 0, 0, 1, 0)
    info = write_series(tmp_path, stored, orientation=iop, order=order, intercept=-1024.0, names="index")
    image, geometry = read_series(_only_series(tmp_path))
    assert image.dtype == np.float32 and image.shape == (12, 24, 20)
    assert np.array_equal(image, hounsfield_volume().astype(np.float32))  # HU, slice 0 first along the normal
    assert np.allclose(geometry.affine, info.geometry.affine, atol=1e-5)
    sitk_array, sitk_geometry = sitk_series(tmp_path, info.uid)
    assert np.allclose(geometry.affine, sitk_geometry.affine, atol=1e-5)
    assert np.array_equal(image, sitk_array.astype(np.float32))


def test_mr_with_rescale_and_several_series_grouped_by_uid(tmp_path):
    study = new_study()
    rng = np.random.default_rng(1)
    t1 = rng.integers(0, 800, size=(10, 16, 14)).astype(np.int16)
    flair = rng.integers(0, 800, size=(10, 16, 14)).astype(np.int16)
    a = write_series(tmp_path / "a", t1, "MR", (3.0, 1.0, 1.0), description="T1", study=study, order="shuffled",
                     slope=0.5, intercept=2.0)
    b = write_series(tmp_path / "b", flair, "MR", (3.0, 1.0, 1.0), description="FLAIR", study=study,
                     orientation=(0, 1, 0, 0, 0, -1), order="reverse")  # sagittal
    (tmp_path / "a" / "notes.txt").write_text("not dicom")
    scan = scan_dicom(tmp_path)
    assert sorted(s.description for s in scan.series) == ["FLAIR", "T1"]
    by_name = {s.description: s for s in scan.series}
    image, geometry = read_series(by_name["T1"])
    assert np.allclose(image, t1 * 0.5 + 2.0) and geometry.allclose(a.geometry)
    image, geometry = read_series(by_name["FLAIR"])
    assert np.array_equal(image, flair.astype(np.float32)) and geometry.allclose(b.geometry, atol=1e-6)
    assert np.allclose(geometry.affine, sitk_series(tmp_path / "b", b.uid)[1].affine, atol=1e-5)


def test_enhanced_multiframe_ct_is_read_from_its_functional_groups(tmp_path):
    stored = hounsfield_volume((8, 12, 10)) + 1024
    info = write_enhanced_ct(tmp_path / "enhanced.dcm", stored, orientation=oblique_orientation(0.2))
    image, geometry = read_series(_only_series(tmp_path))
    assert np.array_equal(image, stored.astype(np.float32) - 1024)  # frames were stored in reverse
    assert np.allclose(geometry.affine, info.geometry.affine, atol=1e-6)


def _refusal(folder) -> str:
    with pytest.raises(ImageReadError) as info:
        read_series(_only_series(folder))
    return str(info.value)


@pytest.mark.parametrize("fault, words", [
    ({"drop": 5}, ["missing slice(s) between", "gap 5.000 mm where the slices are 2.500 mm apart"]),
    ({"duplicate": 3}, ["lie at the same position", "split it into one series per volume"]),
    ({"tilt_degrees": 15.0}, ["gantry tilt", "about 15.0 degrees", "does not resample"]),
    ({"tilt_degrees": 0.5}, ["gantry tilt", "about 0.5 degrees"]),  # small per slice, 0.24 mm over the series
])
def test_broken_series_are_refused_naming_the_series(tmp_path, fault, words):
    info = write_series(tmp_path, hounsfield_volume(), description="Thorax 2.5", order="shuffled", **fault)
    message = _refusal(tmp_path)
    assert info.uid in message and "'Thorax 2.5'" in message and str(tmp_path) in message
    for word in words:
        assert word in message


def test_mixed_orientations_and_sizes_in_one_series_are_refused(tmp_path):
    import pydicom

    info = write_series(tmp_path, hounsfield_volume(), description="mixed")
    ds = pydicom.dcmread(info.files[0])
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.save_as(info.files[0])
    message = _refusal(tmp_path)
    assert "mixed orientations" in message and info.uid in message and "localizer" in message


def test_unequal_spacing_is_refused(tmp_path):
    import pydicom

    info = write_series(tmp_path, hounsfield_volume(), spacing=(2.0, 1.0, 1.0))
    for path in info.files:  # stretch the upper half's positions by 10 %
        ds = pydicom.dcmread(path)
        z = float(ds.ImagePositionPatient[2])
        if z > 40:
            ds.ImagePositionPatient = [-10.0, 20.0, 40 + (z - 40) * 1.1]
            ds.save_as(path)
    assert "unequal slice spacing" in _refusal(tmp_path)


def test_compressed_pixel_data_without_a_decoder_names_the_syntax(tmp_path, monkeypatch):
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    info = write_series(tmp_path, hounsfield_volume(), description="packed")
    for path in info.files:  # pixel data as a JPEG 2000 series carries it (encapsulated fragments)
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        ds.PixelData = encapsulate([ds.PixelData])
        ds.save_as(path)
    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array",
                        property(lambda self: (_ for _ in ()).throw(RuntimeError("no handler for JPEG 2000"))))
    message = _refusal(tmp_path)
    assert "cannot be decoded (transfer syntax JPEG 2000 Image Compression (Lossless Only)" in message
    assert "'packed'" in message and "install a decoder" in message and "export the series uncompressed" in message


def test_non_images_are_not_read_as_images_and_an_empty_folder_is_refused(tmp_path):
    import pydicom

    info = write_series(tmp_path / "ct", hounsfield_volume())
    sr = pydicom.dcmread(info.files[0])
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    sr.file_meta.MediaStorageSOPClassUID = sr.SOPClassUID
    sr.SeriesInstanceUID = "1.2.3.4.5"
    sr.save_as(tmp_path / "ct" / "report")
    scan = scan_dicom(tmp_path)
    assert [s.uid for s in scan.series] == [info.uid] and len(scan.ignored) == 1
    assert "not an image" in scan.ignored[0][1]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ImageReadError, match="no DICOM image series found"):
        scan_dicom(tmp_path / "empty")


def test_missing_position_tags_and_single_slices_are_refused(tmp_path):
    import pydicom

    info = write_series(tmp_path / "a", hounsfield_volume(), description="scout")
    ds = pydicom.dcmread(info.files[0])
    del ds.ImagePositionPatient
    ds.save_as(info.files[0])
    assert "no valid ImagePositionPatient" in _refusal(tmp_path / "a")
    write_series(tmp_path / "b", hounsfield_volume()[:1])
    assert "a volume needs at least two slices" in _refusal(tmp_path / "b")


def test_without_pydicom_the_message_says_what_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'voxseg\[dicom\]'"):
        scan_dicom(tmp_path)


@pytest.mark.parametrize("sample", ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"])
def test_pydicoms_own_sample_files_stacked_into_a_series(tmp_path, sample):
    """A real MR image (pydicom's test files: uncompressed, RLE and JPEG 2000) copied to three positions along its
    normal, files in scrambled order: decoded, rescaled and placed as SimpleITK places them."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    original = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    expected = original.pixel_array.astype(np.float32) * float(getattr(original, "RescaleSlope", 1)) + \
        float(getattr(original, "RescaleIntercept", 0))
    iop = np.asarray([float(v) for v in original.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    for k, name in ((2, "a"), (0, "b"), (1, "c")):
        ds = pydicom.dcmread(get_testdata_file(sample))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = [float(v) + 3.0 * k * n for v, n in zip(ds.ImagePositionPatient, normal)]
        ds.InstanceNumber = 3 - k
        ds.save_as(tmp_path / name)
    series = _only_series(tmp_path)
    image, geometry = read_series(series)
    assert image.shape == (3, 64, 64) and all(np.array_equal(image[k], expected) for k in range(3))
    _, sitk_geometry = sitk_series(tmp_path, series.uid)
    assert np.allclose(geometry.affine, sitk_geometry.affine, atol=1e-4)
    assert np.isclose(geometry.spacing[0], 3.0)


def test_a_series_split_over_folders_is_one_series_named_by_their_common_folder(tmp_path):
    info = write_series(tmp_path / "export" / "a", hounsfield_volume(), order="shuffled")
    for path in info.files[::2]:  # half of the files into a sibling folder
        (tmp_path / "export" / "b").mkdir(exist_ok=True)
        path.rename(tmp_path / "export" / "b" / path.name)
    series = _only_series(tmp_path)
    assert series.folder == tmp_path / "export" and f"in {tmp_path / 'export'})" in series.label
    image, geometry = read_series(series)
    assert np.array_equal(image, hounsfield_volume().astype(np.float32)) and geometry.allclose(info.geometry)


def test_a_damaged_file_is_refused_not_left_out_of_its_series(tmp_path):
    info = write_series(tmp_path, hounsfield_volume(), order="shuffled")
    damaged = info.files[0]
    damaged.write_bytes(damaged.read_bytes()[:200])  # the marker survives, the header does not
    with pytest.raises(ImageReadError) as error:
        scan_dicom(tmp_path)
    message = str(error.value)
    assert "1 DICOM file(s) cannot be read, so the series they belong to would be incomplete" in message
    assert str(damaged) in message and "copy them again or remove them" in message


def test_truncated_pixel_data_and_uninterpretable_headers_name_the_file(tmp_path):
    import pydicom

    info = write_series(tmp_path / "a", hounsfield_volume(), description="cut")
    ds = pydicom.dcmread(info.files[3])
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(info.files[3])
    message = _refusal(tmp_path / "a")
    assert f"the pixel data of {info.files[3].name} cannot be decoded" in message
    assert "Explicit VR Little Endian" in message and "the file may be truncated" in message
    info = write_series(tmp_path / "b", hounsfield_volume(), description="odd slope")
    ds = pydicom.dcmread(info.files[0])
    del ds.Rows
    ds.save_as(info.files[0])
    assert f"{info.files[0].name}: header cannot be interpreted" in _refusal(tmp_path / "b")


def test_the_top_level_api_names_the_dicom_functions():
    import voxseg
    from voxseg.data.dicom_convert import convert_dicom

    assert voxseg.read_series is read_series and voxseg.scan_dicom is scan_dicom
    assert voxseg.convert_dicom is convert_dicom

"""Image I/O: geometry round trips for both backends, agreement between them, and clear read errors."""
from __future__ import annotations

import numpy as np
import pytest

from voxseg.data import io
from voxseg.data.io import Geometry, read_channels, read_image, write_image
from voxseg.errors import ImageReadError


def _rotation(axis: int, degrees: float) -> np.ndarray:
    angle = np.deg2rad(degrees)
    c, s = np.cos(angle), np.sin(angle)
    i, j = [a for a in range(3) if a != axis]
    rotation = np.eye(3)
    rotation[i, i], rotation[i, j], rotation[j, i], rotation[j, j] = c, -s, s, c
    return rotation


def _oblique_geometry() -> Geometry:
    """Anisotropic spacing, a rotated and flipped direction and an off-centre origin."""
    direction = _rotation(0, 25.0) @ _rotation(2, -10.0) @ np.diag([1.0, -1.0, 1.0])  # columns: one per array axis
    spacing = np.array([2.5, 0.8, 1.2])
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing[None, :]
    affine[:3, 3] = [12.5, -30.25, 44.0]
    return Geometry(affine)


def _volume(dtype: type = np.float32, shape: tuple[int, int, int] = (5, 7, 9)) -> np.ndarray:
    # distinct values along each axis so any transposition or flip changes the array
    values = np.arange(np.prod(shape)).reshape(shape) % 251
    return values.astype(dtype)


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".mha", ".nrrd"])
@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8])
def test_round_trip_keeps_array_and_geometry(tmp_path, ending, dtype):
    geometry = _oblique_geometry()
    array = _volume(dtype)
    path = tmp_path / f"image{ending}"
    write_image(path, array, geometry)
    read, read_geometry = read_image(path)
    assert read.shape == (5, 7, 9)
    assert read.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(read, array)
    np.testing.assert_allclose(read_geometry.affine, geometry.affine, atol=1e-4)
    np.testing.assert_allclose(read_geometry.spacing, (2.5, 0.8, 1.2), rtol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # atomic write leaves no temp file


@pytest.mark.parametrize("ending", [".nii.gz", ".mha"])
def test_bool_and_float16_are_written_as_supported_types(tmp_path, ending):
    geometry = Geometry.from_spacing((1.0, 2.0, 3.0))
    mask = _volume(np.uint8) > 100
    write_image(tmp_path / f"mask{ending}", mask, geometry)
    read, _ = read_image(tmp_path / f"mask{ending}")
    np.testing.assert_array_equal(read, mask.astype(np.uint8))
    half = _volume(np.float16)
    write_image(tmp_path / f"half{ending}", half, geometry)
    read, _ = read_image(tmp_path / f"half{ending}")
    assert read.dtype == np.float32
    np.testing.assert_array_equal(read, half.astype(np.float32))


def test_nifti_reads_the_same_with_both_backends(tmp_path):
    geometry = _oblique_geometry()
    array = _volume(np.int16)
    written_by_nibabel = tmp_path / "nib.nii.gz"
    written_by_sitk = tmp_path / "sitk.nii.gz"
    io._write_nibabel(written_by_nibabel, array, geometry)
    io._write_sitk(written_by_sitk, array, geometry)
    for path in (written_by_nibabel, written_by_sitk):
        array_nib, geo_nib = io._read_nibabel(path)
        array_sitk, geo_sitk = io._read_sitk(path)
        np.testing.assert_array_equal(array_nib, array)
        np.testing.assert_array_equal(array_sitk, array)
        np.testing.assert_allclose(geo_nib.affine, geometry.affine, atol=1e-4)
        np.testing.assert_allclose(geo_sitk.affine, geo_nib.affine, atol=1e-4)


def test_affine_matches_simpleitk_physical_points(tmp_path):
    """The affine maps array index (a0, a1, a2) to the point ITK gives for index (a2, a1, a0), in LPS mm."""
    import SimpleITK as sitk

    geometry = _oblique_geometry()
    path = tmp_path / "image.mha"
    write_image(path, _volume(), geometry)
    image = sitk.ReadImage(str(path))
    assert image.GetSize() == (9, 7, 5)
    np.testing.assert_allclose(image.GetSpacing(), (1.2, 0.8, 2.5), rtol=1e-6)
    for index in [(0, 0, 0), (4, 6, 8), (1, 2, 3)]:
        expected = image.TransformIndexToPhysicalPoint(tuple(int(i) for i in index[::-1]))
        np.testing.assert_allclose(geometry.affine @ np.array([*index, 1.0]), [*expected, 1.0], atol=1e-6)


def test_affine_matches_nibabel_ras_affine(tmp_path):
    """nibabel's (i, j, k) RAS affine equals ours with the axes reversed and x, y negated (RAS -> LPS)."""
    import nibabel as nib

    geometry = _oblique_geometry()
    array = _volume()
    path = tmp_path / "image.nii.gz"
    write_image(path, array, geometry)
    image = nib.load(str(path))
    assert image.shape == (9, 7, 5)
    np.testing.assert_array_equal(np.asanyarray(image.dataobj)[3, 2, 1], array[1, 2, 3])
    ras = image.affine @ np.array([3, 2, 1, 1.0])
    lps = geometry.affine @ np.array([1, 2, 3, 1.0])
    np.testing.assert_allclose(ras, lps * np.array([-1, -1, 1, 1]), atol=1e-4)


def test_from_spacing_puts_axis_zero_on_world_z():
    geometry = Geometry.from_spacing((3.0, 2.0, 0.5))
    assert geometry.spacing == (3.0, 2.0, 0.5)
    np.testing.assert_allclose(geometry.affine @ [1, 0, 0, 1], [0, 0, 3, 1])
    np.testing.assert_allclose(geometry.affine @ [0, 0, 4, 1], [2, 0, 0, 1])
    assert Geometry.from_list(geometry.to_list()).allclose(geometry)


def test_read_channels_stacks_and_rejects_mismatched_grids(tmp_path):
    geometry = _oblique_geometry()
    paths = []
    for channel in range(3):
        paths.append(tmp_path / f"case_{channel:04d}.nii.gz")
        write_image(paths[-1], _volume(np.int16) + channel, geometry)
    stacked, read_geometry = read_channels(paths)
    assert stacked.shape == (3, 5, 7, 9) and stacked.dtype == np.float32
    np.testing.assert_array_equal(stacked[2] - stacked[0], 2.0)
    assert read_geometry.allclose(geometry)
    write_image(paths[1], _volume(np.int16, (5, 7, 8)), geometry)
    with pytest.raises(ImageReadError, match="case_0001.nii.gz: shape"):
        read_channels(paths)


@pytest.mark.parametrize("ending", [".nii.gz", ".mha", ".nrrd"])
def test_truncated_file_raises_with_path(tmp_path, ending):
    path = tmp_path / f"cut{ending}"
    write_image(path, np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32),
                Geometry.from_spacing((1, 1, 1)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("ending", [".nii.gz", ".mha"])
def test_empty_and_missing_files_raise_with_path(tmp_path, ending):
    empty = tmp_path / f"empty{ending}"
    empty.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty") as info:
        read_image(empty)
    assert str(empty) in str(info.value)
    missing = tmp_path / f"missing{ending}"
    with pytest.raises(ImageReadError, match="not found") as info:
        read_image(missing)
    assert str(missing) in str(info.value)


def test_garbage_and_unsupported_files_raise(tmp_path):
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ImageReadError, match="garbage.nii.gz"):
        read_image(garbage)
    other = tmp_path / "image.png"
    other.write_bytes(b"\x89PNG")
    with pytest.raises(ImageReadError, match="unsupported"):
        read_image(other)


def test_4d_nifti_is_rejected_with_a_hint(tmp_path):
    import nibabel as nib

    path = tmp_path / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 2), dtype=np.float32), np.eye(4)), str(path))
    with pytest.raises(ImageReadError, match="3D"):
        read_image(path)

"""Image reading and writing with geometry kept, for two backends.

nibabel reads and writes NIfTI (`.nii`, `.nii.gz`); SimpleITK reads and writes everything else it knows
(`.mha`, `.mhd`, `.nrrd`, and NIfTI too). Both return arrays in array axis order (D, H, W) (SimpleITK's order,
slowest axis first) and a `Geometry` whose affine maps array indices to LPS world millimetres, so a file read by
either backend gives the same array and geometry, and whatever voxseg writes lines up with its input in a viewer.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from voxseg.atomicio import atomic_path
from voxseg.errors import ImageReadError

NIFTI_ENDINGS = (".nii.gz", ".nii")
SITK_ENDINGS = (".mha", ".mhd", ".nrrd", ".nhdr")
SUPPORTED_ENDINGS = NIFTI_ENDINGS + SITK_ENDINGS
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Geometry:
    """Where an array lies in the world.

    Attributes:
        affine: (4, 4) maps (a0, a1, a2, 1) in array axis order to LPS world coordinates in mm.
    """

    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm, array axis order."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def origin(self) -> tuple[float, ...]:
        return tuple(float(v) for v in self.affine[:3, 3])

    @property
    def direction(self) -> np.ndarray:
        """(3, 3) unit column per array axis."""
        return self.affine[:3, :3] / np.asarray(self.spacing)[None, :]

    def to_list(self) -> list[list[float]]:
        return np.asarray(self.affine, dtype=float).tolist()

    @classmethod
    def from_list(cls, affine: list[list[float]]) -> "Geometry":
        return cls(np.asarray(affine, dtype=np.float64))

    @classmethod
    def from_spacing(cls, spacing: tuple[float, ...]) -> "Geometry":
        """Axis-aligned geometry at the origin (synthetic data, tests)."""
        affine = np.eye(4)
        affine[:3, :3] = 0.0
        # array axis 0 is the world z axis, axis 2 the world x axis (SimpleITK's convention)
        for axis, world_axis in enumerate((2, 1, 0)):
            affine[world_axis, axis] = float(spacing[axis])
        return cls(affine)

    def allclose(self, other: "Geometry", atol: float = 1e-4) -> bool:
        return bool(np.allclose(self.affine, other.affine, atol=atol))


def file_ending(path: str | Path) -> str:
    name = str(path).lower()
    for ending in SUPPORTED_ENDINGS:
        if name.endswith(ending):
            return ending
    return Path(name).suffix


def read_image(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Read one single-channel 3D image.

    Returns:
        array (D, H, W) in the file's own dtype, and its Geometry.

    Raises:
        ImageReadError: missing, empty, truncated or unsupported file, or not 3D.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: file is empty (0 bytes); re-export or re-copy it")
    ending = file_ending(path)
    if ending not in SUPPORTED_ENDINGS:
        dicom = starts_like_dicom(path)
        raise ImageReadError(f"{path}: unsupported file type '{ending}'; use one of {', '.join(SUPPORTED_ENDINGS)}"
                             + ("; it is a DICOM file: give the folder holding its series (DICOM input reads whole "
                                "series, docs/INFERENCE.md)" if dicom else ""))
    try:
        array, geometry = _read_nibabel(path) if ending in NIFTI_ENDINGS else _read_sitk(path)
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - any backend failure is a bad file for the user
        raise ImageReadError(f"{path}: cannot be read ({type(exc).__name__}: {exc}); the file may be truncated or "
                             "corrupt") from None
    if array.ndim != 3:
        raise ImageReadError(f"{path}: expected a 3D image, found shape {array.shape}; split 4D images with "
                             "'voxseg convert'")
    return array, geometry


def starts_like_dicom(path: Path) -> bool:
    """The DICOM file marker: 'DICM' after a 128-byte preamble."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _read_nibabel(path: Path) -> tuple[np.ndarray, Geometry]:
    import nibabel as nib

    image = nib.load(str(path))
    data = np.asanyarray(image.dataobj)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        return data, Geometry(np.eye(4))
    ras_affine = image.affine
    # nibabel's array is (i, j, k) with the RAS affine; ours is (k, j, i) with an LPS affine
    affine = _RAS_TO_LPS @ ras_affine
    affine = affine[:, [2, 1, 0, 3]]
    return np.ascontiguousarray(data.transpose(2, 1, 0)), Geometry(affine)


def _read_sitk(path: Path) -> tuple[np.ndarray, Geometry]:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        return array.reshape(array.shape + (1,)) if array.ndim == 3 else array, Geometry(np.eye(4))
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    affine = np.eye(4)
    # SimpleITK index (x, y, z) -> world = origin + direction @ diag(spacing) @ index; array order is (z, y, x)
    affine[:3, :3] = (direction * np.asarray(image.GetSpacing())[None, :])[:, ::-1]
    affine[:3, 3] = image.GetOrigin()
    return array, Geometry(affine)


def write_image(path: str | Path, array: np.ndarray, geometry: Geometry) -> None:
    """Write a 3D array (D, H, W) with the given geometry, atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ending = file_ending(path)
    if ending not in SUPPORTED_ENDINGS:
        raise ImageReadError(f"{path}: cannot write file type '{ending}'; use one of {', '.join(SUPPORTED_ENDINGS)}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if array.dtype == np.float16:
        array = array.astype(np.float32)
    with atomic_path(path) as tmp:  # keeps the ending, from which nibabel / SimpleITK pick the format
        if ending in NIFTI_ENDINGS:
            _write_nibabel(tmp, array, geometry)
        else:
            _write_sitk(tmp, array, geometry)


def _write_nibabel(path: Path, array: np.ndarray, geometry: Geometry) -> None:
    import nibabel as nib

    ras_affine = _RAS_TO_LPS @ geometry.affine[:, [2, 1, 0, 3]]
    # NIfTI stores x fastest: the transposed view of a C-ordered (z, y, x) array is already in that order, and
    # nibabel writes it as it lies in memory (no copy of the volume)
    image = nib.Nifti1Image(array.transpose(2, 1, 0), ras_affine)
    image.set_qform(ras_affine, code=1)
    image.set_sform(ras_affine, code=1)
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))


def _write_sitk(path: Path, array: np.ndarray, geometry: Geometry) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    spacing = np.asarray(geometry.spacing)[::-1]
    direction = geometry.affine[:3, :3][:, ::-1] / spacing[None, :]
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in direction.ravel()])
    image.SetOrigin([float(v) for v in geometry.affine[:3, 3]])
    sitk.WriteImage(image, str(path), useCompression=True)


def zero_spacing_axes(geometry: Geometry) -> list[int]:
    """Array axes whose voxel size is zero (a broken header: direction and every size derived from it are void)."""
    return [axis for axis, size in enumerate(geometry.spacing) if not size > 1e-9]


def geometry_differences(shape: tuple, geometry: Geometry, ref_shape: tuple, ref_geometry: Geometry) -> list[str]:
    """How a file's grid differs from a reference grid, one phrase per difference (empty: the same grid).

    The one definition of "the same voxel grid" for check (training data) and predict (channels of a case):
    shape equal, spacing within 0.1 %, direction within 1e-3, origin within 5 % of the smallest voxel size.
    A zero spacing is reported as such, not as the direction difference it would otherwise cause.
    """
    differences = []
    if shape != ref_shape:
        differences.append(f"shape {tuple(shape)} differs from {tuple(ref_shape)}")
    zero = zero_spacing_axes(geometry) or zero_spacing_axes(ref_geometry)
    if zero:
        return differences + [f"spacing is zero along array axis {zero} (spacing {geometry.spacing} vs "
                              f"{ref_geometry.spacing}); fix the file header"]
    spacing, ref_spacing = (tuple(round(s, 4) for s in g.spacing) for g in (geometry, ref_geometry))
    if not np.allclose(geometry.spacing, ref_geometry.spacing, rtol=1e-3):
        differences.append(f"spacing {spacing} differs from {ref_spacing}")
    if not np.allclose(geometry.direction, ref_geometry.direction, atol=1e-3):
        direction, ref_direction = (np.round(g.direction, 3).tolist() for g in (geometry, ref_geometry))
        differences.append(f"direction/orientation differs (the affines disagree: flipped or rotated axes): "
                           f"{direction} vs {ref_direction}")
    elif not np.allclose(geometry.origin, ref_geometry.origin,
                         atol=0.05 * min(min(geometry.spacing), min(ref_geometry.spacing))):
        origin, ref_origin = (tuple(round(o, 3) for o in g.origin) for g in (geometry, ref_geometry))
        differences.append(f"origin {origin} differs from {ref_origin}")
    return differences


def read_channels(paths: list[Path], case: str = "",
                  error: type[Exception] = ImageReadError) -> tuple[np.ndarray, Geometry]:
    """Read one case's channel files into (C, D, H, W) float32, checking they lie on one voxel grid.

    Args:
        paths: the channel files in channel order; the first is the reference grid.
        case: case name for error messages.
        error: the error type raised for a grid mismatch (ImageReadError; InputError in predict).

    Raises:
        error: a channel's shape, spacing, direction or origin differs from channel 0's, or a spacing is zero.
    """
    arrays, geometries = [], []
    where = f"case '{case}': " if case else ""
    for path in paths:
        array, geometry = read_image(path)
        zero = zero_spacing_axes(geometry)
        if zero:
            raise error(f"{where}{path}: spacing is zero along array axis {zero} ({geometry.spacing}); "
                        "fix the file header (the voxel size must be positive)")
        if arrays:
            differences = geometry_differences(array.shape, geometry, arrays[0].shape, geometries[0])
            if differences:
                raise error(f"{where}channel file {path}: {'; '.join(differences)} ({paths[0].name} is the reference); "
                            "all channels of a case must be co-registered on the same grid: resample or re-export it")
        arrays.append(array.astype(np.float32, copy=False))
        geometries.append(geometry)
    assert geometries, "read_channels needs at least one path"
    return np.stack(arrays), geometries[0]

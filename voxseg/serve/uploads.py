"""What an upload may be, checked before any voxel is decoded: the request's size, each file's kind (by its
ending, then by its header), the image size its header declares, the channel count, and for a zip its member
count and total uncompressed size (read from its directory before anything is extracted).

Names sent by the client are never used as paths: the files are stored as channel_0000<ending>, ... (or
dicom/00000.dcm, ... for a DICOM study), and the client's names only give the channel order (CASE_0001 is
channel 1) and the case name shown back.
"""
from __future__ import annotations

import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO, Sequence

from voxseg.errors import InputError, VoxsegError
from voxseg.plans import Plan

__all__ = ["IMAGE_ENDINGS", "SavedUpload", "UploadError", "UploadLimits", "save_upload"]

IMAGE_ENDINGS = (".nii.gz", ".nii", ".mha", ".nrrd")
DICOM_FOLDER = "dicom"
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")
_COPY_CHUNK = 1 << 20


class UploadError(InputError):
    """An upload the server refuses; `status` is the HTTP status it answers with (4xx)."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class UploadLimits:
    """The limits an upload is checked against.

    Attributes:
        max_upload_bytes: the request body (all files together).
        max_voxels: voxels of one channel image, as its header declares them.
        max_zip_members: files in a zip.
        max_unzipped_bytes: a zip's members together, uncompressed.
    """

    max_upload_bytes: int = 1 << 30
    max_voxels: int = 1 << 28
    max_zip_members: int = 4096
    max_unzipped_bytes: int = 4 << 30


@dataclass(frozen=True)
class SavedUpload:
    """An upload stored in a job's inputs folder: the case name to show, the stored names (in channel order, or
    [DICOM_FOLDER]) and the result's ending."""

    name: str
    inputs: list[str]
    result_ending: str


def _base_name(filename: str | None) -> str:
    """The last part of a client's file name, whichever separator it used (only read, never a path)."""
    return PureWindowsPath(PurePosixPath(filename or "").name).name


def _ending(name: str) -> str | None:
    lowered = name.lower()
    return next((ending for ending in IMAGE_ENDINGS if lowered.endswith(ending)), None)


def save_upload(parts: Sequence[tuple[str | None, IO[bytes]]], inputs: Path, plan: Plan,
                limits: UploadLimits) -> SavedUpload:
    """Check the uploaded files and store them in `inputs` (a job's staging inputs folder).

    Args:
        parts: (client's file name, readable file) per uploaded file: the channel files of one case, or one zip
            of them, or one zip of a DICOM study.
        inputs: the folder to store them in.
        plan: the model's plan (its channel count).
        limits: what an upload may be.

    Raises:
        UploadError: with the HTTP status and a message naming the file and what to send instead.
    """
    if not parts:
        raise UploadError("no file uploaded: send the channel files of one case (multipart field 'files'), or one "
                          "zip of them or of a DICOM study", 400)
    names = [_base_name(filename) for filename, _ in parts]
    if len(parts) == 1 and names[0].lower().endswith(".zip"):
        return _save_zip(names[0], parts[0][1], inputs, plan, limits)
    return _save_images([(name, handle) for name, (_, handle) in zip(names, parts)], inputs, plan, limits)


def _channel_order(names: list[str], num_channels: int) -> list[int]:
    """The channel of each named file: its _NNNN suffix, or the upload order when no name carries one."""
    stems = [name[: -len(_ending(name) or "")] for name in names]
    found = [_CHANNEL.match(stem) for stem in stems]
    if len(names) == 1 or not any(found):
        order = list(range(len(names)))
    elif not all(found):
        raise UploadError(f"cannot tell the channel of {', '.join(n for n, f in zip(names, found) if not f)}: name "
                          "every channel file CASE_0000, CASE_0001, ... (or none, to use the upload order)")
    else:
        order = [int(match.group("channel")) for match in found]
    if sorted(order) != list(range(num_channels)):
        raise UploadError(f"{len(names)} channel file(s) given ({', '.join(names)}), the model expects "
                          f"{num_channels} ({', '.join(map(str, range(num_channels)))}): send one file per channel")
    return order


def _case_name(names: list[str]) -> str:
    stem = names[0][: -len(_ending(names[0]) or "")] or "case"
    match = _CHANNEL.match(stem)
    return _SAFE_NAME.sub("_", match.group("case") if match else stem)[:80]


def _save_images(parts: list[tuple[str, IO[bytes]]], inputs: Path, plan: Plan, limits: UploadLimits) -> SavedUpload:
    names = [name for name, _ in parts]
    endings = [_ending(name) for name in names]
    unknown = [name or "(no name)" for name, ending in zip(names, endings) if ending is None]
    if unknown:
        raise UploadError(f"{', '.join(unknown)}: not an image file this server reads; send "
                          f"{', '.join(IMAGE_ENDINGS)} files, or a .zip of them or of a DICOM study", 415)
    order = _channel_order(names, plan.num_channels)
    stored = [""] * len(parts)
    for (name, handle), ending, channel in zip(parts, endings, order):
        stored[channel] = f"channel_{channel:04d}{ending}"
        target = inputs / stored[channel]
        with open(target, "wb") as out:
            shutil.copyfileobj(handle, out, _COPY_CHUNK)
        _check_header(target, name, limits)
    return SavedUpload(_case_name(names), stored, endings[order.index(0)] or ".nii.gz")


def _check_header(path: Path, name: str, limits: UploadLimits) -> None:
    """Read only the header: an unreadable file is 415, more voxels than the limit 413."""
    shape = header_shape(path)
    if shape is None:
        raise UploadError(f"{name}: not a readable image (its header could not be read); send a NIfTI, MHA or NRRD "
                          "file", 415)
    voxels = 1
    for size in shape:
        voxels *= int(size)
    if voxels > limits.max_voxels or voxels == 0:
        raise UploadError(f"{name}: {' x '.join(map(str, shape))} = {voxels} voxels; this server takes images of 1 to "
                          f"{limits.max_voxels} voxels (--max-voxels)", 413)


def header_shape(path: Path) -> tuple[int, ...] | None:
    """The image size a file's header declares, without reading its voxels; None when it is not an image."""
    try:
        if path.name.endswith((".nii", ".nii.gz")):
            import nibabel

            return tuple(int(s) for s in nibabel.load(str(path)).header.get_data_shape())
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        return tuple(int(s) for s in reader.GetSize())[::-1]
    except Exception:  # any decoder's refusal means the same to the client: not an image  # noqa: BLE001
        return None


def _zip_members(name: str, handle: IO[bytes], limits: UploadLimits) -> tuple[zipfile.ZipFile, list[zipfile.ZipInfo]]:
    """The zip's file members, its directory checked against the limits before anything is extracted."""
    try:
        archive = zipfile.ZipFile(handle)
    except (zipfile.BadZipFile, OSError, ValueError):
        raise UploadError(f"{name}: not a readable zip file; send a .zip of the channel files or of a DICOM study",
                          415) from None
    members = [info for info in archive.infolist() if not info.is_dir()]
    if not members or len(members) > limits.max_zip_members:
        raise UploadError(f"{name}: {len(members)} files in the zip; this server takes 1 to {limits.max_zip_members}",
                          413 if members else 422)
    unzipped = sum(info.file_size for info in members)
    if unzipped > limits.max_unzipped_bytes:
        raise UploadError(f"{name}: {unzipped} bytes uncompressed (its directory says); this server takes at most "
                          f"{limits.max_unzipped_bytes} bytes from a zip", 413)
    return archive, members


def _extract(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, name: str) -> None:
    """Copy one member to `target`, stopping when it inflates past the size its directory declared."""
    written = 0
    with archive.open(info) as source, open(target, "wb") as out:
        while chunk := source.read(_COPY_CHUNK):
            written += len(chunk)
            if written > info.file_size:
                raise UploadError(f"{name}: a member inflates past its declared size; send an ordinary zip", 413)
            out.write(chunk)


def _save_zip(name: str, handle: IO[bytes], inputs: Path, plan: Plan, limits: UploadLimits) -> SavedUpload:
    archive, members = _zip_members(name, handle, limits)
    with archive:
        member_names = [_base_name(info.filename) for info in members]
        if all(_ending(member) for member in member_names):
            extracted = inputs / ".zip"
            extracted.mkdir()
            parts = []
            for index, (info, member) in enumerate(zip(members, member_names)):
                path = extracted / f"{index:05d}{_ending(member)}"
                _extract(archive, info, path, name)
                parts.append((member, path))
            handles = [(member, open(path, "rb")) for member, path in parts]
            try:
                return _save_images(handles, inputs, plan, limits)
            finally:
                for _, opened in handles:
                    opened.close()
                shutil.rmtree(extracted, ignore_errors=True)
        folder = inputs / DICOM_FOLDER
        folder.mkdir()
        for index, info in enumerate(members):  # not images: a DICOM study
            _extract(archive, info, folder / f"{index:05d}.dcm", name)
    _check_dicom_study(folder, name, plan)
    return SavedUpload(_SAFE_NAME.sub("_", name[:-4])[:80] or "study", [DICOM_FOLDER], ".nii.gz")


def _check_dicom_study(folder: Path, name: str, plan: Plan) -> None:
    """One study whose series give the model's channels (headers only; the pixels are read by the job)."""
    try:
        from voxseg.infer.dicom_cases import dicom_input_cases

        cases = dicom_input_cases(folder, plan)
    except ImportError:
        raise UploadError(f"{name}: holds no image files, and reading a DICOM study needs pip install "
                          "'voxseg[dicom]' on the server", 415) from None
    except VoxsegError as exc:
        raise UploadError(f"{name}: not a DICOM study this model can read: {exc}", 422) from None
    if len(cases) != 1:
        raise UploadError(f"{name}: {len(cases)} DICOM studies in the zip; send one study per job", 422)

"""DICOM studies as the cases of `voxseg predict -i FOLDER`: one case per study, channels mapped to series.

    >>> cases = dicom_input_cases(Path("incoming"), plan, parse_channel_rules(["0=T1", "1=FLAIR"]))
    [("P001_20260101", [DicomSeries(T1), DicomSeries(FLAIR)]), ...]

The rules are `voxseg.data.dicom_studies`'s (docs/INFERENCE.md, "DICOM input").
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from voxseg.errors import ConfigError, InputError

if TYPE_CHECKING:
    from voxseg.data.dicom import DicomSeries
    from voxseg.data.io import Geometry
    from voxseg.plans import Plan

DICOM_OUTPUTS = ("dicom-seg", "rtstruct")  # output formats written as DICOM objects, OUT/CASE.dcm

__all__ = ["DICOM_OUTPUTS", "check_dicom_output_input", "dicom_input_cases", "is_dicom_case", "looks_like_dicom_input",
           "read_dicom_case", "write_dicom_output"]


def looks_like_dicom_input(paths: Sequence[str | Path]) -> bool:
    """One folder given, holding DICOM files (NIfTI / MHA / NRRD files are not opened to find out)."""
    from voxseg.data.dicom import is_dicom_folder

    items = [Path(p) for p in paths]
    return len(items) == 1 and items[0].is_dir() and is_dicom_folder(items[0])


def dicom_input_cases(folder: str | Path, plan: Plan, rules: dict[int, str] | None = None
                      ) -> list[tuple[str, list[DicomSeries]]]:
    """The cases of a DICOM folder: (name, [series per channel]), one per study (see the module docstring).

    Raises:
        ConfigError: channel rules that do not cover the model's channels.
        InputError: a study whose channels cannot be matched (listing its series).
    """
    from voxseg.data.dicom import scan_dicom
    from voxseg.data.dicom_studies import case_names, studies, study_channels

    rules = dict(rules or {})
    if rules and sorted(rules) != list(range(plan.num_channels)):
        expected = ", ".join(f"{k}={v}" for k, v in plan.channel_names.items())
        raise ConfigError(f"--channel gives channel(s) {sorted(rules)}; the model has {plan.num_channels} "
                          f"channel(s) 0..{plan.num_channels - 1} ({expected}): give one --channel INDEX=PATTERN each")
    ordered = studies(scan_dicom(folder))
    return [(name, study_channels(study, rules, plan.channel_names, name))
            for name, study in zip(case_names(ordered), ordered)]


def is_dicom_case(files: Sequence[Any]) -> bool:
    from voxseg.data.dicom import DicomSeries

    return bool(files) and all(isinstance(f, DicomSeries) for f in files)


def check_dicom_output_input(cases: Sequence[tuple[str, Sequence[Any]]], output_format: str) -> None:
    """InputError unless every case is read from DICOM series (a DICOM output references its source series)."""
    other = [name for name, files in cases if not is_dicom_case(files)]
    if other:
        raise InputError(f"--output-format {output_format} needs DICOM input (it references its source series); "
                         f"case(s) {', '.join(other[:5])} are read from image files: predict a DICOM folder, or write "
                         "--output-format nifti")


def write_dicom_output(output_format: str, path: Path, labels: np.ndarray, geometry: Geometry,
                       series: DicomSeries, plan: Plan) -> Path:
    """Write a case's label map as `output_format` (one of DICOM_OUTPUTS) on the grid of `series`, its channel 0."""
    if output_format == "rtstruct":
        from voxseg.infer.rtstruct import write_rtstruct

        return write_rtstruct(path, labels, geometry, series, plan)
    from voxseg.infer.dicom_seg import write_dicom_seg

    return write_dicom_seg(path, labels, geometry, series, plan)


def read_dicom_case(name: str, channels: Sequence[DicomSeries]) -> tuple[np.ndarray, Geometry]:
    """(C, D, H, W) float32 of a case's series, which must lie on one voxel grid (channel 0's)."""
    from voxseg.data.dicom_volume import read_series
    from voxseg.data.io import geometry_differences

    arrays, geometry = [], None
    for series in channels:
        array, series_geometry = read_series(series)
        if arrays:
            differences = geometry_differences(array.shape, series_geometry, arrays[0].shape, geometry)
            if differences:
                raise InputError(f"case '{name}': {series.label}: {'; '.join(differences)} (channel 0 "
                                 f"{channels[0].label} is the reference); the channels of a case must lie on one "
                                 "voxel grid: register and resample the series first")
        else:
            geometry = series_geometry
        arrays.append(array)
    return np.stack(arrays), geometry

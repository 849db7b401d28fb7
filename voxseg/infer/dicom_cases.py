"""DICOM studies as the cases of `voxseg predict -i FOLDER`: one case per study, channels mapped to series.

    >>> cases = dicom_input_cases(Path("incoming"), plan, parse_channel_rules(["0=T1", "1=FLAIR"]))
    [("P001_20260101", [DicomSeries(T1), DicomSeries(FLAIR)]), ...]

Rules (docs/INFERENCE.md, "DICOM input"):

- Every study (StudyInstanceUID) under the folder is one case. Its name is PatientID_StudyDate (characters
  other than letters, digits, '.', '-' and '_' become '_'); two studies that would share a name both get the
  last 8 digits of their StudyInstanceUID appended; a study without PatientID and StudyDate is named
  study_<last 8 digits of its StudyInstanceUID>.
- Channel rules `INDEX=PATTERN` (`--channel 0=T1 --channel 1=FLAIR`, or a JSON file `{"0": "T1", "1": "FLAIR"}`)
  pick each channel's series: PATTERN is matched against SeriesDescription, case-insensitively, with shell
  wildcards (`*`, `?`); a PATTERN equal to a SeriesInstanceUID picks that series.
- Without rules: a one-channel model takes a study's only image series; a model with several channels matches
  its channel names (dataset.json channel_names) as the patterns.
- A study where a channel matches no series, or several, is refused before anything is predicted; the error
  lists the study's series.
"""
from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from voxseg.errors import ConfigError, InputError

if TYPE_CHECKING:
    from voxseg.data.dicom import DicomSeries
    from voxseg.data.io import Geometry
    from voxseg.plans import Plan

__all__ = ["check_dicom_seg_input", "dicom_input_cases", "is_dicom_case", "looks_like_dicom_input",
           "parse_channel_rules", "read_dicom_case"]


def looks_like_dicom_input(paths: Sequence[str | Path]) -> bool:
    """One folder given, holding DICOM files (NIfTI / MHA / NRRD files are not opened to find out)."""
    from voxseg.data.dicom import is_dicom_folder

    items = [Path(p) for p in paths]
    return len(items) == 1 and items[0].is_dir() and is_dicom_folder(items[0])


def parse_channel_rules(items: Sequence[str] | None = None, map_file: str | Path | None = None) -> dict[int, str]:
    """{channel index: pattern} from `--channel INDEX=PATTERN` items or a JSON mapping file (not both)."""
    if items and map_file:
        raise ConfigError("give the channel mapping once: --channel INDEX=PATTERN flags or --channel-map FILE")
    if map_file:
        from voxseg.jsonio import read_json

        data = read_json(Path(map_file))
        if not isinstance(data, dict):
            raise ConfigError(f"--channel-map {map_file}: expected a JSON object such as "
                              '{"0": "T1", "1": "FLAIR"} (channel index: SeriesDescription)')
        items = [f"{key}={value}" for key, value in data.items()]
        where = f"--channel-map {map_file}"
    else:
        where = "--channel"
    rules: dict[int, str] = {}
    for item in items or ():
        index, sep, pattern = str(item).partition("=")
        if not sep or not index.strip().isdigit() or not pattern.strip():
            raise ConfigError(f"{where} '{item}': give INDEX=SERIES_DESCRIPTION, e.g. 0=T1 (wildcards * and ? "
                              "allowed)")
        if int(index) in rules:
            raise ConfigError(f"{where}: channel {int(index)} is given twice ('{rules[int(index)]}', '{pattern}')")
        rules[int(index)] = pattern.strip()
    return rules


def _describe(series: DicomSeries) -> str:
    return f"'{series.description}' ({series.modality}, {len(series.frames)} images, {series.uid})"


def _matches(series: DicomSeries, pattern: str) -> bool:
    return series.uid == pattern or fnmatch.fnmatchcase(series.description.strip().lower(), pattern.lower())


def _study_channels(study: list[DicomSeries], rules: dict[int, str], plan: Plan, name: str) -> list[DicomSeries]:
    """The study's series in channel order, or InputError listing its series."""
    found = "; ".join(_describe(s) for s in study)
    where = f"DICOM study {study[0].study_uid} (case '{name}', patient {study[0].patient_id or '?'}, in " \
            f"{study[0].folder.parent if len(study) > 1 else study[0].folder})"
    if not rules and plan.num_channels == 1:
        if len(study) != 1:
            raise InputError(f"{where}: {len(study)} image series and the model takes one channel; choose one with "
                             f"--channel 0=SERIES_DESCRIPTION. Series found: {found}")
        return list(study)
    how = "--channel INDEX=PATTERN" if rules else "the model's channel names (give --channel INDEX=PATTERN)"
    patterns = rules or {int(k): str(v) for k, v in plan.channel_names.items()}
    chosen = []
    for index in range(plan.num_channels):
        matching = [s for s in study if _matches(s, patterns[index])]
        if len(matching) != 1:
            what = "no series matches" if not matching else f"{len(matching)} series match"
            raise InputError(f"{where}: {what} channel {index} '{patterns[index]}' (matched on SeriesDescription, "
                             f"case-insensitive, by {how}); series found: {found}")
        chosen.append(matching[0])
    return chosen


def _case_names(studies: list[list[DicomSeries]]) -> list[str]:
    def base(series: DicomSeries) -> str:
        text = "_".join(part for part in (series.patient_id, series.study_date) if part)
        return re.sub(r"[^A-Za-z0-9._-]", "_", text) or f"study_{series.study_uid.replace('.', '')[-8:]}"

    names = [base(study[0]) for study in studies]
    return [name if names.count(name) == 1 else f"{name}_{study[0].study_uid.replace('.', '')[-8:]}"
            for name, study in zip(names, studies)]


def dicom_input_cases(folder: str | Path, plan: Plan, rules: dict[int, str] | None = None
                      ) -> list[tuple[str, list[DicomSeries]]]:
    """The cases of a DICOM folder: (name, [series per channel]), one per study (see the module docstring).

    Raises:
        ConfigError: channel rules that do not cover the model's channels.
        InputError: a study whose channels cannot be matched (listing its series).
    """
    from voxseg.data.dicom import scan_dicom

    rules = dict(rules or {})
    if rules and sorted(rules) != list(range(plan.num_channels)):
        expected = ", ".join(f"{k}={v}" for k, v in plan.channel_names.items())
        raise ConfigError(f"--channel gives channel(s) {sorted(rules)}; the model has {plan.num_channels} "
                          f"channel(s) 0..{plan.num_channels - 1} ({expected}): give one --channel INDEX=PATTERN each")
    scan = scan_dicom(folder)
    studies: dict[str, list[DicomSeries]] = {}
    for series in scan.series:
        studies.setdefault(series.study_uid, []).append(series)
    ordered = sorted(studies.values(), key=lambda study: (study[0].patient_id, study[0].study_date, study[0].study_uid))
    names = _case_names(ordered)
    return [(name, _study_channels(study, rules, plan, name)) for name, study in zip(names, ordered)]


def is_dicom_case(files: Sequence[Any]) -> bool:
    from voxseg.data.dicom import DicomSeries

    return bool(files) and all(isinstance(f, DicomSeries) for f in files)


def check_dicom_seg_input(cases: Sequence[tuple[str, Sequence[Any]]]) -> None:
    """InputError unless every case is read from DICOM series (a DICOM-SEG references its source series)."""
    other = [name for name, files in cases if not is_dicom_case(files)]
    if other:
        raise InputError(f"--output-format dicom-seg needs DICOM input (a DICOM-SEG references its source series); "
                         f"case(s) {', '.join(other[:5])} are read from image files: predict a DICOM folder, or write "
                         "--output-format nifti")


def read_dicom_case(name: str, channels: Sequence[DicomSeries]) -> tuple[np.ndarray, Geometry]:
    """(C, D, H, W) float32 of a case's series, which must lie on one voxel grid (channel 0's)."""
    from voxseg.data.dicom import read_series
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

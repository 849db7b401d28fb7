"""DICOM studies as cases: grouping series by study, naming the cases, and mapping channels to series.

Shared by `voxseg predict -i DICOM_FOLDER` (`voxseg.infer.dicom_cases`) and `voxseg convert dicom`
(`voxseg.data.dicom_convert`). The rules (docs/INFERENCE.md, "DICOM input"):

- Every study (StudyInstanceUID) is one case. Its name is PatientID_StudyDate (characters other than letters,
  digits, '.', '-' and '_' become '_'); two studies that would share a name both get the last 8 digits of their
  StudyInstanceUID appended; a study without PatientID and StudyDate is named study_<last 8 digits>.
- Channel rules `INDEX=PATTERN` (`--channel 0=T1 --channel 1=FLAIR`, or a JSON file `{"0": "T1", "1": "FLAIR"}`)
  pick each channel's series: PATTERN is matched against SeriesDescription, case-insensitively, with shell
  wildcards (`*`, `?`); a PATTERN equal to a SeriesInstanceUID picks that series.
- Without rules: a one-channel model takes a study's only image series, or, among several, the only one that
  looks like a volume (two images or more in one orientation: one-image scouts and localizers of several planes
  are passed over); a model with several channels matches its channel names (dataset.json channel_names) as
  the patterns.
- A study where a channel matches no series, or several, is refused; the error lists the study's series.
"""
from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from voxseg.data.dicom import DicomScan, DicomSeries
from voxseg.errors import ConfigError, InputError, VoxsegError

__all__ = ["case_names", "describe_series", "parse_channel_rules", "study_channels", "studies"]


def studies(scan: DicomScan) -> list[list[DicomSeries]]:
    """The scan's image series grouped by StudyInstanceUID, ordered by PatientID, StudyDate and UID."""
    by_study: dict[str, list[DicomSeries]] = {}
    for series in scan.series:
        by_study.setdefault(series.study_uid, []).append(series)
    return sorted(by_study.values(), key=lambda study: (study[0].patient_id, study[0].study_date, study[0].study_uid))


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


def describe_series(series: DicomSeries) -> str:
    return f"'{series.description}' ({series.modality}, {len(series.frames)} images, {series.uid})"


def _matches(series: DicomSeries, pattern: str) -> bool:
    return series.uid == pattern or fnmatch.fnmatchcase(series.description.strip().lower(), pattern.lower())


def _is_volume_like(series: DicomSeries) -> bool:
    """Two images or more, all in one orientation: not a one-image scout or a localizer of several planes."""
    first = series.frames[0].orientation if series.frames else None
    return len(series.frames) >= 2 and all(np.allclose(f.orientation, first, atol=1e-3) for f in series.frames)


def study_channels(study: list[DicomSeries], rules: dict[int, str], channel_names: dict[str, str], name: str,
                   error: type[VoxsegError] = InputError) -> list[DicomSeries]:
    """The study's series in channel order (`channel_names`: the model's, index -> name), or `error` listing its
    series."""
    found = "; ".join(describe_series(s) for s in study)
    folder = os.path.commonpath([str(s.folder) for s in study])
    where = f"DICOM study {study[0].study_uid} (case '{name}', patient {study[0].patient_id or '?'}, in {folder})"
    if not rules and len(channel_names) == 1:
        volumes = study if len(study) == 1 else [s for s in study if _is_volume_like(s)]
        if len(volumes) != 1:
            raise error(f"{where}: {len(volumes)} of its {len(study)} image series look like volumes and the model "
                        f"takes one channel; choose one with --channel 0=SERIES_DESCRIPTION. Series found: {found}")
        return list(volumes)
    how = "--channel INDEX=PATTERN" if rules else "the model's channel names (give --channel INDEX=PATTERN)"
    patterns = rules or {int(k): str(v) for k, v in channel_names.items()}
    chosen = []
    for index in range(len(channel_names)):
        matching = [s for s in study if _matches(s, patterns[index])]
        if len(matching) != 1:
            what = "no series matches" if not matching else f"{len(matching)} series match"
            raise error(f"{where}: {what} channel {index} '{patterns[index]}' (matched on SeriesDescription, "
                        f"case-insensitive, by {how}); series found: {found}")
        chosen.append(matching[0])
    return chosen


def case_names(studies: list[list[DicomSeries]]) -> list[str]:
    def base(series: DicomSeries) -> str:
        text = "_".join(part for part in (series.patient_id, series.study_date) if part)
        return re.sub(r"[^A-Za-z0-9._-]", "_", text) or f"study_{series.study_uid.replace('.', '')[-8:]}"

    names = [base(study[0]) for study in studies]
    return [name if names.count(name) == 1 else f"{name}_{study[0].study_uid.replace('.', '')[-8:]}"
            for name, study in zip(names, studies)]

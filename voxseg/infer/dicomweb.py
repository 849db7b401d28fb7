"""A study on a DICOMweb server (a PACS such as Orthanc, dcm4chee or a cloud DICOM store) as predict's input, and
the DICOM-SEG results stored back to it.

    voxseg predict -m MODEL -i dicomweb://pacs:8042/dicom-web/studies/1.2.3 -o OUT --output-format dicom-seg

`dicomweb://HOST[:PORT]/PATH/studies/STUDY_UID` is http://HOST:PORT/PATH, the DICOMweb service root, and the
study (`dicomwebs://` for https). The study is retrieved with WADO-RS into a temporary folder, predicted like a
DICOM folder (`voxseg.infer.dicom_cases`), and with `--output-format dicom-seg` each written Segmentation is
stored back to the same service with STOW-RS; OUT keeps a copy. The HTTP work is dicomweb-client's.
"""
from __future__ import annotations

import contextlib
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from voxseg.errors import ConfigError, InputError

__all__ = ["DicomWebStudy", "parse_dicomweb", "pulled_input", "store_instances"]

RETRY_ATTEMPTS = 3
_URL = re.compile(r"^(?P<scheme>dicomwebs?)://(?P<host>[^/]+)(?P<root>/.*?)?/studies/(?P<study>[0-9.]+)/?$")


@dataclass(frozen=True)
class DicomWebStudy:
    """A study on a DICOMweb service: the service root URL (http/https) and the StudyInstanceUID."""

    root: str
    study_uid: str

    @property
    def label(self) -> str:
        return f"study {self.study_uid} on the DICOMweb service {self.root}"


def parse_dicomweb(text: str) -> DicomWebStudy | None:
    """The study a `dicomweb://` input names; None for other input; ConfigError for a malformed URL."""
    if not str(text).startswith(("dicomweb://", "dicomwebs://")):
        return None
    match = _URL.match(str(text))
    if match is None:
        raise ConfigError(f"-i {text}: give dicomweb://HOST:PORT/SERVICE_ROOT/studies/STUDY_UID, e.g. "
                          "dicomweb://127.0.0.1:8042/dicom-web/studies/1.2.840.113619.2.1 (dicomwebs:// for https)")
    scheme = "https" if match.group("scheme") == "dicomwebs" else "http"
    return DicomWebStudy(f"{scheme}://{match.group('host')}{match.group('root') or ''}", match.group("study"))


def _client(root: str) -> Any:
    try:
        from dicomweb_client.api import DICOMwebClient
    except ImportError:
        raise ConfigError("DICOMweb input needs the dicomweb-client package: pip install 'voxseg[dicom]'") from None
    client = DICOMwebClient(url=root)
    # a busy server (429, 503, ...) or a refused connection is tried 3 times within about a second, not for 30 s
    client.set_http_retry_params(max_attempts=RETRY_ATTEMPTS, wait_exponential_multiplier=250)
    return client


def _failure(study: DicomWebStudy, action: str, exc: Exception) -> InputError:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status == 404:
        return InputError(f"{study.label}: not found (HTTP 404) while {action}; check the StudyInstanceUID and the "
                          "service root (e.g. /dicom-web for Orthanc)")
    return InputError(f"{study.label}: {action} failed ({type(exc).__name__}: {exc}); check that the server runs "
                      "and is reachable, and its DICOMweb plugin is enabled")


def download_study(study: DicomWebStudy, folder: Path) -> int:
    """Retrieve every instance of the study (WADO-RS) into `folder`; returns how many."""
    client = _client(study.root)
    count = 0
    try:
        for dataset in client.iter_study(study.study_uid):  # one instance in memory at a time
            dataset.save_as(str(folder / f"{count:06d}.dcm"), enforce_file_format=True)
            count += 1
    except Exception as exc:  # noqa: BLE001 - any HTTP or connection failure is the user's server or URL
        raise _failure(study, "retrieving it", exc) from None
    if not count:
        raise InputError(f"{study.label}: the study has no instances")
    return count


def store_instances(study: DicomWebStudy, paths: Sequence[Path]) -> int:
    """Store DICOM files (the written Segmentations) to the study's service (STOW-RS); returns how many."""
    import pydicom

    client = _client(study.root)
    datasets = [pydicom.dcmread(str(path)) for path in paths]
    if not datasets:
        return 0
    try:
        client.store_instances(datasets, study_instance_uid=study.study_uid)
    except Exception as exc:  # noqa: BLE001
        raise _failure(study, "storing the DICOM-SEG back", exc) from None
    return len(datasets)


@contextlib.contextmanager
def pulled_input(inputs: Sequence[str]) -> Iterator[tuple[list[str], DicomWebStudy | None]]:
    """The inputs as local paths: a `dicomweb://` study retrieved into a temporary folder (removed afterwards)
    with the study it came from; other inputs as they are, with None."""
    studies = [parse_dicomweb(text) for text in inputs]
    study = studies[0] if len(studies) == 1 else None
    if any(studies) and study is None:
        raise ConfigError("-i: give one dicomweb:// study, or local files and folders")
    if study is None:
        yield list(inputs), None
        return
    with tempfile.TemporaryDirectory(prefix="voxseg-dicomweb-") as folder:
        count = download_study(study, Path(folder))
        print(f"retrieved {count} instance(s) of {study.label}")
        yield [folder], study

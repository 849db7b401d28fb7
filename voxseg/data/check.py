"""Check a raw dataset before planning: every problem at once, each with what is wrong and what to do.

Every image and label file is read exactly once. Per case: all channel files and the label present and
readable, shapes, spacings, directions and origins agree, label values are declared in dataset.json, images
hold no NaN/Inf. Per dataset: dataset.json parses, labels are consecutive 0..N, regions have a class order,
numTraining matches, no stray files that the layout silently ignores.
"""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from voxseg.data.dataset import RawCase, RawDataset, load_dataset
from voxseg.data.io import Geometry, geometry_differences, read_image, zero_spacing_axes
from voxseg.errors import DatasetError, ImageReadError


@dataclass
class Problem:
    """One thing wrong with a dataset.

    Attributes:
        case: case name, or None for dataset-wide problems.
        file: the file at fault (relative to the dataset root where possible), or None.
        message: what is wrong and what to do about it.
        severity: "error" (planning cannot go on) or "warning" (worth fixing, not blocking).
    """

    case: str | None
    file: str | None
    message: str
    severity: str = "error"

    def format(self) -> str:
        where = " ".join(part for part in (self.case, f"{self.file}:" if self.file else None) if part)
        return f"{self.severity.upper():7s} {where + ' ' if where else ''}{self.message}"


@dataclass
class CheckReport:
    """All problems found in one dataset."""

    root: Path
    problems: list[Problem] = field(default_factory=list)
    num_cases: int = 0
    num_test_cases: int = 0

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity != "error"]

    @property
    def ok(self) -> bool:
        """True when nothing blocks planning (warnings allowed)."""
        return not self.errors

    def format(self) -> str:
        """One line per problem, then a summary line."""
        lines = [p.format() for p in self.problems]
        checked = f"{self.num_cases} training and {self.num_test_cases} test case(s) in {self.root}"
        if not self.problems:
            lines.append(f"OK: {checked}, no problems found")
        else:
            verdict = "OK with warnings" if self.ok else "FAILED"
            lines.append(f"{verdict}: {len(self.errors)} error(s), {len(self.warnings)} warning(s) in {checked}")
        return "\n".join(lines)


# ----- per case ----------------------------------------------------------------------------------------------

@dataclass
class _CaseJob:
    case: RawCase
    root: Path
    allowed_labels: set[int] | None  # None: dataset.json labels are invalid, values not checked
    is_test: bool
    ignore_label: int | None = None
    label_values: list[int] | None = None  # set by the check: the label file's values, None when unread


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def label_values(array: np.ndarray) -> tuple[list[int], str | None]:
    """Distinct integer values of a label array, or an explanation when it is not an integer label map."""
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            return [], "contains NaN or Inf; a label map holds integer label values only"
        if not np.array_equal(array, np.rint(array)):
            return [], ("contains non-integer values; a label map holds integer label values only "
                        "(save it as an integer type)")
        array = array.astype(np.int64)
    elif array.dtype.kind not in "iub":
        return [], f"has data type {array.dtype}; a label map holds integer label values only"
    flat = array.ravel()
    low = int(flat.min()) if flat.size else 0
    if low >= 0 and int(flat.max()) < 1 << 16:
        # O(N) counting instead of np.unique's sort: labels are small non-negative integers
        return np.flatnonzero(np.bincount(flat.astype(np.intp, copy=False))).tolist(), None
    return np.unique(flat).astype(np.int64).tolist(), None


def _compare_geometry(job: _CaseJob, name: str, shape: tuple, geo: Geometry, ref_name: str, ref_shape: tuple,
                      ref_geo: Geometry) -> list[Problem]:
    fix = "all files of a case must lie on the same voxel grid; resample or re-export them"
    return [Problem(job.case.name, name, f"{difference} ({ref_name} is the reference); {fix}")
            for difference in geometry_differences(shape, geo, ref_shape, ref_geo)]


def _grid_key(shape: tuple, geo: Geometry) -> tuple:
    return shape, tuple(np.round(geo.affine[:3], 2).ravel().tolist())


def _check_case(job: _CaseJob) -> list[Problem]:
    """All checks of one case; reads each of its files once."""
    problems: list[Problem] = []
    case, root = job.case.name, job.root
    grids: list[tuple[str, tuple, Geometry]] = []
    files = [(path, False) for path in job.case.image_files]
    if job.case.label_file is not None:
        files.append((job.case.label_file, True))
    elif not job.is_test:
        problems.append(Problem(case, None, "has no label file; add labelsTr/<case> or remove the case"))
    for path, is_label in files:
        name = _relative(path, root)
        if not path.is_file():
            what = "label file" if is_label else "channel file"
            todo = "add it or remove the case's other files" if not job.is_test else "add it or remove the test case"
            problems.append(Problem(case, name, f"{what} is missing; {todo}"))
            continue
        try:
            array, geo = read_image(path)
        except ImageReadError as exc:
            problems.append(Problem(case, name, f"unreadable: {exc}"))
            continue
        spacing_problems = _check_spacing(case, name, geo)
        problems += spacing_problems
        if not any(p.severity == "error" for p in spacing_problems):
            grids.append((name, array.shape, geo))
        if is_label:
            problems += _check_label_values(job, name, array)
        elif array.dtype.kind == "f":
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            if bad:
                message = f"contains {bad} NaN/Inf voxel(s); replace them (e.g. by 0) before training"
                problems.append(Problem(case, name, message))
    if grids:
        # the grid most files share is the reference, so one odd file gives one problem, not one per other file
        keys = [_grid_key(shape, geo) for _, shape, geo in grids]
        reference = grids[max(range(len(keys)), key=lambda i: (keys.count(keys[i]), -i))]
        for name, shape, geo in grids:
            if name != reference[0]:
                problems += _compare_geometry(job, name, shape, geo, *reference)
    return problems


SPACING_WARN_ABOVE_MM = 100.0
SPACING_WARN_BELOW_MM = 1e-3


def _check_spacing(case: str, name: str, geo: Geometry) -> list[Problem]:
    """A zero voxel size is an error; one above 100 mm or below 1 micrometre is most likely a unit mistake."""
    zero = zero_spacing_axes(geo)
    if zero:
        return [Problem(case, name, f"spacing is zero along array axis {zero} (spacing {geo.spacing}); "
                        "fix the file header: every voxel size must be positive")]
    odd = [round(s, 6) for s in geo.spacing if s > SPACING_WARN_ABOVE_MM or s < SPACING_WARN_BELOW_MM]
    if odd:
        return [Problem(case, name, f"spacing {tuple(round(s, 6) for s in geo.spacing)} mm has voxel size(s) {odd} "
                        f"outside {SPACING_WARN_BELOW_MM}..{SPACING_WARN_ABOVE_MM} mm; check the header's units "
                        "(metres or micrometres instead of millimetres?)", "warning")]
    return []


def _check_label_values(job: _CaseJob, name: str, array: np.ndarray) -> list[Problem]:
    values, error = label_values(array)
    if error:
        return [Problem(job.case.name, name, error)]
    job.label_values = values
    if job.allowed_labels is None:
        return []
    unexpected = sorted(set(values) - job.allowed_labels)
    if unexpected:
        return [Problem(job.case.name, name,
                        f"unexpected label value(s) {unexpected}; dataset.json declares {sorted(job.allowed_labels)}. "
                        "Fix the label file or add the value(s) to 'labels' in dataset.json")]
    return []


# ----- dataset-wide ------------------------------------------------------------------------------------------

def _allowed_labels(dataset: RawDataset) -> set[int] | None:
    try:
        return dataset.label_scheme.allowed_values
    except (TypeError, ValueError, AttributeError):
        return None


MAX_TRAINING_LABEL = 127
"""The largest label value training takes: the case store keeps label maps as int8 (voxseg.data.store)."""


def _check_labels_meta(dataset: RawDataset, meta_file: str) -> list[Problem]:
    allowed = _allowed_labels(dataset)
    if allowed is None:
        return [Problem(None, meta_file, f"labels {dataset.labels} must map names to integers or lists of integers, "
                        "e.g. {\"background\": 0, \"tumour\": 1}")]
    problems = []
    values = sorted(allowed)
    if values != list(range(len(values))):
        problems.append(Problem(None, meta_file, f"label values {values} are not consecutive integers 0..N; "
                                "renumber the labels (and the label files) so no value is skipped"))
    elif values and values[-1] > MAX_TRAINING_LABEL:
        problems.append(Problem(None, meta_file, f"{len(values)} label values (0..{values[-1]}): voxseg trains with "
                                f"label values up to {MAX_TRAINING_LABEL} (its case store keeps label maps as int8), "
                                "so this dataset cannot be trained; predicting with a model of more labels works"))
    scheme = dataset.label_scheme
    # as in nnU-Net, once one label is a list every class is a region (a plain number is a one-value region)
    regions = scheme.class_names if scheme.is_region_based else []
    order = dataset.meta.get("regions_class_order")
    if regions and (not isinstance(order, list) or len(order) != len(regions)):
        problems.append(Problem(None, meta_file, f"{len(regions)} region label(s) {regions} need 'regions_class_order' "
                                "with one label value per region (e.g. [1, 2, 3] for BraTS)"))
    return problems


def _check_meta(dataset: RawDataset) -> list[Problem]:
    meta_file = "dataset.json"
    problems = _check_labels_meta(dataset, meta_file)
    names = dataset.meta["channel_names"]
    keys = sorted(str(k) for k in names) if isinstance(names, dict) else None
    if keys != [str(i) for i in range(len(names))]:
        problems.append(Problem(None, meta_file, f"channel_names {names} must map \"0\", \"1\", ... (channel order) "
                                "to channel names, e.g. {\"0\": \"T1\", \"1\": \"FLAIR\"}"))
    declared = dataset.meta.get("numTraining")
    if declared is not None and str(declared) != str(len(dataset.cases)):
        problems.append(Problem(None, meta_file, f"numTraining is {declared} but {len(dataset.cases)} training case(s) "
                                "were found; update numTraining (the cases on disk are used)", "warning"))
    if not dataset.cases:
        ending = dataset.file_ending
        problems.append(Problem(None, "imagesTr", f"no training cases found: expected imagesTr/CASE_0000{ending} ... "
                                f"and labelsTr/CASE{ending} (file_ending in dataset.json is '{ending}')"))
    return problems


def _check_stray_files(dataset: RawDataset) -> list[Problem]:
    """Files the layout ignores: wrong names, wrong endings, channel indices beyond channel_names."""
    problems = []
    ending, root = dataset.file_ending, dataset.root
    pattern = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})" + re.escape(ending) + "$")
    for folder in ("imagesTr", "imagesTs"):
        directory = root / folder
        if not directory.is_dir():
            continue
        for path in sorted(directory.iterdir()):
            if path.name.startswith("."):
                continue
            match = pattern.match(path.name)
            if match is None:
                problems.append(Problem(None, _relative(path, root), f"ignored: not named CASE_XXXX{ending} "
                                        "(XXXX = 4-digit channel index); rename or remove it", "warning"))
            elif int(match.group("channel")) >= dataset.num_channels:
                problems.append(Problem(match.group("case"), _relative(path, root),
                                        f"channel {int(match.group('channel'))} but dataset.json declares "
                                        f"{dataset.num_channels} channel(s); add it to channel_names or remove the "
                                        "file"))
    return problems


def _check_some_foreground(jobs: list[_CaseJob]) -> list[Problem]:
    """Training labels that are all background teach nothing: an error (a wrong labelsTr, or an export bug)."""
    read = [job for job in jobs if job.label_values is not None]
    if not read or len(read) < len(jobs):
        return []  # nothing read, or unreadable labels: those are reported already
    background = {0, jobs[0].ignore_label}
    if any(set(job.label_values or []) - background for job in read):
        return []
    return [Problem(None, "labelsTr", f"all {len(read)} training label map(s) hold background (0) only: there is "
                    "nothing to learn; check that labelsTr holds the right files (and their label values)")]


def check_dataset(root: str | Path, num_workers: int = 1) -> CheckReport:
    """Check a raw nnU-Net v2 dataset; returns every problem found (never raises for bad data).

    Args:
        root: dataset folder holding dataset.json, imagesTr/, labelsTr/ (and optionally imagesTs/, labelsTs/).
        num_workers: cases checked in parallel threads (file decompression and numpy release the GIL, and
            threads avoid forking a process that may hold CUDA state).
    """
    root = Path(root)
    report = CheckReport(root=root)
    try:
        dataset = load_dataset(root)
    except DatasetError as exc:
        report.problems.append(Problem(None, "dataset.json", str(exc)))
        return report
    report.root = dataset.root
    report.num_cases, report.num_test_cases = len(dataset.cases), len(dataset.test_cases)
    report.problems += _check_meta(dataset)
    report.problems += _check_stray_files(dataset)

    allowed = _allowed_labels(dataset)
    ignore = dataset.label_scheme.ignore_label if allowed is not None else None
    jobs = [_CaseJob(case, dataset.root, allowed, False, ignore) for case in dataset.cases]
    for case in dataset.test_cases:
        # test references in labelsTs/ are checked when present; they are optional
        label = dataset.root / "labelsTs" / f"{case.name}{dataset.file_ending}"
        test_case = RawCase(case.name, case.image_files, label if label.is_file() else None)
        jobs.append(_CaseJob(test_case, dataset.root, allowed, True))
    if num_workers > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(max_workers=num_workers) as pool:
            results = list(pool.map(_check_case, jobs))
    else:
        results = [_check_case(job) for job in jobs]
    for problems in results:  # in case order, whatever order the workers finished in
        report.problems += problems
    report.problems += _check_some_foreground([job for job in jobs if not job.is_test])
    return report

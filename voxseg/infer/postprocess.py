"""From network output to the final label map: regions -> labels, and largest-component postprocessing.

Region-based models (BraTS) output one sigmoid per region; `regions_to_labels` writes label values back in
`regions_class_order`.

Largest connected component: a trained network sometimes predicts small blobs far from the structure (a second
"tumour" in noise). Keeping only the largest connected component of a class removes them, but hurts where a
class is legitimately split
(metastases, left and right kidney), so it is only switched on where it improved the mean Dice of the
cross-validation predictions (`decide_postprocessing`), and the decision is saved as postprocessing.json:

    {"largest_component": [[1, 2, 3], [2]], ...statistics...}

Each entry is a class (a list of label values: one value for a label, several for a region). Applying an
entry keeps the largest face-connected component of the voxels whose label is in that list and sets the
other voxels of that list to background (0). Entries are applied in order.

Where a model's decision lives (`model_postprocessing`): WORKDIR/postprocessing.json in a voxseg work directory
or installed archive; voxseg_postprocessing.json in an nnU-Net v2 model folder written by `voxseg export
--format nnunet`, which `voxseg import nnunet` and `voxseg predict -m` read back (checked like any untrusted
input: only label values of the model).
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from scipy import ndimage

from voxseg.data.io import SUPPORTED_ENDINGS, read_image
from voxseg.data.restore import DEFAULT_RESTORE_VALUES, crop_box, paste_rows, restore_in_slabs
from voxseg.errors import ConfigError, InputError
from voxseg.jsonio import read_json, write_json_atomic
from voxseg.plans import Plan
from voxseg.workdir import WorkDir

EXPORTED_POSTPROCESSING_FILE = "voxseg_postprocessing.json"  # in an nnU-Net model folder voxseg exported
# a candidate must raise the mean Dice by more than this, so float noise never switches postprocessing on
_MIN_IMPROVEMENT = 1e-6


# ----- network output -> labels ----------------------------------------------------------------------------
def label_dtype(plan: Plan) -> torch.dtype:
    """uint8 while every label value fits (<= 255), else int32 on the device (written as uint16)."""
    return torch.uint8 if max(plan.label_scheme.class_order or [0]) <= 255 else torch.int32


def label_numpy_dtype(plan: Plan) -> np.dtype:
    """The label map's dtype on the host and in the written file: uint8, or uint16 for label values above 255."""
    return np.dtype(np.uint8) if label_dtype(plan) == torch.uint8 else np.dtype(np.uint16)


def regions_to_labels(probabilities: torch.Tensor, regions_class_order: Sequence[int],
                      threshold: float = 0.5) -> torch.Tensor:
    """(R, *S) region probabilities -> (*S) labels (uint8, or int32 with a value above 255): start at 0; region
    r writes its value where p > 0.5."""
    dtype = torch.uint8 if max(regions_class_order or [0]) <= 255 else torch.int32
    labels = torch.zeros(probabilities.shape[1:], dtype=dtype, device=probabilities.device)
    for region, value in enumerate(regions_class_order):
        labels[probabilities[region] > threshold] = int(value)
    return labels


def logits_to_labels(logits: torch.Tensor, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, *S) logits -> ((*S) label values, (K, *S) probabilities).

    Softmax plans: channel i + 1 predicts the label value of the i-th foreground class (labels need not be
    listed in value order). Region plans: sigmoid per region, then regions -> labels in regions_class_order.
    """
    probabilities = activate(logits, plan)
    return probabilities_to_labels(probabilities, plan), probabilities


def activate(logits: torch.Tensor, plan: Plan) -> torch.Tensor:
    """(K, *S) logits -> probabilities: a sigmoid per region, or a softmax over background + labels."""
    return torch.sigmoid(logits) if plan.is_region_based else torch.softmax(logits, dim=0)


def probabilities_to_labels(probabilities: torch.Tensor, plan: Plan) -> torch.Tensor:
    """(K, *S) probabilities (softmax, or sigmoid per region) -> (*S) label values (`label_dtype`)."""
    if plan.is_region_based:
        return regions_to_labels(probabilities, plan.label_scheme.class_order)
    values = torch.tensor([0] + plan.label_scheme.class_order, dtype=label_dtype(plan), device=probabilities.device)
    return values[probabilities.argmax(0)]


def logits_to_label_map(logits: torch.Tensor, plan: Plan) -> torch.Tensor:
    """(K, *S) logits -> (*S) label values, decided on the logits: the largest logit (the softmax keeps the
    order), or a region where its logit is above 0 (its sigmoid above 0.5). The same labels as
    `probabilities_to_labels(activate(logits))` without computing K exponentials per voxel (they may differ only
    where rounding makes two probabilities equal that the logits tell apart)."""
    if plan.is_region_based:
        return regions_to_labels(logits, plan.label_scheme.class_order, threshold=0.0)
    values = torch.tensor([0] + plan.label_scheme.class_order, dtype=label_dtype(plan), device=logits.device)
    return values[logits.argmax(0)]


def probability_names(plan: Plan) -> list[str]:
    """The names of the probability channels: the regions, or background followed by the labels."""
    return list(plan.class_names) if plan.is_region_based else ["background", *plan.class_names]


class OriginalGrid:
    """Where restored slabs of a case go (`consume(rows, restored)` of `voxseg.data.restore`): each (K, rows, H, W)
    slab of the crop box's logits is turned into labels (`logits_to_label_map`) and pasted into the (D, H, W)
    label map of the original grid; when probabilities are asked for, it is activated and they go into
    `probabilities`, an array (K, D, H, W) float32 kept in memory (`with_probabilities=True`), or to
    `probability_sink`, an object with `paste(rows, box, activated)` (`voxseg.infer.casefiles.ProbabilityFile`
    writes them to disk as they come). Outside the crop box: background (label 0; softmax probability 1 for
    background, 0 for the rest; regions 0). Pasting a slab twice (a retry) writes the same values again.
    """

    def __init__(self, plan: Plan, properties: dict[str, Any], with_probabilities: bool = False,
                 probability_sink: Any = None) -> None:
        self.plan = plan
        self.box = crop_box(properties)
        original = tuple(int(s) for s in properties["original_shape"])
        self.labels = np.zeros(original, dtype=label_numpy_dtype(plan))  # background outside the crop box
        self.probabilities = None
        self.sink = probability_sink
        if with_probabilities and probability_sink is None:
            self.probabilities = np.zeros((plan.num_outputs, *original), dtype=np.float32)
            if not plan.is_region_based:
                self.probabilities[0] = 1.0

    def __call__(self, rows: slice, restored: torch.Tensor) -> None:
        labels = logits_to_label_map(restored, self.plan).cpu().numpy()
        paste_rows(self.labels, self.box, rows, labels.astype(self.labels.dtype, copy=False))
        if self.probabilities is None and self.sink is None:
            return
        activated = activate(restored, self.plan)
        if self.probabilities is not None:
            paste_rows(self.probabilities, self.box, rows, activated.cpu().numpy())
        if self.sink is not None:
            self.sink.paste(rows, self.box, activated)


def labels_on_original_grid(logits: torch.Tensor, plan: Plan, properties: dict[str, Any],
                            with_probabilities: bool = False,
                            max_values: int = DEFAULT_RESTORE_VALUES) -> tuple[np.ndarray, np.ndarray | None]:
    """(K, d, h, w) logits at the target spacing -> ((D, H, W) labels (uint8, uint16 for label values above
    255), (K, D, H, W) float32 probabilities or None) on the case's original grid; the probabilities reach the
    host only when `with_probabilities`.

    As nnU-Net does: the logits are resampled linearly to the crop box's original shape, activated there (softmax
    / sigmoid) and pasted into the full grid, and the labels are decided there (on the resampled logits: the
    same decision as on their probabilities, `logits_to_label_map`). Deciding after resampling keeps thin
    structures and smooth borders that resampling a label map (nearest values) would lose when the original
    spacing differs from the target spacing.

    Memory: the crop box is restored in slabs of rows (`voxseg.data.restore`) on the logits' device, each slab
    activated, turned into labels and copied to the host before the next, so that the device holds at most
    `max_values` values (channels x voxels) of slab tensors at once; on a CUDA out-of-memory error the rest is
    done on the CPU. The result does not depend on `max_values`. Prediction does not hold the whole logits at
    all: the sliding window hands its finished rows to a `StreamingRestore` feeding the same `OriginalGrid`.
    """
    expected = [int(s) for s in properties["shape_after_resample"]]
    if logits.ndim != 4 or list(logits.shape[1:]) != expected:
        raise InputError(f"case '{properties.get('name', '')}': prediction shape {tuple(logits.shape)} does not "
                         f"match the preprocessed shape {expected}")
    grid = OriginalGrid(plan, properties, with_probabilities)
    restore_in_slabs(logits, properties, grid, max_values)
    return grid.labels, grid.probabilities


# ----- largest connected component --------------------------------------------------------------------------
def largest_component(mask: np.ndarray, connectivity: int = 1) -> np.ndarray:
    """The largest connected component of a boolean mask (connectivity 1 = faces, 3 = faces/edges/corners)."""
    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    components, count = ndimage.label(mask, structure=structure)
    if count <= 1:
        return mask.copy()
    sizes = np.bincount(components.ravel())
    sizes[0] = 0  # background is not a component
    return components == int(sizes.argmax())


def keep_largest_component(seg: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """Copy of `seg` where voxels of `values` outside their largest joint component become 0."""
    mask = np.isin(seg, np.asarray(list(values)))
    out = seg.copy()
    out[mask & ~largest_component(mask)] = 0
    return out


def _normalise_classes(classes: Sequence[int | Sequence[int]]) -> list[list[int]]:
    return [[int(v) for v in c] if isinstance(c, (list, tuple)) else [int(c)] for c in classes]


def apply_postprocessing(seg: np.ndarray, spec: dict[str, Any] | None) -> np.ndarray:
    """Apply a postprocessing spec (see module docstring) to a label map; None or an empty spec is a no-op."""
    if not spec:
        return seg
    for values in _normalise_classes(spec.get("largest_component", [])):
        seg = keep_largest_component(seg, values)
    return seg


def load_postprocessing(path: str | Path, classes: Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
    """Read and validate a postprocessing.json (see `check_postprocessing`)."""
    path = Path(path)
    spec = read_json(path, ConfigError, invalid="delete it or decide postprocessing again")
    return check_postprocessing(spec, str(path), classes)


def check_postprocessing(spec: Any, source: str, classes: Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
    """A postprocessing spec with its "largest_component" entries as lists of label values.

    Args:
        spec: the parsed JSON (untrusted).
        source: where it came from, for the error message.
        classes: the model's classes (`plan.regions`); when given, every value must be one of their label values.

    Raises:
        ConfigError: naming `source`, when the spec is not {"largest_component": [[values], ...]} of label values.
    """
    entries = spec.get("largest_component") if isinstance(spec, dict) else None

    def is_value(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536

    if not isinstance(entries, list) or not all(
            is_value(e) or (isinstance(e, list) and e and all(is_value(v) for v in e)) for e in entries):
        raise ConfigError(f"{source}: expected {{\"largest_component\": [[label values], ...]}} with label values "
                          "1..65535; delete it or decide postprocessing again ('voxseg evaluate --crossval WORKDIR')")
    normalised = _normalise_classes(entries)
    if classes is not None:
        known = {int(v) for c in classes for v in c}
        unknown = sorted({v for entry in normalised for v in entry} - known)
        if unknown:
            raise ConfigError(f"{source}: label value(s) {unknown} are not labels of the model ({sorted(known)}); "
                              "it belongs to another model: delete it or decide postprocessing again")
    return {**spec, "largest_component": normalised}


def model_postprocessing(folder: str | Path, classes: Sequence[Sequence[int]],
                         nnunet_folder: bool = False) -> dict[str, Any] | None:
    """The postprocessing a model folder brings, or None: its postprocessing.json, or for an nnU-Net v2 model
    folder the voxseg_postprocessing.json `voxseg export --format nnunet` wrote (nnU-Net's own files are
    never read), checked against the model's `classes`."""
    path = (Path(folder) / EXPORTED_POSTPROCESSING_FILE) if nnunet_folder else WorkDir(folder).postprocessing
    return load_postprocessing(path, classes) if path.is_file() else None


def describe_postprocessing(spec: dict[str, Any] | None, classes: Sequence[Sequence[int]], names: Sequence[str],
                            dice: tuple[float, float] | None = None) -> str:
    """The decision as a sentence, e.g. "keep the largest component of classes edema, enhancing (cross-validation
    Dice 0.812 -> 0.823); none for necrosis".

    Args:
        spec: the decision ({"largest_component": [[values], ...]}) or None.
        classes, names: the model's classes (`plan.regions`) and their names (`plan.class_names`).
        dice: (before, after) cross-validation Dice, shown when given.
    """
    entries = _normalise_classes((spec or {}).get("largest_component", []))
    by_values = {tuple(sorted(c)): name for c, name in zip(_normalise_classes(classes), names)}
    everything = tuple(sorted({v for c in classes for v in c}))
    scores = f" (cross-validation Dice {dice[0]:.3f} -> {dice[1]:.3f})" if dice else ""
    if not entries:
        kept = f" (cross-validation Dice {dice[0]:.3f})" if dice else ""
        return f"none: keeping the largest component raised the Dice of no class{kept}"
    parts, kept_names = [], []
    for entry in entries:
        key = tuple(sorted(entry))
        if key in by_values:
            kept_names.append(by_values[key])
        elif key == everything:
            parts.append("keep the largest foreground component (all classes together)")
        else:
            kept_names.append("+".join(str(v) for v in entry))
    if kept_names:
        label = "class" if len(kept_names) == 1 else "classes"
        parts.append(f"keep the largest component of {label} {', '.join(kept_names)}")
    sentence = ", then ".join(parts) + scores
    others = [name for name in names if name not in kept_names]
    if not kept_names and len(parts) == 1:  # the foreground step alone
        return sentence + "; no class on its own"
    return sentence + (f"; none for {', '.join(others)}" if others else "")


def _class_dice(seg: np.ndarray, ref: np.ndarray, classes: list[list[int]]) -> np.ndarray:
    """Dice per class, 1 where prediction and reference are both empty."""
    from voxseg.evaluate.metrics import dice

    return np.array([dice(np.isin(seg, c), np.isin(ref, c)) for c in classes], dtype=np.float64)


def _score_case(pred_path: Path, ref_path: Path, classes: list[list[int]], base: list[list[int]],
                candidates: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Dice per class of the prediction with `base` applied, and with `base` + each candidate applied."""
    pred, _ = read_image(pred_path)
    ref, _ = read_image(ref_path)
    if pred.shape != ref.shape:
        raise InputError(f"{pred_path.name}: prediction shape {pred.shape} differs from its reference {ref.shape}")
    pred = apply_postprocessing(pred, {"largest_component": base})
    base_scores = _class_dice(pred, ref, classes)
    candidate_scores = np.stack([_class_dice(keep_largest_component(pred, c), ref, classes) for c in candidates])
    return base_scores, candidate_scores  # (N,), (M, N)


def _pairs(pred_dir: Path, ref_dir: Path, file_ending: str | None) -> list[tuple[Path, Path]]:
    files = sorted(p for p in pred_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    if file_ending is None:
        found = [e for e in SUPPORTED_ENDINGS if any(p.name.endswith(e) for p in files)]
        file_ending = found[0] if found else ".nii.gz"
    preds = [p for p in files if p.name.endswith(file_ending)]
    if not preds:
        raise InputError(f"{pred_dir}: no predictions ending in {file_ending} to decide postprocessing on")
    missing = [p.name for p in preds if not (ref_dir / p.name).is_file()]
    if missing:
        raise InputError(f"{ref_dir}: no reference for {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    return [(p, ref_dir / p.name) for p in preds]


def _score_all(pairs: list[tuple[Path, Path]], classes: list[list[int]], base: list[list[int]],
               candidates: list[list[int]], num_workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean over cases: base Dice per class (N,) and candidates' Dice per class (M, N)."""
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        results = list(pool.map(lambda pair: _score_case(*pair, classes, base, candidates), pairs))
    return np.mean([r[0] for r in results], axis=0), np.mean([r[1] for r in results], axis=0)


def decide_postprocessing(
    pred_dir: str | Path,
    ref_dir: str | Path,
    classes: Sequence[int | Sequence[int]],
    file_ending: str | None = None,
    *,
    out_file: str | Path,
    num_workers: int = 1,
) -> dict[str, Any]:
    """Choose the largest-component postprocessing that raises the mean Dice of cross-validation predictions.

    First all foreground classes together (one candidate: keep the largest foreground blob), then each class
    on top of that decision. A candidate is kept only when it raises the mean Dice over cases and classes.
    Per-class candidates are judged independently against the same baseline (exact for labels; for nested
    regions a close approximation) so only two passes over the files are needed.

    Args:
        pred_dir: predictions (label maps in the original geometry), e.g. WORKDIR/training/crossval.
        ref_dir: reference label maps with the same file names (the raw dataset's labelsTr).
        classes: label values or regions (lists of values), e.g. `plan.regions`.
        file_ending: prediction file ending; detected from the folder when None.
        out_file: where the decision is saved (WORKDIR/postprocessing.json for a work directory's folds).
        num_workers: threads reading and scoring cases.

    Returns:
        the spec, also saved to `out_file`.
    """
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    pairs = _pairs(pred_dir, ref_dir, file_ending)
    classes = _normalise_classes(classes)
    foreground = sorted({v for c in classes for v in c})
    accepted: list[list[int]] = []
    base, with_foreground = _score_all(pairs, classes, [], [foreground], num_workers)
    before, before_per_class = float(base.mean()), base.tolist()
    foreground_mean = float(with_foreground[0].mean())
    if len(classes) > 1 and foreground_mean > before + _MIN_IMPROVEMENT:
        accepted.append(foreground)
        base = with_foreground[0]
    reference = float(base.mean())
    base, per_class = _score_all(pairs, classes, accepted, classes, num_workers)
    class_means = [float(s.mean()) for s in per_class]
    accepted += [c for c, mean in zip(classes, class_means) if mean > reference + _MIN_IMPROVEMENT]
    spec = {
        "largest_component": accepted,
        "num_cases": len(pairs),
        "mean_dice_before": before,
        "mean_dice_foreground_candidate": foreground_mean,
        "mean_dice_per_class_candidate": {json.dumps(c): m for c, m in zip(classes, class_means)},
        "mean_dice_per_class_before": before_per_class,
    }
    write_json_atomic(Path(out_file), spec)
    return spec

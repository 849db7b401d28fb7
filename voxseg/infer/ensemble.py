"""Predicting with the configuration (or pair of configurations) that cross-validation chose.

`voxseg evaluate --crossval WORKDIR --configurations all` (`voxseg.crossval`) writes WORKDIR/inference_choice.json:

    {"choice": {"kind": "ensemble", "configurations": ["3d_fullres", "2d"], "dice": 0.91},
     "postprocessing": {"largest_component": [[1, 2, 3]], ...}, "compared": [...], "folds": [0, 1, 2, 3, 4], ...}

and `voxseg predict -m WORKDIR` without `--configuration` follows it (`predictor_from_choice`): one configuration
predicts with that configuration's folds; an ensemble runs each configuration's predictor on the case (each its
own preprocessing, network and sliding window), averages their probabilities on the case's original grid
(`average_probabilities`, also what cross-validation scored) and takes the labels from that mean, with the
chosen postprocessing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from voxseg.data.configs import config_workdir
from voxseg.data.io import Geometry
from voxseg.data.restore import default_restore_values
from voxseg.errors import ConfigError, MemoryBudgetError
from voxseg.infer.budget import budget_bytes, case_memory, size_text
from voxseg.infer.casefiles import CaseImage
from voxseg.infer.config import InferConfig
from voxseg.infer.postprocess import probabilities_to_labels, probability_names
from voxseg.infer.predictor import Predictor
from voxseg.jsonio import read_json
from voxseg.workdir import WorkDir

CHOICE_KINDS = ("configuration", "ensemble")

__all__ = ["EnsemblePredictor", "average_probabilities", "load_choice", "predictor_from_choice"]


def average_probabilities(probabilities: Sequence[np.ndarray]) -> np.ndarray:
    """The mean of several (K, *S) probability maps of one case, in float32: the ensemble's probabilities."""
    total = np.zeros(probabilities[0].shape, np.float32)
    for member in probabilities:
        total += member.astype(np.float32, copy=False)
    return total / np.float32(len(probabilities))


def load_choice(workdir: str | Path) -> dict[str, Any] | None:
    """WORKDIR/inference_choice.json, checked; None when the work directory has none."""
    path = WorkDir(workdir).inference_choice
    if not path.is_file():
        return None
    fix = f"re-run 'voxseg evaluate --crossval {workdir} --configurations all' or delete {path}"
    choice = read_json(path, ConfigError, invalid=fix)
    chosen = choice.get("choice") if isinstance(choice, dict) else None
    names = chosen.get("configurations") if isinstance(chosen, dict) else None
    postprocessing = choice.get("postprocessing") if isinstance(choice, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names) or \
            chosen.get("kind") not in CHOICE_KINDS or len(names) != (1 if chosen["kind"] == "configuration" else 2) \
            or not isinstance(postprocessing, dict) or not isinstance(postprocessing.get("largest_component"), list):
        raise ConfigError(f"{path}: expected {{\"choice\": {{\"kind\": \"configuration\" | \"ensemble\", "
                          f"\"configurations\": [one or two names]}}, \"postprocessing\": {{\"largest_component\": "
                          f"[...]}}}}; {fix}")
    return choice


def describe_choice(choice: dict[str, Any]) -> str:
    """'ensemble of 3d_fullres + 2d (cross-validation Dice 0.9132)' or 'configuration 2d (...)'."""
    chosen = choice["choice"]
    dice = chosen.get("dice")
    score = f" (cross-validation Dice {dice:.4f})" if isinstance(dice, (int, float)) else ""
    if chosen["kind"] == "ensemble":
        return "ensemble of " + " + ".join(chosen["configurations"]) + score
    return f"configuration {chosen['configurations'][0]}{score}"


class EnsemblePredictor(Predictor):
    """Several configurations' predictors on one case: the mean of their probabilities on the original grid,
    then labels (argmax, or regions) from that mean. Everything else (reading, writing, postprocessing,
    `predict_files`) is the `Predictor`'s.

    Args:
        members: the configurations' predictors (the same dataset: the same channels and labels).
        postprocessing: the spec applied by `predict_files` by default (the chosen one).
    """

    def __init__(self, members: Sequence[Predictor], postprocessing: dict[str, Any] | None = None) -> None:
        first = members[0]
        for member in members[1:]:
            if probability_names(member.plan) != probability_names(first.plan) or \
                    member.plan.num_channels != first.plan.num_channels:
                raise ConfigError(f"configurations {first.plan.configuration} and {member.plan.configuration} "
                                  "predict different channels or classes; an ensemble needs the same dataset")
        super().__init__(first.plan, [], first.config, first.device, postprocessing)
        self.members = list(members)

    def predict_logits(self, image_pp: np.ndarray | torch.Tensor, name: str = "") -> torch.Tensor:
        raise ConfigError("an ensemble of configurations has no logits of its own: each configuration "
                          "preprocesses the case itself; use predict_array")

    def _predict_for_files(self, case: CaseImage, name: str, out_dir: Path,
                           with_probabilities: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """The members' mean probabilities are needed whole (in memory) to take the labels from them."""
        result = self.predict_array(case.image, case.geometry, return_probabilities=with_probabilities, name=name)
        return result if with_probabilities else (result, None)

    def predict_array(self, image: np.ndarray, geometry: Geometry | Sequence[float],
                      return_probabilities: bool = False, name: str = "") -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Segment one image given on its own grid with every member (see `Predictor.predict_array`)."""
        self._check_memory(np.asarray(image), geometry, name)
        outputs = [member.predict_array(image, geometry, return_probabilities=True, name=name)
                   for member in self.members]
        probabilities = average_probabilities([p for _, p in outputs])  # (K, D, H, W) on the original grid
        labels = probabilities_to_labels(torch.from_numpy(probabilities), self.plan).numpy()
        return (labels, probabilities) if return_probabilities else labels


    def _check_memory(self, image: np.ndarray, geometry: Geometry | Sequence[float], name: str) -> None:
        """Refuse before any work when the members' probabilities, held on the input grid until their mean is
        taken (one array per member and the mean), do not fit the budget beside one member's prediction."""
        spacing = geometry.spacing if isinstance(geometry, Geometry) else tuple(float(s) for s in geometry)
        shape = image.shape if image.ndim == 4 else (1, *image.shape)
        memory = case_memory(self.plan, shape, spacing, self.device, default_restore_values(self.device), 1, "memory")
        held = len(self.members) * memory.probabilities  # the finished members' arrays and the mean
        budget, source = budget_bytes(self.config.max_memory)
        if memory.peak + held > budget:
            case = f"case '{name}': " if name else ""
            raise MemoryBudgetError(
                f"{case}an ensemble of {len(self.members)} configurations holds their probabilities on the input "
                f"grid ({self.plan.num_outputs} x {'x'.join(str(int(s)) for s in shape[1:])} float32 each) to "
                f"average them: about {size_text(memory.peak + held)} at the peak, more than the "
                f"{size_text(budget)} allowed ({source}). Predict with one configuration (--configuration "
                "NAME), give a larger --max-memory if the machine has it, or free memory")


def predictor_from_choice(workdir: str | Path, choice: dict[str, Any], config: InferConfig | None = None) -> Predictor:
    """The predictor of the chosen configuration, or the ensemble of the two chosen ones, with the chosen
    postprocessing; `config` (folds, checkpoint, device, ...) is the same for every configuration."""
    spec = dict(choice["postprocessing"])
    members = [Predictor.from_workdir(config_workdir(workdir, name), config)
               for name in choice["choice"]["configurations"]]
    if len(members) == 1:
        members[0].postprocessing = spec
        return members[0]
    return EnsemblePredictor(members, spec)

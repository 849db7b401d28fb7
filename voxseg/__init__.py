"""voxseg: fast 3D medical image segmentation on nnU-Net-format datasets.

The public API is small; everything is importable lazily so `voxseg --help` stays fast:

    >>> import voxseg
    >>> voxseg.make_synthetic_dataset("data/Synth", num_cases=20)
    >>> plan = voxseg.plan_dataset("data/Synth", "work/synth")
    >>> voxseg.preprocess_dataset("work/synth")
    >>> voxseg.preprocess_dataset(voxseg.config_workdir("work/synth", "2d"))   # another planned configuration
    >>> voxseg.train_fold("work/synth", fold=0, config=voxseg.TrainConfig())
    >>> predictor = voxseg.Predictor.from_workdir("work/synth", folds=[0])
    >>> predictor = voxseg.Predictor.from_workdir("work/synth", voxseg.InferConfig(folds=[0], step=0.25))
    >>> labels = predictor.predict_array(image, geometry)
    >>> voxseg.evaluate_folder("preds", "data/Synth/labelsTs", dataset_json="data/Synth/dataset.json")
    >>> result = voxseg.evaluate_crossval("work/synth")   # after training every fold: .summary, .postprocessing
    >>> choice = voxseg.choose_configuration("work/synth")   # every trained configuration and pair ensemble
    >>> voxseg.WorkDir("work/synth").fold(0).checkpoint("final")   # every path of a work directory
    >>> image, geometry = voxseg.read_series(voxseg.scan_dicom("incoming/study").series[0])   # voxseg[dicom]
"""
from __future__ import annotations

import importlib
from typing import Any

from voxseg.errors import VoxsegError

__version__ = "0.1.0"

_LAZY = {
    "make_synthetic_dataset": "voxseg.data.synth",
    "convert_brats": "voxseg.data.convert",
    "convert_msd": "voxseg.data.convert",
    "convert_dicom": "voxseg.data.dicom_convert",
    "scan_dicom": "voxseg.data.dicom",
    "read_series": "voxseg.data.dicom_volume",
    "dicom_input_cases": "voxseg.infer.dicom_cases",
    "check_dataset": "voxseg.data.check",
    "plan_dataset": "voxseg.data.plan",
    "config_workdir": "voxseg.data.configs",
    "WorkDir": "voxseg.workdir",
    "Plan": "voxseg.plans",
    "preprocess_dataset": "voxseg.data.preprocess",
    "TrainConfig": "voxseg.config",
    "build_train_config": "voxseg.train.api",
    "train_fold": "voxseg.train.api",
    "RunStart": "voxseg.train.start",
    "Predictor": "voxseg.infer.predictor",
    "InferConfig": "voxseg.infer.config",
    "evaluate_folder": "voxseg.evaluate.folder",
    "evaluate_crossval": "voxseg.crossval",
    "choose_configuration": "voxseg.crossval",
    "read_image": "voxseg.data.io",
    "write_image": "voxseg.data.io",
}

__all__ = ["VoxsegError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attribute = _LAZY[name] if isinstance(_LAZY[name], tuple) else (_LAZY[name], name)
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'voxseg' has no attribute '{name}'")

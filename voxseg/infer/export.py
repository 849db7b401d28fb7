"""ONNX export of a trained fold, checked against PyTorch with onnxruntime, and loading it back for inference.

The exported graph takes `image` (B, C, *patch_size) float32 with a dynamic batch axis and returns `logits`
(B, K, *patch_size); the spatial size is fixed to the training patch, which is all sliding-window inference
feeds it. The plan travels inside the file (metadata "voxseg_plan"), and so does the checkpoint it was
exported from ("voxseg_fold", "voxseg_checkpoint"). Next to it, `model.onnx.sha256` holds its SHA-256
(`sha256sum -c` format); loading refuses a file that does not match it.

Where the files go, and how predict finds them:
```
voxseg export W --onnx --folds 0,1      ->  W/training/fold_0/model.onnx, W/training/fold_1/model.onnx
voxseg predict -m W --backend onnxruntime --folds 0,1          (reads those: `load_onnx_models`)
voxseg export W --onnx fold0.onnx --folds 0                    (one fold, anywhere)
voxseg predict -m W --onnx-model fold0.onnx                    (an explicit file; W gives postprocessing.json)
```
The default location is inside the model folder, so `voxseg export W --onnx --archive Z` ships the ONNX files
in the archive and the installed folder predicts with onnxruntime too.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from voxseg.atomicio import atomic_path
from voxseg.digest import digest_file_path, verify_digest_file, write_digest_file
from voxseg.errors import CheckpointError, ConfigError
from voxseg.infer.archive import check_same_plan, checkpoint_path, load_fold_network, resolve_folds
from voxseg.jsonio import parse_json
from voxseg.plans import Plan
from voxseg.workdir import WorkDir

PLAN_METADATA_KEY = "voxseg_plan"
CHECKPOINT_METADATA_KEY = "voxseg_checkpoint"


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ConfigError("ONNX export needs the onnx and onnxruntime packages: pip install 'voxseg[onnx]'") from None


def export_onnx(
    workdir: str | Path,
    fold: int | str,
    out_file: str | Path | None = None,
    checkpoint: str = "final",
    opset: int = 17,
    tolerance: float = 1e-3,
    dynamo: bool = False,
) -> float:
    """Export one fold's network to ONNX and check it against PyTorch.

    Args:
        workdir: the model folder.
        fold: fold number or "all".
        out_file: the .onnx file (default WORKDIR/training/fold_F/model.onnx, where the onnxruntime backend
            of the Predictor looks).
        checkpoint: "final", "best" or "latest".
        opset: ONNX opset version.
        tolerance: largest accepted absolute difference between onnxruntime's and PyTorch's logits.
        dynamo: use the torch.export-based exporter (needs onnxscript) instead of the TorchScript one.

    Returns:
        the largest absolute logit difference between onnxruntime and PyTorch on a random batch of two.

    Raises:
        CheckpointError: the parity check failed (the file is not written then).
    """
    _require_onnx()
    network, plan = load_fold_network(workdir, fold, checkpoint, "cpu")
    plan.check_runnable("ONNX export")
    out_file = Path(out_file) if out_file is not None else default_onnx_path(workdir, fold)
    with atomic_path(out_file) as tmp:  # nothing is written unless the parity check passes
        example = torch.randn(1, plan.num_channels, *plan.patch_size)
        with warnings.catch_warnings(), torch.no_grad():
            # the TorchScript exporter's deprecation and tracer notes are not actionable for a fixed U-Net
            warnings.simplefilter("ignore")
            torch.onnx.export(
                network, (example,), str(tmp), dynamo=dynamo, opset_version=opset,
                input_names=["image"], output_names=["logits"],
                dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            )
        _add_metadata(tmp, {PLAN_METADATA_KEY: json.dumps(plan.to_dict()), "voxseg_fold": str(fold),
                            CHECKPOINT_METADATA_KEY: checkpoint})
        difference = onnx_parity(tmp, network, plan)
        if not difference <= tolerance:
            raise CheckpointError(
                f"ONNX export of fold {fold} differs from PyTorch by {difference:.3g} (> {tolerance:g}); "
                f"{out_file} was not written. Try another opset (opset={opset}) or dynamo=True"
            )
    write_digest_file(out_file)  # OUT.sha256, checked by load_onnx_model
    return difference


def default_onnx_path(workdir: str | Path, fold: int | str) -> Path:
    """WORKDIR/training/fold_F/model.onnx, where `voxseg predict --backend onnxruntime` looks for fold F."""
    return WorkDir(workdir).fold(fold).onnx


def export_onnx_folds(workdir: str | Path, folds: int | str | Sequence[int | str] | None = (0,),
                      checkpoint: str = "final", **options: Any) -> dict[int | str, tuple[Path, float]]:
    """Export every chosen fold to its default location (`voxseg export WORKDIR --onnx`).

    Args:
        folds: as for `voxseg.infer.archive.resolve_folds` ("all": fold_all, else every trained fold).
        options: `export_onnx`'s opset, tolerance, dynamo.

    Returns:
        {fold: (the .onnx file, its largest logit difference to PyTorch)}.
    """
    fold_list = resolve_folds(workdir, folds, checkpoint)
    for fold in fold_list:  # every checkpoint is there before the first file is written
        checkpoint_path(workdir, fold, checkpoint)
    return {fold: (default_onnx_path(workdir, fold), export_onnx(workdir, fold, None, checkpoint, **options))
            for fold in fold_list}


def _add_metadata(path: Path, entries: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    for key, value in entries.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.save(model, str(path))


def onnx_parity(path: str | Path, network: torch.nn.Module, plan: Plan, batch: int = 2, seed: int = 0) -> float:
    """Largest absolute difference of the logits of onnxruntime and PyTorch on a random (batch, C, *patch)."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, plan.num_channels, *plan.patch_size, generator=generator)
    with torch.no_grad():
        expected = network(image)
    expected = expected[0] if isinstance(expected, (list, tuple)) else expected
    actual = OnnxModel(path)(image)
    if actual.shape != expected.shape:
        return float("inf")
    return float((actual - expected).abs().max())


class OnnxModel:
    """An exported network run by onnxruntime on the CPU, callable like the torch network: (B, C, *P) -> logits.

    Attributes:
        plan: the plan stored in the file, or None for a file exported elsewhere.
        metadata: the file's metadata properties (voxseg_plan, voxseg_fold, voxseg_checkpoint).
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        _require_onnx()
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise CheckpointError(f"{path}: onnxruntime cannot load it ({exc})") from None
        self.path = Path(path)
        self.input_name = self.session.get_inputs()[0].name
        metadata: dict[str, Any] = self.session.get_modelmeta().custom_metadata_map
        self.metadata = dict(metadata)
        plan = metadata.get(PLAN_METADATA_KEY)
        self.plan = Plan.from_dict(parse_json(plan, f"{path}: its plan metadata", CheckpointError)) if plan else None

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        array = image.detach().to("cpu", torch.float32).numpy()
        logits = self.session.run(None, {self.input_name: np.ascontiguousarray(array)})[0]
        return torch.from_numpy(logits)


def load_onnx_model(path: str | Path, threads: int | None = None) -> OnnxModel:
    """Load an exported network; when `PATH.sha256` (written by `export_onnx`) is there, the file must match it.

    Raises:
        CheckpointError: the file does not match its digest (corrupt or altered), or onnxruntime cannot load it.
    """
    mismatch = verify_digest_file(path)
    if mismatch:
        raise CheckpointError(f"{path}: {mismatch}; the file is corrupt or was altered: export it again "
                              f"('voxseg export') or delete {digest_file_path(path).name} if you changed it on purpose")
    return OnnxModel(path, threads)


def load_onnx_models(workdir: str | Path, folds: Sequence[int | str], onnx_files: Sequence[str | Path] | None = None,
                     checkpoint: str = "final") -> list[OnnxModel]:
    """The ONNX networks the onnxruntime backend runs: the files given, or each fold's default file.

    A default file must have been exported from `checkpoint` (its metadata says which); several networks must
    share one plan, as the folds of an ensemble do.

    Raises:
        CheckpointError: a missing file (saying how to export it), one exported from another checkpoint, a
            file that does not match its digest, or networks of different plans.
    """
    if onnx_files is not None:
        paths, names = [Path(p) for p in onnx_files], [str(p) for p in onnx_files]
        for path in paths:
            if not path.is_file():
                raise CheckpointError(f"ONNX model {path} (--onnx-model) not found; export one with "
                                      f"'voxseg export {workdir} --onnx {path} --folds F'")
    else:
        paths, names = [default_onnx_path(workdir, fold) for fold in folds], [str(fold) for fold in folds]
        for path, fold in zip(paths, folds):
            if not path.is_file():
                raise CheckpointError(f"ONNX model {path} not found; export it first with 'voxseg export {workdir} "
                                      f"--onnx --folds {fold} --checkpoint {checkpoint}', or give a file with "
                                      "--onnx-model FILE")
    models = [load_onnx_model(path) for path in paths]
    if onnx_files is None:
        for model, path in zip(models, paths):
            exported = model.metadata.get(CHECKPOINT_METADATA_KEY, checkpoint)
            if exported != checkpoint:
                raise CheckpointError(f"{path} was exported from checkpoint_{exported}.pt, not the checkpoint_"
                                      f"{checkpoint}.pt asked for; predict with --checkpoint {exported}, or export "
                                      f"again with 'voxseg export {workdir} --onnx --checkpoint {checkpoint}'")
    with_plans = [(model.plan, name) for model, name in zip(models, names) if model.plan is not None]
    if len(with_plans) > 1:
        check_same_plan([plan for plan, _ in with_plans], [name for _, name in with_plans])
    return models

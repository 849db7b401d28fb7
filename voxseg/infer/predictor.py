"""Predict segmentations with a trained model: read -> preprocess (training's code) -> sliding window -> invert ->
write.

    >>> predictor = Predictor.from_workdir("work/synth", InferConfig(folds=[0, 1, 2, 3, 4], step=0.5))
    >>> predictor = Predictor.from_workdir("work/synth", folds=[0])   # the same, InferConfig fields as keywords
    >>> labels = predictor.predict_array(image, geometry)          # (C, D, H, W) -> (D, H, W) uint8 (uint16 > 255)
    >>> predictor.predict_files(find_input_cases("imagesTs", 4, ".nii.gz"), "preds")

Every setting (tile step, tile batch, mirroring, precision, device, backend, folds, checkpoint, outputs) is a
field of `voxseg.infer.config.InferConfig`, with its default there.

Folds: an int or list of ints picks training/fold_F; "all" picks training/fold_all (the model trained on every
case, nnU-Net's `-f all`), or, when no fold_all was trained, every trained fold_F as an ensemble; None (the
default, as in nnU-Net) picks every trained fold_F, or fold_all when it is the only trained model. Folds are
averaged in logit space inside one sliding-window pass; `Predictor.folds` lists those loaded.
"""
from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from voxseg.atomicio import make_output_folder, sweep_stale_temporaries
from voxseg.data.configs import stage_workdir
from voxseg.data.io import Geometry, write_image
from voxseg.data.restore import StreamingRestore, default_restore_values
from voxseg.devices import cudnn_autotuning, resolve_device
from voxseg.distributed import local_device
from voxseg.errors import ConfigError, InputError, MemoryBudgetError, VoxsegError
from voxseg.infer.archive import load_fold_network, resolve_folds
from voxseg.infer.budget import FittedCase, fit_case, forward_limit
from voxseg.infer.casefiles import (
    CaseImage,
    ProbabilityFile,
    case_failure_reason,
    collect_write,
    my_share,
    save_probabilities,
)
from voxseg.infer.config import InferConfig
from voxseg.infer.dicom_cases import DICOM_OUTPUTS, check_dicom_output_input, write_dicom_output
from voxseg.infer.inputs import (
    check_output_not_input,
    checked_geometry,
    checked_image,
    find_input_cases,
    read_input_case,
)
from voxseg.infer.loading import load_models
from voxseg.infer.postprocess import (
    OriginalGrid,
    apply_postprocessing,
    load_postprocessing,
    logits_to_labels,
    model_postprocessing,
    probability_names,
    regions_to_labels,
)
from voxseg.infer.progress import CaseProgress
from voxseg.infer.sliding_window import sliding_window_inference
from voxseg.plans import Plan

__all__ = ["InferConfig", "Predictor", "find_input_cases", "load_fold_network", "regions_to_labels", "resolve_folds"]


class Predictor:
    """A loaded model (one or more folds) plus its plan and inference settings.

    Args:
        plan: the plan the models were trained with (its patch is the tile size).
        models: networks (in eval mode, on `device`) or callables (B, C, *P) -> (B, K, *P) logits.
        config: the inference settings (default `InferConfig()`); tiling, mirroring and precision are resolved
            from it for this plan and device (`tiling`).
        device: the compute device the models are on (default: `config.device`, resolved).
        postprocessing: default postprocessing spec (postprocessing.json of the work directory) or None.
        previous: for a cascade stage, the Predictor of its first stage: it runs first on every image, and its
            segmentation, on this plan's grid and one-hot, is appended to the image channels
            (`voxseg.infer.cascade`).

    Attributes:
        config: the settings given.
        tiling: the sliding-window settings resolved from them (`voxseg.infer.config.Tiling`).
        folds: the folds `from_workdir` loaded (fold numbers, or "all" for fold_all); empty otherwise.
        restore_values: the most values (channels x voxels) restoring a prediction to the original grid holds on
            the device at once (`voxseg.data.restore`; None, the default: 2^28, 1 GiB of float32, on a GPU,
            2^26 on a CPU); set it lower for a small GPU. A case's memory budget may lower it further.
    """

    folds: tuple[int | str, ...] = ()
    restore_values: int | None = None

    def __init__(self, plan: Plan, models: Sequence[Any], config: InferConfig | None = None,
                 device: str | torch.device | None = None, postprocessing: dict[str, Any] | None = None,
                 previous: "Predictor | None" = None) -> None:
        if config is not None and not isinstance(config, InferConfig):
            raise TypeError(f"Predictor: config must be an InferConfig, got {type(config).__name__}")
        self.plan = plan
        self.models = list(models)
        self.config = config or InferConfig()
        self.device = torch.device(device) if device is not None else local_device(resolve_device(self.config.device))
        self.tiling = self.config.tiling(plan, self.device)
        self.postprocessing = postprocessing
        self.previous = previous
        if plan.previous_stage is not None and previous is None:
            raise ConfigError(f"configuration '{plan.configuration}' is a cascade stage: give the Predictor of its "
                              f"first stage '{plan.previous_stage}' (Predictor.from_workdir loads it)")

    @property
    def mirror_axes(self) -> tuple[int, ...]:
        """The spatial axes mirrored for test-time augmentation (resolved: "all" is the axes the model allows)."""
        return self.tiling.mirror_axes

    @mirror_axes.setter
    def mirror_axes(self, axes: Sequence[int]) -> None:
        self.tiling = replace(self.tiling, mirror_axes=tuple(axes))

    @classmethod
    def from_workdir(cls, workdir: str | Path, config: InferConfig | None = None, **settings: Any) -> "Predictor":
        """Load the folds' checkpoints (or ONNX files with the onnxruntime backend) of a work directory; for a
        cascade stage (WORKDIR/configs/3d_cascade_fullres) also its first stage's, with the same settings.

        Args:
            workdir: a work directory of `voxseg train`, an installed model folder or an nnU-Net v2 model folder
                (<Trainer>__<Plans>__<configuration>, whose fold_F/checkpoint_{final,best}.pth load through
                `voxseg.infer.nnunet`).
            config: the inference settings (default `InferConfig()`).
            **settings: `InferConfig` fields replacing the config's, e.g. `folds=[0], device="cpu",
                mirror_axes=None` (the keyword form of the Python API; None/False for mirror_axes is "none", and
                amp=None/True/False is "auto"/"auto"/"off").
        """
        if config is not None and not isinstance(config, InferConfig):
            raise TypeError(f"Predictor.from_workdir: config must be an InferConfig (give folds=... as a keyword), "
                            f"got {type(config).__name__}")
        config = (config or InferConfig()).replace(**settings)
        workdir = Path(workdir)
        loaded = load_models(workdir, config)
        postprocessing = model_postprocessing(workdir, loaded.plan.regions, nnunet_folder=loaded.backend == "nnunet")
        previous = None
        if loaded.plan.previous_stage is not None:  # a cascade stage: its first stage's folds (the same selection)
            if loaded.backend != "torch":
                raise ConfigError(f"configuration '{loaded.plan.configuration}': a cascade stage predicts with the "
                                  "torch backend only")
            previous = cls.from_workdir(stage_workdir(workdir, loaded.plan.previous_stage), config)
        predictor = cls(loaded.plan, loaded.models, config, loaded.device, postprocessing, previous)
        predictor.folds = loaded.folds
        return predictor

    # ----- arrays ---------------------------------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        """Names of the probability channels."""
        return probability_names(self.plan)

    def predict_logits(self, image_pp: np.ndarray | torch.Tensor, name: str = "",
                       consume: Callable[[slice, torch.Tensor], None] | None = None,
                       forward_tiles: int | None = None) -> torch.Tensor | None:
        """(C, d, h, w) preprocessed image -> (K, d, h, w) float32 logits (on the compute device, or on the host
        when they do not fit in device memory); `name` is the case named in out-of-memory messages. With
        `consume`, the logits go to it row by row as the sliding window finishes them, and None is returned
        (`sliding_window_inference`). `forward_tiles` caps the tiles x mirrored copies of a forward pass (the
        case's memory budget on a CPU, `fit_case`; default: half of what the device has free, `forward_limit`)."""
        image = torch.as_tensor(image_pp, dtype=torch.float32).to(self.device, non_blocking=True)[None]
        limit = forward_tiles
        if limit is None:
            limit = forward_limit(self.plan, self.device, image.shape[2:], self.tiling.amp_dtype)
        with cudnn_autotuning(self.device.type == "cuda"):
            return sliding_window_inference(self.models, image, self.plan.patch_size, self.plan.num_outputs,
                                            replace(self.tiling, max_forward_batch=limit), self.plan.slice_axis,
                                            name, consume)

    def predict_to_grid(self, image_pp: np.ndarray | torch.Tensor, properties: dict[str, Any], grid: OriginalGrid,
                        name: str = "", fitted: FittedCase | None = None) -> None:
        """Predict a preprocessed case straight onto its original grid: the sliding window's finished rows are
        restored (`StreamingRestore`, on the compute device) into `grid` as they come, so neither the whole
        logits nor anything of K x the original grid is held at once; `fitted` (`fit_case`) gives the restore
        slab and the tiles per forward pass."""
        values = fitted.restore_values if fitted is not None else self.restore_slab_values()
        restorer = StreamingRestore(properties, self.plan.num_outputs, grid, values, self.device)
        self.predict_logits(image_pp, name, consume=restorer.feed,
                            forward_tiles=fitted.forward_tiles if fitted is not None else None)
        restorer.finish()

    def logits_to_labels(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, *S) logits -> ((*S) labels, (K, *S) probabilities)."""
        return logits_to_labels(logits, self.plan)

    def predict_array(self, image: np.ndarray, geometry: Geometry | Sequence[float],
                      return_probabilities: bool = False, name: str = "") -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Segment one image given on its own grid.

        Args:
            image: (C, D, H, W) (or (D, H, W) for a one-channel model), any real dtype.
            geometry: its Geometry, or just its spacing (array axis order).
            return_probabilities: also return (K, D, H, W) float32 probabilities on the original grid.
            name: case name used in error messages.

        Returns:
            (D, H, W) labels, uint8 (uint16 for label values above 255) [, probabilities].
        """
        image = checked_image(image, self.plan, name)
        geometry = checked_geometry(geometry, name)
        grid = self._predict_case(CaseImage(image, geometry), name, with_probabilities=return_probabilities)
        return (grid.labels, grid.probabilities) if return_probabilities else grid.labels

    def restore_slab_values(self) -> int:
        """Values (channels x voxels) one restore slab may hold: the config's, else the device's default."""
        return self.restore_values if self.restore_values is not None else default_restore_values(self.device)

    def _predict_case(self, case: CaseImage, name: str, with_probabilities: bool = False,
                      probability_sink: Any = None) -> OriginalGrid:
        """A (C, D, H, W) image, checked against the model, on its own grid -> its OriginalGrid (labels, and
        probabilities in memory or in `probability_sink`). The case's memory is fitted into the budget first
        (refused if it cannot fit), and the case lets go of its image once preprocessed."""
        probabilities = "disk" if probability_sink is not None else ("memory" if with_probabilities else "none")
        try:  # before any work
            fitted = fit_case(self.plan, case.image.shape, case.geometry.spacing, self.device,
                              self.restore_slab_values(), probabilities, self.config.max_memory,
                              None if self.previous is None else self.previous.plan)
        except MemoryBudgetError as exc:
            raise MemoryBudgetError(f"case '{name}': {exc}" if name else str(exc)) from None
        image_pp, properties = self.preprocess(case.take_image().astype(np.float32, copy=False), case.geometry, name)
        grid = OriginalGrid(self.plan, properties, with_probabilities, probability_sink)
        self.predict_to_grid(image_pp, properties, grid, name, fitted)
        return grid

    def preprocess(self, image: np.ndarray, geometry: Geometry, name: str = "") -> tuple[torch.Tensor, dict[str, Any]]:
        """(C, D, H, W) float32 image -> (the network's input (C [+ L], d, h, w) float32 on the compute device,
        preprocessing properties); a cascade stage runs its first stage first and appends the one-hot of its
        segmentation on this grid. The input is not copied back to the host (`preprocess_image`)."""
        from voxseg.data.preprocess import preprocess_image
        from voxseg.infer.cascade import first_stage_labels, with_first_stage

        previous = self.previous and first_stage_labels(self.previous, image, geometry, self.plan, name)
        image_pp, properties = preprocess_image(image, geometry, self.plan, device=self.device, name=name)
        return (image_pp if previous is None else with_first_stage(image_pp, previous, self.plan, name)), properties

    # ----- files ----------------------------------------------------------------------------------------------
    def _postprocessing_spec(self, postprocess: Any) -> dict[str, Any] | None:
        """None: the config's choice (`InferConfig.postprocess`; by default the work directory's
        postprocessing.json if any); False: none; "force" or True: every class; a dict or a path: that spec."""
        if postprocess is None:
            postprocess = self.config.postprocess
        if postprocess is None:
            return self.postprocessing
        if postprocess is False:
            return None
        if postprocess == "force" or postprocess is True:
            return {"largest_component": self.plan.regions}
        if isinstance(postprocess, dict):
            return postprocess
        return load_postprocessing(postprocess)

    def postprocessing_spec(self, postprocess: Any = None) -> dict[str, Any] | None:
        """The postprocessing `predict_files` applies for `postprocess` (its argument), for callers that predict
        arrays and write the files themselves (`voxseg serve`)."""
        return self._postprocessing_spec(postprocess)

    def _read_case(self, name: str, files: Sequence[Any]) -> tuple[np.ndarray, Geometry]:
        return read_input_case(name, files, self.plan)

    def predict_files(
        self,
        cases: Sequence[tuple[str, Sequence[str | Path]]],
        out_dir: str | Path,
        save_probabilities: bool | None = None,
        continue_run: bool = False,
        num_io_threads: int = 2,
        postprocess: Any = None,
        file_ending: str | None = None,
        progress: bool = False,
    ) -> dict[str, Any]:
        """Predict cases from files and write OUT/NAME{file_ending} with each input's geometry (OUT/NAME.dcm, a
        DICOM-SEG or RTSTRUCT on channel 0's series, with `config.output_format` dicom-seg or rtstruct).

        Reading the next cases and writing finished ones run on `num_io_threads` threads while the device
        works. A case that cannot be read or does not fit the model is skipped and reported; the others are
        still written, then InputError lists every failed case with its reason.

        Args:
            cases: (name, [channel files in channel order]), e.g. from `find_input_cases`, or (name, [DICOM series
                per channel]) from `voxseg.infer.dicom_cases.dicom_input_cases`.
            save_probabilities: also write NAME.npz: "probabilities" (K, D, H, W) float16 and "class_names"
                (None: `config.save_probabilities`).
            continue_run: skip cases whose outputs already exist.
            postprocess: None (`config.postprocess`: by default the model's postprocessing.json, if any), False,
                "force" (largest component of every class), a spec dict or a path to a postprocessing.json.
            file_ending: output ending (None: `config.file_ending`, by default the plan's).
            progress: report each case on stderr with its time (a bar on a terminal, a plain line per case
                otherwise) and a summary line at the end (`voxseg.infer.progress`); off by default, `voxseg
                predict` turns it on.

        Under torchrun (RANK / WORLD_SIZE in the environment) each process predicts its share of the cases,
        balanced by input file size, and writes its own outputs; no process group is needed. The shares are
        fixed before `continue_run` looks at the outputs, so ranks never disagree about who does what.

        Returns:
            {"written": n, "skipped": n, "out_dir": str}, counted over this process's share.
        """
        check_output_not_input(cases, Path(out_dir))
        dicom_output = self.config.output_format in DICOM_OUTPUTS
        if dicom_output:
            check_dicom_output_input(cases, self.config.output_format)
        out_dir = make_output_folder(out_dir, "predict -o")
        sweep_stale_temporaries(out_dir)  # left by a killed run
        ending = ".dcm" if dicom_output else file_ending or self.config.file_ending or self.plan.file_ending
        if save_probabilities is None:
            save_probabilities = self.config.save_probabilities
        spec = self._postprocessing_spec(postprocess)
        cases = my_share(cases)
        todo = [(name, files) for name, files in cases
                if not (continue_run and self._outputs_exist(out_dir, name, ending, save_probabilities))]
        failures: list[tuple[str, str]] = []
        report = CaseProgress(len(todo), progress)
        written = self._pipeline(todo, out_dir, ending, spec, save_probabilities, num_io_threads, failures, report)
        report.close()
        if failures:
            lines = "\n".join(f"  {name}: {reason}" for name, reason in failures)
            raise InputError(f"{len(failures)} of {len(todo)} case(s) failed ({written} written to "
                             f"{out_dir}):\n{lines}")
        return {"written": written, "skipped": len(cases) - len(todo), "out_dir": str(out_dir)}

    def _pipeline(self, todo: list[tuple[str, Sequence[str | Path]]], out_dir: Path, ending: str,
                  spec: dict[str, Any] | None, save_probabilities: bool, num_io_threads: int,
                  failures: list[tuple[str, str]], report: CaseProgress) -> int:
        """Read ahead and write behind on `num_io_threads` threads while the device predicts; returns the number
        of cases written and appends (name, reason) for each case that failed."""
        threads, written = max(1, num_io_threads), 0
        with ThreadPoolExecutor(threads) as pool:
            pending_reads: deque[tuple[str, Future]] = deque()
            pending_writes: deque[tuple[str, Future]] = deque()
            queue = iter(todo)

            def read_ahead() -> None:
                case = next(queue, None)
                if case is not None:
                    pending_reads.append((case[0], case[1], pool.submit(self._read_case, *case)))

            for _ in range(threads):
                read_ahead()
            while pending_reads:
                name, files, future = pending_reads.popleft()
                read_ahead()
                start = time.perf_counter()  # from waiting for the read to the prediction handed to a writer
                try:
                    case = CaseImage(*future.result())
                    future = None  # the image is dropped once preprocessed: nothing else may hold it
                    geometry = case.geometry
                    labels, probabilities = self._predict_for_files(case, name, out_dir, save_probabilities)
                except (VoxsegError, OSError) as exc:
                    failures.append((name, case_failure_reason(name, exc)))
                    report.done(name, time.perf_counter() - start, failed=True)
                    continue
                labels = apply_postprocessing(labels, spec)
                pending_writes.append((name, pool.submit(self._write_case, out_dir, name, ending, labels, geometry,
                                                         probabilities, files)))
                while len(pending_writes) > threads:  # bound the finished cases waiting for the writers
                    written += collect_write(pending_writes.popleft(), failures)
                report.done(name, time.perf_counter() - start)
            while pending_writes:
                written += collect_write(pending_writes.popleft(), failures)
        return written

    @staticmethod
    def _outputs_exist(out_dir: Path, name: str, ending: str, with_probabilities: bool) -> bool:
        return (out_dir / f"{name}{ending}").is_file() and (
            not with_probabilities or (out_dir / f"{name}.npz").is_file())

    def _predict_for_files(self, case: CaseImage, name: str, out_dir: Path,
                           with_probabilities: bool) -> tuple[np.ndarray, ProbabilityFile | np.ndarray | None]:
        """(labels, probabilities) of a case for `predict_files`: the probabilities (when asked for) go to disk
        slab by slab as they are restored (`ProbabilityFile`, committed by the writer)."""
        case.image = checked_image(case.image, self.plan, name)
        if not with_probabilities:
            return self._predict_case(case, name).labels, None
        sink = ProbabilityFile(out_dir / f"{name}.npz", self.plan.num_outputs, case.image.shape[1:],
                               self.class_names, background_channel=not self.plan.is_region_based)
        try:
            return self._predict_case(case, name, probability_sink=sink).labels, sink
        except BaseException:
            sink.discard()
            raise

    def _write_case(self, out_dir: Path, name: str, ending: str, labels: np.ndarray, geometry: Geometry,
                    probabilities: ProbabilityFile | np.ndarray | None, files: Sequence[Any] = ()) -> None:
        if isinstance(probabilities, ProbabilityFile):
            probabilities.commit()
        elif probabilities is not None:
            save_probabilities(out_dir / f"{name}.npz", probabilities, self.class_names)
        # the label map last: continue_run treats a case as done once it exists
        if self.config.output_format in DICOM_OUTPUTS:  # on the grid of channel 0's series, which it references
            write_dicom_output(self.config.output_format, out_dir / f"{name}{ending}", labels, geometry, files[0],
                               self.plan)
        else:
            write_image(out_dir / f"{name}{ending}", labels, geometry)

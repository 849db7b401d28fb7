"""`voxseg report`, and the --report flag of evaluate and predict: the HTML report (`voxseg.report.build`)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from voxseg.cli.common import Subparsers, add_command
from voxseg.errors import ConfigError, InputError
from voxseg.workdir import WorkDir

__all__ = ["add_report_command", "add_report_flag", "check_report_format", "report_after_crossval",
           "report_after_evaluate", "report_after_predict"]


def add_report_flag(parser: argparse.ArgumentParser, default_where: str) -> None:
    parser.add_argument("--report", nargs="?", const=True, default=None, metavar="FILE.html",
                        help=f"also write the HTML report: metrics, plots and overlays (default {default_where})")


def _out(flag: Any) -> str | None:
    return None if flag is True or flag is None else str(flag)


def _written(path: Path) -> None:
    print(f"report: {path} (open it in a browser; keep {path.stem}_files/ beside it)")


def report_after_evaluate(args: argparse.Namespace, summary: dict[str, Any]) -> None:
    """evaluate PRED REF --report: the report of that evaluation."""
    from voxseg.report.build import ReportSources, write_report

    sources = ReportSources(Path(args.pred), Path(args.ref), dataset_json=args.dataset_json, summary=summary)
    _written(write_report(sources, _out(args.report), num_workers=args.workers))


def report_after_crossval(args: argparse.Namespace, workdir: str, summary: dict[str, Any]) -> None:
    """evaluate --crossval WORKDIR --report: the folds' validation predictions together, and every fold's run."""
    from voxseg.report.build import write_report

    sources = _crossval_sources(Path(workdir), summary)
    out = _out(args.report) or WorkDir(workdir).crossval / "report.html"
    _written(write_report(sources, out, num_workers=args.workers))


def _trained_folds(workdir: Path) -> list[Any]:
    folds = [*WorkDir(workdir).numbered_folds().values(), WorkDir(workdir).fold("all")]
    return [fold for fold in folds if fold.log.is_file()]


def _crossval_sources(workdir: Path, summary: dict[str, Any] | None) -> Any:
    from voxseg.evaluate.workdir import workdir_references
    from voxseg.report.build import ReportSources

    crossval = WorkDir(workdir).crossval
    if not crossval.is_dir():
        raise InputError(f"{crossval}: no cross-validation predictions; run 'voxseg evaluate --crossval {workdir}' "
                         "first, or give --fold F for one fold's validation")
    references = workdir_references(workdir)
    return ReportSources(crossval, references.labels_dir, dataset_json=references.dataset, summary=summary,
                         training=_trained_folds(workdir), title=f"voxseg cross-validation report: {workdir.name}",
                         partial=True)


def _fold_sources(workdir: Path, fold: str) -> Any:
    from voxseg.evaluate.workdir import workdir_references
    from voxseg.report.build import ReportSources

    fold_dir = WorkDir(workdir).fold(fold)
    if not fold_dir.path.is_dir():
        raise InputError(f"{fold_dir.path}: fold {fold} was not trained ('voxseg train {workdir} {fold}')")
    references = workdir_references(workdir)
    has_validation = fold_dir.validation.is_dir() and any(fold_dir.validation.glob(f"*{references.file_ending}"))
    predictions = fold_dir.validation if has_validation else None
    if predictions is None:
        raise InputError(f"{fold_dir.validation}: fold {fold} has no validation predictions; they are written at the "
                         f"end of training, or by 'voxseg train {workdir} {fold} --test-only'")
    return ReportSources(predictions, references.labels_dir, dataset_json=references.dataset,
                         training=[fold_dir], title=f"voxseg report: {workdir.name}, fold {fold}", partial=True)


def check_report_format(args: argparse.Namespace, output_format: str) -> None:
    """predict --report draws NIfTI label maps: refused, before predicting, with another output format."""
    if args.report and output_format != "nifti":
        raise ConfigError(f"--report draws label maps: it goes with --output-format nifti, not {output_format}; "
                          "predict to NIfTI for the report, or leave --report out")


def report_after_predict(args: argparse.Namespace, predictor: Any, cases: Sequence[tuple[str, Sequence[Any]]],
                         out_dir: Path, file_ending: str) -> None:
    """predict --report: overlays of the predictions on their images, volumes, and uncertainty when the
    probabilities were saved."""
    from voxseg.report.build import ReportSources, write_report

    plan = predictor.plan
    dataset = {"labels": plan.labels, "channel_names": plan.channel_names, "file_ending": file_ending}
    # channel 0's file under each case's pictures (a DICOM series is not a file: its pictures have no image)
    images = {name: Path(files[0]) for name, files in cases if isinstance(files[0], (str, Path))}
    sources = ReportSources(out_dir, images=images, dataset_json=dataset,
                            title=f"voxseg report: predictions in {out_dir.name}")
    _written(write_report(sources, _out(args.report), num_workers=1))


def cmd_report(args: argparse.Namespace) -> int:
    from voxseg.report.build import ReportSources, write_report

    if args.workers < 1:
        raise ConfigError(f"-j {args.workers}: give 1 or more processes")
    target = Path(args.pred)
    if WorkDir(target).plans.is_file():
        if args.ref is not None:
            raise ConfigError(f"{target} is a work directory: its references are its raw dataset's labels; "
                              "give REF only with a folder of predictions")
        sources = _fold_sources(target, args.fold) if args.fold is not None else _crossval_sources(target, None)
        default = (WorkDir(target).fold(args.fold).path if args.fold is not None else WorkDir(target).crossval)
        out = args.output or default / "report.html"
        if args.images is not None:
            sources.images = Path(args.images)
    else:
        if args.fold is not None:
            raise ConfigError(f"--fold is for a work directory; {target} has no plans.json")
        sources = ReportSources(target, Path(args.ref) if args.ref else None, images=args.images,
                                dataset_json=args.dataset_json)
        out = args.output
    _written(write_report(sources, out, num_workers=args.workers))
    return 0


def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pred", help="folder of predictions, or a work directory (with --fold F: that fold's validation "
                                "and training; without: the cross-validation predictions and every fold's training)")
    p.add_argument("ref", nargs="?", help="folder of reference labels with the same file names (omit for a "
                                          "prediction-only report: volumes and uncertainty)")
    p.add_argument("-o", "--output", metavar="FILE.html",
                   help="the report page (default PRED/report.html; a work directory's fold or crossval folder)")
    p.add_argument("--images", metavar="DIR", help="folder of the images the predictions were made from (default: "
                                                   "imagesTr/imagesTs beside REF when REF is labelsTr/labelsTs)")
    p.add_argument("--dataset-json", metavar="FILE", help="dataset.json with the labels (default: beside REF)")
    p.add_argument("--fold", help="with a work directory: the fold whose validation and training to show")
    p.add_argument("-j", "--workers", type=int, default=1, help="processes drawing the cases (default 1)")


def add_report_command(sub: Subparsers) -> None:
    add_command(sub, "report", cmd_report,
                "write an HTML report: metrics table, plots, overlays on three planes, training curves",
                "voxseg report preds data/Dataset001_Synth/labelsTs -o report.html\n"
                "voxseg report preds --images data/Dataset001_Synth/imagesTs --dataset-json "
                "data/Dataset001_Synth/dataset.json   # no references\n"
                "voxseg report work/synth --fold 0\n"
                "voxseg report work/synth   # cross-validation, after 'voxseg evaluate --crossval work/synth'",
                setup=_report_arguments)

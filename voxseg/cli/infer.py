"""Inference and evaluation commands: predict, evaluate, export, install."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from voxseg.cli.common import (
    Subparsers,
    add_command,
    add_configuration_flag,
    configuration_workdir,
    folds,
    usable_device,
)
from voxseg.cli.dicom import add_channel_flags, input_cases
from voxseg.cli.report import (
    add_report_flag,
    check_report_format,
    report_after_crossval,
    report_after_evaluate,
    report_after_predict,
)
from voxseg.errors import ConfigError
from voxseg.workdir import WorkDir

if TYPE_CHECKING:
    from voxseg.infer.config import InferConfig

EXPORT_FORMATS = ("nnunet",)  # --format FORMAT OUT: another tool's model layout

# `voxseg predict`'s flags, each naming the InferConfig field it sets: type, choices, default and help come from
# the field (`voxseg.cli.derive`); the config module is imported when `voxseg predict` is used (it imports torch)
PREDICT_FLAGS: dict[str, str] = {
    "--folds": "folds",
    "--checkpoint": "checkpoint",
    "--step": "step",
    "--tile-batch": "tile_batch",
    "--mirror-axes": "mirror_axes",
    "--amp": "amp",
    "--device": "device",
    "--cpu-forward": "cpu_forward",
    "--backend": "backend",
    "--compile": "compile",
    "--save-probabilities": "save_probabilities",
    "--postprocess": "postprocess",
    "--file-ending": "file_ending",
    "--output-format": "output_format",
    "--max-memory": "max_memory",
}
# fields with a hand-written flag: another spelling (--no-mirror), or several values after one flag (--onnx-model)
PREDICT_EXTRA_FLAGS: dict[str, str] = {"--no-mirror": "mirror_axes", "--onnx-model": "onnx_files"}


def _checkpoint_flag(parser: argparse.ArgumentParser) -> None:
    """export's --checkpoint: the names of `voxseg.checkpoint.CHECKPOINT_CHOICES`, the one list every command uses
    (predict's flag is derived from `InferConfig.checkpoint`, which declares the same choices)."""
    from voxseg.infer.archive import CHECKPOINT_CHOICES

    parser.add_argument("--checkpoint", choices=CHECKPOINT_CHOICES, default="final",
                        help="which checkpoint_NAME.pt of each fold (default final)")


def predict_config(args: argparse.Namespace) -> "InferConfig":
    """The InferConfig `voxseg predict` runs with: each field as its flag gives it, else its default (the
    parser holds every field's default, `_predict_arguments`)."""
    from voxseg.cli.derive import blame_flag, flag_overrides
    from voxseg.infer.config import infer_config

    try:
        return infer_config(flag_overrides(args, {name: name for name in _flag_names().values()}))
    except ConfigError as exc:
        blamed = blame_flag(exc, _flag_names(), args)
        if blamed is exc:
            raise
        raise blamed from None


def _flag_names() -> dict[str, str]:
    """Every flag of `voxseg predict` that sets an InferConfig field: the derived ones and the hand-written."""
    return {**PREDICT_FLAGS, **PREDICT_EXTRA_FLAGS}


def cmd_predict(args: argparse.Namespace) -> int:
    from voxseg.infer.predictor import Predictor

    config = predict_config(args)
    if config.resolved_backend() == "torch":
        usable_device(config.device)
    choice = None
    if args.configuration is None and not config.onnx_files:  # ONNX files are the model: no configuration choice
        from voxseg.infer.ensemble import load_choice

        choice = load_choice(args.model)
    if choice is not None:
        from voxseg.infer.ensemble import describe_choice, predictor_from_choice

        predictor = predictor_from_choice(args.model, choice, config)
        print(f"using the cross-validation choice in {WorkDir(args.model).inference_choice}: "
              f"{describe_choice(choice)}, postprocessing {choice['postprocessing']['largest_component']} "
              "(--configuration NAME overrides)")
    else:
        predictor = Predictor.from_workdir(configuration_workdir(args.model, args.configuration), config)
    print(_folds_line(predictor, config.folds))
    check_report_format(args, config.output_format)
    from voxseg.infer.dicomweb import pulled_input, store_instances

    with pulled_input(args.input) as (inputs, study):  # a dicomweb:// study: retrieved into a temporary folder
        cases = input_cases(args, predictor.plan, inputs)
        result = predictor.predict_files(cases, args.output, continue_run=args.continue_run, progress=True)
    skipped = f", skipped {result['skipped']} already there (--continue)" if result["skipped"] else ""
    print(f"wrote {result['written']} prediction(s) to {result['out_dir']}{skipped}")
    if study is not None and config.output_format != "nifti":  # a DICOM-SEG or RTSTRUCT per case, back to the PACS
        stored = store_instances(study, [Path(result["out_dir"]) / f"{name}.dcm" for name, _ in cases])
        print(f"stored {stored} {config.output_format} object(s) to {study.label}")
    if args.report:
        report_after_predict(args, predictor, cases, Path(result["out_dir"]),
                             config.file_ending or predictor.plan.file_ending)
    return 0


def _folds_line(predictor: Any, requested: list[int] | str | None) -> str:
    """'using folds 0,1,2,3,4 (every trained fold; --folds to choose)', per configuration for an ensemble."""
    members = getattr(predictor, "members", None) or [predictor]
    parts = []
    for member in members:
        folds = [str(f) for f in member.folds] or ["?"]
        where = f" of {member.plan.configuration}" if len(members) > 1 else ""
        parts.append(f"fold{'s' if len(folds) > 1 else ''} {','.join(folds)}{where}")
    if requested is not None:
        return f"using {' and '.join(parts)}"
    why = "the only trained model, fold_all" if all(list(m.folds) == ["all"] for m in members) else "every trained fold"
    return f"using {' and '.join(parts)} ({why}; --folds to choose)"


def cmd_evaluate(args: argparse.Namespace) -> int:
    from voxseg.evaluate.folder import evaluate_folder, format_table

    if args.configurations is not None and not args.crossval:
        raise ConfigError("--configurations compares a work directory's configurations: add --crossval WORKDIR")
    if args.crossval and args.configurations is not None:
        from voxseg.crossval import choose_configuration, format_choice

        if args.configuration:
            raise ConfigError("--configuration evaluates one configuration, --configurations compares several: "
                              "give one of them")
        if args.report:
            raise ConfigError("--report with --configurations: write the report of one configuration "
                              "(--crossval WORKDIR --configuration NAME --report)")
        choice = choose_configuration(args.crossval, args.configurations, num_workers=args.workers,
                                      tolerance_mm=args.tolerance, convention=args.convention)
        print(format_choice(choice))
        print(f"chosen: {choice['choice']['name']}, postprocessing {choice['postprocessing']['largest_component']} "
              f"(saved to {WorkDir(args.crossval).inference_choice}; 'voxseg predict -m {args.crossval}' uses it)")
        return 0
    if args.crossval:
        from voxseg.crossval import describe_crossval, evaluate_crossval

        workdir = configuration_workdir(args.crossval, args.configuration)
        result = evaluate_crossval(workdir, num_workers=args.workers, tolerance_mm=args.tolerance,
                                   convention=args.convention)
        print(format_table(result.final_summary))
        print(describe_crossval(workdir, result))
        if args.report:
            report_after_crossval(args, workdir, result.final_summary)
        return 0
    if args.configuration:
        raise ConfigError("--configuration selects a work directory's configuration for --crossval WORKDIR")
    if not args.pred or not args.ref:
        raise ConfigError("evaluate needs PRED and REF folders, or --crossval WORKDIR")
    summary = evaluate_folder(
        args.pred, args.ref, dataset_json=args.dataset_json, tolerance_mm=args.tolerance, num_workers=args.workers,
        allow_missing=args.allow_missing, allow_undeclared=args.allow_undeclared_labels, convention=args.convention,
    )
    print(format_table(summary))
    if args.report:
        report_after_evaluate(args, summary)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from voxseg.infer.archive import export_archive

    if args.onnx is None and not args.archive and not args.format:
        raise ConfigError("export needs --onnx [FILE], --archive ZIP and/or --format nnunet OUT")
    if args.format and args.format[0] not in EXPORT_FORMATS:
        raise ConfigError(f"--format {args.format[0]}: unknown format; use {', '.join(EXPORT_FORMATS)} "
                          "(--format nnunet OUT)")
    workdir = configuration_workdir(args.workdir, args.configuration)
    chosen = folds(args.folds)
    if args.format:
        from voxseg.infer.nnunet_export import export_nnunet

        folder = export_nnunet(workdir, args.format[1], folds=chosen, checkpoint=args.checkpoint, force=args.force)
        print(f"wrote nnU-Net v2 model folder {folder}; predict with nnU-Net: nnUNetv2_predict_from_modelfolder "
              f"-m {folder} -i INPUT -o OUTPUT, or with voxseg: voxseg predict -m {folder} -i INPUT -o OUTPUT")
    if args.onnx is not None:
        _export_onnx(args, workdir, chosen)
    if args.archive:
        export_archive(workdir, args.archive, folds=chosen, checkpoint=args.checkpoint)
        print(f"wrote {args.archive}")
    return 0


def _export_onnx(args: argparse.Namespace, workdir: str, chosen: list[int] | str) -> None:
    """--onnx: every chosen fold to WORKDIR/training/fold_F/model.onnx; --onnx FILE: one fold to FILE."""
    from voxseg.infer.export import export_onnx, export_onnx_folds

    if not args.onnx:
        for fold, (path, diff) in export_onnx_folds(workdir, chosen, checkpoint=args.checkpoint).items():
            print(f"wrote {path} (fold {fold}; onnxruntime vs PyTorch max abs difference {diff:.2e})")
        print(f"predict with onnxruntime: voxseg predict -m {workdir} -i INPUT -o OUTPUT --backend onnxruntime "
              f"--folds {args.folds}" + ("" if args.checkpoint == "final" else f" --checkpoint {args.checkpoint}"))
        return
    if chosen != "all" and len(chosen) > 1:
        raise ConfigError(f"--onnx FILE exports one fold's network; got --folds {args.folds}. Give --onnx without a "
                          "file to export each fold into its folder (training/fold_F/model.onnx), or export each "
                          "fold to its own file (--folds 0 --onnx fold0.onnx, ...)")
    fold = chosen if chosen == "all" else chosen[0]
    diff = export_onnx(workdir, fold, args.onnx, checkpoint=args.checkpoint)
    print(f"wrote {args.onnx} (onnxruntime vs PyTorch max abs difference {diff:.2e}); predict with it: "
          f"voxseg predict -m {workdir} -i INPUT -o OUTPUT --onnx-model {args.onnx}")


def cmd_install(args: argparse.Namespace) -> int:
    from voxseg.infer.archive import install_archive

    path = install_archive(args.archive, args.target, force=args.force)
    print(f"installed model into {path}; predict with: voxseg predict -m {path} -i INPUT -o OUTPUT")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from voxseg.infer.verify import verify_model

    report = verify_model(args.model, write_weights=args.write_weights)
    print(report.text())
    report.check()
    return 0


def _predict_arguments(p: argparse.ArgumentParser) -> None:
    from voxseg.cli.derive import add_flags, as_text, config_options, flag_help
    from voxseg.infer.config import InferConfig

    p.add_argument("-m", "--model", required=True,
                   help="work directory with plans.json and training/fold_F, or an nnU-Net v2 trained-model folder "
                        "(<Trainer>__<Plans>__<configuration> with fold_X/checkpoint_final.pth)")
    p.add_argument("-i", "--input", required=True, nargs="+",
                   help="folder (nnU-Net or BraTS layout), channel files, a folder of DICOM files (one case per "
                        "study), or dicomweb://HOST:PORT/ROOT/studies/STUDY_UID (a study on a PACS)")
    p.add_argument("-o", "--output", required=True,
                   help="folder for the predictions, OUT/CASE{file ending} (OUT/CASE.dcm for DICOM outputs; created)")
    add_configuration_flag(p)
    p.epilog = (f"{p.epilog}\n\nEvery inference option has a flag: each sets one field of voxseg.infer.config."
                "InferConfig, the one home of its default and documentation (docs/INFERENCE.md).")
    options = config_options(InferConfig)
    add_flags(p, PREDICT_FLAGS, options)
    p.add_argument("--no-mirror", dest="mirror_axes", action="store_const", const="none", default=argparse.SUPPRESS,
                   help="no mirror test-time augmentation (the same as --mirror-axes none)")
    p.add_argument("--onnx-model", dest="onnx_files", nargs="+", metavar="FILE", default=argparse.SUPPRESS,
                   help=flag_help(options["onnx_files"]))
    # every field's default in the namespace, as text like a given value: the config is built from the flags alone
    p.set_defaults(**{name: as_text(option.default) for name, option in options.items()})
    p.add_argument("--continue", dest="continue_run", action="store_true", help="skip cases already predicted")
    add_channel_flags(p, "DICOM input")
    add_report_flag(p, "OUT/report.html; with --save-probabilities it shows the model's uncertainty; "
                       "--output-format nifti")


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("workdir", help="the trained work directory (or an installed model folder)")
    add_configuration_flag(p)
    p.add_argument("--onnx", nargs="?", const="", metavar="FILE",
                   help="export each chosen fold's network to ONNX (checked against PyTorch) as "
                        "WORKDIR/training/fold_F/model.onnx, where 'predict --backend onnxruntime' and archives "
                        "find it; with FILE, one fold's network to FILE (predict with --onnx-model FILE)")
    p.add_argument("--archive", metavar="ZIP",
                   help="write a shareable model archive: the chosen folds' weights, plans, dataset.json, "
                        "postprocessing.json and any training/fold_F/model.onnx ('voxseg install' unpacks it)")
    p.add_argument("--format", nargs=2, metavar=("FORMAT", "OUT"),
                   help="--format nnunet OUT: an nnU-Net v2 model folder (OUT/nnUNetTrainer__voxsegPlans__3d_fullres, "
                        "or OUT itself when named <Trainer>__<Plans>__<configuration>)")
    p.add_argument("--force", action="store_true", help="with --format: replace an existing model folder")
    p.add_argument("--folds", default="0",
                   help="0 | 0,1,2 | all (fold_all, else every trained fold): the folds to export (default 0)")
    _checkpoint_flag(p)


def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    from voxseg.evaluate.conventions import CONVENTIONS  # the evaluation package reads images: on first use
    from voxseg.evaluate.settings import EvaluationSettings

    p.add_argument("pred", nargs="?", help="folder of predicted label maps (not with --crossval)")
    p.add_argument("ref", nargs="?", help="folder of reference label maps with the same file names")
    p.add_argument("--dataset-json", metavar="FILE",
                   help="dataset.json with the labels (and regions) to score (default: REF/dataset.json or "
                        "REF/../dataset.json, the raw dataset's own)")
    defaults = EvaluationSettings()  # the one home of the evaluation defaults
    p.add_argument("--tolerance", type=float, default=defaults.tolerance_mm,
                   help=f"surface Dice tolerance in mm (default {defaults.tolerance_mm:g})")
    p.add_argument("--crossval", metavar="WORKDIR",
                   help="aggregate the folds' validation predictions and decide the postprocessing")
    add_configuration_flag(p)
    p.add_argument("--configurations", type=_configuration_names, nargs="?", const="all", metavar="all|NAME,NAME",
                   help="with --crossval: rank these configurations (all, the default when no value is given: "
                        "every one with all folds validated) "
                        "and their pair ensembles by cross-validation Dice, and save the best to "
                        "WORKDIR/inference_choice.json for 'voxseg predict'")
    p.add_argument("-j", "--workers", type=int, default=defaults.num_workers,
                   help=f"processes reading and scoring cases (default {defaults.num_workers})")
    p.add_argument("--convention", choices=list(CONVENTIONS), default=defaults.convention,
                   help="how a class absent from the reference is scored, to match another tool's numbers "
                        f"(default {defaults.convention}; see docs/INFERENCE.md)")
    p.add_argument("--allow-missing", action="store_true",
                   help="score the cases present on both sides and list missing/extra cases in summary.json "
                        "(default: an error)")
    p.add_argument("--allow-undeclared-labels", action="store_true",
                   help="list label values that dataset.json does not declare in summary.json (default: an error)")
    add_report_flag(p, "PRED/report.html; with --crossval WORKDIR/training/crossval/report.html")


def _configuration_names(value: str) -> str | list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    if value.strip() == "all":
        return "all"
    if not names or "all" in names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected 'all' or distinct configuration names like 3d_fullres,2d, "
                                         f"got '{value}'")
    return names


def add_infer_commands(sub: Subparsers) -> None:
    # predict reads InferConfig and export the checkpoint names (both import torch): set up on first use
    add_command(sub, "predict", cmd_predict,
                "segment images with a trained model (sliding window, mirroring, fold ensemble)",
                "voxseg predict -m work/synth -i data/Dataset001_Synth/imagesTs -o preds\n"
                "voxseg predict -m work/synth -i data/Dataset001_Synth/imagesTs -o preds_fold0 --folds 0\n"
                "voxseg predict -m work/synth -i case_0000.nii.gz case_0001.nii.gz -o preds --folds all --no-mirror\n"
                "voxseg predict -m work/synth -i imagesTs -o preds --folds 0,1 --backend onnxruntime"
                "  # after export --onnx\n"
                "voxseg predict -m work/synth -i imagesTs -o preds --step 0.25 --tile-batch 8 --amp bf16"
                " --mirror-axes 1,2\n"
                "voxseg predict -m work/liver -i /incoming/ct_study -o segs --output-format dicom-seg"
                "  # a DICOM folder\n"
                "voxseg predict -m work/synth -i /incoming/mr -o segs --channel 0='T1*' --channel 1='T1*GD*'"
                " --channel 2=T2 --channel 3=FLAIR\n"
                "voxseg predict -m work/liver -i dicomweb://pacs:8042/dicom-web/studies/1.2.3 -o segs"
                " --output-format dicom-seg  # SEG stored back",
                setup=_predict_arguments)
    add_command(sub, "evaluate", cmd_evaluate,
                "score predictions: Dice, IoU, HD95, surface Dice, volumes per label and region",
                "voxseg evaluate preds data/Dataset001_Synth/labelsTs"
                " --dataset-json data/Dataset001_Synth/dataset.json\n"
                "voxseg evaluate --crossval work/synth\n"
                "voxseg evaluate --crossval work/synth --configurations all", setup=_evaluate_arguments)

    add_command(sub, "export", cmd_export,
                "export a trained model to ONNX, a shareable archive and/or an nnU-Net v2 model folder",
                "voxseg export work/synth --onnx --folds 0,1\n"
                "voxseg export work/synth --onnx --archive model.zip --folds all\n"
                "voxseg export work/synth --format nnunet nnUNet_results/Dataset001_Synth --folds all",
                setup=_export_arguments)

    p = add_command(sub, "install", cmd_install, "install a model archive (never writes outside TARGET)",
                    "voxseg install model.zip models/synth")
    p.add_argument("archive", help="the model archive (.zip) written by 'voxseg export --archive'")
    p.add_argument("target", help="the model folder to install into (absent or empty, unless --force)")
    p.add_argument("--force", action="store_true",
                   help="replace a model already installed in TARGET (as a whole; default: refuse)")

    p = add_command(sub, "verify", cmd_verify,
                    "check a model (archive, model folder or nnU-Net model folder) and show where it came from",
                    "voxseg verify model.zip\n"
                    "voxseg verify models/synth\n"
                    "voxseg verify work/synth --write-weights   # folds trained before weights files existed")
    p.add_argument("model", help="a model archive (.zip), a work directory or installed model folder, or an "
                                 "nnU-Net v2 model folder")
    p.add_argument("--write-weights", action="store_true",
                   help="write model_TAG.safetensors from checkpoint_TAG.pt where a fold has none, or a stale one")

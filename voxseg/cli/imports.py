"""`voxseg import`: bring a model trained elsewhere (an nnU-Net v2 model folder) into a voxseg work directory."""
from __future__ import annotations

import argparse

from voxseg.cli.common import Subparsers, add_command, folds
from voxseg.errors import ConfigError
from voxseg.workdir import WorkDir


def _postprocessing_note(result) -> str:  # noqa: ANN001 - an ImportResult (torch is imported on first use only)
    """What happened to nnU-Net's postprocessing, and how to get voxseg's decision."""
    if result.postprocessing is not None:  # a folder voxseg exported: its decision came along
        from voxseg.infer.postprocess import describe_postprocessing
        from voxseg.plans import Plan

        plan = Plan.load(WorkDir(result.workdir).plans)
        decision = describe_postprocessing(result.postprocessing, plan.regions, plan.class_names)
        return (f"postprocessing: {decision} (voxseg's cross-validation decision, restored from the model folder's "
                f"voxseg_postprocessing.json into {WorkDir(result.workdir).postprocessing}; 'voxseg predict' applies "
                "it)")
    lines = []
    if result.ignored_pickles:
        names = ", ".join(str(p) for p in result.ignored_pickles)
        lines.append(f"note: {names} was not read: nnU-Net's postprocessing is a pickle, which voxseg never opens "
                     "(loading it could run code). voxseg decides its own postprocessing from the folds' "
                     "validation predictions instead.")
    if not result.validation_folds:
        lines.append("the model folder has no fold_X/validation predictions, so no postprocessing can be decided "
                     "from cross-validation; predictions are written without postprocessing.")
    elif not result.raw_dataset:
        lines.append(f"to decide the postprocessing from folds {','.join(result.validation_folds)}' validation "
                     f"predictions, import again with --dataset RAW (the raw dataset with labelsTr) and --crossval, "
                     "or set raw_dataset in plans.json and run: voxseg evaluate --crossval " + str(result.workdir))
    else:
        lines.append(f"decide the postprocessing with: voxseg evaluate --crossval {result.workdir} "
                     "(or import with --crossval)")
    return "\n".join(lines)


def cmd_import(args: argparse.Namespace) -> int:
    from voxseg.infer.nnunet_import import import_nnunet

    if args.crossval and not args.dataset:
        raise ConfigError("--crossval scores the folds' validation predictions against the raw dataset's labelsTr; "
                          "give it with --dataset RAW")
    result = import_nnunet(args.model, args.workdir, folds=args.folds, checkpoint=args.checkpoint, force=args.force,
                           raw_dataset=args.dataset)
    chosen = "" if result.checkpoint == "final" else f" --checkpoint {result.checkpoint}"
    print(f"imported {args.model} (folds {','.join(result.folds)}, checkpoint {result.checkpoint}) into "
          f"{result.workdir}; predict with: voxseg predict -m {result.workdir} -i INPUT -o OUTPUT --folds all{chosen}")
    if args.crossval and result.validation_folds:
        from voxseg.crossval import describe_crossval, evaluate_crossval
        from voxseg.evaluate.folder import format_table

        numbered = [int(f) for f in result.validation_folds if f.isdigit()]
        crossval = evaluate_crossval(result.workdir, folds=numbered, num_workers=args.workers)
        print(format_table(crossval.final_summary))
        print(describe_crossval(result.workdir, crossval))
        if result.ignored_pickles:
            print(f"note: {', '.join(str(p) for p in result.ignored_pickles)} was not read (a pickle, which voxseg "
                  "never opens); the decision above replaces it.")
    else:
        print(_postprocessing_note(result))
    return 0


def _import_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=["nnunet"], help="what MODEL is: nnunet (an nnU-Net v2 trained-model folder)")
    p.add_argument("model", help="the <Trainer>__<Plans>__<configuration> folder (with fold_X/checkpoint_final.pth)")
    p.add_argument("workdir", help="the voxseg work directory to write (absent or empty, unless --force)")
    p.add_argument("--folds", type=folds, default=None, help="0 | 0,1,2 | all (default: every fold_N)")
    p.add_argument("--checkpoint", choices=["final", "best"], default="final",
                   help="which checkpoint_NAME.pth of each fold (default final; written as checkpoint_NAME.pt)")
    p.add_argument("--dataset", metavar="RAW",
                   help="the raw dataset the model was trained on; its labelsTr scores --crossval")
    p.add_argument("--crossval", action="store_true",
                   help="after importing, evaluate the folds' validation predictions and decide the postprocessing "
                        "(needs --dataset)")
    p.add_argument("-j", "--workers", type=int, default=1, help="threads scoring cases for --crossval (default 1)")
    p.add_argument("--force", action="store_true", help="replace the contents of a non-empty WORKDIR as a whole")


def add_import_commands(sub: Subparsers) -> None:
    add_command(sub, "import", cmd_import,
                "turn a model trained elsewhere (an nnU-Net v2 model folder) into a voxseg work directory",
                "voxseg import nnunet nnUNet_results/Dataset001_X/nnUNetTrainer__nnUNetPlans__3d_fullres work/x\n"
                "voxseg import nnunet MODEL work/x --folds 0,1 --checkpoint best --force\n"
                "voxseg import nnunet MODEL work/x --dataset nnUNet_raw/Dataset001_X --crossval",
                setup=_import_arguments)

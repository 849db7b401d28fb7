"""Data commands: synth, convert, check, plan, preprocess."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from voxseg.cli.common import (
    Subparsers,
    add_command,
    add_configuration_flag,
    configuration_workdir,
    csv_floats,
    csv_ints,
    device,
    key_values,
    usable_device,
)
from voxseg.cli.dicom import add_channel_flags
from voxseg.data.plan_options import PlanOptions  # plain dataclass: no torch at parser build time
from voxseg.errors import ConfigError


def cmd_synth(args: argparse.Namespace) -> int:
    if args.kind == "ct":
        from voxseg.data.synth_ct import make_ct_dataset

        if args.regions or args.layout != "nnunet":
            raise ConfigError("--kind ct writes the nnU-Net layout with one label per class: leave out --regions and "
                              "--layout")
        path = make_ct_dataset(args.out, num_cases=args.cases, num_test=args.test_cases, shape=tuple(args.shape),
                               spacing=tuple(args.spacing or (2.5, 0.8, 0.8)), num_classes=args.classes or 41,
                               seed=args.seed)
    else:
        from voxseg.data.synth import make_synthetic_dataset

        if args.classes is not None:
            raise ConfigError("--classes sets the number of classes of --kind ct; the brain tumour data has 4")
        path = make_synthetic_dataset(
            args.out, num_cases=args.cases, num_test=args.test_cases, shape=tuple(args.shape),
            spacing=tuple(args.spacing or (1.0, 1.0, 1.0)), seed=args.seed, regions=args.regions, layout=args.layout,
        )
    print(f"wrote {args.cases} training and {args.test_cases} test cases to {path}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from voxseg.data import convert

    if args.format == "dicom":
        from voxseg.data.dicom_convert import convert_dicom
        from voxseg.data.dicom_studies import parse_channel_rules

        path, unannotated = convert_dicom(args.src, args.dst, parse_channel_rules(args.channel, args.channel_map))
        skipped = f" ({unannotated} stud{'y' if unannotated == 1 else 'ies'} without a DICOM-SEG not converted)" \
            if unannotated else ""
        print(f"converted {args.src} -> {path} (nnU-Net v2 layout){skipped}")
        return 0
    if args.channel or args.channel_map:
        raise ConfigError("--channel / --channel-map map DICOM series to channels: use them with 'convert dicom'")
    fn = convert.convert_brats if args.format == "brats" else convert.convert_msd
    path = fn(args.src, args.dst)
    print(f"converted {args.src} -> {path} (nnU-Net v2 layout)")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from voxseg.data.check import check_dataset

    report = check_dataset(args.dataset, num_workers=args.workers)
    # a failed check is an error: its report goes to stderr like every other error message
    print(report.format(), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1


def cmd_plan(args: argparse.Namespace) -> int:
    from voxseg.data.configs import describe_configurations
    from voxseg.data.plan import describe_plan, plan_dataset

    not_planned: dict[str, str] = {}
    plan = plan_dataset(
        args.dataset, args.output, gpu_memory_gb=args.gpu_memory, overrides=key_values(args.set),
        num_folds=args.folds, val_fraction=args.val_fraction, seed=args.seed, num_workers=args.workers,
        dims=2 if args.two_d else 3, cube_patch=args.cube_patch, notes=not_planned,
    )
    if args.calibrate:
        plan = _calibrate(args, plan)
    print(describe_plan(plan))
    print(f"wrote {args.output}/plans.json, fingerprint.json, splits.json, configurations.json")
    print("configurations (select one with --configuration NAME):")
    print(describe_configurations(args.output))
    for reason in not_planned.values():
        print(reason)
    return 0


def _calibrate(args: argparse.Namespace, plan: Any) -> Any:
    """`plan --calibrate`: fit the memory model to real steps on the CUDA device, plan again with it."""
    import torch

    if not torch.cuda.is_available():
        print("note: --calibrate needs a CUDA device and there is none here: nothing was measured, the memory "
              "model's formula is used as it is (plans.json: memory_calibration null)")
        return plan
    from voxseg.bench.calibrate import calibrate_workdir, cuda_measure, describe_calibration, device_name

    plan, calibration = calibrate_workdir(args.output, cuda_measure(), device_name(), overrides=key_values(args.set),
                                          dims=2 if args.two_d else 3, cube_patch=args.cube_patch)
    print(describe_calibration(calibration))
    return plan


def cmd_preprocess(args: argparse.Namespace) -> int:
    from voxseg.data.preprocess import preprocess_dataset

    stats = preprocess_dataset(configuration_workdir(args.workdir, args.configuration), num_workers=args.workers,
                               progress=not args.quiet, device=usable_device(args.device))
    print(
        f"preprocessed {stats['done']} cases, skipped {stats['skipped']} already done, "
        f"{stats['seconds']:.1f} s ({stats.get('cases_per_s', 0):.2f} cases/s)"
    )
    return 0


def _synth_and_convert(sub: Subparsers) -> None:
    p = add_command(sub, "synth", cmd_synth,
                    "write a synthetic dataset: brain-tumour-like MRI (nnU-Net or BraTS layout) or CT-like with many "
                    "classes",
                    "voxseg synth data/Dataset001_Synth --cases 20 --test-cases 5\n"
                    "voxseg synth data/brats --layout brats --shape 155,240,240\n"
                    "voxseg synth data/Dataset002_CT --kind ct --classes 41 --cases 4 --shape 300,512,512")
    p.add_argument("out", help="output dataset folder")
    p.add_argument("--cases", type=int, default=20, help="training cases (default 20)")
    p.add_argument("--test-cases", type=int, default=0, help="test cases in imagesTs/labelsTs (default 0)")
    p.add_argument("--shape", type=csv_ints, default=[64, 64, 64], help="D,H,W voxels (default 64,64,64)")
    p.add_argument("--spacing", type=csv_floats,
                   help="mm per voxel (default 1,1,1; for --kind ct 2.5,0.8,0.8)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same dataset (default 0)")
    p.add_argument("--kind", choices=["brain", "ct"], default="brain",
                   help="brain: 4-channel MRI-like brain tumour cases; ct: 1-channel CT-like cases (int16 Hounsfield "
                        "units) with one organ per class (default brain)")
    p.add_argument("--classes", type=int, help="with --kind ct: number of classes, background included (default 41)")
    p.add_argument("--regions", action="store_true", help="BraTS regions (whole tumour, core, enhancing) as labels")
    p.add_argument("--layout", choices=["nnunet", "brats"], default="nnunet",
                   help="nnunet: imagesTr/CASE_0000.nii.gz ... with dataset.json; brats: one folder per case with "
                        "CASE_t1, _t1ce, _t2, _flair, _seg files (default nnunet)")

    p = add_command(sub, "convert", cmd_convert,
                    "convert a BraTS 2021 folder, a Decathlon task or DICOM series with their DICOM-SEG to the "
                    "nnU-Net v2 layout",
                    "voxseg convert brats /data/BraTS2021_TrainingData data/Dataset137_BraTS\n"
                    "voxseg convert msd /data/Task01_BrainTumour data/Dataset001_BrainTumour\n"
                    "voxseg convert dicom /data/liver_export data/Dataset050_Liver\n"
                    "voxseg convert dicom /data/mr_export data/Dataset051_Brain --channel 0=T1* --channel 1=FLAIR*")
    p.add_argument("format", choices=["brats", "msd", "dicom"],
                   help="brats: a BraTS 2021 training folder (one folder per case); msd: a Medical Segmentation "
                        "Decathlon task folder (TaskNN_Name with dataset.json); dicom: a folder of DICOM image "
                        "series with one DICOM-SEG per study (each SEG is a training case)")
    p.add_argument("src", help="the folder to convert")
    p.add_argument("dst", help="the nnU-Net v2 dataset folder to write, e.g. data/Dataset137_BraTS")
    add_channel_flags(p, "dicom", default="the series the SEG references")


def add_data_commands(sub: Subparsers) -> None:
    _synth_and_convert(sub)
    p = add_command(sub, "check", cmd_check,
                    "check a dataset's integrity (files, channels, shapes, geometry, labels, NaN)",
                    "voxseg check data/Dataset001_Synth -j 2")
    p.add_argument("dataset", help="the raw dataset folder (nnU-Net v2 layout, with dataset.json)")
    p.add_argument("-j", "--workers", type=int, default=1, help="processes reading cases (default 1)")

    p = add_command(sub, "plan", cmd_plan,
                    "check, fingerprint and plan a dataset: writes plans.json, fingerprint.json, splits.json",
                    "voxseg plan data/Dataset001_Synth -o work/synth --gpu-memory 8\n"
                    "voxseg plan data/brats -o work/brats --set batch_size=4 --set network.residual=true "
                    "--val-fraction 0.2")
    p.add_argument("dataset", help="the raw dataset folder (nnU-Net v2 layout, with dataset.json)")
    p.add_argument("-o", "--output", required=True, help="work directory")
    defaults = PlanOptions()  # the one home of the planning defaults
    p.add_argument("--gpu-memory", type=float, default=defaults.gpu_memory_gb,
                   help=f"GPU memory budget in GB (default {defaults.gpu_memory_gb:g})")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a plan field (repeatable)")
    p.add_argument("--folds", type=int, default=defaults.num_folds,
                   help=f"cross-validation folds (default {defaults.num_folds})")
    p.add_argument("--val-fraction", type=float, default=None, help="single train/val split instead of folds, e.g. 0.2")
    p.add_argument("--seed", type=int, default=defaults.seed,
                   help=f"random seed of the folds (default {defaults.seed})")
    p.add_argument("--2d", dest="two_d", action="store_true",
                   help="plan only the 2d configuration, as the default (plans.json)")
    p.add_argument("--cube-patch", action="store_true",
                   help="3D patches tend to a cube in mm (shrink the longest axis in mm) instead of following the "
                        "median case's aspect ratio")
    p.add_argument("--calibrate", action="store_true",
                   help="fit the memory model to a few real training steps on this machine's CUDA GPU and plan "
                        "patch and batch with it (without a GPU the formula is used as it is, and said so)")
    p.add_argument("-j", "--workers", type=int, default=defaults.num_workers,
                   help=f"processes reading cases for the fingerprint (default {defaults.num_workers})")

    p = add_command(sub, "preprocess", cmd_preprocess,
                    "crop, resample and normalise every case into the fast case store",
                    "voxseg preprocess work/synth -j 2\nvoxseg preprocess work/synth --configuration 2d")
    p.add_argument("workdir", help="the work directory written by 'voxseg plan'")
    add_configuration_flag(p)
    p.add_argument("-j", "--workers", type=int, default=1, help="processes preprocessing cases (default 1)")
    p.add_argument("--device", type=device, default="cpu", help="cpu or cuda (resampling on the GPU) (default cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

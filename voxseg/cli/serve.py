"""`voxseg serve`: one model kept loaded behind an HTTP API and a viewer page (`voxseg.serve`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from voxseg.cli.common import Subparsers, add_command, folds, usable_device
from voxseg.errors import ConfigError

__all__ = ["add_serve_command"]

MEBIBYTE = 1 << 20


def cmd_serve(args: argparse.Namespace) -> int:
    from voxseg.serve import require_serve_extra

    require_serve_extra()  # before the model is loaded
    from voxseg.infer.config import InferConfig
    from voxseg.serve.app import ServeSettings
    from voxseg.serve.server import read_token, run_server
    from voxseg.serve.uploads import UploadLimits

    for flag, value in (("--max-queue", args.max_queue), ("--max-upload-mb", args.max_upload_mb),
                        ("--max-voxels", args.max_voxels), ("--port", args.port)):
        if value < 1:
            raise ConfigError(f"{flag} {value}: give a positive number")
    if args.keep_hours <= 0:
        raise ConfigError(f"--keep-hours {args.keep_hours}: give a positive number of hours")
    upload_bytes = int(args.max_upload_mb * MEBIBYTE)
    limits = UploadLimits(max_upload_bytes=upload_bytes, max_voxels=args.max_voxels,
                          max_unzipped_bytes=max(4 * upload_bytes, args.max_voxels * 8))
    settings = ServeSettings(Path(args.jobs_dir), read_token(args.token_file), args.max_queue, limits,
                             args.keep_hours * 3600.0)
    config = InferConfig(device=usable_device(args.device), folds=args.folds)
    run_server(args.model, settings, config, args.host, args.port)
    return 0


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a work directory, an installed model folder, an nnU-Net v2 model folder, or a "
                                 "model archive (.zip, installed into the jobs folder)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface, "
                        "behind a token and TLS)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--device", default="auto",
                   help="compute device: auto (a GPU when present), cpu, cuda, cuda:1 (default auto)")
    p.add_argument("--folds", type=folds, default=None, help="folds to load, e.g. 0 or 0,1,2 or all (default: "
                                                             "every trained fold)")
    p.add_argument("--jobs-dir", default="voxseg-jobs", metavar="DIR",
                   help="folder of the jobs, their uploads and results; a restarted server lists its finished jobs "
                        "and runs its unfinished ones again (default ./voxseg-jobs)")
    p.add_argument("--token-file", metavar="FILE",
                   help="file holding a bearer token every API request must send (default: no token)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="jobs queued or running at once; more are refused with 503 and Retry-After (default 64)")
    p.add_argument("--max-upload-mb", type=float, default=1024.0, help="largest upload in MiB (default 1024)")
    p.add_argument("--max-voxels", type=int, default=1 << 28,
                   help="largest image, in voxels per channel, read from its header before decoding "
                        "(default 268435456, 2^28)")
    p.add_argument("--keep-hours", type=float, default=24.0,
                   help="hours a finished job and its result are kept (default 24)")


def add_serve_command(sub: Subparsers) -> None:
    add_command(sub, "serve", cmd_serve,
                "serve a model over HTTP: job queue, synchronous segment call, metrics and a viewer page",
                "voxseg serve work/synth\n"
                "voxseg serve model.zip --port 8080 --jobs-dir /var/lib/voxseg/jobs --token-file token\n"
                "curl -F files=@case_0000.nii.gz http://127.0.0.1:8000/v1/segment -o case_seg.nii.gz",
                setup=_serve_arguments)

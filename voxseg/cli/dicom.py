"""DICOM on the command line: the --channel / --channel-map rules (predict, convert dicom) and predict's cases of a
DICOM folder."""
from __future__ import annotations

import argparse
from typing import Any

from voxseg.errors import ConfigError

__all__ = ["add_channel_flags", "input_cases"]


def add_channel_flags(p: argparse.ArgumentParser, what: str, default: str = "") -> None:
    """--channel INDEX=PATTERN (repeatable) and --channel-map FILE; `what` starts their help ("DICOM input"),
    `default` says what happens without them."""
    p.add_argument("--channel", action="append", metavar="INDEX=PATTERN",
                   help=f"{what}: the series of channel INDEX, matched on SeriesDescription (case-insensitive, "
                        "wildcards * ?) or a SeriesInstanceUID, e.g. --channel 0=T1 --channel 1=FLAIR (repeatable"
                        f"{'; default: ' + default if default else ''})")
    p.add_argument("--channel-map", metavar="FILE",
                   help=f'{what}: the channel rules as a JSON object, e.g. {{"0": "T1", "1": "FLAIR"}}')


def input_cases(args: argparse.Namespace, plan: Any, inputs: list[str]) -> list:
    """The cases of predict -i: a DICOM folder (one case per study, --channel rules) or image files
    (`find_input_cases`)."""
    from voxseg.data.dicom_studies import parse_channel_rules
    from voxseg.infer.dicom_cases import dicom_input_cases, looks_like_dicom_input
    from voxseg.infer.predictor import find_input_cases

    rules = parse_channel_rules(args.channel, args.channel_map)
    if looks_like_dicom_input(inputs):
        cases = dicom_input_cases(inputs[0], plan, rules)
        for name, channels in cases:  # which series became which channel: never a silent choice
            print(f"case {name}: " + ", ".join(f"channel {c} = '{s.description}' ({s.modality}, {len(s.frames)} "
                                               f"images, series {s.uid})" for c, s in enumerate(channels)))
        return cases
    if rules:
        raise ConfigError("--channel / --channel-map map DICOM series to channels; -i gives no DICOM folder")
    return find_input_cases(inputs, plan.num_channels, plan.file_ending)

"""Cross-validation: what the trained folds' validation predictions decide.

- `evaluate_crossval` (`voxseg.crossval.folds`): one configuration's folds evaluated together, and the
  largest-component postprocessing kept where it raised their Dice (`voxseg evaluate --crossval WORKDIR`).
- `choose_configuration` (`voxseg.crossval.choice`): every trained configuration and pair ensemble ranked by
  cross-validation Dice, the winner saved as WORKDIR/inference_choice.json for `voxseg predict`
  (`voxseg evaluate --crossval WORKDIR --configurations all`).

It sits above evaluation and inference (it scores with `voxseg.evaluate.workdir` and decides with
`voxseg.infer.postprocess` / `voxseg.infer.ensemble`) and below the command line.

Example:
    >>> from voxseg.crossval import choose_configuration, evaluate_crossval
    >>> evaluate_crossval("work/synth").final_summary["foreground_mean"]["dice"]
    >>> choose_configuration("work/synth", "all")["choice"]["name"]
"""
from voxseg.crossval.choice import choose_configuration, format_choice
from voxseg.crossval.folds import CrossvalResult, describe_crossval, evaluate_crossval

__all__ = ["CrossvalResult", "choose_configuration", "describe_crossval", "evaluate_crossval", "format_choice"]

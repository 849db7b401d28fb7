"""Training recipes: named presets of config overrides (`voxseg train WORKDIR --recipe fast`).

A recipe is a list of dotted `section.field=value` overrides, applied to the config before any other flag, so
`--recipe fast --lr 1e-3` is the fast recipe with a different learning rate. Recipes set every value they
depend on (not only the ones that differ from the defaults), so a recipe applied on top of a saved config.json
gives the same run as on top of the defaults.

Recipes:
    nnunet: nnU-Net v2's default trainer (the config defaults): SGD with Nesterov momentum 0.99, lr 1e-2,
        poly decay (exponent 0.9), 1000 epochs x 250 iterations. Robust and well understood, but slow: the
        high momentum and the poly schedule keep the lr near its peak for most of the run, so the network
        only settles at the very end and nearly every epoch of the 1000 is needed.
    fast: fewer iterations to the same accuracy. AdamW reaches a good region in far fewer steps than SGD
        for 3D U-Nets with instance normalisation (per-parameter step sizes suit the very different gradient
        scales of encoder, decoder and deep-supervision heads); a short linear warm-up keeps Adam's first,
        poorly estimated second moments from taking large steps from the random initialisation; a cosine
        decay spends the last part of the run at a small lr, where the Dice gains of annealing happen, and
        lets the whole run be a quarter as long. See benchmarks/recipe_curve.py for the measurement.

Batch size and patch size are not part of any recipe: the planner sizes them to the GPU's memory, and a
recipe cannot know how much memory is left (raise them with `--batch-size` where memory allows).

Example:
    >>> config = apply_recipe(TrainConfig(), "fast")
    >>> config.optim.name, config.schedule.name
    ('adamw', 'cosine')
"""
from __future__ import annotations

from voxseg.config import TrainConfig, apply_overrides
from voxseg.errors import ConfigError
from voxseg.registry import unknown_name_message

RECIPES: dict[str, list[str]] = {
    "nnunet": [
        "optim.name=sgd",
        "optim.lr=1e-2",
        "optim.momentum=0.99",  # nnU-Net's heavy Nesterov momentum
        "optim.nesterov=true",
        "optim.weight_decay=3e-5",
        "schedule.name=poly",
        "schedule.exponent=0.9",  # lr * (1 - epoch/epochs)^0.9
        "schedule.warmup_epochs=0",
        "schedule.min_lr=0",
        "loop.epochs=1000",
        "data.iterations_per_epoch=250",
    ],
    "fast": [
        "optim.name=adamw",
        # peak lr: 1e-3..3e-3 is the stable range for Adam on 3D U-Nets with instance norm; the warm-up
        # makes the upper end safe, and higher peaks learn faster in a short run
        "optim.lr=2e-3",
        "optim.betas=[0.9,0.999]",
        # decoupled decay: with instance norm it mostly keeps weight norms in check; 1e-4 is small enough
        # not to fight the short schedule
        "optim.weight_decay=1e-4",
        "schedule.name=cosine",
        # ~4% of the run: Adam's second-moment estimates are poor for the first few hundred steps
        "schedule.warmup_epochs=10",
        "schedule.min_lr=1e-5",  # the final epochs still move the weights, nothing is wasted at lr 0
        "loop.epochs=250",  # a quarter of nnU-Net's 1000 epochs
        "data.iterations_per_epoch=250",
    ],
}


def recipe_names() -> list[str]:
    return list(RECIPES)


def recipe_overrides(name: str) -> list[str]:
    """The dotted overrides of recipe `name` (a copy); an unknown name raises ConfigError naming the valid ones."""
    if name not in RECIPES:
        raise ConfigError("--recipe: " + unknown_name_message("recipe", name, recipe_names()))
    return list(RECIPES[name])


def apply_recipe(config: TrainConfig, name: str) -> TrainConfig:
    """A copy of `config` with recipe `name` applied (validated like any override)."""
    return apply_overrides(config, recipe_overrides(name))

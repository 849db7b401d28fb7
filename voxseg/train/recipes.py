"""Training recipes: named presets of config overrides (`voxseg train WORKDIR --recipe fast`).

A recipe is a list of dotted `section.field=value` overrides, applied to the config before any other flag, so
`--recipe fast --lr 1e-3` is the fast recipe with a different learning rate. Recipes set every value they
depend on (not only the ones that differ from the defaults), so a recipe applied on top of a saved config.json
gives the same run as on top of the defaults.

Recipes:
    nnunet: nnU-Net v2's default trainer (the config defaults): SGD with Nesterov momentum 0.99, lr 1e-2,
        poly decay (exponent 0.9), 1000 epochs x 250 iterations. Robust and well understood, but slow: the
        poly decay is nearly linear (half the peak lr half-way through), so the network settles only in the
        last part of the run and nearly all of the 1000 epochs are needed.
    fast: fewer iterations to the same accuracy. AdamW (lr 3e-3) makes progress in far fewer steps than SGD
        on 3D U-Nets with instance normalisation (per-parameter step sizes suit the very different gradient
        scales of encoder, decoder and deep-supervision heads); a short linear warm-up keeps Adam's first,
        poorly estimated second moments from taking large steps from the random initialisation; a cosine
        decay spends the last part of the run at a small lr, where the Dice gains of annealing happen. The
        run is a quarter as long: 250 epochs. Measured with benchmarks/recipe_curve.py (Dice versus
        wall-clock time against nnunet; results in BENCHMARKS.md).

Batch size, patch size and patches per case are not part of any recipe: the planner sizes batch and patch to
the GPU's memory, which a recipe cannot know (raise them with `--batch-size` where memory allows), and
`data.num_samples` changes how fast batches are made, not how the network learns.

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
        # peak lr: 1e-3..3e-3 is the range where Adam trains 3D U-Nets with instance norm stably; the warm-up
        # makes the upper end safe, and it learned fastest in benchmarks/recipe_curve.py (1e-3 < 2e-3 < 3e-3;
        # 5e-3 was better still in that 200-step miniature, but short runs favour large steps, so we stop at 3e-3)
        "optim.lr=3e-3",
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

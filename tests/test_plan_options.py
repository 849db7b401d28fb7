"""plan validates every option before it writes anything: a refused run leaves no plans.json or fingerprint."""
from __future__ import annotations

import pytest

from voxseg.data.plan import plan_dataset
from voxseg.data.synth import make_synthetic_dataset
from voxseg.errors import ConfigError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("raw") / "Dataset001_Syn", num_cases=3,
                                  shape=(16, 16, 16), seed=1)


@pytest.mark.parametrize("options, words", [
    ({"num_folds": 0}, "num_folds=0"),
    ({"num_folds": 100}, "cannot be split into 100 folds"),
    ({"val_fraction": 1.5}, "val_fraction=1.5"),
    ({"val_fraction": 0.0}, "val_fraction=0.0"),
    ({"gpu_memory_gb": 0}, "gpu_memory_gb=0"),
    ({"gpu_memory_gb": -4.0}, "gpu_memory_gb=-4.0"),
    ({"overrides": {"gpu_memory_gb": -1}, "num_folds": 2}, "gpu_memory_gb=-1"),
])
def test_a_refused_option_writes_nothing(dataset, tmp_path, options, words):
    workdir = tmp_path / "work"
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        plan_dataset(dataset, workdir, **options)
    assert not workdir.exists() or sorted(p.name for p in workdir.iterdir()) == []


def test_a_workdir_that_is_a_file_is_a_clear_error(dataset, tmp_path):
    (tmp_path / "work").write_text("not a folder")
    with pytest.raises(ConfigError, match="plan -o .*work: exists and is a file"):
        plan_dataset(dataset, tmp_path / "work")

"""Train/validation splits: k-fold and fraction splits, splits.json round trip, get_fold checks."""
from __future__ import annotations

import json

import numpy as np
import pytest

from voxseg.data.splits import (
    get_fold,
    load_splits,
    make_fraction_split,
    make_kfold_splits,
    save_splits,
    trained_folds,
)
from voxseg.errors import ConfigError
from voxseg.workdir import WorkDir

NAMES = [f"case_{i:03d}" for i in range(23)]


def test_kfold_every_case_validated_exactly_once():
    splits = make_kfold_splits(NAMES, num_folds=5, seed=1)
    assert len(splits) == 5
    val_all = [n for s in splits for n in s["val"]]
    assert sorted(val_all) == sorted(NAMES)  # exactly once each
    sizes = [len(s["val"]) for s in splits]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 23
    for split in splits:
        assert not set(split["train"]) & set(split["val"])
        assert sorted(split["train"] + split["val"]) == sorted(NAMES)


def test_kfold_is_seeded_and_order_independent():
    a = make_kfold_splits(NAMES, 5, seed=7)
    b = make_kfold_splits(list(reversed(NAMES)), 5, seed=7)
    c = make_kfold_splits(NAMES, 5, seed=8)
    assert a == b
    assert a != c
    # the shuffle actually shuffles: fold 0 differs between seeds
    assert len({tuple(make_kfold_splits(NAMES, 5, seed=s)[0]["val"]) for s in range(5)}) > 1


def test_kfold_rejects_too_few_cases():
    with pytest.raises(ConfigError, match="3 case\\(s\\) cannot be split into 5 folds"):
        make_kfold_splits(NAMES[:3], num_folds=5)
    with pytest.raises(ConfigError, match="at least 2 folds"):
        make_kfold_splits(NAMES, num_folds=1)


def test_fraction_split_sizes():
    (split,) = make_fraction_split(NAMES, 0.2, seed=3)
    assert len(split["val"]) == round(0.2 * 23) == 5
    assert sorted(split["train"] + split["val"]) == sorted(NAMES)
    (tiny,) = make_fraction_split(NAMES[:2], 0.01, seed=3)
    assert len(tiny["val"]) == 1 and len(tiny["train"]) == 1
    with pytest.raises(ConfigError, match="val_fraction"):
        make_fraction_split(NAMES, 1.5)


def test_save_load_and_get_fold(tmp_path):
    splits = make_kfold_splits(NAMES, 4, seed=0)
    save_splits(tmp_path, splits)
    assert load_splits(tmp_path) == splits
    train, val = get_fold(tmp_path, 2, available=NAMES)
    assert val == sorted(splits[2]["val"]) and train == sorted(splits[2]["train"])
    assert get_fold(tmp_path, "2", available=NAMES) == (train, val)  # CLI passes strings
    train_all, val_all = get_fold(tmp_path, "all", available=NAMES)
    assert train_all == val_all == sorted(NAMES)


def test_fold_out_of_range_says_how_many(tmp_path):
    save_splits(tmp_path, make_kfold_splits(NAMES, 5))
    with pytest.raises(ConfigError, match="has 5 fold\\(s\\); use 0..4"):
        get_fold(tmp_path, 5)
    with pytest.raises(ConfigError, match="not a fold index"):
        get_fold(tmp_path, "first")


def test_custom_split_respected_and_checked(tmp_path):
    custom = [{"train": ["a", "b"], "val": ["c"]}]
    (tmp_path / "splits.json").write_text(json.dumps(custom))
    assert get_fold(tmp_path, 0, available=["a", "b", "c", "d"]) == (["a", "b"], ["c"])
    with pytest.raises(ConfigError, match="do not exist: c"):
        get_fold(tmp_path, 0, available=["a", "b"])


def test_unknown_names_found_from_preprocessed_dir(tmp_path):
    (tmp_path / "splits.json").write_text(json.dumps([{"train": ["a", "typo"], "val": ["b"]}]))
    pre = tmp_path / "preprocessed"
    pre.mkdir()
    for name in ("a", "b"):
        np.save(pre / f"{name}.npy", np.zeros(1))
        np.save(pre / f"{name}_seg.npy", np.zeros(1))
    with pytest.raises(ConfigError, match="typo"):
        get_fold(tmp_path, 0)
    # without any list of cases the split is taken as is
    (tmp_path / "splits.json").write_text(json.dumps([{"train": ["a"], "val": ["b"]}]))
    assert get_fold(tmp_path, 0) == (["a"], ["b"])


def test_malformed_or_missing_splits(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_splits(tmp_path)
    (tmp_path / "splits.json").write_text('{"train": []}')
    with pytest.raises(ConfigError, match="non-empty list"):
        load_splits(tmp_path)
    (tmp_path / "splits.json").write_text('[{"train": ["a"], "validation": ["b"]}]')
    with pytest.raises(ConfigError, match="exactly the keys"):
        load_splits(tmp_path)
    (tmp_path / "splits.json").write_text("[{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_splits(tmp_path)


def test_trained_folds_counts_numbered_fold_folders_or_those_with_the_checkpoint(tmp_path):
    assert trained_folds(tmp_path) == [] and trained_folds(tmp_path, "final") == []  # no training/ yet
    for fold in (10, 2, 0):
        WorkDir(tmp_path).fold(fold).path.mkdir(parents=True)
    (WorkDir(tmp_path).fold(0).path / "checkpoint_final.pt").write_bytes(b"")
    (WorkDir(tmp_path).fold(10).path / "checkpoint_final.pt").write_bytes(b"")
    (WorkDir(tmp_path).fold(10).path / "checkpoint_best.pt").write_bytes(b"")
    WorkDir(tmp_path).fold("all").path.mkdir()
    (WorkDir(tmp_path).fold("all").path / "checkpoint_final.pt").write_bytes(b"")
    WorkDir(tmp_path).fold("x1").path.mkdir()
    (WorkDir(tmp_path).training / "fold_5").write_text("a file, not a fold folder")
    assert trained_folds(tmp_path) == [0, 2, 10]  # numeric order; fold_all, fold_x1 and files left out
    assert trained_folds(tmp_path, "final") == [0, 10]
    assert trained_folds(tmp_path, "best") == [10]
    assert trained_folds(tmp_path, "latest") == []


def test_archive_keeps_the_trained_folds_name():
    from voxseg.infer import archive

    assert archive.trained_folds is trained_folds

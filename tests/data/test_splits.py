"""imta_fast/data/splits.py: the seeded, persisted, hashed train / hold-out split (docs/method.md §9.1 item 7)."""
import hashlib
import json

import pytest
import torch

from imta_fast.data.errors import DataError
from imta_fast.data.splits import load_or_create_split, load_split, make_split, save_split


def test_split_partitions_the_training_indices_and_is_seeded():
    s = make_split(100, 20, seed=3, dataset="cifar10")
    assert len(s.train_indices) == 80 and len(s.holdout_indices) == 20
    assert sorted(s.train_indices + s.holdout_indices) == list(range(100))
    # The hold-out is the tail of a seeded randperm (the reference's rule), from a local generator.
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(3)).tolist()
    assert list(s.holdout_indices) == perm[80:] and list(s.train_indices) == perm[:80]
    assert make_split(100, 20, seed=4).holdout_indices != s.holdout_indices
    assert len(s.sha256) == 64


def test_split_ignores_and_preserves_the_global_rng():
    torch.manual_seed(0)
    a = make_split(50, 10, seed=1)
    torch.manual_seed(999)
    torch.rand(7)  # e.g. a bigger model consumed random numbers first (the reference's bug)
    state = torch.get_rng_state()
    b = make_split(50, 10, seed=1)
    assert a == b and torch.equal(state, torch.get_rng_state())


def test_created_once_then_reloaded_even_with_another_seed(tmp_path):
    path = tmp_path / "run" / "split.json"
    s = load_or_create_split(path, 40, 8, seed=0, dataset="mnist")
    data = json.loads(path.read_text())
    assert data["format"] == "imta_fast.split/v1" and data["sha256"] == s.sha256
    assert data["holdout_indices"] == list(s.holdout_indices) and data["seed"] == 0
    assert load_or_create_split(path, 40, 8, seed=123, dataset="mnist") == s  # stage 2 / resume
    assert load_or_create_split(path, 40, None, seed=0) == s  # evaluation: take the file's size
    assert load_split(path) == s
    assert [p.name for p in path.parent.iterdir()] == ["split.json"]  # no temp file left behind


def test_in_memory_only_when_save_is_false(tmp_path):
    path = tmp_path / "split.json"
    load_or_create_split(path, 40, 8, seed=0, save=False)
    assert not path.exists()


@pytest.mark.parametrize("kwargs, problem", [
    (dict(num_train=41, holdout_size=8, dataset="mnist"), "num_train 40 != 41"),
    (dict(num_train=40, holdout_size=9, dataset="mnist"), "holdout_size 8 != 9"),
    (dict(num_train=40, holdout_size=8, dataset="cifar10"), "dataset 'mnist' != 'cifar10'"),
])
def test_a_split_file_for_another_setup_is_rejected(tmp_path, kwargs, problem):
    path = tmp_path / "split.json"
    load_or_create_split(path, 40, 8, seed=0, dataset="mnist")
    with pytest.raises(DataError, match=f"split file '{path}' is for another setup") as exc:
        load_or_create_split(path, seed=0, **kwargs)
    assert problem in str(exc.value)


def _rehash(d):
    """The documented hash rule: sha256 of the canonical JSON of every field but sha256."""
    d.pop("sha256")
    d["sha256"] = hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_hash_follows_the_documented_rule(tmp_path):
    path = tmp_path / "split.json"
    save_split(make_split(30, 5, seed=2, dataset="digits"), path)
    data = json.loads(path.read_text())
    stored = data["sha256"]
    _rehash(data)
    assert data["sha256"] == stored


def _edit(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_corrupted_files_are_rejected(tmp_path):
    path = tmp_path / "split.json"
    s = load_or_create_split(path, 40, 8, seed=0)
    good = path.read_text()
    # One index moved from hold-out to train: the hash no longer matches.
    _edit(path, lambda d: d["train_indices"].append(d["holdout_indices"].pop()))
    with pytest.raises(DataError, match=f"corrupt split file '{path}': sha256 does not match its content"):
        load_or_create_split(path, 40, 8, seed=0)
    # A consistent hash over nonsense indices (a duplicate) is still caught.
    path.write_text(good)
    _edit(path, lambda d: (d["holdout_indices"].__setitem__(0, d["train_indices"][0]), _rehash(d)))
    with pytest.raises(DataError, match="indices do not partition range\\(40\\)"):
        load_split(path)
    path.write_text(good[: len(good) // 2])
    with pytest.raises(DataError, match=f"corrupt split file '{path}'"):
        load_split(path)
    path.write_text("[1, 2]")
    with pytest.raises(DataError, match="not an imta_fast.split/v1 file"):
        load_split(path)
    assert s.sha256  # the original was fine


def test_size_errors(tmp_path):
    with pytest.raises(DataError, match="hold-out size 10 must be in \\[0, 10\\)"):
        make_split(10, 10, seed=0, dataset="digits")
    with pytest.raises(DataError, match="empty split: no training images"):
        make_split(0, 0, seed=0)
    assert make_split(10, 0, seed=0).holdout_indices == ()
    with pytest.raises(DataError, match=f"split file not found: '{tmp_path / 'nope.json'}'"):
        load_or_create_split(tmp_path / "nope.json", 10, None, seed=0)

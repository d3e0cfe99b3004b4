from __future__ import annotations

import pytest

from intq.models.sst2 import load_sst2, sst2_path


def test_dev_split_ships_with_intq():
    sentences, labels = load_sst2("dev")
    assert len(sentences) == len(labels) == 872
    assert int((labels == 1).sum()) == 444 and int((labels == 0).sum()) == 428
    assert sentences[0] == "it 's a charming and often affecting journey ."
    assert all(s and s == s.strip() for s in sentences)


def test_train_split_from_the_shared_folder():
    # CI runs with ../shared beside the checkout: a missing train split is a failure, not a skip
    assert sst2_path("train").is_file(), f"SST-2 train split not found at {sst2_path('train')}"
    sentences, labels = load_sst2("train")
    assert len(sentences) == len(labels) == 67_349
    assert set(labels.tolist()) == {0, 1}


def test_train_split_from_env_var_and_path(tmp_path, monkeypatch):
    folder = tmp_path / "data" / "sst2"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text("text\tlabel\ngreat fun \t1\ndull\t0\n", encoding="utf-8")
    monkeypatch.setenv("INTQ_SHARED", str(tmp_path))
    sentences, labels = load_sst2("train")
    assert sentences == ["great fun", "dull"] and labels.tolist() == [1, 0]
    assert load_sst2("train", path=folder / "train.tsv")[0] == sentences


def test_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("INTQ_SHARED", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="set INTQ_SHARED"):
        load_sst2("train")
    with pytest.raises(ValueError, match="Unknown SST-2 split 'test'"):
        load_sst2("test")
    bad = tmp_path / "bad.tsv"
    bad.write_text("text\tlabel\nno label here\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        load_sst2("dev", path=bad)

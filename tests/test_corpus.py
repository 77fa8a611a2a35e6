"""The shipped text: a fixed extract of Python's documentation, split three ways and kept apart."""

import hashlib
import sys
from importlib import resources

import pytest

from kqv import corpus


def data_file(name):
    return resources.files("kqv").joinpath("data", name)


def test_every_shipped_file_has_its_recorded_hash():
    for name, digest in corpus.SHA256.items():
        assert hashlib.sha256(data_file(name).read_bytes()).hexdigest() == digest, name


@pytest.mark.skipif(sys.version.split()[0] != corpus.BUILT_WITH,
                    reason=f"the extract comes from Python {corpus.BUILT_WITH}'s documentation")
def test_the_build_reproduces_the_shipped_files(tmp_path):
    assert corpus.build(tmp_path) == corpus.SHA256


def test_the_splits_are_large_and_in_the_stated_shares():
    sizes = {split: len(corpus.text(split)) for split in corpus.SPLITS}
    total = sum(sizes.values())
    assert total > 2_000_000                                  # about 600,000 SmolLM2 tokens
    assert 0.09 <= sizes["eval"] / total < 0.12               # whole documents: near 10% and 5%
    assert 0.04 <= sizes["validation"] / total < 0.07
    assert all(len(corpus.documents(split)) > 20 for split in corpus.SPLITS)


def test_no_long_paragraph_is_in_two_splits():
    seen = {}
    for split in corpus.SPLITS:
        for doc in corpus.documents(split):
            for para in doc.split("\n\n"):
                key = " ".join(para.split())
                if len(key) >= 64:
                    assert seen.setdefault(key, split) == split, (key[:60], seen[key], split)


def test_the_licence_ships_with_the_text():
    notice = " ".join(data_file("PSF_LICENSE.txt").read_text(encoding="utf-8").split())
    assert "PSF License Agreement" in notice and "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" in notice


def test_unknown_split_is_named():
    with pytest.raises(ValueError, match=r"unknown split 'test'; the splits are \('train', 'validation', 'eval'\)"):
        corpus.documents("test")

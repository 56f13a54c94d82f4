"""The runnable examples in the data layer's docstrings stay runnable."""

import doctest
import importlib
import tempfile

import pytest

MODULES = [
    "elim.data",
    "elim.data.afew_va",
    "elim.data.affectnet",
    "elim.data.base",
    "elim.data.csv_dataset",
    "elim.data.faces",
    "elim.data.sampler",
    "elim.data.synthetic",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # examples write under tmp_path
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0

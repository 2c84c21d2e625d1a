"""Every docstring example of the core runs as written (doctest)."""

import doctest
import importlib

import pytest

MODULES = [
    "pyro_avf.step", "pyro_avf.guide", "pyro_avf.elbo", "pyro_avf.inference", "pyro_avf.updates",
    "pyro_avf.encoders", "pyro_avf.posterior", "pyro_avf.free_energy", "pyro_avf.run_folder", "pyro_avf.sequences",
    "pyro_avf.transition", "pyro_avf.outer_guides", "pyro_avf.global_sites", "pyro_avf.pickling",
    "pyro_avf.outer_stack", "pyro_avf.checkpoints", "pyro_avf.trainer", "pyro_avf.training", "pyro_avf.evaluation",
]  # fmt: skip


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_the_core_has_runnable_examples():
    attempted = sum(doctest.testmod(importlib.import_module(name)).attempted for name in MODULES[:3])
    assert attempted >= 10

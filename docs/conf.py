"""Sphinx configuration of the pyro-avf documentation (build: ``sphinx-build -W --keep-going -b html docs OUT``)."""

import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)  # pyro_avf and data_loaders from this checkout, installed or not

import pyro_avf  # noqa: E402

project = "pyro-avf"
author = "pyro-avf contributors"
copyright = "pyro-avf contributors, Apache-2.0"
version = release = pyro_avf.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path = []

# Document what the package itself says: torch's and Pyro's docstrings of overridden methods (forward,
# __call__, ...) are not repeated on every subclass.
autodoc_inherit_docstrings = False
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "signature"

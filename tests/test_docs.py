"""The Sphinx documentation builds with warnings treated as errors, and its API page documents the core."""

import subprocess
import sys
from pathlib import Path

import sphinx  # a test dependency: the docs build is part of the tests

ROOT = Path(__file__).resolve().parents[1]


def test_docs_build_without_warnings(tmp_path):
    out = tmp_path / "html"
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(ROOT / "docs"), str(out)]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"sphinx {sphinx.__version__} failed:\n{result.stdout}\n{result.stderr}"
    api = (out / "api.html").read_text(encoding="utf-8")
    assert "IterativeGuide" in api
    assert 'id="pyro_avf.IterativeGuide"' in api and 'id="pyro_avf.AmortizedFilteringELBO"' in api
    for page in ("index", "concepts", "models_and_data", "tutorials"):
        assert (out / f"{page}.html").is_file()

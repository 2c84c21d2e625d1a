"""The README's example runs as written."""

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.rst"


def test_readme_example_runs():
    block = README.read_text().split(".. code-block:: python")[1].split("\n\n``")[0]
    code = "\n".join(line[4:] for line in block.splitlines())
    namespace = {}
    exec(compile(code, "README.rst", "exec"), namespace)
    assert namespace["guide"].last_pass.step_executions == 50 * (5 * 2 + 1)  # K antithetic pairs + 1 run, no replay


def test_readme_commands_match_ci():
    ci = (README.parent / ".ci" / "run").read_text()
    test_command = [line.strip() for line in README.read_text().splitlines() if "pytest" in line][0]
    assert test_command in ci


def test_readme_training_example_runs(tmp_path, monkeypatch):
    """The "Training from Python" block, on the shared data, in a scratch folder (it writes runs/my-srnn)."""
    data = README.parents[1] / "shared" / "data"
    monkeypatch.setenv("PYRO_AVF_DATA", str(data))
    monkeypatch.chdir(tmp_path)
    section = README.read_text().split("Training from Python\n--------------------")[1]
    block = section.split(".. code-block:: python")[1].split("\n\n``")[0]
    namespace = {}
    exec(compile("\n".join(line[4:] for line in block.splitlines()), "README.rst", "exec"), namespace)
    history = namespace["result"].history
    assert history["epoch"].tolist() == [1, 2] and history["valid_free_energy_per_step"].notna().all()
    assert (tmp_path / "runs" / "my-srnn" / "checkpoint.pt").is_file()

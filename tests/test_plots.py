"""The run figures: which series get a panel of their own and which are drawn as markers."""

import matplotlib.image
import pandas as pd
import pytest

from pyro_avf.plots import plot_training_curves


def history(test_epochs):
    rows = [{"epoch": e, "train_loss_per_step": 20.0 / e} for e in range(1, 11)]
    for row in rows:
        if row["epoch"] in test_epochs:
            row["test_free_energy_per_step"] = 12.0 - 0.1 * row["epoch"]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("test_epochs, panels", [((), 1), ((10,), 1), ((5, 10), 1), ((2, 6, 10), 2)])
def test_sparse_scores_are_markers_and_regular_ones_get_a_panel(tmp_path, test_epochs, panels):
    path = plot_training_curves(history(test_epochs), tmp_path / "curves.png", {"train": 229, "test": 77})
    width = matplotlib.image.imread(path).shape[1]
    assert width == 480 * panels  # 4.8 inches per panel at 100 dpi


def test_missing_columns_are_named(tmp_path):
    with pytest.raises(ValueError, match="train_loss_per_step"):
        plot_training_curves(pd.DataFrame({"epoch": [1]}), tmp_path / "curves.png")

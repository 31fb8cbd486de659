"""The training history (moeviz.analysis.training): saturation, load CV and MaxVio against
cases worked by hand, hostile history files refused, and the bundled models' own histories."""

import json
from pathlib import Path

import numpy as np
import pytest

from moeviz.analysis import training
from moeviz.model.loading import BUNDLED_MODELS
from moeviz.views import training_charts
from moeviz.views.charts import figure_table

SAMPLES = Path(__file__).resolve().parent.parent / "assets" / "samples"
# Two points, two samples (3 tokens and 1 token + padding), one MoE layer, top-2 of 4.
EXPERTS = np.array([
    [[[[0, 1], [2, 3], [0, 2]]], [[[3, 1], [-1, -1], [-1, -1]]]],  # point 0
    [[[[1, 0], [0, 1], [3, 2]]], [[[1, 2], [-1, -1], [-1, -1]]]],  # point 1, the final model
], dtype=np.int16)


def write_history(folder, experts=EXPERTS, lengths=(3, 1), biases=None, **meta_changes):
    meta = {"arch": "test", "samples": ["a", "b"], "moe_layers": [1], "num_experts": 4, "top_k": 2,
            "shared_experts": 0, "points": [{"step": 0, "tokens": 0}, {"step": 10, "tokens": 40960}]}
    meta.update(meta_changes)
    (folder / training.MANIFEST).write_text(json.dumps(meta))
    arrays = {"experts": experts, "lengths": np.array(lengths, dtype=np.int32)}
    if biases is not None:
        arrays["biases"] = biases
    np.savez_compressed(folder / training.ARRAYS, **arrays)
    return folder


def test_saturation_is_olmoe_eq5_by_hand(tmp_path):
    h = training.read_history(write_history(tmp_path))
    # Point 0 against the final point, |E_t ∩ E_T| per token: a: {0,1}&{1,0} = 2, {2,3}&{0,1} = 0,
    # {0,2}&{3,2} = 1; b: {3,1}&{1,2} = 1; padding ignored. (2+0+1+1) / (4 tokens * k=2) = 0.5.
    np.testing.assert_allclose(training.saturation(h), [[0.5], [1.0]])


def test_load_cv_and_max_violation_by_hand(tmp_path):
    h = training.read_history(write_history(tmp_path))
    loads = training.expert_loads(h)
    # Point 0 selections: 0,1,2,3,0,2,3,1 -> two each; point 1: 1,0,0,1,3,2,1,2 -> 0:2, 1:3, 2:2, 3:1.
    np.testing.assert_allclose(loads[:, 0], [[0.25] * 4, [0.25, 0.375, 0.25, 0.125]])
    cv = training.load_cv(loads)
    # Point 1: mean 0.25, deviations 0, .125, 0, -.125 -> std sqrt(2 * .125^2 / 4) = .0884, CV .3536.
    np.testing.assert_allclose(cv[:, 0], [0.0, np.sqrt(2 * 0.125**2 / 4) / 0.25])
    np.testing.assert_allclose(training.max_violation(loads)[:, 0], [0.0, (0.375 - 0.25) / 0.25])


def test_charts_plot_the_computed_values(tmp_path):
    biases = np.array([[[0.0, 0.0, 0.0, 0.0]], [[0.001, -0.001, 0.0, 0.002]]], dtype=np.float32)
    h = training.read_history(write_history(tmp_path, biases=biases))
    table = figure_table(training_charts.saturation_chart(h, training.saturation(h)))
    assert table["step"].tolist() == [0, 10] and table["saturation"].tolist() == [0.5, 1.0]
    assert table["tokens"].tolist() == [0, 40960] and set(table["layer"]) == {1}
    bias = figure_table(training_charts.bias_chart(h, 0))
    final = bias[bias["step"] == "10"].sort_values("expert")
    np.testing.assert_allclose(final["bias"], [0.001, -0.001, 0.0, 0.002], rtol=1e-6)
    assert set(bias["layer"]) == {1}


@pytest.mark.parametrize("damage, message", [
    (dict(experts=EXPERTS.astype(np.float32)), "integers"),
    (dict(experts=np.where(EXPERTS == 3, 4, EXPERTS).astype(np.int16)), "0..3"),
    (dict(experts=EXPERTS[:, :, :, :, :1]), "shape"),
    (dict(lengths=(3, 5)), "lengths"),
    (dict(lengths=(3, 0)), "lengths"),
    (dict(top_k=5), "shape"),
    (dict(points=[{"step": 0}]), "shape"),
    (dict(biases=np.zeros((2, 1, 3), dtype=np.float32)), "biases"),
])
def test_inconsistent_histories_are_refused(tmp_path, damage, message):
    write_history(tmp_path, **damage)
    with pytest.raises(training.HistoryError, match=message):
        training.read_history(tmp_path)


def test_hostile_files_are_refused_without_unpickling_or_inflating(tmp_path, monkeypatch):
    write_history(tmp_path)
    objects = np.array([{"evil": 1}], dtype=object)
    np.savez(tmp_path / training.ARRAYS, experts=objects, lengths=np.array([3, 1]))
    with pytest.raises(training.HistoryError):
        training.read_history(tmp_path)
    (tmp_path / training.ARRAYS).write_bytes(b"not a zip at all")
    with pytest.raises(training.HistoryError, match="NumPy archive"):
        training.read_history(tmp_path)
    write_history(tmp_path)
    (tmp_path / training.MANIFEST).write_text("{not json")
    with pytest.raises(training.HistoryError, match="cannot be read"):
        training.read_history(tmp_path)
    write_history(tmp_path)
    monkeypatch.setattr(training, "MAX_ARRAY_BYTES", 64)  # a small stand-in for a zip bomb's size
    with pytest.raises(training.HistoryError, match="uncompressed"):
        training.read_history(tmp_path)
    assert not training.has_history(tmp_path / "elsewhere")
    with pytest.raises(training.HistoryError, match="no training history"):
        training.read_history(tmp_path / "elsewhere")


# The bundled models trained by the current scripts/train_bundled.py, which keeps their history.
WITH_HISTORY = ["moeviz Mixtral-style (bundled)", "moeviz DeepSeek-style (bundled)"]


def test_the_bundled_models_with_a_history():
    assert [name for name, folder in BUNDLED_MODELS.items() if training.has_history(folder)] == WITH_HISTORY


@pytest.mark.parametrize("name", WITH_HISTORY)
def test_bundled_history_spans_training_and_ends_saturated(name):
    folder = BUNDLED_MODELS[name]
    h = training.read_history(folder)
    assert len(h.points) >= 8 and h.steps[0] == 0 and h.steps == sorted(h.steps)
    assert sorted(h.samples) == sorted(path.stem for path in SAMPLES.glob("*.txt"))
    saturation = training.saturation(h)
    np.testing.assert_allclose(saturation[-1], 1.0)
    assert (saturation[0] < 0.6).all(), f"the untrained router already agreed with the final one: {saturation[0]}"
    log = training.read_training_log(folder)
    assert log["step"].iloc[-1] == h.steps[-1]
    heldout = log["heldout_loss"].dropna()
    assert float(heldout.iloc[-1]) == pytest.approx(h.points[-1]["heldout_loss"], abs=1e-3)


def test_deepseek_biases_evened_the_load():
    h = training.read_history(BUNDLED_MODELS["moeviz DeepSeek-style (bundled)"])
    assert h.biases is not None and h.shared_experts == 1
    np.testing.assert_array_equal(h.biases[0], 0.0)  # the update starts from zero biases
    assert np.abs(h.biases[-1]).max() > 0
    max_vio = training.max_violation(training.expert_loads(h))
    assert (max_vio[-1] < max_vio[0]).all(), f"MaxVio per layer, first and last point: {max_vio[[0, -1]]}"

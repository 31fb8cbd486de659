"""The tidy per-token export: one row per token x layer x rank, values checked by hand."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pandas as pd
import pytest

from moeviz.analysis import tables
from tests.factories import make_trace

# 2 layers (model layers 1 and 3), 2 tokens, top-2 of 3 experts.
IDS = [[[2, 0], [1, 2]], [[0, 1], [2, 1]]]
WEIGHTS = [[[0.7, 0.3], [0.6, 0.4]], [[0.9, 0.1], [0.5, 0.5]]]
LOGITS = np.log(np.array([
    [[0.3, 0.1, 0.6], [0.2, 0.5, 0.3]],
    [[0.7, 0.2, 0.1], [0.1, 0.4, 0.5]],
]))  # softmax gives back these probabilities


@pytest.fixture
def trace():
    return make_trace(IDS, LOGITS, WEIGHTS, layer_ids=[1, 3], tokens=["Hi", "\n"], token_ids=[17, 5], num_layers=4)


def test_one_row_per_token_layer_rank_with_hand_checked_values(trace):
    table = tables.token_table(trace)
    assert list(table.columns) == tables.COLUMNS
    assert len(table) == 2 * 2 * 2
    assert table["position"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert table["token_id"].tolist() == [17] * 4 + [5] * 4
    assert table["token"].tolist() == ["Hi"] * 4 + ["\n"] * 4  # raw text, not ↵
    assert table["layer"].tolist() == [1, 1, 3, 3] * 2
    assert table["layer_label"].tolist() == ["layer 1", "layer 1", "layer 3", "layer 3"] * 2
    assert table["rank"].tolist() == [1, 2] * 4
    assert table["expert"].tolist() == [2, 0, 0, 1, 1, 2, 2, 1]
    assert table["expert"].dtype == np.int64 and table["token_id"].dtype == np.int64
    np.testing.assert_allclose(table["weight"], [0.7, 0.3, 0.9, 0.1, 0.6, 0.4, 0.5, 0.5], rtol=1e-6)
    # router_prob is the probability of the row's expert: token 0, layer 1, expert 2 -> 0.6.
    np.testing.assert_allclose(table["router_prob"], [0.6, 0.3, 0.7, 0.2, 0.5, 0.3, 0.5, 0.4], rtol=1e-5)


def test_full_distribution_repeats_the_router_probabilities(trace):
    table = tables.token_table(trace, full_distribution=True)
    assert list(table.columns) == tables.COLUMNS + ["router_prob_0", "router_prob_1", "router_prob_2"]
    row = table[(table.position == 1) & (table.layer == 3)]
    np.testing.assert_allclose(row[["router_prob_0", "router_prob_1", "router_prob_2"]].to_numpy(),
                               [[0.1, 0.4, 0.5]] * 2, rtol=1e-5)


def test_ids_only_trace_leaves_weight_and_probability_empty(trace):
    ids_only = dataclasses.replace(trace, router_logits=None, topk_weights=None, engine="vllm")
    table = tables.token_table(ids_only)
    assert table["expert"].tolist() == [2, 0, 0, 1, 1, 2, 2, 1]
    assert table["weight"].isna().all() and table["router_prob"].isna().all()
    with pytest.raises(ValueError, match="full router distribution needs router scores"):
        tables.token_table(ids_only, full_distribution=True)


def test_csv_and_parquet_round_trip_the_values(trace):
    table = tables.token_table(trace)
    from_csv = pd.read_csv(io.BytesIO(tables.to_csv(table)), keep_default_na=False, na_values=[""])
    assert from_csv["token"].tolist() == ["Hi"] * 4 + ["\n"] * 4
    assert from_csv["expert"].dtype == np.int64
    assert tables.to_csv(table).decode().splitlines()[0] == ",".join(tables.COLUMNS)
    from_parquet = pd.read_parquet(io.BytesIO(tables.to_parquet(table)))
    pd.testing.assert_frame_equal(from_parquet, table)

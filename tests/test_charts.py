"""Figures built from hand-made traces carry titles, units, hover data and the expected traces."""

import numpy as np
import pytest

from analysis import velocity
from analysis.projection import project_trajectories
from app import charts
from m2r2core.trace import ResidualCapture, RunTrace, TokenStep

N = 3


def step(position, text, agrees, speed, cosine):
    tops = tuple((text, "x", "y") for _ in range(N + 1))
    return TokenStep(
        position=position, token_id=position + 10, text=text, token_prob=0.5, exit_layer=N,
        source="full", latency_ms=10.0, forward_ms=8.0, trace_ms=1.0,
        residual_norm=(1.0, 2.0, 3.0, 4.0), relative_speed=speed, cosine_to_final=cosine,
        lens_entropy=(5.0, 4.0, 2.0, 1.0), lens_top_ids=((1, 2, 3),) * (N + 1),
        lens_top_tokens=tops, lens_top_probs=((0.5, 0.2, 0.1),) * (N + 1), lens_agrees=agrees)


@pytest.fixture
def trace():
    steps = (
        step(0, " Paris", (False, False, True, True), (2.0, 0.5, 0.1), (0.1, 0.4, 0.9, 1.0)),
        step(1, ".", (False, True, False, True), (3.0, 0.2, 0.3), (0.0, 0.5, 0.7, 1.0)),
    )
    return RunTrace(run_id="hand", created="2026-01-01T00:00:00", mode="baseline", prompt="p",
                    prompt_token_count=4, model={"model_type": "llama", "dtype": "float32"},
                    config={}, environment={}, steps=steps, stop_reason="eos", prefill_ms=5.0,
                    decode_ms=10.0, n_layers=N, completion=" Paris.")


def test_lock_in_layer_is_first_of_the_final_agreeing_run(trace):
    assert velocity.lock_in_layer(trace.steps[0]) == 2
    assert velocity.lock_in_layer(trace.steps[1]) == 3  # agreement at 1 broke at 2


def test_layer_matrix_and_profile(trace):
    speed = velocity.layer_matrix(trace, "relative_speed")
    assert speed.layers == (1, 2, 3)
    assert speed.values.shape == (2, 3)
    profile = velocity.layer_profile(trace, "lens_agrees")
    assert profile.mean == (0.0, 0.5, 0.5, 1.0)
    cos = velocity.layer_profile(trace, "cosine_to_final")
    assert cos.median[2] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="unknown quantity"):
        velocity.layer_matrix(trace, "nope")


@pytest.mark.parametrize("quantity", list(charts.HEATMAP_STYLE))
def test_heatmap_has_title_units_and_hover(trace, quantity):
    fig = charts.token_layer_heatmap(velocity.layer_matrix(trace, quantity))
    heat = fig.data[0]
    assert fig.layout.title.text
    assert "(" in heat.colorbar.title.text  # a unit in brackets
    assert fig.layout.xaxis.title.text.startswith("layer")
    assert "<extra></extra>" in heat.hovertemplate and "layer %{x}" in heat.hovertemplate
    assert np.asarray(heat.customdata).shape[:2] == (2, len(heat.x))
    assert heat.y[0].startswith("  0 ␣Paris")


def test_speed_heatmap_colours_by_decade_but_hovers_raw_values(trace):
    fig = charts.token_layer_heatmap(velocity.layer_matrix(trace, "relative_speed"))
    assert fig.data[0].z[0][0] == pytest.approx(np.log10(2.0))
    assert fig.data[0].customdata[0][0][2] == "2.000"


def test_profile_figure_has_band_and_median(trace):
    fig = charts.layer_profile_figure(velocity.layer_profile(trace, "relative_speed"), "t", "y",
                                      log_y=True)
    assert [t.name for t in fig.data] == ["25–75% of tokens", "median token"]
    assert fig.layout.yaxis.type == "log"


def test_lens_trajectory_marks_agreement(trace):
    rows = velocity.lens_table(trace.steps[0])
    fig = charts.lens_trajectory_figure(rows, " Paris")
    colours = fig.data[1].marker.color
    assert colours[-1] == colours[-2] != colours[0]
    assert rows[0].relative_speed is None and rows[1].relative_speed == 2.0


def test_projection_figure_draws_one_path_per_token():
    rng = np.random.default_rng(0)
    capture = ResidualCapture("r", rng.normal(size=(3, N + 1, 8)).astype(np.float32))
    proj = project_trajectories(capture, [0, 2], method="pca")
    assert proj.coords.shape == (2, N + 1, 2)
    fig = charts.projection_figure(proj, ("a", "b", "c"))
    assert len(fig.data) == 2 and fig.data[1].name == "2 c"
    with pytest.raises(ValueError, match="within"):
        project_trajectories(capture, [5])


def test_umap_projection_is_seeded():
    rng = np.random.default_rng(1)
    capture = ResidualCapture("r", rng.normal(size=(4, 8, 16)).astype(np.float32))
    a = project_trajectories(capture, [0, 1, 2], method="umap", seed=3)
    b = project_trajectories(capture, [0, 1, 2], method="umap", seed=3)
    assert a.method == "umap"
    np.testing.assert_allclose(a.coords, b.coords)

"""The frontier and the linear depth are computed from result rows, choosing on validation."""

from koopnet.lab.frontier import frontier, frontier_section, linear_depth


def _row(layer, steps, seed, val, test, observable="delay"):
    return {"layer": layer, "linear_steps": steps, "seed": seed, "val_accuracy": val,
            "test_accuracy": test, "observable": observable, "replacement_parameters": 10}


def test_choice_is_made_on_validation_not_test():
    rows = [_row(1, 5, 0, 0.90, 0.99, "rbf"), _row(1, 5, 0, 0.95, 0.80, "delay")]
    (entry,) = frontier(rows, {0: 0.98})
    assert entry["methods"] == ["delay"] and entry["test_accuracy"] == 0.80
    assert not entry["within"]


def test_linear_depth_is_the_largest_step_count_within_half_a_point():
    rows = [_row(1, s, seed, 0.9, test, "delay")
            for seed in (0, 1)
            for s, test in ((1, 0.98), (2, 0.976), (3, 0.95), (4, 0.9751))]
    entries = frontier(rows, {0: 0.98, 1: 0.98})
    assert linear_depth(entries) == {1: 4}  # 4 steps: drop 0.49 point; 3 steps: 3 points
    worse = frontier([_row(2, 1, 0, 0.9, 0.5)], {0: 0.98})
    assert linear_depth(worse) == {2: None}


def test_section_reads_a_reproduce_results_file():
    results = {"original": {"test_accuracy": 0.98},
               "sweep": [_row(3, 4, None, 0.9, 0.979)]}
    text = "\n".join(frontier_section(results))
    assert "| 3 | 4 | delay | 97.90 | +0.10 | yes |" in text
    assert "layer 3: 4." in text


def test_state_errors_and_spectra_are_averaged_over_the_seeds_picks():
    rows = [{**_row(1, 2, seed, 0.9, 0.97), "test_state_errors": [0.1 * (seed + 1), 0.3],
             "spectral_radius": 0.5 + seed} for seed in (0, 1)]
    (entry,) = frontier(rows, {0: 0.98, 1: 0.98})
    assert entry["test_state_errors"] == [0.15000000000000002, 0.3]
    assert entry["spectral_radius"] == 1.0
    results = {"comparison": rows, "seeds": {"runs": [
        {"seed": s, "original": {"test_accuracy": 0.98}} for s in (0, 1)]}}
    text = "\n".join(frontier_section(results))
    assert "| 1 | 2 | delay | 97.00 | +1.00 | no | 1.000 | 0.15 0.3 |" in text


def test_rows_without_a_linear_step_are_left_out():
    rows = [_row(1, 2, 0, 0.9, 0.97), {**_row(1, -5, 0, 0.99, 0.99, "learned"),
                                       "encoder_blocks": 16}]
    assert [e["linear_steps"] for e in frontier(rows, {0: 0.98})] == [2]

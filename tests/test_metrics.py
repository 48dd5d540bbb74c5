"""Tests for sfa_jax.metrics on hand-computed matrices, edge cases and properties."""

import json

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import numpy as np
import pytest

from sfa_jax import metrics

# R[i, j]: accuracy on task j after training on task i. Task 0 peaks after task 1 (0.95), so the
# 'max' and 'first' conventions of forgetting differ on it; task 1 improves at the end.
R = np.array([
    [0.90, 0.20, 0.10],
    [0.95, 0.80, 0.30],
    [0.60, 0.85, 0.95],
])
B = np.array([0.1, 0.1, 0.2])  # accuracies of the randomly initialised model


def _matrices(max_tasks=6):
  return st.integers(1, max_tasks).flatmap(
      lambda t: hnp.arrays(np.float64, (t, t), elements=st.floats(0.0, 1.0))
  )


# Hand-computed values.


def test_average_accuracy():
  assert metrics.average_accuracy(R) == pytest.approx((0.60 + 0.85 + 0.95) / 3)


def test_average_accuracy_curve():
  np.testing.assert_allclose(metrics.average_accuracy_curve(R), [0.9, (0.95 + 0.8) / 2, 0.8])


def test_forgetting_max_convention():
  np.testing.assert_allclose(metrics.forgetting_per_task(R, 'max'), [0.95 - 0.60, 0.80 - 0.85])
  assert metrics.forgetting(R) == pytest.approx((0.35 - 0.05) / 2)
  assert metrics.forgetting(R, 'max') == metrics.forgetting(R)


def test_forgetting_first_convention():
  np.testing.assert_allclose(metrics.forgetting_per_task(R, 'first'), [0.90 - 0.60, 0.80 - 0.85])
  assert metrics.forgetting(R, 'first') == pytest.approx((0.30 - 0.05) / 2)


def test_forgetting_max_ignores_rows_before_the_task_was_learned():
  # Task 1 scores 0.9 by chance before it is trained on (row 0); that is not forgetting.
  matrix = np.array([[0.5, 0.9, 0.0], [0.5, 0.6, 0.0], [0.5, 0.6, 0.7]])
  np.testing.assert_allclose(metrics.forgetting_per_task(matrix, 'max'), [0.0, 0.0])


def test_backward_transfer():
  assert metrics.backward_transfer(R) == pytest.approx(((0.60 - 0.90) + (0.85 - 0.80)) / 2)


def test_forward_transfer():
  # R[0, 1] - b[1] = 0.2 - 0.1 and R[1, 2] - b[2] = 0.3 - 0.2; b[0] is not used.
  assert metrics.forward_transfer(R, B) == pytest.approx(0.1)
  assert metrics.forward_transfer(R, [1.0, 0.1, 0.2]) == pytest.approx(0.1)


def test_summarize_is_json_with_every_metric():
  summary = metrics.summarize(R, B)
  assert json.loads(json.dumps(summary, allow_nan=False)) == summary
  assert summary['num_tasks'] == 3
  assert summary['average_accuracy'] == pytest.approx(0.8)
  np.testing.assert_allclose(summary['average_accuracy_curve'], [0.9, 0.875, 0.8])
  assert summary['forgetting'] == pytest.approx(0.15)
  assert summary['forgetting_first'] == pytest.approx(0.125)
  np.testing.assert_allclose(summary['forgetting_per_task'], [0.35, -0.05])
  np.testing.assert_allclose(summary['forgetting_first_per_task'], [0.30, -0.05])
  assert summary['backward_transfer'] == pytest.approx(-0.125)
  assert summary['forward_transfer'] == pytest.approx(0.1)
  assert 'forward_transfer' not in metrics.summarize(R)
  for key in ('average_accuracy', 'forgetting', 'backward_transfer', 'forward_transfer'):
    assert type(summary[key]) is float, key


def test_accepts_lists_and_any_float_arrays():
  assert metrics.average_accuracy(R.tolist()) == pytest.approx(0.8)
  assert metrics.forgetting(R.astype(np.float32)) == pytest.approx(0.15)


# A single task: nothing to forget or transfer.


def test_single_task():
  single = [[0.7]]
  assert metrics.average_accuracy(single) == pytest.approx(0.7)
  np.testing.assert_allclose(metrics.average_accuracy_curve(single), [0.7])
  for convention in ('max', 'first'):
    assert metrics.forgetting_per_task(single, convention).shape == (0,)
    assert metrics.forgetting(single, convention) == 0.0
  assert metrics.backward_transfer(single) == 0.0
  assert metrics.forward_transfer(single, [0.1]) == 0.0
  summary = metrics.summarize(single, [0.1])
  assert json.loads(json.dumps(summary, allow_nan=False)) == summary
  assert summary['forgetting_per_task'] == []


# Clear errors.


@pytest.mark.parametrize(
    'matrix, message',
    [
        (np.zeros((2, 3)), 'square'),
        (np.zeros(3), 'square'),
        (np.zeros((2, 2, 2)), 'square'),
        (np.zeros((0, 0)), 'at least 1 task'),
        (np.array([[0.5, np.nan], [0.5, 0.5]]), r'NaN .* at \[\[0, 1\]\]'),
        (np.array([[np.inf]]), 'NaN or infinite'),
        (np.array([[90.0, 10.0], [80.0, 95.0]]), 'not percentages'),
        (np.array([[-0.1]]), r'\[0, 1\]'),
    ],
)
def test_bad_matrices_raise(matrix, message):
  for metric in (
      metrics.average_accuracy,
      metrics.average_accuracy_curve,
      metrics.forgetting,
      metrics.forgetting_per_task,
      metrics.backward_transfer,
      metrics.summarize,
  ):
    with pytest.raises(ValueError, match=message):
      metric(matrix)


def test_bad_convention_raises():
  with pytest.raises(ValueError, match=r"convention must be one of \('max', 'first'\)"):
    metrics.forgetting(R, 'last')


@pytest.mark.parametrize(
    'baseline, message',
    [
        ([0.1, 0.1], r'shape \(3,\)'),
        ([[0.1, 0.1, 0.1]], r'shape \(3,\)'),
        ([0.1, np.nan, 0.1], 'NaN'),
        ([10.0, 10.0, 10.0], 'not percentages'),
    ],
)
def test_bad_random_init_accuracies_raise(baseline, message):
  with pytest.raises(ValueError, match=message):
    metrics.forward_transfer(R, baseline)
  with pytest.raises(ValueError, match=message):
    metrics.summarize(R, baseline)


# Properties.


@hypothesis.given(hnp.arrays(np.float64, st.integers(1, 6), elements=st.floats(0.0, 1.0)))
def test_no_change_means_no_forgetting_and_no_backward_transfer(final_accuracies):
  # Every row equal: each task keeps the accuracy it has from the start.
  matrix = np.tile(final_accuracies, (final_accuracies.size, 1))
  for convention in ('max', 'first'):
    np.testing.assert_array_equal(metrics.forgetting_per_task(matrix, convention), 0.0)
  assert metrics.backward_transfer(matrix) == 0.0


@hypothesis.given(_matrices())
def test_forgetting_conventions_and_transfer_agree(matrix):
  by_max = metrics.forgetting_per_task(matrix, 'max')
  by_first = metrics.forgetting_per_task(matrix, 'first')
  assert np.all(by_max >= by_first)
  assert np.all((-1.0 <= by_first) & (by_max <= 1.0))
  assert metrics.forgetting(matrix, 'max') >= metrics.forgetting(matrix, 'first') - 1e-12
  assert metrics.backward_transfer(matrix) == pytest.approx(-metrics.forgetting(matrix, 'first'))
  curve = metrics.average_accuracy_curve(matrix)
  assert curve[-1] == pytest.approx(metrics.average_accuracy(matrix))


@hypothesis.given(_matrices())
def test_mammoth_forgetting_is_ours_clipped_at_zero(matrix):
  # Mammoth's definition: the maximum over every row from the task's own onwards, the final row
  # included, minus the final accuracy.
  num_tasks = matrix.shape[0]
  mammoth = [np.max(matrix[j:, j]) - matrix[-1, j] for j in range(num_tasks - 1)]
  np.testing.assert_allclose(
      np.maximum(metrics.forgetting_per_task(matrix, 'max'), 0.0), mammoth, atol=1e-12
  )


@hypothesis.given(_matrices(), st.data())
def test_forward_transfer_is_zero_against_its_own_baseline(matrix, data):
  # With b[j] = R[j-1, j], the accuracy before training on task j, nothing was transferred.
  first = data.draw(st.floats(0.0, 1.0))
  baseline = np.concatenate([[first], np.diag(matrix, k=1)])
  assert metrics.forward_transfer(matrix, baseline) == pytest.approx(0.0)

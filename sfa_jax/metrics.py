"""Continual-learning metrics computed from an accuracy matrix.

Every function takes the accuracy matrix ``R`` of a run over ``T`` tasks: a ``(T, T)`` array where
``R[i, j]`` is the accuracy on task ``j``'s test set after training on tasks ``0..i``. Accuracies
are fractions in ``[0, 1]``, not percentages. Entries above the diagonal (tasks not trained yet) are
read only by :func:`forward_transfer`; pass any values in ``[0, 1]`` there when they were not
measured.

Conventions, since the libraries disagree:

* **Forgetting** of task ``j < T-1`` is ``max_{j <= i <= T-2} R[i, j] - R[T-1, j]`` by default
  (``convention='max'``, Chaudhry et al 2018): the best accuracy the task ever had once learned,
  minus its final accuracy. ``convention='first'`` is ``R[j, j] - R[T-1, j]`` (Avalanche): the
  accuracy right after learning the task, minus its final accuracy. Either can be negative when the
  final accuracy is the best one. Mammoth's ``forgetting`` also takes the final row into the
  maximum, so its per-task values are ``max(0, ours)``. Chaudhry et al's formula ranges over every
  earlier row; rows before task ``j`` was trained (``i < j``) are left out here, since a task not
  yet learned cannot be forgotten. The last task is never counted: nothing came after it.
* **Backward transfer** (BWT) is ``mean_{j < T-1} (R[T-1, j] - R[j, j])`` (GEM): minus the mean
  'first' forgetting.
* **Forward transfer** (FWT) is ``mean_{j >= 1} (R[j-1, j] - b[j])`` (GEM), with ``b[j]`` the
  accuracy of the randomly initialised model on task ``j``.
* With a single task (``T = 1``) forgetting, BWT and FWT have no term to average; they are ``0.0``
  (nothing was forgotten or transferred), and the per-task forgetting vector is empty. Every value
  stays a finite float, so results remain plain JSON.

References:
  Lopez-Paz & Ranzato, `Gradient Episodic Memory for Continual Learning
  <https://arxiv.org/abs/1706.08840>`_, 2017

  Chaudhry et al, `Riemannian Walk for Incremental Learning: Understanding Forgetting and
  Intransigence <https://arxiv.org/abs/1801.10112>`_, 2018

  Lomonaco et al, `Avalanche: an End-to-End Library for Continual Learning
  <https://arxiv.org/abs/2104.00405>`_, 2021

  Buzzega et al, `Dark Experience for General Continual Learning: a Strong, Simple Baseline
  <https://arxiv.org/abs/2004.07211>`_, 2020 (Mammoth)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike

_CONVENTIONS = ('max', 'first')


def _check_accuracies(name: str, values: ArrayLike) -> np.ndarray:
  """``values`` as a float64 array; ``ValueError`` on NaN, infinities or values outside [0, 1]."""
  array = np.asarray(values, dtype=np.float64)
  if not np.all(np.isfinite(array)):
    where = np.argwhere(~np.isfinite(array))[:5].tolist()
    raise ValueError(f'{name} must not contain NaN or infinite values; found some at {where}.')
  if np.any((array < 0.0) | (array > 1.0)):
    raise ValueError(
        f'{name} holds accuracies, which must lie in [0, 1] (fractions, not percentages); '
        f'got values from {array.min()} to {array.max()}.'
    )
  return array


def _check_matrix(accuracy_matrix: ArrayLike) -> np.ndarray:
  """The accuracy matrix as a float64 ``(T, T)`` array with ``T >= 1``, or ``ValueError``."""
  shape = np.shape(accuracy_matrix)
  if len(shape) != 2 or shape[0] != shape[1]:
    raise ValueError(
        f'The accuracy matrix must be square, of shape (T, T) with R[i, j] the accuracy on task j '
        f'after training on task i; got shape {shape}.'
    )
  if shape[0] < 1:
    raise ValueError('The accuracy matrix must cover at least 1 task; got shape (0, 0).')
  return _check_accuracies('The accuracy matrix', accuracy_matrix)


def average_accuracy(accuracy_matrix: ArrayLike) -> float:
  """The mean accuracy over all ``T`` tasks after training on the last one: ``mean_j R[T-1, j]``.

  Args:
    accuracy_matrix: ``(T, T)`` accuracies in [0, 1], ``R[i, j]`` on task ``j`` after task ``i``.

  Returns:
    A Python float.

  Raises:
    ValueError: if the matrix is not square, is empty, holds NaN or values outside [0, 1].

  Example:
    >>> from sfa_jax import metrics
    >>> metrics.average_accuracy([[0.9, 0.1], [0.6, 0.8]])
    0.7
  """
  matrix = _check_matrix(accuracy_matrix)
  return float(np.mean(matrix[-1]))


def average_accuracy_curve(accuracy_matrix: ArrayLike) -> np.ndarray:
  """The mean accuracy over the tasks seen so far, after each task: ``mean_{j <= i} R[i, j]``.

  Args:
    accuracy_matrix: ``(T, T)`` accuracies in [0, 1], ``R[i, j]`` on task ``j`` after task ``i``.

  Returns:
    A float64 array of shape ``(T,)``; its last entry is :func:`average_accuracy`.

  Raises:
    ValueError: if the matrix is not square, is empty, holds NaN or values outside [0, 1].

  Example:
    >>> from sfa_jax import metrics
    >>> metrics.average_accuracy_curve([[0.9, 0.1], [0.6, 0.8]]).tolist()
    [0.9, 0.7]
  """
  matrix = _check_matrix(accuracy_matrix)
  return np.array([np.mean(matrix[i, : i + 1]) for i in range(matrix.shape[0])])


def forgetting_per_task(accuracy_matrix: ArrayLike, convention: str = 'max') -> np.ndarray:
  """How much accuracy each task but the last lost by the end of the sequence.

  * ``convention='max'`` (Chaudhry et al 2018): ``max_{j <= i <= T-2} R[i, j] - R[T-1, j]``, the
    best accuracy task ``j`` had after it was learned and before the last task, minus its final one.
  * ``convention='first'`` (Avalanche): ``R[j, j] - R[T-1, j]``, the accuracy right after learning
    task ``j`` minus its final one.

  'max' is never below 'first', since its maximum includes ``R[j, j]``. Both can be negative.

  Args:
    accuracy_matrix: ``(T, T)`` accuracies in [0, 1], ``R[i, j]`` on task ``j`` after task ``i``.
    convention: ``'max'`` or ``'first'``.

  Returns:
    A float64 array of shape ``(T - 1,)``, entry ``j`` for task ``j``; empty when ``T = 1``.

  Raises:
    ValueError: on an unknown convention, or if the matrix is not square, is empty, holds NaN or
      values outside [0, 1].

  Example:
    >>> from sfa_jax import metrics
    >>> R = [[0.9, 0.0, 0.0], [0.95, 0.8, 0.0], [0.5, 0.7, 0.9]]
    >>> metrics.forgetting_per_task(R, 'max').round(3).tolist()
    [0.45, 0.1]
    >>> metrics.forgetting_per_task(R, 'first').round(3).tolist()
    [0.4, 0.1]
  """
  if convention not in _CONVENTIONS:
    raise ValueError(f'convention must be one of {_CONVENTIONS}; got {convention!r}.')
  matrix = _check_matrix(accuracy_matrix)
  num_tasks = matrix.shape[0]
  final = matrix[-1, : num_tasks - 1]
  if convention == 'first':
    reference = np.diag(matrix)[: num_tasks - 1]
  else:
    reference = np.array([np.max(matrix[j : num_tasks - 1, j]) for j in range(num_tasks - 1)])
  return reference - final


def forgetting(accuracy_matrix: ArrayLike, convention: str = 'max') -> float:
  """The mean of :func:`forgetting_per_task` over tasks ``0..T-2``; ``0.0`` when ``T = 1``.

  Args:
    accuracy_matrix: ``(T, T)`` accuracies in [0, 1], ``R[i, j]`` on task ``j`` after task ``i``.
    convention: ``'max'`` (Chaudhry et al 2018, Mammoth) or ``'first'`` (Avalanche); see
      :func:`forgetting_per_task`.

  Returns:
    A Python float.

  Raises:
    ValueError: on an unknown convention, or if the matrix is not square, is empty, holds NaN or
      values outside [0, 1].

  Example:
    >>> from sfa_jax import metrics
    >>> R = [[0.9, 0.0, 0.0], [0.95, 0.8, 0.0], [0.5, 0.7, 0.9]]
    >>> round(metrics.forgetting(R), 3), round(metrics.forgetting(R, 'first'), 3)
    (0.275, 0.25)
  """
  per_task = forgetting_per_task(accuracy_matrix, convention)
  return float(np.mean(per_task)) if per_task.size else 0.0


def backward_transfer(accuracy_matrix: ArrayLike) -> float:
  """Backward transfer: ``mean_{j < T-1} (R[T-1, j] - R[j, j])``; ``0.0`` when ``T = 1``.

  Negative values mean forgetting; it equals ``-forgetting(R, 'first')``.

  Args:
    accuracy_matrix: ``(T, T)`` accuracies in [0, 1], ``R[i, j]`` on task ``j`` after task ``i``.

  Returns:
    A Python float.

  Raises:
    ValueError: if the matrix is not square, is empty, holds NaN or values outside [0, 1].

  Example:
    >>> from sfa_jax import metrics
    >>> round(metrics.backward_transfer([[0.9, 0.0], [0.6, 0.8]]), 3)
    -0.3

  References:
    Lopez-Paz & Ranzato, `Gradient Episodic Memory for Continual Learning
    <https://arxiv.org/abs/1706.08840>`_, 2017
  """
  matrix = _check_matrix(accuracy_matrix)
  num_tasks = matrix.shape[0]
  if num_tasks == 1:
    return 0.0
  return float(np.mean(matrix[-1, :-1] - np.diag(matrix)[:-1]))


def forward_transfer(accuracy_matrix: ArrayLike, random_init_accuracies: ArrayLike) -> float:
  """Forward transfer: ``mean_{j >= 1} (R[j-1, j] - b[j])``; ``0.0`` when ``T = 1``.

  How much better than a randomly initialised model each task is solved *before* training on it,
  thanks to the tasks before it.

  Args:
    accuracy_matrix: ``(T, T)`` accuracies in [0, 1], ``R[i, j]`` on task ``j`` after task ``i``.
    random_init_accuracies: ``b``, shape ``(T,)``: the accuracy of the randomly initialised model
      on each task. ``b[0]`` is not used.

  Returns:
    A Python float.

  Raises:
    ValueError: if the matrix is not square, is empty, holds NaN or values outside [0, 1], or if
      ``b`` is not a vector of ``T`` such accuracies.

  Example:
    >>> from sfa_jax import metrics
    >>> round(metrics.forward_transfer([[0.9, 0.3], [0.6, 0.8]], [0.1, 0.1]), 3)
    0.2

  References:
    Lopez-Paz & Ranzato, `Gradient Episodic Memory for Continual Learning
    <https://arxiv.org/abs/1706.08840>`_, 2017
  """
  matrix = _check_matrix(accuracy_matrix)
  num_tasks = matrix.shape[0]
  if np.shape(random_init_accuracies) != (num_tasks,):
    raise ValueError(
        f'random_init_accuracies must have shape ({num_tasks},), one accuracy per task; got shape '
        f'{np.shape(random_init_accuracies)}.'
    )
  baseline = _check_accuracies('random_init_accuracies', random_init_accuracies)
  if num_tasks == 1:
    return 0.0
  before_training = np.diag(matrix, k=1)  # R[j-1, j] for j = 1..T-1
  return float(np.mean(before_training - baseline[1:]))


def summarize(
    accuracy_matrix: ArrayLike, random_init_accuracies: ArrayLike | None = None
) -> dict[str, Any]:
  """Every metric of this module in one JSON-serialisable dict of Python floats and lists.

  Keys: ``num_tasks``, ``average_accuracy``, ``average_accuracy_curve``, ``forgetting`` (the 'max'
  convention), ``forgetting_first``, ``forgetting_per_task``, ``forgetting_first_per_task``,
  ``backward_transfer``, and ``forward_transfer`` only when ``random_init_accuracies`` is given.

  Args:
    accuracy_matrix: ``(T, T)`` accuracies in [0, 1], ``R[i, j]`` on task ``j`` after task ``i``.
    random_init_accuracies: optional ``(T,)`` accuracies of the randomly initialised model, for
      :func:`forward_transfer`.

  Returns:
    A dict of ints, floats and lists of floats.

  Raises:
    ValueError: as the functions it calls.

  Example:
    >>> import json
    >>> from sfa_jax import metrics
    >>> summary = metrics.summarize([[0.9, 0.3], [0.6, 0.8]], [0.1, 0.1])
    >>> round(summary['forgetting'], 3), round(summary['forward_transfer'], 3)
    (0.3, 0.2)
    >>> json.loads(json.dumps(summary))['num_tasks']
    2
  """
  matrix = _check_matrix(accuracy_matrix)
  summary: dict[str, Any] = {
      'num_tasks': int(matrix.shape[0]),
      'average_accuracy': average_accuracy(matrix),
      'average_accuracy_curve': average_accuracy_curve(matrix).tolist(),
      'forgetting': forgetting(matrix, 'max'),
      'forgetting_first': forgetting(matrix, 'first'),
      'forgetting_per_task': forgetting_per_task(matrix, 'max').tolist(),
      'forgetting_first_per_task': forgetting_per_task(matrix, 'first').tolist(),
      'backward_transfer': backward_transfer(matrix),
  }
  if random_init_accuracies is not None:
    summary['forward_transfer'] = forward_transfer(matrix, random_init_accuracies)
  return summary

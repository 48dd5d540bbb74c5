"""Tables of results in markdown: runs of the task streams and language-model sequences.

Every function takes results as the engine returns them or as their JSON was written
(``SequenceResult.to_json()`` aggregated by :func:`sfa_jax.engine.grids.summarize_runs`; the
:class:`~sfa_jax.engine.lm.LMResult` of a language-model sequence), so tables can be written again
from saved results without training. The figures are in :mod:`sfa_jax.cli.plots`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
  from sfa_jax.engine.lm import LMResult

__all__ = ['markdown_table', 'lm_markdown_table', 'seed_summaries', 'lm_seed_table']


def markdown_table(rows: Sequence[dict[str, Any]], task_names: Sequence[str]) -> str:
  """A markdown table of :func:`~sfa_jax.engine.grids.summarize_runs` rows: mean ± std over seeds.

  Columns: the final accuracy on each task (for streams of up to 5 tasks), the mean accuracy over
  all tasks after the last one (in bold), forgetting, backward transfer, training seconds.

  Args:
    rows: from :func:`~sfa_jax.engine.grids.summarize_runs` (in the order to show).
    task_names: the stream's task names, for the per-task columns.

  Returns:
    The table, without a final newline.

  Example:
    >>> row = {'method': 'm', 'seeds': 2, 'final_accuracy': [(0.5, 0.1)],
    ...        'average_accuracy': (0.5, 0.1), 'forgetting': (0.2, 0.0),
    ...        'backward_transfer': (-0.2, 0.0), 'train_seconds': (1.0, 0.0)}
    >>> print(markdown_table([row], ['t0']).splitlines()[2])  # doctest: +ELLIPSIS
    | m | 2 | 0.500 ± 0.100 | **0.500 ± 0.100** | 0.200 ± 0.000 | -0.200 ± 0.000 | ...|
  """
  show_tasks = len(task_names) <= 5
  header = ['method', 'seeds'] + ([f'acc. {name}' for name in task_names] if show_tasks else [])
  header += ['mean acc. (all tasks)', 'forgetting', 'BWT', 'train s']
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * 2 + '---:|' * (len(header) - 2)]
  cell = lambda pair: f'{pair[0]:.3f} ± {pair[1]:.3f}'
  for row in rows:
    cells = [row['method'], str(row['seeds'])]
    if show_tasks:
      cells += [cell(pair) for pair in row['final_accuracy']]
    cells += [f"**{cell(row['average_accuracy'])}**", cell(row['forgetting']), cell(row['backward_transfer'])]
    cells.append('{:.1f} ± {:.1f}'.format(*row['train_seconds']))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def steps_note(runs: Sequence[dict[str, Any]]) -> str:
  """A line saying how many optimizer steps each method took per task, when the methods differ.

  Every method trains the same epochs of each task, but its batch plan decides the steps: replay
  fills a share of each batch (its ``ratio``) from memory, so a task's examples take more batches,
  and joint trains on every task so far. Such a method's run, and its accuracy curve, is longer.

  Args:
    runs: run JSONs (``SequenceResult.to_json()``, needs ``method`` and ``steps_per_task``).

  Returns:
    The line, or ``''`` when every run took the same steps.

  Example:
    >>> runs = [{'method': m, 'steps_per_task': [62, 124 if m == 'replay' else 62]} for m in ('finetune', 'sfa', 'replay')]
    >>> steps_note(runs).split(' (')[0]
    'Optimizer steps per task: finetune, sfa: 62, 62; replay: 62, 124'
    >>> steps_note(runs[:2])
    ''
  """
  methods: dict[tuple[int, ...], dict[str, None]] = {}
  for run in runs:
    methods.setdefault(tuple(run['steps_per_task']), {})[run['method']] = None
  if len(methods) <= 1:
    return ''
  listed = '; '.join(f"{', '.join(names)}: {', '.join(map(str, counts))}" for counts, names in methods.items())
  return (f'Optimizer steps per task: {listed} (every method trains the same epochs of each task, but replay fills part '
          'of each batch from its memory and joint trains on every task so far, so their tasks take more steps and '
          'their curves run longer).')


def lm_markdown_table(results: Sequence[LMResult]) -> str:
  """A markdown table: per method, the final held-out loss (perplexity) per domain, exact match, forgetting.

  Args:
    results: from :func:`sfa_jax.engine.lm.run_lm_sequences`.

  Returns:
    The table.
  """
  names = results[0].domain_names
  em_names = list(results[0].exact_match)
  header = ['method'] + [f'{n} loss (ppl)' for n in names] + ['mean loss'] + [f'{n} exact match' for n in em_names] + ['forgetting']
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for r in results:
    s = r.summary()
    cells = [r.method] + [f'{v:.3f} ({math.exp(v):.1f})' for v in r.loss_matrix[-1]] + [f"{s['mean_final_loss']:.3f}"]
    cells += [f'{r.exact_match[n][-1]:.3f}' for n in em_names] + [f"{s['forgetting']:+.3f}"]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def seed_summaries(results: Sequence[LMResult]) -> list[dict[str, Any]]:
  """Mean and standard deviation over seeds of each method's :meth:`~sfa_jax.engine.lm.LMResult.summary`.

  Args:
    results: runs of several seeds, one :class:`~sfa_jax.engine.lm.LMResult` per (seed, method);
      runs of one method share its label.

  Returns:
    One dict per method, in order of first appearance: ``method``, ``seeds`` (the count), and
    ``mean`` / ``std`` dicts of every summary metric (population std, 0 for one seed), of
    ``{domain}_loss_when_learned``, the loss of each domain right after it is learned, and of
    ``{domain}_loss_after_next``, right after the next one is learned.

  Example:
    >>> import dataclasses
    >>> from sfa_jax.engine.lm import LMResult
    >>> losses = [[3.0, 3.0], [1.0, 3.0], [2.0, 1.0]]
    >>> r = LMResult('sfa', ['a', 'b'], ['initial', 'a', 'b'], losses, {}, [], [], {})
    >>> other_losses = [[3.0, 3.0], [1.0, 3.0], [1.0, 1.0]]
    >>> other_seed = dataclasses.replace(r, loss_matrix=other_losses)
    >>> s = seed_summaries([r, other_seed])[0]
    >>> mean, std = s['mean'], s['std']
    >>> s['seeds'], mean['final_loss_a'], std['final_loss_a'], mean['forgetting']
    (2, 1.5, 0.5, 0.5)
  """
  groups: dict[str, list[dict[str, float]]] = {}
  for r in results:
    summary = r.summary()
    for j, name in enumerate(r.domain_names):
      summary[f'{name}_loss_when_learned'] = r.loss_matrix[j + 1][j]
    for j, name in enumerate(r.domain_names[:-1]):
      summary[f'{name}_loss_after_next'] = r.loss_matrix[j + 2][j]
    groups.setdefault(r.method, []).append(summary)
  out = []
  for method, summaries in groups.items():
    keys = list(summaries[0])
    values = {k: np.asarray([s[k] for s in summaries], float) for k in keys}
    out.append({'method': method, 'seeds': len(summaries),
                'mean': {k: float(v.mean()) for k, v in values.items()},
                'std': {k: float(v.std()) for k, v in values.items()}})
  return out


def lm_seed_table(results: Sequence[LMResult]) -> str:
  """A markdown table of :func:`seed_summaries`: final loss per domain, mean final loss, exact
  match and forgetting, each as mean ± std over the seeds.

  Args:
    results: runs of several seeds (see :func:`seed_summaries`).

  Returns:
    The table.
  """
  names = results[0].domain_names
  em_names = list(results[0].exact_match)
  keys = [f'final_loss_{n}' for n in names] + ['mean_final_loss'] + [f'final_exact_match_{n}' for n in em_names] + ['forgetting']
  header = ['method', 'seeds'] + [f'{n} loss' for n in names] + ['mean loss'] + [f'{n} exact match' for n in em_names] + ['forgetting']
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for row in seed_summaries(results):
    cells = [row['method'], str(row['seeds'])]
    cells += [f"{row['mean'][k]:{'+' if k == 'forgetting' else ''}.3f} ± {row['std'][k]:.3f}" for k in keys]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)

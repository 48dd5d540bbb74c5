"""experiments/three_scenarios.py's LwF (van de Ven & Tolias's weighting and classes) against an independent NumPy
computation of their loss, in the three scenarios."""

import doctest

import jax
import numpy as np
import pytest

from sfa_jax import models
from sfa_jax import tasks
from sfa_jax.engine import methods
from sfa_jax.engine import objectives
from sfa_jax.engine import steps
from sfa_jax.engine.loop import RunState

import three_scenarios


def numpy_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def loss_fn_kd(scores, target_scores, temperature):
  """Their utils.loss_fn_kd: the targets' softmax padded with zeros to the scores' classes, times T²."""
  log_p = numpy_log_softmax(scores / temperature)
  q = np.exp(numpy_log_softmax(target_scores / temperature))
  q = np.concatenate([q, np.zeros((len(q), scores.shape[1] - q.shape[1]))], axis=1)
  return (-(q * log_p).sum(1)).mean() * temperature ** 2


def their_loss(scenario, new, old, y, task):
  """Their train_a_batch with LwF's replay of the current batch, on task ``task`` (from 1) of two classes each:
  ``(1/task)·CE + (1 - 1/task)·KD``. ``new``/``old``: ``{head: logits}`` (one head, 0, unless Task-IL).
  The cross-entropy is the engine's (all of the head's outputs)."""
  cross_entropy = -numpy_log_softmax(new[task - 1 if scenario == tasks.TASK_INCREMENTAL else 0])[np.arange(len(y)), y].mean()
  if task == 1:  # no previous model: the current batch's loss alone
    return cross_entropy
  if scenario == tasks.TASK_INCREMENTAL:  # each past task's head: its two units, averaged over the past tasks
    distill = np.mean([loss_fn_kd(new[j], old[j], 2.0) for j in range(task - 1)])
  elif scenario == tasks.DOMAIN_INCREMENTAL:  # the shared two outputs
    distill = loss_fn_kd(new[0], old[0], 2.0)
  else:  # the classes seen so far against the previous model's past classes
    distill = loss_fn_kd(new[0][:, :2 * task], old[0][:, :2 * (task - 1)], 2.0)
  return cross_entropy / task + (1 - 1 / task) * distill


def _case(scenario, task):
  """An MLP at the end of the previous task (seed 0), the model being trained (seed 1), the step state of
  task ``task`` (from 1) of a three-task stream."""
  heads, outputs = (3, 2) if scenario == tasks.TASK_INCREMENTAL else (1, 6 if scenario == tasks.CLASS_INCREMENTAL else 2)
  model = models.make_model('mlp', outputs, num_heads=heads, hidden=(8,))
  x = np.random.default_rng(0).normal(size=(6, 8, 8, 1)).astype(np.float32)
  labels = [(2 * k, 2 * k + 1) if scenario == tasks.CLASS_INCREMENTAL else (0, 1) for k in range(3)]
  stream = [tasks.Task(k, f't{k}', tasks.Split(x, np.zeros(6, np.int32)), tasks.Split(x, np.zeros(6, np.int32)),
                       (2 * k, 2 * k + 1), labels[k]) for k in range(3)]
  init = steps.initializer(model, x[:1])
  previous, current = init(0), init(1)
  spec = steps.step_spec(model, *previous, stream, batch_size=6, seed=0)
  method = three_scenarios.VanDeVenLwF()
  state = RunState(*previous, None, methods.with_step_state({}, method.init_step_state(*previous, spec)))
  for k in range(task):
    state = method.start_task(state, methods.Boundary(k, 3, 10, None))
  y = np.array(labels[task - 1] * 3, np.int32)
  return model, x, y, previous, current, method, methods.step_state(state.extras), spec


@pytest.mark.parametrize('scenario', [tasks.TASK_INCREMENTAL, tasks.DOMAIN_INCREMENTAL, tasks.CLASS_INCREMENTAL])
@pytest.mark.parametrize('task', [1, 2, 3])
def test_the_loss_is_their_weighted_loss(scenario, task):
  model, x, y, previous, current, method, state, spec = _case(scenario, task)
  assert spec.task_heads == (scenario == tasks.TASK_INCREMENTAL)
  apply = lambda variables, head: np.asarray(
      model.apply(models.merge_variables(*variables), x, task_id=np.full(6, head, np.int32), train=False))
  heads = range(3) if spec.task_heads else [0]
  expected = their_loss(scenario, {j: apply(current, j) for j in heads}, {j: apply(previous, j) for j in heads}, y, task)
  ids = np.full(6, task - 1, np.int32)
  hooks = methods.StepModel(lambda p, xs, t: model.apply(models.merge_variables(p, current[1]), xs, task_id=t, train=False),
                            lambda p, s, xs, t: model.apply(models.merge_variables(p, s), xs, task_id=t, train=False),
                            objectives.CLASSIFICATION.loss)
  batch = methods.StepBatch(x, y, np.ones(6, bool), ids)

  def total(params):  # what the engine's step differentiates: the objective's loss plus the method's term
    outputs = model.apply(models.merge_variables(params, current[1]), x, task_id=ids, train=False)
    return objectives.CLASSIFICATION.loss(outputs, y, batch.mask)[0] + method.step_loss(params, outputs, batch, state, hooks)

  got, grads = jax.value_and_grad(total)(current[0])
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(grads))


def test_the_classes_and_weight_follow_the_task():
  *_, state, _ = _case(tasks.CLASS_INCREMENTAL, 3)
  assert float(state['current_weight']) == pytest.approx(1 / 3)
  assert state['seen'].tolist() == [True] * 6 and state['past'].tolist() == [True, True, False]


def test_the_soft_cross_entropys_examples():
  finder = doctest.DocTestFinder()
  for test in finder.find(three_scenarios.soft_cross_entropy, globs=vars(three_scenarios)):
    assert doctest.DocTestRunner().run(test).failed == 0

"""van de Ven & Tolias, "Three scenarios for continual learning" (arXiv 1904.07734), reproduced with the engine.

Their protocols (settings verified in GMvandeVen/continual-learning, `param_values.py` of 2019-12-19 and
`compare_MNIST.py`): an MLP with two hidden layers (400 units for split MNIST, 1000 for permuted MNIST),
ReLU, Adam (lr 1e-3 split / 1e-4 permuted; the optimizer is *not* reset between tasks), batch 128,
2000 (split) / 5000 (permuted) iterations per task, evaluated in three scenarios:

  task-incremental    one head per task (their multi-headed output, the active task's units only)
  domain-incremental  one shared head with the task's classes relabelled 0..c-1 (split: even/odd digit)
  class-incremental   one shared 10-way head (split MNIST only here)

Methods the engine has, and their rows in the paper's Tables 4-5:

  finetune      "None - lower bound"
  joint         "Offline - upper bound" (stage k trains on tasks 0..k, the same iterations per stage)
  ewc           "Online EWC" (one quadratic penalty toward the last task's end, F <- gamma F + F_new), at the
                lambda and gamma of their grid search (param_values.py)
  ewc-offline   "EWC" (one penalty per past task, Kirkpatrick et al's), at the lambda of their grid search (the
                same 1/2 convention: their ewc_lambda is the engine's strength)
  si            "SI" (Zenke et al's path integral), at the c of their grid search: the engine's penalty has
                EWC's 1/2, so strength = 2c; damping = their epsilon, 0.1. The engine's path integral uses the
                gradient of the task's loss (Zenke et al's definition), theirs that of the total loss, the SI
                penalty included
  replay        no row in the 2019 tables (their memory-based row is iCaRL, budget 2000, class-IL); run with
                25 % of each past task kept (200 images per task, 100 per class) and half of each batch replayed
  lwf           "LwF", as they train it (`VanDeVenLwF`, a subclass of the engine's LwF written here): on task k
                (from 1) the loss is (1/k)·CE + (1 - 1/k)·T²·KD with T = 2, KD the soft cross-entropy of the
                model's softened outputs to the previous model's; per scenario the classes distilled are theirs
                (each past task's head, averaged; the shared head; the previous model's classes against the
                model's softmax over every class seen so far, the current task's included)

DGR, DGR+distill, iCaRL and XdG are not in the engine: their rows are shown, not run.

What differs from the paper, beyond the methods: the bundled 5000 MNIST images (4000 train, 1000 test:
800 / 200 per split-MNIST task) instead of 60 000 / 10 000; permuted MNIST permutes the 28x28 pixels (theirs:
zero-padded to 32x32) and uses the 4000 training images per task; 3 seeds instead of 20; EWC's Fisher uses
the true labels (theirs: the model's predicted labels); class-incremental trains the full 10-way head
(theirs: the softmax over the classes seen so far; LwF's distillation does take their softmax).

  python experiments/three_scenarios.py --protocols split            # 3 scenarios x 7 methods x 3 seeds
  python experiments/three_scenarios.py --protocols permuted --scenarios domain-incremental --seeds 0
  python experiments/three_scenarios.py --quick                      # 8x8 digits, few steps

Each finished run is appended to <out>/three_scenarios/<protocol>.runs.jsonl at once and skipped on a
rerun (the long runs survive a stop). The budget rule (`sfa_jax.engine.budget`) is checked once per protocol:
fine-tuning's convergence is measured with twice the steps per task (permuted: on its first two tasks)
and recorded in the results.
"""

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from sfa_jax import engine
from sfa_jax import tasks
from sfa_jax.engine import budget
from sfa_jax.engine import compile_cache
from sfa_jax.engine import methods

import scaffold

PROTOCOLS = {
    'split': {'stream': 'split-mnist', 'hidden': (400, 400), 'learning_rate': 1e-3, 'steps': 2000, 'tasks': 5,
              'scenarios': (tasks.TASK_INCREMENTAL, tasks.DOMAIN_INCREMENTAL, tasks.CLASS_INCREMENTAL)},
    'permuted': {'stream': 'permuted-mnist', 'hidden': (1000, 1000), 'learning_rate': 1e-4, 'steps': 5000, 'tasks': 10,
                 'scenarios': (tasks.TASK_INCREMENTAL, tasks.DOMAIN_INCREMENTAL)},
}
BATCH = 128

# Their online-EWC lambda and gamma per (protocol, scenario): GMvandeVen/continual-learning param_values.py
# (commit f0b1461, 2019-12-19, "default (hyper)parameter-values based on chosen experiment and scenario").
# Same convention as sfa_jax's EWC: loss + lambda * 1/2 * sum F (theta - theta*)^2, F a mean over examples.
ONLINE_EWC = {
    ('split', tasks.TASK_INCREMENTAL): (1e8, 0.8),
    ('split', tasks.DOMAIN_INCREMENTAL): (1e8, 0.7),
    ('split', tasks.CLASS_INCREMENTAL): (1e9, 0.8),
    ('permuted', tasks.TASK_INCREMENTAL): (500.0, 0.8),
    ('permuted', tasks.DOMAIN_INCREMENTAL): (1000.0, 0.9),
    ('permuted', tasks.CLASS_INCREMENTAL): (5.0, 1.0),
}
# Their SI c and offline-EWC lambda per (protocol, scenario), from the same param_values.py (si_c, ewc_lambda); SI's
# epsilon is their --epsilon default, 0.1. The engine's SI strength is 2c (its penalty has EWC's 1/2).
SI_C = {
    ('split', tasks.TASK_INCREMENTAL): 50.0,
    ('split', tasks.DOMAIN_INCREMENTAL): 500.0,
    ('split', tasks.CLASS_INCREMENTAL): 0.5,
    ('permuted', tasks.TASK_INCREMENTAL): 5.0,
    ('permuted', tasks.DOMAIN_INCREMENTAL): 5.0,
    ('permuted', tasks.CLASS_INCREMENTAL): 0.1,
}
SI_EPSILON = 0.1
OFFLINE_EWC = {
    ('split', tasks.TASK_INCREMENTAL): 1e7,
    ('split', tasks.DOMAIN_INCREMENTAL): 1e6,
    ('split', tasks.CLASS_INCREMENTAL): 1e8,
    ('permuted', tasks.TASK_INCREMENTAL): 500.0,
    ('permuted', tasks.DOMAIN_INCREMENTAL): 500.0,
    ('permuted', tasks.CLASS_INCREMENTAL): 1.0,
}
REPLAY_FRACTION = 0.25


def soft_cross_entropy(old, new, teacher, student, temperature, mask):
  r"""van de Ven's distillation loss (``utils.loss_fn_kd``), without its ``T²``: ``-mean_n Σ_c q_{n,c} log p_{n,c}``.

  ``q = softmax(old / T)`` over the ``teacher`` classes and 0 elsewhere (their zero padding of the previous
  model's probabilities), ``p = softmax(new / T)`` over the ``student`` classes (a superset of ``teacher``);
  the mean over the examples ``mask`` selects. With ``student == teacher`` it is the engine's
  :func:`sfa_jax.engine.rehearsal.distillation`.

  Example:
    >>> z = jnp.array([[1.0, 2.0, 9.0]])
    >>> teacher, student = jnp.array([True, True, False]), jnp.array([True, True, True])
    >>> round(float(soft_cross_entropy(z, z, teacher, teacher, 1.0, jnp.ones(1))), 4)  # the entropy of softmax([1, 2])
    0.5822
    >>> round(float(soft_cross_entropy(z, z, teacher, student, 1.0, jnp.ones(1))), 4)  # the third class takes p's mass
    7.2702
  """
  q = jax.nn.softmax(jnp.where(teacher, old / temperature, -jnp.inf), axis=-1)
  log_p = jnp.where(student, jax.nn.log_softmax(jnp.where(student, new / temperature, -jnp.inf), axis=-1), 0.0)
  per_example = -jnp.sum(jnp.where(teacher, q * log_p, 0.0), axis=-1)
  mask = mask.astype(per_example.dtype)
  return (per_example * mask).sum() / jnp.maximum(mask.sum(), 1.0)


class VanDeVenLwF(methods.LwF):
  r"""LwF as van de Ven & Tolias train it: the engine's :class:`~sfa_jax.engine.methods.LwF`, reweighted per task.

  On task ``k`` (counted from 1) the loss is

  .. math::  \frac{1}{k} L_{CE} + \alpha \left(1 - \frac{1}{k}\right) T^2 L_{KD}

  with ``alpha = 1`` theirs, ``T = 2`` and ``L_KD`` :func:`soft_cross_entropy` toward the previous task's model
  (evaluation mode) on the current batch: with one head per task (Task-IL), each past task's head under its
  task id, averaged over the past tasks; with a shared head, the previous model's softmax over the past tasks'
  classes against the model's over the classes seen so far, the current task's included (Domain-IL: the two
  shared outputs on both sides; Class-IL: ``2(k-1)`` against ``2k`` classes). The engine's LwF takes
  ``L_CE + alpha·L_KD`` with the same softmax on both sides; here the step's extra loss is
  ``(1/k - 1)·L_CE + alpha·(1 - 1/k)·T²·L_KD``, so the total is their weighted sum exactly (Adam, not reset
  between tasks, sees their loss scale). The weight ``1/k`` and the classes seen are arrays of the step state,
  set at each task's start.

  Read in GMvandeVen/continual-learning at commit 9945f84 (2019-12-19, the version with ``param_values.py``):
  ``_compare.py`` (LwF is ``--replay=current --distill``; ``main.py``: ``--temp`` 2), ``train.py`` (``rnt=1./task``;
  the previous model ``copy.deepcopy(model).eval()``; replay of the current batch, its target scores per past
  task's slice for Task-IL, ``[:, :classes_per_task*(task-1)]`` for Class-IL, all for Domain-IL; active
  classes: the current task's for Task-IL, ``range(classes_per_task*task)`` for Class-IL),
  ``encoder.py`` ``Classifier.train_a_batch`` (``loss_total = rnt*loss_cur + (1-rnt)*loss_replay``,
  ``loss_replay`` the mean over the past tasks' replays, ``y_hat_all[:, active_classes[replay_id]]``) and
  ``utils.py`` ``loss_fn_kd`` (``log_softmax(scores/T)``, ``softmax(target_scores/T)`` padded with zeros to
  the scores' classes, summed over classes, averaged over the batch, times ``T**2``).
  """

  name = 'lwf-vandeven'

  def init_step_state(self, params, model_state, spec):
    state = super().init_step_state(params, model_state, spec)
    return state | {'current_weight': jnp.float32(1.0), 'seen': state['classes'][0]}

  def start_task(self, state, boundary):
    state = super().start_task(state, boundary)
    k = boundary.task_index + 1
    step = methods.step_state(state.extras)
    step = step | {'current_weight': jnp.float32(1.0 / k), 'seen': jnp.any(step['classes'][:k], axis=0)}
    return state._replace(extras=methods.with_step_state(state.extras, step))

  def step_loss(self, params, outputs, batch, step_state, model):
    previous_params, previous_state = step_state['previous']
    past = step_state['past']
    teacher = jnp.any(step_state['classes'] & past[:, None], axis=0)
    teacher = jnp.where(jnp.any(teacher), teacher, True)  # task 1: no past class; its weight 1 - 1/k is 0
    student = step_state['seen'] | teacher
    temperature = step_state['temperature']
    previous = lambda ids: jax.lax.stop_gradient(model.evaluate(previous_params, previous_state, batch.x, ids))
    if 'heads' not in step_state:
      distill = soft_cross_entropy(previous(batch.task_ids), outputs, teacher, student, temperature, batch.mask)
    else:
      def head(j):
        ids = jnp.full_like(batch.task_ids, j)
        return soft_cross_entropy(previous(ids), model.apply(params, batch.x, ids), teacher, student, temperature,
                                  batch.mask)

      weights = past.astype(jnp.float32)
      distill = (jax.vmap(head)(step_state['heads']) * weights).sum() / jnp.maximum(weights.sum(), 1.0)
    task_loss, _ = model.loss(outputs, batch.y, batch.mask)
    weight = step_state['current_weight']
    return (weight - 1.0) * task_loss + step_state['alpha'] * (1.0 - weight) * temperature ** 2 * distill

# The paper's Tables 4 (split MNIST) and 5 (permuted MNIST): mean over 20 seeds, in %, with the spread it
# reports (± SEM). Task-IL / Domain-IL / Class-IL. "verified": the mean was found, to the first decimal,
# in a stored copy of the paper's numbers (a course page quoting Tables 4-5; the paper's own PDF is not
# in the stored corpus); the ± values and the other means are as the paper reports them to our knowledge
# and were not found in a stored copy (marked "unverified" in the outputs).
PUBLISHED = {
    'split': {
        'None': ((87.19, 0.94), (59.21, 2.04), (19.90, 0.02)),
        'Offline': ((99.66, 0.02), (98.42, 0.06), (97.94, 0.03)),
        'EWC': ((98.64, 0.22), (63.95, 1.90), (20.01, 0.06)),
        'Online EWC': ((99.12, 0.11), (64.32, 1.90), (19.96, 0.07)),
        'SI': ((99.09, 0.15), (65.36, 1.57), (19.99, 0.06)),
        'LwF': ((99.57, 0.02), (71.50, 1.63), (23.85, 0.44)),
        'DGR': ((99.50, 0.03), (95.72, 0.25), (90.79, 0.41)),
        'DGR+distill': ((99.61, 0.02), (96.83, 0.20), (91.79, 0.32)),
        'iCaRL (budget 2000)': (None, None, (94.57, 0.11)),
    },
    'permuted': {
        'None': ((81.79, 0.48), (78.51, 0.24), (17.26, 0.19)),
        'Offline': ((97.68, 0.01), (97.59, 0.01), (97.59, 0.02)),
        'EWC': ((94.74, 0.05), (94.31, 0.11), (25.04, 0.50)),
        'Online EWC': ((95.96, 0.06), (94.42, 0.13), (33.88, 0.49)),
        'SI': ((94.75, 0.14), (95.33, 0.11), (29.31, 0.62)),
        'LwF': ((69.84, 0.46), (72.64, 0.52), (22.64, 0.23)),
        'DGR': ((92.52, 0.08), (95.09, 0.04), (92.19, 0.09)),
        'DGR+distill': ((97.51, 0.01), (97.35, 0.02), (96.38, 0.03)),
        'iCaRL (budget 2000)': (None, None, (94.85, 0.03)),
    },
}
# Means found to one decimal in the stored secondary copy (split: every row; permuted: Class-IL EWC, SI,
# Online EWC, DGR, DGR+distill, iCaRL).
VERIFIED = {
    'split': {(row, s) for row in PUBLISHED['split'] for s in range(3)},
    'permuted': {('EWC', 2), ('SI', 2), ('Online EWC', 2), ('DGR', 2), ('DGR+distill', 2), ('iCaRL (budget 2000)', 2)},
}
ROW_OF = {'finetune': 'None', 'joint': 'Offline', 'ewc': 'Online EWC', 'ewc-offline': 'EWC', 'si': 'SI', 'lwf-vandeven': 'LwF'}
SCENARIO_COLUMN = {tasks.TASK_INCREMENTAL: 0, tasks.DOMAIN_INCREMENTAL: 1, tasks.CLASS_INCREMENTAL: 2}
SHORT = {tasks.TASK_INCREMENTAL: 'Task-IL', tasks.DOMAIN_INCREMENTAL: 'Domain-IL', tasks.CLASS_INCREMENTAL: 'Class-IL'}


def methods_for(protocol, scenario, extra_ewc=()):
  """``(selector, (method, {hyper-parameter: (value,)}))``: the seven methods, then EWC at the --ewc-strengths
  (selector 'ewc-tuned'); the second item is a grid entry of :func:`scaffold.configurations`."""
  strength, gamma = ONLINE_EWC[protocol, scenario]
  si = {'strength': (2.0 * SI_C[protocol, scenario],), 'damping': (SI_EPSILON,)}
  return ([('finetune', ('finetune', {})), ('joint', ('joint', {})), ('ewc', ('ewc', {'strength': (strength,), 'gamma': (gamma,)})),
           ('ewc-offline', ('ewc-offline', {'strength': (OFFLINE_EWC[protocol, scenario],)})), ('si', ('si', si)),
           ('replay', ('replay', {'fraction': (REPLAY_FRACTION,)})), ('lwf', (VanDeVenLwF, {}))]
          + [('ewc-tuned', ('ewc', {'strength': (float(x),), 'gamma': (gamma,)})) for x in extra_ewc if float(x) != strength])


def stream_of(protocol, scenario, quick):
  spec = PROTOCOLS[protocol]
  source = 'digits' if quick else 'offline'
  if spec['stream'] == 'permuted-mnist':
    return tasks.make_stream('permuted-mnist', source=source, num_tasks=3 if quick else spec['tasks'], setting=scenario)
  return tasks.make_stream('split-mnist', source=source, setting=scenario)


def config_of(protocol, quick):
  spec = PROTOCOLS[protocol]
  return engine.TrainConfig(
      model='mlp', model_kwargs=(('hidden', (32, 32) if quick else spec['hidden']),), batch_size=32 if quick else BATCH,
      learning_rate=spec['learning_rate'], steps_per_task=20 if quick else spec['steps'], reset_optimizer=False,
      eval_batch_size=1000, eval_every=0)


def run_key(protocol, scenario, label, seed):
  return f'{protocol}|{scenario}|{label}|{seed}'


def load_runs(path):
  return scaffold.load_runs(path, lambda run: run['key'])


def summarize(protocol, runs):
  """Per scenario and table row: mean and SEM (over seeds) of the final average accuracy, in %.

  Rows: each method at the paper's settings (``(scenario, name)``), and ``(scenario, 'ewc-tuned')``: the
  EWC strength with the best mean, the paper's included (chosen on the test accuracies, as the paper chose
  its strengths; its number of seeds is shown beside it).
  """
  cells = {}
  for run in runs.values():
    cells.setdefault((run['scenario'], run['method_name'], run['method'], run['hyperparams'].get('strength')), []).append(
        100.0 * run['metrics']['average_accuracy'])
  out = {}
  for (scenario, name, label, strength), values in cells.items():
    values = np.asarray(values)
    cell = {'label': label, 'mean': float(values.mean()), 'std': float(values.std()), 'sem': scaffold.standard_error(values),
            'seeds': len(values)}
    paper_strength = ONLINE_EWC[protocol, scenario][0]
    if name != 'ewc' or strength == paper_strength:
      out[scenario, name] = cell
    if name == 'ewc':
      best = out.get((scenario, 'ewc-tuned'))
      if best is None or cell['mean'] > best['mean']:
        out[scenario, 'ewc-tuned'] = cell
  return out


def side_by_side(protocol, summary, scenarios):
  lines = ['| paper row (method here) | ' + ' | '.join(f'{SHORT[s]}: paper | {SHORT[s]}: ours | {SHORT[s]}: verdict' for s in scenarios) + ' |',
           '|---|' + '---:|---:|---|' * len(scenarios)]
  ours_of_row = {row: name for name, row in ROW_OF.items()}
  rows = list(PUBLISHED[protocol])
  rows.insert(rows.index('Online EWC') + 1, 'Online EWC, strength tuned here')
  rows.append('(replay 25 %, no 2019 row)')
  for row in rows:
    name = ours_of_row.get(row) or ('replay' if row.startswith('(replay') else ('ewc-tuned' if 'tuned' in row else None))
    published_row = 'Online EWC' if name == 'ewc-tuned' else row
    cells = []
    for scenario in scenarios:
      column = SCENARIO_COLUMN[scenario]
      published = PUBLISHED[protocol].get(published_row, (None, None, None))[column]
      mark = '' if (published_row, column) in VERIFIED[protocol] else ' (unverified)'
      cells.append('–' if published is None else f'{published[0]:.2f} ± {published[1]:.2f}{mark}')
      mine = summary.get((scenario, name)) if name else None
      if mine is None:
        cells += ['not run' if name else 'not in the engine', '–']
        continue
      cells.append(f"{mine['mean']:.2f} ± {mine['sem']:.2f} (n={mine['seeds']})" + (f" `{mine['label']}`" if name == 'ewc-tuned' else ''))
      if published is None:
        cells.append('no published cell')
      else:
        ok, diff, spread = scaffold.within_spread((mine['mean'], mine['sem']), published)
        cells.append(f"{'within' if ok else '**not within**'} ({diff:+.2f}; 2σ {spread:.2f})")
    label = f'{row} (`{name}`)' if name else row
    lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  return lines


def main(argv=None) -> None:
  parser = scaffold.experiment_parser(__doc__)
  parser.add_argument('--protocols', default='split,permuted', help='comma-separated: split, permuted')
  parser.add_argument('--scenarios', help='comma-separated settings (default: every scenario of each protocol)')
  parser.add_argument('--methods', default='finetune,joint,ewc,ewc-offline,si,replay,lwf',
                      help="comma-separated: finetune, joint, ewc, ewc-offline, si (at the paper's strengths), replay, lwf, "
                           'ewc-tuned (at --ewc-strengths)')
  parser.add_argument('--ewc-strengths', default='', help='comma-separated EWC strengths run as ewc-tuned (the paper\'s '
                      'strengths do not transfer: on 800 images per task trained for 2000 steps the Fisher is ~1e6 times smaller)')
  args = parser.parse_args(argv)
  compile_cache.enable_compilation_cache()
  start = time.perf_counter()
  command = scaffold.command_line(__file__, argv)
  seeds = scaffold.seeds_of(args)
  wanted_methods = set(args.methods.split(','))
  for protocol in args.protocols.split(','):
    if protocol not in PROTOCOLS:
      raise SystemExit(f'--protocols: unknown protocol {protocol!r}; choose from {sorted(PROTOCOLS)}.')
    scenarios = [s for s in PROTOCOLS[protocol]['scenarios'] if args.scenarios is None or s in args.scenarios.split(',')]
    name = scaffold.output_name(args, 'three_scenarios', protocol)
    runs_path = os.path.join(args.out, f'{name}.runs.jsonl')
    os.makedirs(os.path.dirname(runs_path), exist_ok=True)
    runs = load_runs(runs_path)
    config = config_of(protocol, args.quick)
    # The budget rule, once per protocol: fine-tuning's convergence at twice the budget, on the first
    # scenario's stream (the task-incremental one; permuted: its first two tasks), first seed.
    budget_path = os.path.join(args.out, f'{name}.budget.json')
    if os.path.exists(budget_path):
      with open(budget_path) as f:
        budget_record = json.load(f)
    else:
      probe = stream_of(protocol, scenarios[0], args.quick)
      if protocol == 'permuted':
        probe = tasks.make_stream('permuted-mnist', source=probe.source if args.quick else 'offline', num_tasks=2,
                                  setting=scenarios[0]) if not args.quick else probe
      convergence = budget.measure_convergence(probe, dataclasses.replace(config, seed=seeds[0]), 2 * config.steps_per_task,
                                               eval_every=max(1, config.steps_per_task // 10))
      convergence['stream'] = f'{probe.name}, {probe.setting}, {len(probe)} tasks'
      check = budget.check_budget(config.steps_per_task, convergence=convergence, strict=False, what=name)
      budget_record = {'convergence': convergence, 'check': check.to_json()}
      with open(budget_path, 'w') as f:
        json.dump(budget_record, f, indent=1)
    print(f'[{name}] budget: {config.steps_per_task} steps per task; fine-tuning reaches 95 % of converged after '
          f"{budget_record['check']['steps_to_fraction']} steps; ok={budget_record['check']['ok']}", flush=True)
    for scenario in scenarios:
      stream = stream_of(protocol, scenario, args.quick)
      extra = [x for x in args.ewc_strengths.split(',') if x]
      grid = [entry for selector, entry in methods_for(protocol, scenario, extra) if selector in wanted_methods]
      key = lambda label, seed: run_key(protocol, scenario, label, seed)
      fields = lambda finished, seconds: {
          'key': key(finished.method.label, finished.config.seed), 'protocol': protocol, 'scenario': scenario,
          'wall_seconds': seconds, 'loadavg': os.getloadavg()}
      for run in scaffold.train_missing(stream, scaffold.configurations(grid, config, seeds), runs, runs_path, key,
                                           fields=fields, as_sweep=args.sweep):
        print(f'[{time.perf_counter() - start:6.0f} s] {protocol} {scenario:18s} {run["method"]:32s} seed {run["seed"]}: '
              f"avg {run['metrics']['average_accuracy']:.4f} ({run['wall_seconds']:.0f} s, load {os.getloadavg()[0]:.1f})", flush=True)
    runs = load_runs(runs_path)  # with the runs of any other process on this protocol (run side by side)
    summary = summarize(protocol, runs)
    table = side_by_side(protocol, summary, PROTOCOLS[protocol]['scenarios'])
    md = [f'# Three scenarios for continual learning (van de Ven & Tolias 2019): {protocol} MNIST, paper against sfa_jax', '',
          f"Final average accuracy over all {PROTOCOLS[protocol]['tasks'] if not args.quick else 'the'} tasks, %: "
          'paper mean ± SEM over 20 seeds; ours mean ± SEM over the seeds run (n). Verdict: within when '
          '|ours − paper| ≤ 2·sqrt(SEM_ours² + SEM_paper²) (n = 1: the paper\'s SEM alone, a strict test). Settings and differences: the docstring of '
          '`experiments/three_scenarios.py`.', ''] + table + ['',
          f"Budget rule: {config.steps_per_task} steps per task; fine-tuning's steps to 95 % of its converged accuracy "
          f"(measured over {budget_record['convergence']['reference_steps']} steps per task on "
          f"{budget_record['convergence']['stream']}): {budget_record['check']['steps_to_fraction']}; "
          f"rule {'met' if budget_record['check']['ok'] else 'FAILED: ' + '; '.join(budget_record['check']['problems'])}.", '',
          'Learning against keeping: *right after training* is the accuracy on each of tasks 2–5 just after it '
          'was trained, *past at the end* the final accuracy on tasks 1–4 (`scaffold.stability_plasticity`), '
          'means over seeds, %. A method below fine-tuning in the first learns less; one at fine-tuning\'s '
          'level in the second does not protect the past.', '',
          '| scenario | method | final avg acc (mean ± std) | forgetting | right after training | past at the end | seeds | '
          'train s per run |', '|---|---|---:|---:|---:|---:|---:|---:|']
    for scenario in PROTOCOLS[protocol]['scenarios']:
      mine = [r for r in runs.values() if r['scenario'] == scenario]
      for row in engine.summarize_runs(mine):
        stability, plasticity = 100.0 * np.mean([scaffold.stability_plasticity(r) for r in mine if r['method'] == row['method']], axis=0)
        md.append(f"| {scenario} | {row['method']} | {row['average_accuracy'][0]:.4f} ± {row['average_accuracy'][1]:.4f} | "
                  f"{row['forgetting'][0]:.4f} ± {row['forgetting'][1]:.4f} | {plasticity:.2f} | {stability:.2f} | "
                  f"{row['seeds']} | {row['train_seconds'][0]:.0f} |")
    payload = {'protocol': protocol, 'settings': {**{k: v for k, v in PROTOCOLS[protocol].items() if k != 'scenarios'},
                                                  'batch_size': BATCH, 'online_ewc': {f'{p}|{s}': v for (p, s), v in ONLINE_EWC.items() if p == protocol},
                                                  'offline_ewc': {f'{p}|{s}': v for (p, s), v in OFFLINE_EWC.items() if p == protocol},
                                                  'si_c': {f'{p}|{s}': v for (p, s), v in SI_C.items() if p == protocol},
                                                  'si_epsilon': SI_EPSILON,
                                                  'replay_fraction': REPLAY_FRACTION, 'config': engine.run.describe_config(config)},
               'published': PUBLISHED[protocol], 'verified_cells': sorted(map(list, VERIFIED[protocol])),
               'summary': [{'scenario': s, 'method_name': n, **v} for (s, n), v in summary.items()],
               'budget': budget_record, 'seeds': list(seeds), 'runs': list(runs.values())}
    scaffold.write_results(args.out, name, payload, '\n'.join(md), command, time.perf_counter() - start)
    print('\n'.join(md), flush=True)


if __name__ == '__main__':
  main()

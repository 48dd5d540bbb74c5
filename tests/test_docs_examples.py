"""Every ```python block of the README and of the documentation's pages runs, as written, in a test.

A page's blocks run in order in one namespace (a page is one example told in steps), in a
temporary working folder. Markers, HTML comments that neither the site nor GitHub shows:

* ``<!-- docs-test: skip (reason) -->`` on the line before a block: the block is not run (few,
  each with its reason);
* ``<!-- docs-test: subprocess (reason) -->`` on the line before a page's first block: the page
  runs in a fresh Python (a page that sets ``XLA_FLAGS`` before JAX starts);
* ``<!-- docs-test: slow (reason) -->`` on a line of its own: the page's test is marked slow.

``CHECKS`` holds what each page's example must have computed (and printed: ``ns['__printed__']``
is its standard output), so a block that runs but goes wrong fails too. The ``sfa-jax`` command
lines of the pages' ```bash blocks (a line ending in ``\\`` continues on the next) are parsed and
checked by the command line's own argument checks (nothing trained). No line of a code block is
wider than :data:`MAX_COLUMNS` (what a page shows at 1280 px without cutting it off), but for the
README's two set-up commands.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / 'docs'
README = ROOT / 'README.md'
PAGES = [README] + sorted(p for p in DOCS.rglob('*.md') if not {'_build', 'api'} & set(p.relative_to(DOCS).parts))
FENCE = re.compile(
    r'^(?P<marker><!-- docs-test: (?P<kind>skip|subprocess) \((?P<reason>[^)]+)\) -->\n)?```(?P<info>[^\n]*)\n(?P<code>.*?)^```',
    re.M | re.S)
SLOW = re.compile(r'^<!-- docs-test: slow \([^)]+\) -->$', re.M)
MAX_SKIPPED = 3
MAX_COLUMNS = 88
README_SETUP = ('python3 -m venv .venv && ',)  # the README's two set-up commands, each one line to copy


@dataclasses.dataclass
class Page:
  path: pathlib.Path
  blocks: list[str]
  skipped: list[tuple[str, str]]
  subprocess: bool
  slow: bool

  @property
  def name(self) -> str:
    return 'README.md' if self.path == README else self.path.relative_to(DOCS).as_posix()


def read_page(path: pathlib.Path) -> Page:
  text = path.read_text()
  blocks, skipped, in_subprocess = [], [], False
  for match in FENCE.finditer(text):
    if match['info'].strip() != 'python':
      continue
    if match['kind'] == 'skip':
      skipped.append((match['reason'], match['code']))
    else:
      in_subprocess |= match['kind'] == 'subprocess'
      blocks.append(match['code'])
  return Page(path, blocks, skipped, in_subprocess, SLOW.search(text) is not None)


ALL = [read_page(path) for path in PAGES]
RUNNABLE = [page for page in ALL if page.blocks]


def _params():
  return [pytest.param(page, id=page.name, marks=[pytest.mark.slow] if page.slow else []) for page in RUNNABLE]


# -- What each page's example computed ------------------------------------------------------------


def _tiny_hugging_face_checkpoint(folder: pathlib.Path) -> None:
  """A random Llama in Hugging Face's layout at ``folder/path/to/SmolLM2-135M`` (the pages' path)."""
  import jax
  from sfa_jax.models import save_hf_llama
  from sfa_jax.models.llama import Llama, LlamaConfig

  pytest.importorskip('safetensors')
  config = LlamaConfig.tiny(vocab_size=64, num_layers=6, dim=32, ffn_dim=48)
  params = Llama(config).init(jax.random.key(0), np.zeros((1, 8), np.int32))['params']
  save_hf_llama(folder / 'path' / 'to' / 'SmolLM2-135M', params, config)


SETUP = {'guides/huggingface.md': _tiny_hugging_face_checkpoint}
# A page's optional package (module, what to install): without it, the page's test skips.
NEEDS = {'guides/tunix.md': ('tunix', 'google-tunix: pip install sfa-jax[tunix]')}


def _check_readme(ns):
  import sfa_jax
  x, y, loss = ns['x'], ns['y'], ns['loss_fn']
  assert float(loss(ns['params'], x, y)) < 0.8 * float(np.log(3))  # the last task is learnt
  assert int(sfa_jax.find_state(ns['opt_state']).count) == 40 and bool(sfa_jax.find_state(ns['opt_state']).averaged)
  printed = ns['__printed__'].splitlines()  # the accuracy on both tasks after each, rounded
  assert [line.split(':')[0] for line in printed] == ['after task 0, accuracy on tasks 0 and 1', 'after task 1, accuracy on tasks 0 and 1']
  assert all(re.fullmatch(r'.*: \[0\.\d{1,2}, 0\.\d{1,2}\]', line) for line in printed), printed


def _check_index(ns):
  import sfa_jax
  assert int(sfa_jax.find_state(ns['opt_state']).total_steps) == 100


def _check_getting_started(ns):
  import sfa_jax
  loss, make_task, params = ns['loss_fn'], ns['make_task'], ns['params']
  chance = float(np.log(3))  # the loss of the zero params
  assert float(loss(params, *make_task(1))) < 0.8 * chance  # the second task is learnt
  assert float(loss(params, *make_task(0))) < 0.6 * chance  # and the first one kept
  assert isinstance(sfa_jax.find_state(ns['opt_state']), sfa_jax.EWCState)  # the last block's EWC
  assert all(np.all(np.asarray(leaf) >= 0) for leaf in __import__('jax').tree.leaves(ns['fisher']))


def _check_sequence(ns):
  assert ns['averaged_steps'] == [(1, 5), (1, 10), (1, 15), (1, 20), (2, 6), (2, 12), (2, 18), (2, 24), (2, 25)]
  import sfa_jax
  assert float(sfa_jax.find_state(ns['opt_state']).beta) == 0.25


def _check_masked(ns):
  import optax
  import sfa_jax
  states = sfa_jax.find_states(ns['opt_state'])
  by_beta = sorted(states, key=lambda s: float(s.beta))
  assert [(round(float(s.beta), 6), int(s.total_steps)) for s in by_beta] == [(0.1, 16), (0.5, 16)]
  assert isinstance(by_beta[0].anchor['body'], optax.MaskedNode) and isinstance(by_beta[1].anchor['head'], optax.MaskedNode)


def _check_nnx(ns):
  import sfa_jax
  state = sfa_jax.find_state(ns['optimizer'])
  assert int(state.count) == 20 and bool(state.active) and bool(ns['averaged'])  # step T averages


def _check_placement(ns):
  assert 'MultiSteps' in ns['refused'] and len(ns['caught']) == 1 and 'last' in str(ns['caught'][0].message)


def _check_schedule(ns):
  averages = ns['averages']
  assert averages(0.25, 10) == [3, 6, 9, 10] and averages(0.25, 12) == [3, 6, 9, 12] and averages(1.0, 10) == [10]
  assert averages(0.25, 62) == [16, 32, 48, 62]


def _check_sfa_and_l2(ns):
  np.testing.assert_allclose(ns['ends'][0], ns['ends'][1], rtol=1e-5, atol=1e-6)
  assert not np.allclose(ns['ends'][0], ns['start']['w'])


def _check_merges(ns):
  accuracy, data, merged = ns['accuracy'], ns['data'], ns['merged']
  last, magmax = ([accuracy(merged[name], x, y) for x, y in data] for name in ('last model', 'magmax'))
  assert magmax[0] > last[0] + 0.1 and magmax[1] > last[1] + 0.1  # the earlier tasks kept
  assert ns['__printed__'].splitlines()[:3] == [
      f'{name}: {[round(accuracy(merged[name], x, y), 2) for x, y in data]}' for name in merged]
  finetune, magmax_run, cofima_run = ns['results']
  assert [r.method for r in ns['results']] == ['finetune', 'magmax(scaling=0.5)', 'cofima(beta=0.6, gamma=0)']
  assert all(len(r.accuracy_matrix) == 3 for r in ns['results'])
  assert magmax_run.summary()['average_accuracy'] > finetune.summary()['average_accuracy']


def _check_regularisers(ns):
  losses = ns['losses']
  finetune = losses.pop('finetune')
  assert finetune[0] > 0.3 and finetune[1] < 1e-3  # fine-tuning forgets task 0
  for name, (first, second) in losses.items():
    assert first < 0.3 * finetune[0] and second < 0.3, name  # each keeps task 0, and learns task 1
  assert len(ns['__printed__'].splitlines()) == 4


def _check_engine(ns):
  result, results = ns['result'], ns['results']
  assert len(result.accuracy_matrix) == 2 and len(results) == 4
  assert [r.method for r in results] == ['params-ema(decay=0.5)'] * 2 + ['params-ema(decay=0.9)'] * 2
  finetune, sfa = ns['finetune'], ns['sfa']
  assert finetune.accuracy_matrix[0][0] > 0.8  # the NNX module learns task 0
  assert sfa.accuracy_matrix[1][0] > finetune.accuracy_matrix[1][0]  # and SFA keeps more of it
  assert [(r['method'], r['seed']) for r in ns['compared']][-2:] == [('params-ema(decay=0.5)', 0), ('params-ema(decay=0.5)', 1)]
  assert [r.method for r in ns['swept']] == ['params-ema(decay=0.5)', 'params-ema(decay=0.9)']
  fused_run = ns['fused_run']
  assert fused_run.accuracy_matrix == ns['stepped_run'].accuracy_matrix == ns['on_host'].accuracy_matrix
  assert len(ns['watched'].losses) == sum(fused_run.steps_per_task) and fused_run.averaging_steps
  printed = ns['__printed__']
  assert re.findall(r'\d\.\d+', printed) and not re.search(r'\d\.\d{3}', printed), printed  # rounded


def _check_sweeps(ns):
  results = ns['results']
  assert [(r.method, c.seed) for (_, c), r in zip(ns['configurations'], results)][:2] == [('sfa(beta=0.25, p=0.25)', 0), ('sfa(beta=0.25, p=0.25)', 1)]
  assert len(results) == 8 and all(len(r.accuracy_matrix) == 2 for r in results)


def _check_checkpoints(ns):
  assert ns['first'].accuracy_matrix == ns['again'].accuracy_matrix
  assert os.listdir('outputs/sfa-run')


def _check_huggingface(ns):
  import jax
  import jax.numpy as jnp
  import optax
  import sfa_jax
  from sfa_jax.models import load_hf_llama

  assert ns['logits'].shape == (1, 8, 64)
  _, original = load_hf_llama('path/to/SmolLM2-135M', dtype=None)
  _, tuned = load_hf_llama('finetuned', dtype=None)
  assert tuned['layers']['mlp']['up']['kernel'].dtype == jnp.bfloat16
  as_bf16 = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32)
  got = np.asarray(tuned['layers']['mlp']['up']['kernel'], np.float32)
  want = as_bf16(original['layers']['mlp']['up']['kernel'])
  np.testing.assert_array_equal(got[:2], want[:2])  # the frozen blocks, bit for bit
  assert all(not np.array_equal(got[i], want[i]) for i in range(2, 6))  # the top 4 trained
  np.testing.assert_array_equal(np.asarray(tuned['embed']['embedding'], np.float32), as_bf16(original['embed']['embedding']))
  anchor = sfa_jax.find_state(ns['opt_state']).anchor
  assert anchor['top_layers']['mlp']['up']['kernel'].dtype == jnp.bfloat16
  assert all(isinstance(leaf, optax.MaskedNode) for leaf in jax.tree.leaves(anchor['layers'], is_leaf=lambda n: isinstance(n, optax.MaskedNode)))


def _check_replay_methods(ns):
  kept = ns['kept']
  assert all(kept[name] > kept['finetune'] for name in ('lwf', 'derpp', 'agem')), kept
  np.testing.assert_allclose(ns['params']['w'], [-0.1, 0.0])  # the projected gradient's step


def _check_tunix(ns):
  import sfa_jax

  (finetune, _), (sfa, sfa_trainer), (l2, _), (ewc, _) = ns['runs'].values()
  assert finetune[0][0] < 0.8 * np.log(32)  # the first task is learned
  assert all(losses[1][1] < 0.8 * np.log(32) for losses in (finetune, sfa, l2, ewc))  # and the second
  assert all(kept[1][0] < finetune[1][0] - 0.5 for kept in (sfa, l2, ewc))  # the first kept better
  state = sfa_jax.find_state(sfa_trainer.optimizer)
  assert (int(state.count), int(state.total_steps), bool(state.averaged)) == (20, 20, True)
  assert ns['resumed'].train_steps == 40 and ns['__printed__'].splitlines()[-1].endswith(': True')


def _check_api_reference(ns):
  assert len(ns['result'].accuracy_matrix) == 2 and ns['result'].method == 'sfa(beta=0.25, p=0.25)'


def _check_distributed(stdout):
  lines = stdout.strip().splitlines()
  assert lines[-2].startswith('8 devices:') and lines[-1] == 'the same as on one device: True'


CHECKS = {
    'README.md': _check_readme,
    'api_reference.md': _check_api_reference,
    'index.md': _check_index,
    'getting_started.md': _check_getting_started,
    'guides/sequence.md': _check_sequence,
    'guides/masked.md': _check_masked,
    'guides/nnx.md': _check_nnx,
    'guides/placement.md': _check_placement,
    'guides/schedule.md': _check_schedule,
    'guides/sfa_and_l2.md': _check_sfa_and_l2,
    'guides/merges.md': _check_merges,
    'guides/regularisers.md': _check_regularisers,
    'guides/engine.md': _check_engine,
    'guides/replay_methods.md': _check_replay_methods,
    'guides/sweeps.md': _check_sweeps,
    'guides/checkpoints.md': _check_checkpoints,
    'guides/huggingface.md': _check_huggingface,
    'guides/distributed.md': _check_distributed,
    'guides/tunix.md': _check_tunix,
}


# -- The tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize('page', _params())
def test_the_page_examples_run(page: Page, tmp_path, monkeypatch, capsys):
  if page.name in NEEDS:
    module, what = NEEDS[page.name]
    pytest.importorskip(module, reason=f'{page.name} needs {what}')
  monkeypatch.chdir(tmp_path)
  if page.name in SETUP:
    SETUP[page.name](tmp_path)
  if page.subprocess:
    script = tmp_path / 'page.py'
    script.write_text('\n'.join(page.blocks))
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'} | {'JAX_PLATFORMS': 'cpu'}
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    CHECKS[page.name](out.stdout)
    return
  namespace: dict = {'__name__': '__docs__'}
  for i, code in enumerate(page.blocks):
    exec(compile(code, f'docs/{page.name} (block {i + 1})', 'exec'), namespace)
  namespace['__printed__'] = capsys.readouterr().out
  CHECKS[page.name](namespace)


def test_every_page_with_examples_has_checks_and_every_check_a_page():
  assert sorted(CHECKS) == sorted(page.name for page in RUNNABLE)


def test_every_python_block_is_run_or_skipped_with_a_reason():
  fences = [(page.name, m['info'].strip()) for page in ALL for m in FENCE.finditer(page.path.read_text())]
  pythonish = [(name, info) for name, info in fences if re.search(r'py|ipython|code-block|code-cell|^$', info) and info != 'python']
  assert not pythonish, f'code blocks that the tests would not run: {pythonish}'
  for page in ALL:  # a misspelt or misplaced marker would be ignored silently
    text = page.path.read_text()
    markers = sum(1 for m in FENCE.finditer(text) if m['marker']) + len(SLOW.findall(text))
    assert text.count('docs-test:') == markers, f'{page.name}: a docs-test marker that is not one of the module docstring\'s'
  skipped = [(page.name, reason) for page in ALL for reason, _ in page.skipped]
  assert len(skipped) <= MAX_SKIPPED, skipped
  assert sum(len(page.blocks) for page in ALL) >= 15


def command_lines(text: str) -> list[str]:
  """The ``sfa-jax`` command lines of a page's ```bash blocks, each continued line (``\\``) joined."""
  found = []
  for match in FENCE.finditer(text):
    if match['info'].strip() != 'bash':
      continue
    for line in match['code'].replace('\\\n', ' ').splitlines():
      line = line.split('#', 1)[0].strip()
      if line.startswith('sfa-jax ') and '...' not in line and '[' not in line:
        found.append(' '.join(line.split()))
  return found


def _command_lines():
  for page in ALL:
    for line in command_lines(page.path.read_text()):
      yield pytest.param(line, id=f'{page.name}: {line[:60]}')


@pytest.mark.parametrize('line', list(_command_lines()))
def test_the_pages_command_lines_pass_the_command_lines_checks(line, tmp_path, monkeypatch):
  from sfa_jax.cli import command as cli

  monkeypatch.chdir(tmp_path)
  args = cli.build_parser().parse_args(shlex.split(line)[1:])
  cli.check_arguments(args)


def wide_lines(page: Page) -> list[str]:
  """The lines of the page's code blocks (every language) wider than :data:`MAX_COLUMNS`."""
  lines = [line for match in FENCE.finditer(page.path.read_text()) for line in match['code'].splitlines()]
  setup = README_SETUP if page.path == README else ()
  return [line for line in lines if len(line) > MAX_COLUMNS and not line.startswith(setup)]


@pytest.mark.parametrize('page', ALL, ids=[page.name for page in ALL])
def test_no_code_line_is_wider_than_the_page(page: Page):
  assert wide_lines(page) == [], f'{page.name}: code lines over {MAX_COLUMNS} columns'


def test_wide_lines_finds_a_wide_line_and_lets_the_readme_set_up_commands_be(tmp_path):
  page = tmp_path / 'page.md'
  page.write_text('```python\n' + 'x' * (MAX_COLUMNS + 1) + '\ny = 1\n```\n')
  assert wide_lines(read_page(page)) == ['x' * (MAX_COLUMNS + 1)]
  setup = [line for m in FENCE.finditer(README.read_text()) for line in m['code'].splitlines() if line.startswith(README_SETUP)]
  assert len(setup) == 2 and not set(setup) & set(wide_lines(read_page(README)))


def test_a_continued_command_line_is_read_whole():
  text = '```bash\nsfa-jax run --stream mnist-pair \\\n  --method sfa  # a comment\nsfa-jax demo\n```\n'
  assert command_lines(text) == ['sfa-jax run --stream mnist-pair --method sfa', 'sfa-jax demo']

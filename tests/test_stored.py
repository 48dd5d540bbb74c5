"""The program store: a later process neither traces nor compiles, and nothing is trusted across a mismatch."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sfa_jax import _lazy
from sfa_jax import _validation
from sfa_jax import fisher
from sfa_jax import models
from sfa_jax.engine import stored
from sfa_jax.engine import steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def store(tmp_path):
  previous = stored._state['directory']
  stored.set_directory(str(tmp_path / 'programs'))
  yield tmp_path / 'programs'
  stored.set_directory(previous)


def _python(code: str, env: dict[str, str] | None = None) -> dict:
  """Runs ``code`` in a fresh interpreter; returns the JSON it prints last."""
  result = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], capture_output=True, text=True, timeout=600,
                          cwd=ROOT, env=os.environ | {'JAX_PLATFORMS': 'cpu'} | (env or {}))
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


_RUN = """
import json, sys
import jax, jax.monitoring
from sfa_jax.engine import compile_cache
compile_cache.enable_compilation_cache(sys.argv[1] if len(sys.argv) > 1 else {cache!r})
traced = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: traced.append(event) if event.endswith('jaxpr_trace_duration') else None)
import logging, re
names = []
class Names(logging.Handler):
  def emit(self, record):
    found = re.match(r'Finished tracing (\\S+) for jit', record.getMessage())
    if found: names.append(found.group(1))
jax.config.update('jax_log_compiles', True)
logging.getLogger('jax').addHandler(Names())
from sfa_jax import engine, tasks
stream = tasks.make_stream('permuted-mnist', source='digits', num_tasks=2)
config = engine.TrainConfig(model='mlp', epochs_per_task=1, batch_size=32, learning_rate=1e-3, seed=0)
result = engine.run_sequence(stream, engine.make_method({method!r}, **{values!r}), config)
print(json.dumps({{'matrix': result.accuracy_matrix, 'traced': names}}))
"""


@pytest.mark.parametrize('method, values', [('ewc', {'strength': 100.0}),
                                            pytest.param('finetune', {}, marks=pytest.mark.slow),
                                            pytest.param('sfa', {'p': 0.5, 'beta': 0.25}, marks=pytest.mark.slow)])
def test_a_second_process_traces_none_of_the_engines_programs_and_computes_the_same(tmp_path, method, values):
  code = _RUN.format(cache=str(tmp_path / 'cache'), method=method, values=values)
  cold, warm = _python(code), _python(code)
  assert warm['matrix'] == cold['matrix']
  engine_programs = {'chunk', 'one_lane', '_init_variables', '_finite_leaves', '<lambda>', 'step'}
  # The core's helpers (sfa_jax._lazy.jit): the Fisher's chunk sums and means, online EWC's sum, the checks.
  core_helpers = {'_accumulate', '_zero_sums', '_means', '_online_sum', '_bad_entries', '_copies'}
  assert engine_programs & set(cold['traced']), cold['traced']
  if method == 'ewc':
    assert {'_accumulate', '_means', '_bad_entries'} <= set(cold['traced']), cold['traced']
  assert not (engine_programs | core_helpers) & set(warm['traced']), warm['traced']


def test_an_executable_that_jax_loaded_from_its_own_cache_is_stored_runnable(tmp_path):
  """XLA:CPU serializes an executable loaded from JAX's persistent cache without some kernels (a
  later process fails with "Function ... not found"). The store compiles afresh, and does not store
  what JAX hands back from memory: here the program ran, loaded from JAX's cache, before the store
  was turned on. A later process runs what the store holds."""
  code = f"""
  import json, sys
  import jax, jax.numpy as jnp
  from jax.experimental.compilation_cache import compilation_cache
  from sfa_jax.engine import stored
  jax.config.update('jax_compilation_cache_dir', {str(tmp_path / 'jax')!r})
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
  compilation_cache.reset_cache()
  zeros = stored.StoredProgram(('zeros like',), lambda: jax.jit(lambda tree: jax.tree.map(jnp.zeros_like, tree)))
  tree = {{'a': jnp.ones((64, 32)), 'b': jnp.ones(32)}}
  if sys.argv[1] == 'store on after a run':
    zeros(tree)
  if sys.argv[1] != 'jax only':
    stored.set_directory({str(tmp_path / 'programs')!r})
  out = zeros(tree)
  print(json.dumps({{'sum': float(out['a'].sum() + out['b'].sum())}}))
  """
  run = lambda argv: subprocess.run([sys.executable, '-c', textwrap.dedent(code), argv], capture_output=True,
                                    text=True, timeout=300, cwd=ROOT, env=os.environ | {'JAX_PLATFORMS': 'cpu'})
  stored_programs = lambda: len(list((tmp_path / 'programs').glob('*.program')))
  # JAX's cache written; the store on after a run leaves the entry to a later process, which compiles
  # it afresh (JAX's cache holds it) and writes it; then it is read.
  for argv, programs in (('jax only', 0), ('store on after a run', 0), ('store on', 1), ('store on', 1)):
    result = run(argv)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {'sum': 0.0}
    assert stored_programs() == programs, argv


def test_a_program_whose_tree_pickle_cannot_write_runs_and_is_not_stored(store):
  """A class defined by ``exec`` (a docs page run as a test, a notebook's generated code) cannot be
  pickled by name: its program runs from memory, without an entry or a warning."""
  namespace = {'__name__': 'not_importable'}
  exec('import typing\nclass Pair(typing.NamedTuple):\n  a: object\n  b: object', namespace)
  pair = namespace['Pair'](jnp.ones(2), jnp.ones(3))
  program = stored.StoredProgram(('double a pair',), lambda: jax.jit(lambda p: jax.tree.map(lambda x: 2 * x, p)))
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    doubled = program(pair)
  assert type(doubled) is namespace['Pair'] and doubled.a.tolist() == [2.0, 2.0] and doubled.b.tolist() == [2.0] * 3
  assert not list(store.glob('*.program'))


def test_a_damaged_entry_is_rebuilt_not_trusted(store):
  key = ('double', 2)
  program = stored.StoredProgram(key, lambda: jax.jit(lambda x: 2 * x))
  assert program(jnp.arange(3.0)).tolist() == [0.0, 2.0, 4.0]
  [entry] = store.glob('*.program')
  whole = entry.read_bytes()
  for damaged in (whole[:len(whole) // 2], whole[:100] + bytes([whole[100] ^ 1]) + whole[101:], b''):
    entry.write_bytes(damaged)
    again = stored.StoredProgram(key, lambda: jax.jit(lambda x: 2 * x))
    assert again(jnp.arange(3.0)).tolist() == [0.0, 2.0, 4.0]
    assert again._cache_size() == 1 and entry.read_bytes() != damaged  # compiled and written again


def test_an_entry_of_another_description_is_never_loaded(store, monkeypatch):
  """Two keys never share an entry, nor do other shapes, other static values or another installation."""
  triple = stored.StoredProgram(('scale', 3), lambda: jax.jit(lambda x: 3 * x))
  double = stored.StoredProgram(('scale', 2), lambda: jax.jit(lambda x: 2 * x))
  assert triple(jnp.ones(2)).tolist() == [3.0, 3.0] and double(jnp.ones(2)).tolist() == [2.0, 2.0]
  assert double(jnp.ones(3)).tolist() == [2.0] * 3
  assert len(list(store.glob('*.program'))) == 3
  monkeypatch.setattr(stored, '_installation', lambda: 'jax=another version')
  quadruple = stored.StoredProgram(('scale', 2), lambda: jax.jit(lambda x: 4 * x))  # same key, other installation
  assert quadruple(jnp.ones(2)).tolist() == [4.0, 4.0]
  assert len(list(store.glob('*.program'))) == 4
  # An entry written for one description and placed under another's name is refused by its text.
  entries = sorted(store.glob('*.program'), key=os.path.getmtime)
  entries[0].write_bytes(entries[-1].read_bytes())
  monkeypatch.undo()
  assert stored.StoredProgram(('scale', 3), lambda: jax.jit(lambda x: 3 * x))(jnp.ones(2)).tolist() == [3.0, 3.0]


def test_static_arguments_select_their_own_programs(store):
  power = stored.StoredProgram(('power',), lambda: jax.jit(lambda x, n: x ** n, static_argnums=1), static_argnums=(1,))
  assert power(jnp.full(2, 2.0), 3).tolist() == [8.0, 8.0]
  assert power(jnp.full(2, 2.0), 2).tolist() == [4.0, 4.0]
  assert power._cache_size() == 2


def test_static_keyword_arguments_select_their_own_programs_and_dynamic_ones_are_passed(store):
  build = lambda: jax.jit(lambda x, *, n, shift: x ** n + shift, static_argnames='n')
  power = stored.StoredProgram(('power_kw',), build, static_argnames=('n',))
  assert power(jnp.full(2, 2.0), n=3, shift=1.0).tolist() == [9.0, 9.0]
  assert power(jnp.full(2, 2.0), n=2, shift=jnp.float32(1.0)).tolist() == [5.0, 5.0]
  assert power._cache_size() == 2
  again = stored.StoredProgram(('power_kw',), build, static_argnames=('n',))  # a later process: from disk
  assert again(jnp.full(2, 2.0), n=3, shift=1.0).tolist() == [9.0, 9.0]
  assert again._jitted is None or again.jitted._cache_size() == 0


def test_the_cores_helpers_are_kept_in_the_store_while_it_is_on(store):
  logits = lambda params, x: x @ params['w']
  params, inputs, labels = {'w': jnp.arange(6.0).reshape(3, 2) / 6}, jnp.eye(3), jnp.array([0, 1, 1])
  stored_fisher = fisher.diagonal_fisher(logits, params, inputs, labels, batch_size=2)
  assert any(path.suffix == '.program' for path in store.iterdir())
  stored.set_directory(None)
  plain = fisher.diagonal_fisher(logits, params, inputs, labels, batch_size=2)
  np.testing.assert_array_equal(stored_fisher['w'], plain['w'])


@pytest.mark.parametrize('store_on', [False, True])
def test_a_transforms_init_with_the_cores_quick_helpers_runs_inside_jit_and_eval_shape(store_on, tmp_path):
  """The core's copies compile with options JAX takes on a top-level program only: inside a user's
  ``jit`` or ``eval_shape`` they are traced in plainly, with the store on or off."""
  import sfa_jax

  previous = stored._state['directory']
  stored.set_directory(str(tmp_path / 'programs') if store_on else None)
  try:
    params = {'w': jnp.arange(3.0)}
    tx = sfa_jax.sfa(p=0.5, beta=0.5, total_steps=10)
    assert jax.eval_shape(tx.init, params).anchor['w'].shape == (3,)
    assert jax.jit(tx.init)(params).anchor['w'].tolist() == [0.0, 1.0, 2.0]
    assert tx.init(params).anchor['w'].tolist() == [0.0, 1.0, 2.0]  # top level: the options apply
  finally:
    stored.set_directory(previous)


def test_without_the_store_a_helpers_options_compile_its_top_level_program(tmp_path):
  """A core helper's options apply without the store too (a plain optax loop's first finite check
  compiles at level 0), on concrete arguments also inside a user's jit; traced ones are traced in."""
  previous = stored._state['directory']
  stored.set_directory(None)
  try:
    options = {'xla_backend_optimization_level': 0}
    multiply_add = lambda a, b, c: a * b + c
    args = [jnp.asarray(np.random.default_rng(k).standard_normal(4096, np.float32)) for k in range(3)]
    with_options = jax.jit(multiply_add).lower(*args).compile(compiler_options=options)(*args)
    if np.array_equal(with_options, jax.jit(multiply_add)(*args)):
      pytest.skip('XLA computes a * b + c the same at level 0 and at its default here: the options cannot be told apart')
    helper = _lazy.jit(multiply_add, compiler_options=options)
    assert _bits(helper(*args)) == _bits(with_options)
    assert _bits(jax.jit(lambda x: helper(*args) + 0 * x)(1.0)) == _bits(with_options)  # concrete inside a jit
    assert _bits(jax.jit(helper)(*args)) == _bits(jax.jit(multiply_add)(*args))  # traced: plainly
  finally:
    stored.set_directory(previous)


def test_a_folder_others_may_write_is_not_used(tmp_path):
  folder = tmp_path / 'shared'
  previous = stored._state['directory']
  try:
    stored.set_directory(str(folder))
    os.chmod(folder, 0o777)
    with pytest.warns(UserWarning, match='others may write'):
      assert stored.directory() is None
    program = stored.StoredProgram(('double',), lambda: jax.jit(lambda x: 2 * x))
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      assert program(jnp.ones(2)).tolist() == [2.0, 2.0]
    assert not list(folder.iterdir())
  finally:
    stored.set_directory(previous)


def test_inside_a_transformation_the_jitted_function_is_traced_in(store):
  double = stored.StoredProgram(('double',), lambda: jax.jit(lambda x: 2 * x))
  assert jax.grad(lambda x: double(x).sum())(jnp.ones(2)).tolist() == [2.0, 2.0]
  assert jax.eval_shape(double, jax.ShapeDtypeStruct((4,), jnp.float32)).shape == (4,)


def test_remembered_facts_come_back_from_disk(store):
  calls = []
  compute = lambda: calls.append(1) or {'shape': (2, 3)}
  assert stored.remembered(('fact',), compute) == {'shape': (2, 3)}
  stored._FACTS.clear()  # as in a new process
  assert stored.remembered(('fact',), compute) == {'shape': (2, 3)}
  assert len(calls) == 1


def test_descriptions_are_stable_and_refuse_addresses():
  assert stored.describe((1, 'a', np.float32(2))) == stored.describe((1, 'a', np.float32(2)))
  assert stored.describe(models.make_model('mlp', 10)) != stored.describe(models.make_model('mlp', 5))
  scale = lambda factor: (lambda x: factor * x)
  assert stored.describe(scale(2)) != stored.describe(scale(3))  # closures by their values
  assert stored.describe(np.ones(3)) != stored.describe(np.zeros(3))
  with pytest.raises(stored.Unstable):
    stored.describe(object())
  assert 'sfa_jax.models.mlp:' in stored.describe(models.make_model('mlp', 10))  # its module's source


@pytest.mark.parametrize('name, shape', [('mlp', (1, 28, 28, 1)), ('cnn', (1, 28, 28, 1)),
                                         pytest.param('resnet18', (1, 28, 28, 1), marks=pytest.mark.slow)])
def test_the_initialisation_compiled_quickly_is_bit_for_bit_the_default_one(name, shape):
  model, sample, key = models.make_model(name, 10), np.zeros(shape, np.float32), jax.random.key(7)
  fast = steps.initializer(model, sample)(7)
  default = jax.jit(lambda k, x: steps._init_variables(model, k, x)).lower(key, sample).compile()(key, sample)
  for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(default)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_small_models_initial_variables_are_read_back_from_the_store_bit_for_bit(store, monkeypatch):
  model, sample = models.make_model('mlp', 10), np.zeros((1, 8, 8, 1), np.float32)
  computed = steps.initializer(model, sample)(3)
  facts = set(store.glob('*.fact'))
  assert not any('init_values' in text for text in stored._FACTS)  # on disk only: not held for every seed
  stored._FACTS.clear()  # as in a new process: the values come from disk
  steps._INIT_FROM_SEED._compiled.clear()
  monkeypatch.setattr(stored.StoredProgram, '_load_or_compile', lambda *args: pytest.fail('the init program was loaded'))
  again = steps.initializer(model, sample)(3)
  assert _bits(again) == _bits(computed)
  assert {id(a) for a in jax.tree.leaves(again)}.isdisjoint(id(a) for a in jax.tree.leaves(computed))  # fresh arrays
  monkeypatch.undo()
  stored.set_directory(None)
  assert _bits(steps.initializer(model, sample)(3)) == _bits(computed)  # the program's values, store off
  stored.set_directory(str(store))
  monkeypatch.setattr(steps, '_REMEMBERED_INIT_BYTES', 0)  # a larger model: its values are not kept
  steps.initializer(model, sample)(4)
  assert set(store.glob('*.fact')) == facts


def test_a_model_holding_a_prng_key_is_read_back_from_the_store_with_its_key(store):
  import flax.linen as nn

  class WithKey(nn.Module):
    @nn.compact
    def __call__(self, x, task_id=None, train=False):
      self.variable('rng_state', 'key', lambda: jax.random.key(1))
      return nn.Dense(3)(x.reshape(x.shape[0], -1))

  model, sample = WithKey(), np.zeros((1, 4), np.float32)
  computed = steps.initializer(model, sample)(0)
  stored._FACTS.clear()  # as in a new process: the values come from disk
  _, model_state = again = steps.initializer(model, sample)(0)
  assert jax.dtypes.issubdtype(model_state['rng_state']['key'].dtype, jax.dtypes.extended)
  unkeyed = lambda tree: jax.tree.map(lambda leaf: jax.random.key_data(leaf) if jax.dtypes.issubdtype(
      leaf.dtype, jax.dtypes.extended) else leaf, tree)
  assert _bits(unkeyed(again)) == _bits(unkeyed(computed))
  assert any(store.glob('*.fact'))


def _bits(tree):
  return [np.asarray(leaf).tobytes() for leaf in jax.tree.leaves(tree)]


_RNG = np.random.default_rng(0)
_LARGE_AND_SMALL = [jnp.asarray(_RNG.random(4096, np.float32) * 10.0 ** _RNG.uniform(-30, 30, 4096).astype(np.float32))
                    for _ in range(2)]


@pytest.mark.parametrize('options, function, args', [
    (_lazy.RUNS_ONCE, lambda p: optax.adam(1e-3).init(p), ({'w': jnp.ones((3, 4)), 'b': jnp.ones(4)},)),
    (_lazy.RUNS_ONCE, lambda p: optax.sgd(0.1, momentum=0.9).init(p), ({'w': jnp.ones((3, 4))},)),
    (_lazy.EXACT, fisher._means.__wrapped__, (_LARGE_AND_SMALL, [jnp.zeros(4096), jnp.zeros(4096, jnp.bfloat16)], jnp.int32(12345))),
    (_lazy.EXACT, lambda tree: jax.tree.map(jnp.zeros_like, tree), ({'w': jnp.ones((3, 4)), 'n': jnp.ones(2, jnp.int32)},)),
    (_lazy.EXACT, _validation._bad_entries.__wrapped__, ([jnp.array([1.0, -jnp.inf]), jnp.array([jnp.nan, 2.0])],)),
], ids=['adam-init', 'momentum-init', 'fisher-means', 'zeros', 'checks'])
def test_the_quickly_compiled_programs_compute_the_defaults_values_bit_for_bit(options, function, args):
  quick = jax.jit(function).lower(*args).compile(compiler_options=options)(*args)
  default = jax.jit(function)(*args)
  assert _bits(quick) == _bits(default)


def test_what_a_notebook_defines_is_never_stored(store):
  """A class or function of a module without a source file (a notebook, ``python -c``) can change
  under the same name: it is traced and compiled as if the store were off."""
  namespace = {}
  exec('def scale(x):\n  return 2 * x\n', {'__name__': '__main__notebook__'}, namespace)
  sys.modules['__main__notebook__'] = type(sys)('__main__notebook__')  # a module without __file__
  try:
    with pytest.raises(stored.Unstable, match='no source file'):
      stored.describe(namespace['scale'])
    program = stored.StoredProgram(('scale', namespace['scale']), lambda: jax.jit(namespace['scale']))
    assert program(jnp.ones(2)).tolist() == [2.0, 2.0]
    assert not list(store.glob('*.program'))
  finally:
    del sys.modules['__main__notebook__']


def test_a_build_that_makes_a_plain_callable_is_called_as_it_is(store):
  calls = []
  program = stored.StoredProgram(('wrapped',), lambda: lambda x: calls.append(1) or 2 * x)
  assert program(jnp.ones(2)).tolist() == [2.0, 2.0] and calls == [1]
  assert not list(store.glob('*.program'))


def test_what_the_background_thread_has_not_started_the_waiting_thread_compiles(store):
  import concurrent.futures
  import threading

  busy = threading.Event()
  executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
  executor.submit(busy.wait)  # the background thread compiles something else
  triple = stored.StoredProgram(('triple',), lambda: jax.jit(lambda x: 3 * x))
  assert triple.prepare_in_background(executor, jax.ShapeDtypeStruct((2,), jnp.float32))
  triple.prepare_queued_here()
  assert triple._cache_size() == 1  # compiled here, while the background thread is still busy
  busy.set()
  executor.shutdown()
  assert triple(jnp.ones(2)).tolist() == [3.0, 3.0] and triple._cache_size() == 1

"""Test configuration shared by the whole suite."""

import os

# Deterministic, quiet CPU runs: tests never need an accelerator.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import hypothesis  # noqa: E402

hypothesis.settings.register_profile('ci', max_examples=25, deadline=None, derandomize=True)
hypothesis.settings.register_profile('dev', max_examples=25, deadline=None)
hypothesis.settings.load_profile('ci' if os.environ.get('CI') else 'dev')

# The experiment scripts' shared scaffolding (experiments/scaffold.py) imports as the scripts
# import it, from their own folder.
import sys  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'experiments'))

# One persistent compilation cache for the whole run, shared by pytest-xdist's workers and by the
# command lines that tests run (``SFA_JAX_CACHE_DIR``): many tests compile the same small programs,
# and on the CPU compiling is most of a test's time. Every test starts with the same settings, a
# library user's with JAX's cache on: the cache in the run's folder, the engine's program store
# off (a command line run in the test process turns it on; it is turned off again after the test).
# The suite never writes to the user's cache; a test that needs another cache or none sets its own.
import shutil  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

_CACHE_ENV = 'SFA_JAX_CACHE_DIR'


def _use_the_suites_cache() -> None:
  from sfa_jax.engine import compile_cache
  from sfa_jax.engine import stored

  compile_cache.enable_compilation_cache(os.environ[_CACHE_ENV])  # as the command line does, then
  stored.set_directory(None)  # the store off, as for a library user


def pytest_configure(config):
  if not hasattr(config, 'workerinput'):  # the controller, or a run without workers, makes the folder
    os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix='sfa_jax_tests_cache_')
  _use_the_suites_cache()


def pytest_unconfigure(config):
  if not hasattr(config, 'workerinput'):
    shutil.rmtree(os.environ.pop(_CACHE_ENV), ignore_errors=True)


@pytest.fixture(autouse=True)
def _the_suites_cache():
  """Puts the suite's cache settings back after a test that changed them."""
  yield
  import jax

  from sfa_jax.engine import stored

  if (jax.config.jax_compilation_cache_dir != os.environ[_CACHE_ENV] or stored._state['directory'] is not None
      or jax.config.jax_persistent_cache_min_compile_time_secs != 0.0):
    _use_the_suites_cache()

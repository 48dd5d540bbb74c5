"""The documentation builds offline with warnings as errors, and its API reference holds every public name."""

import importlib
import importlib.util
import inspect
import pathlib
import pkgutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
UNDOCUMENTED = ('sfa_jax.engine.mesh_spec',)  # the command line's plumbing (docs/conf.py's NOT_IN_REFERENCE)


def public_names() -> set[str]:
  """Every public name of ``sfa_jax``, ``sfa_jax.engine``, ``sfa_jax.tasks``, ``sfa_jax.models``, and
  the classes and functions of ``sfa_jax.engine``'s modules (where the package exports one: its name there)."""
  import sfa_jax
  from sfa_jax import engine, models, tasks

  names = set()
  for package in (sfa_jax, engine, tasks, models):
    names |= {f'{package.__name__}.{n}' for n in package.__all__}
  for info in pkgutil.iter_modules(engine.__path__, 'sfa_jax.engine.'):
    if info.name in UNDOCUMENTED:
      continue
    module = importlib.import_module(info.name)
    names |= {
        f'{module.__name__}.{n}' for n, v in vars(module).items()
        if not n.startswith('_') and n not in engine.__all__ and (inspect.isclass(v) or inspect.isfunction(v))
        and v.__module__ == module.__name__
    }
  return names


@pytest.mark.slow
def test_the_docs_build_with_warnings_as_errors_and_document_every_public_name(tmp_path):
  pytest.importorskip('sphinx')
  pytest.importorskip('myst_parser')
  pytest.importorskip('sphinx_book_theme')
  from sphinx.util.inventory import InventoryFile

  out = tmp_path / 'html'
  build = subprocess.run([sys.executable, '-m', 'sphinx', '-W', '-q', '-b', 'html', 'docs', str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=1200)
  assert build.returncode == 0, build.stderr[-4000:]
  with open(out / 'objects.inv', 'rb') as f:
    inventory = InventoryFile.load(f, '', lambda base, uri: uri)
  documented = set(inventory.get('py:function', {})) | set(inventory.get('py:class', {})) | set(inventory.get('py:data', {}))
  documented |= set(inventory.get('py:exception', {}))
  missing = sorted(public_names() - documented)
  assert not missing, f'public names missing from the API reference: {missing}'
  for page in ('getting_started', 'guides/schedule', 'results/experiments', 'results/benchmarks', 'api_reference'):
    assert (out / f'{page}.html').is_file()
  assert 'demo_curves_sfa.png' in (out / 'getting_started.html').read_text()
  assert (out / '_images' / 'demo_curves_sfa.png').is_file() or (out / '_static' / 'figures' / 'demo_curves_sfa.png').is_file()


@pytest.mark.slow
def test_the_docs_configuration_examples_run():
  out = subprocess.run([sys.executable, '-m', 'doctest', 'conf.py'], cwd=ROOT / 'docs', capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def _make_figures():
  spec = importlib.util.spec_from_file_location('make_figures', ROOT / 'docs' / 'make_figures.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_make_figures_copies_the_demo_plots_that_the_pages_show(tmp_path):
  make_figures = _make_figures()
  demo = tmp_path / 'demo'
  demo.mkdir()
  with pytest.raises(FileNotFoundError, match='sfa-jax demo'):
    make_figures.copy_figures(demo, tmp_path / 'figures')
  for i, name in enumerate(make_figures.COPIES):
    (demo / name).write_bytes(bytes([i]) * 8)
  written = make_figures.copy_figures(demo, tmp_path / 'figures')
  assert [p.read_bytes() for p in written] == [bytes([i]) * 8 for i in range(len(written))]
  pages = ''.join(p.read_text() for p in (ROOT / 'docs').rglob('*.md'))
  for target in make_figures.COPIES.values():  # committed, and shown by a page
    assert (make_figures.FIGURES / target).stat().st_size > 10_000 and f'figures/{target}' in pages


def test_the_public_names_are_found():
  names = public_names()
  assert {'sfa_jax.sfa', 'sfa_jax.tasks.Split', 'sfa_jax.models.MLP', 'sfa_jax.engine.Method',
          'sfa_jax.engine.loop.train_stream'} <= names

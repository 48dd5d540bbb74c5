"""The documentation builds offline with warnings as errors: its API reference holds every public
name and no helper, its guides link the names they mention to their API pages, and it reads
offline (MathJax ships with the site, no script comes from elsewhere)."""

import importlib
import importlib.util
import inspect
import pathlib
import pkgutil
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
UNDOCUMENTED = ('sfa_jax.engine.mesh_spec',)  # the command line's plumbing (docs/conf.py's NOT_IN_REFERENCE)
GUIDES = ['index', 'getting_started', 'api_reference'] + sorted(
    f'guides/{p.stem}' for p in (ROOT / 'docs' / 'guides').glob('*.md'))


def public_names() -> set[str]:
  """Every public name of ``sfa_jax``, ``sfa_jax.engine``, ``sfa_jax.tasks``, ``sfa_jax.models``, and
  the classes and functions of ``sfa_jax.engine``'s modules that users write (a module's ``__all__``
  where it has one; where the package exports one: its name there)."""
  import sfa_jax
  from sfa_jax import engine, models, tasks

  names = set()
  for package in (sfa_jax, engine, tasks, models):
    names |= {f'{package.__name__}.{n}' for n in package.__all__}
  for info in pkgutil.iter_modules(engine.__path__, 'sfa_jax.engine.'):
    if info.name in UNDOCUMENTED:
      continue
    module = importlib.import_module(info.name)
    listed = getattr(module, '__all__', None)
    names |= {
        f'{module.__name__}.{n}' for n, v in vars(module).items()
        if not n.startswith('_') and n not in engine.__all__ and (inspect.isclass(v) or inspect.isfunction(v))
        and v.__module__ == module.__name__ and (listed is None or n in listed)
    }
  return names


# Helpers of the package's own modules: public names, left out of their module's ``__all__``.
HELPERS = ['sfa_jax.transforms.scalar', 'sfa_jax.transforms.current', 'sfa_jax.transforms.copy_anchor',
           'sfa_jax.transforms.NO_PARAMS_MSG', 'sfa_jax.engine.run.check_run_arguments',
           'sfa_jax.engine.methods.checked_schedule', 'sfa_jax.engine.loop.check_lanes']
# What a guide names, and the API page its link must reach.
LINKED = {
    'index': ['sfa_jax.sfa', 'sfa_jax.reanchor', 'sfa_jax.engine.run_sequence', 'sfa_jax.engine.TrainConfig'],
    'api_reference': ['sfa_jax.sfa', 'sfa_jax.reanchor', 'sfa_jax.l2', 'sfa_jax.ewc', 'sfa_jax.engine.run_sequence',
                      'sfa_jax.engine.TrainConfig', 'sfa_jax.tasks.make_stream'],
    'guides/sequence': ['sfa_jax.reanchor', 'sfa_jax.find_state', 'sfa_jax.sfa'],
    'guides/engine': ['sfa_jax.engine.run_sequence', 'sfa_jax.engine.TrainConfig', 'sfa_jax.engine.methods.SFA',
                      'sfa_jax.engine.methods.Replay', 'sfa_jax.tasks.make_stream'],
    'guides/sweeps': ['sfa_jax.engine.run_sweep', 'sfa_jax.engine.grid'],
    'guides/merges': ['sfa_jax.magmax', 'sfa_jax.fisher_merge', 'sfa_jax.engine.methods.MagMax',
                      'sfa_jax.engine.methods.CoFiMA'],
    'guides/checkpoints': ['sfa_jax.engine.Checkpointer', 'sfa_jax.engine.make_method'],
    'guides/tunix': ['sfa_jax.engine.tunix.train_task', 'sfa_jax.engine.tunix.nnx_fisher', 'sfa_jax.sfa'],
}


@pytest.fixture(scope='module')
def site(tmp_path_factory) -> pathlib.Path:
  """The site, built once with warnings as errors."""
  for extension in ('sphinx', 'myst_parser', 'sphinx_book_theme', 'sphinx_codeautolink', 'sphinx_copybutton'):
    pytest.importorskip(extension)
  out = tmp_path_factory.mktemp('site') / 'html'
  build = subprocess.run([sys.executable, '-m', 'sphinx', '-W', '-q', '-b', 'html', 'docs', str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=1200)
  assert build.returncode == 0, build.stderr[-4000:]
  return out


def documented_names(site: pathlib.Path) -> set[str]:
  """The Python names of the site's inventory (``objects.inv``)."""
  from sphinx.util.inventory import InventoryFile

  with open(site / 'objects.inv', 'rb') as f:
    inventory = InventoryFile.load(f, '', lambda base, uri: uri)
  return {name for kind in ('py:function', 'py:class', 'py:data', 'py:exception') for name in inventory.get(kind, {})}


def article(html: str) -> str:
  """A page's own text, without the navigation around it."""
  return html.split('<article', 1)[-1].split('</article>', 1)[0]


def api_links(html: str) -> set[str]:
  """The names whose API page a page's text links (``href="...api/_autosummary/NAME.html#..."``)."""
  return set(re.findall(r'href="[^"]*api/_autosummary/([\w.]+)\.html', article(html)))


@pytest.mark.slow
def test_the_docs_build_with_warnings_as_errors_and_document_every_public_name(site):
  documented = documented_names(site)
  missing = sorted(public_names() - documented)
  assert not missing, f'public names missing from the API reference: {missing}'
  assert not set(HELPERS) & documented, 'helpers of the package on the API pages'
  for page in ('getting_started', 'guides/schedule', 'results/experiments', 'results/benchmarks', 'api_reference'):
    assert (site / f'{page}.html').is_file()
  assert 'demo_curves_sfa.png' in (site / 'getting_started.html').read_text()
  assert (site / '_images' / 'demo_curves_sfa.png').is_file() or (site / '_static' / 'figures' / 'demo_curves_sfa.png').is_file()


@pytest.mark.slow
def test_the_guides_link_the_names_they_use_to_their_api_pages(site):
  unlinked = {page: sorted(set(names) - api_links((site / f'{page}.html').read_text())) for page, names in LINKED.items()}
  assert not any(unlinked.values()), unlinked
  linked = sum(len(api_links((site / f'{page}.html').read_text())) for page in GUIDES)
  assert linked >= 100, linked


@pytest.mark.slow
def test_the_site_reads_offline_with_copy_buttons(site):
  pages = [p for p in site.rglob('*.html') if '_static' not in p.parts]
  external = sorted({m for p in pages for m in re.findall(r'<(?:script|link)[^>]+(?:src|href)="(https?://[^"]+)"', p.read_text())})
  assert not external, f'scripts or styles loaded from elsewhere: {external}'
  math_pages = [p for p in pages if 'class="math' in p.read_text()]
  assert math_pages and all('_static/mathjax/tex-chtml.js' in p.read_text() for p in math_pages)
  assert (site / '_static' / 'mathjax' / 'tex-chtml.js').is_file()
  assert (site / '_static' / 'mathjax' / 'output' / 'chtml' / 'fonts' / 'woff-v2').is_dir()
  assert 'copybutton.js' in (site / 'guides' / 'engine.html').read_text()


@pytest.mark.slow
def test_the_api_pages_show_what_users_need(site):
  autosummary = site / 'api' / '_autosummary'
  text = lambda name: re.sub(r'<[^>]+>', '', (autosummary / f'{name}.html').read_text())
  sfa = text('sfa_jax.engine.methods.SFA')
  assert re.search(r'SFA\(\*,\s*p: float = 0\.25,\s*beta: float = 0\.25\)', sfa), 'SFA\'s hyper-parameters in its signature'
  config = text('sfa_jax.engine.TrainConfig')
  assert 'objective: Objective = CLASSIFICATION' in config and '_src' not in config and 'parent' not in text('sfa_jax.models.MLP')
  engine = article((site / 'api' / 'engine.html').read_text())
  exports = engine.split('id="public-api"', 1)[1].split('id="modules"', 1)[0]  # the page's first section
  assert 'sfa_jax.engine.run_sequence.html' in exports and 'sfa_jax.engine.methods.SFA.html' not in exports


@pytest.mark.slow
def test_no_code_line_of_the_site_is_wider_than_the_page(site):
  import html as html_lib

  wide = {}
  for page in site.rglob('*.html'):
    if '_static' in page.parts or '_modules' in page.parts:  # highlighted source files scroll
      continue
    blocks = re.findall(r'<div class="highlight"><pre>(.*?)</pre>', article(page.read_text()), re.S)
    lines = [line for block in blocks for line in html_lib.unescape(re.sub(r'<[^>]+>', '', block)).splitlines()]
    wide[page.relative_to(site).as_posix()] = [line for line in lines if len(line) > 88]
  wide = {page: lines for page, lines in wide.items() if lines}
  assert not wide, wide


def test_every_built_in_method_documents_its_hyper_parameters_with_an_example():
  from sfa_jax.engine import methods

  for name, cls in methods.registered().items():
    doc = inspect.getdoc(cls)
    assert '>>>' in doc, f'{name}: no example'
    for key, spec in cls.hyperparams.items():
      entry = re.search(rf'^  {key}: (.*(?:\n    .*)*)', doc, re.M)  # its Args entry, continued lines too
      assert entry and f'default {spec.default:g}' in ' '.join(entry[1].split()), f'{name}: {key} undocumented'
    assert list(inspect.signature(cls).parameters) == list(cls.hyperparams), name


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

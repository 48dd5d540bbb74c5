"""Sphinx configuration of the sfa_jax documentation.

Build it (offline, warnings as errors) from the repository root::

  pip install -e '.[docs]'
  sphinx-build -W -b html docs docs/_build/html

The build needs no network, and neither does reading it: MathJax comes from the
``sphinx-mathjax-offline`` package and is copied into the site.

The API reference is generated: :func:`write_api_pages` writes one page per package (``api/*.rst``,
not committed). Each page lists first the names the package exports (``sfa_jax.sfa``,
``sfa_jax.engine.run_sequence``), then one section per module with the module's other public
names, read from the code: a module's ``__all__`` where it has one (its helpers for the package's
other modules stay out), else the names it defines. Autosummary then writes a page per name from
its docstring. A public module that no page lists, or a listed constant without a doc, stops the
build.
"""

import ast
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import pathlib
import pkgutil
import re
import sys
import textwrap

DOCS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import sfa_jax  # noqa: E402

project = 'sfa_jax'
author = 'sfa_jax contributors'
copyright = '2026, sfa_jax contributors'  # noqa: A001
release = version = importlib.metadata.version('sfa-jax')

extensions = [
    'myst_parser',
    'sphinx.ext.autodoc',
    'sphinx.ext.autosummary',
    'sphinx.ext.napoleon',
    'sphinx.ext.mathjax',
    'sphinx-mathjax-offline',  # MathJax's files, copied into the site: formulas render offline
    'sphinx.ext.viewcode',
    'sphinx_codeautolink',  # names in code blocks and doctests link to their API pages
    'sphinx_copybutton',
]
source_suffix = {'.rst': 'restructuredtext', '.md': 'markdown'}
root_doc = 'index'
templates_path = ['_templates']
exclude_patterns = ['_build', 'Thumbs.db', '.DS_Store']

# -- autodoc, autosummary, napoleon (Google-style docstrings, as optax and flax) -----------------
autosummary_generate = True
autosummary_imported_members = False
autodoc_member_order = 'bysource'
autodoc_typehints = 'signature'
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_attr_annotations = False  # an attribute's type is in the signature, as written there
napoleon_use_ivar = True  # a class's "Attributes:" section as a field list: no second entry beside :members:
add_module_names = False
add_function_parentheses = False  # {func}`sfa_jax.sfa` reads as written
python_maximum_signature_line_length = 88  # a longer signature: one parameter per line

# -- Links from code, copy buttons, formulas (as optax and flax) ---------------------------------
codeautolink_concat_default = True  # a page's blocks are one example told in steps, as the tests run them
copybutton_prompt_text = r'>>> |\.\.\. |\$ '
copybutton_prompt_is_regexp = True
mathjax_path = 'mathjax/tex-chtml.js'  # under _static: sphinx-mathjax-offline's copy, no CDN

# -- MyST (the Markdown pages) -------------------------------------------------------------------
myst_enable_extensions = ['colon_fence', 'deflist']
myst_heading_anchors = 3

# -- HTML: the theme of optax and flax -----------------------------------------------------------
html_theme = 'sphinx_book_theme'
html_title = 'sfa_jax'
html_static_path = ['_static']
html_css_files = ['custom.css']  # room for 88 columns of code at 1280 px
html_theme_options = {'show_toc_level': 2, 'navigation_with_keys': False}

# -- The API reference ---------------------------------------------------------------------------

# One page per package. Each section is a module: the names it defines, and for a package the names
# it re-exports from it (documented where users write them: ``sfa_jax.sfa``, ``sfa_jax.tasks.Split``).
API_PAGES = {
    'core': ('``sfa_jax``: transforms, anchors, partial training, Fisher, merges, metrics', 'sfa_jax', [
        'transforms', 'anchors', 'partial', 'adaptive', 'fisher', 'merging', 'metrics',
    ]),
    'engine': ('``sfa_jax.engine``: methods, runs, sweeps, grids, the loop, meshes, checkpoints', 'sfa_jax.engine', [
        'methods', 'config', 'optimizers', 'run', 'sweep', 'grids', 'budget', 'objectives', 'callbacks', 'loop',
        'steps', 'programs', 'feed', 'fused', 'distributed', 'checkpoint', 'compile_cache', 'stored', 'lm', 'tunix',
    ]),
    'tasks': ('``sfa_jax.tasks``: task streams on real data', 'sfa_jax.tasks', [
        'stream', 'catalog', 'registry', 'builders', 'batching', 'source', 'offline', 'idx', 'tfds_data', 'text',
    ]),
    'models': ('``sfa_jax.models``: Flax models and checkpoints', 'sfa_jax.models', [
        'mlp', 'cnn', 'resnet', 'heads', 'registry', 'state', 'transfer', 'llama', 'hf', 'gguf_loader',
        'tokenizer',
    ]),
    'cli': ('``sfa_jax.cli``: tables and figures of results', 'sfa_jax.cli', ['report', 'plots']),
}
# Public modules without a reference section: the command line's own plumbing (its options are
# documented in the command-line guide and by ``sfa-jax --help``).
NOT_IN_REFERENCE = {'sfa_jax.cli.command', 'sfa_jax.cli.presets', 'sfa_jax.engine.mesh_spec', 'sfa_jax.__main__'}
PACKAGES = ('sfa_jax', 'sfa_jax.engine', 'sfa_jax.tasks', 'sfa_jax.models')


def package_exports(package: str) -> dict[str, str]:
  """``{name: defining module}`` of the names a package re-exports (``__all__`` or its imports).

  Args:
    package: one of :data:`PACKAGES`, e.g. ``'sfa_jax'`` or ``'sfa_jax.tasks'``.

  Returns:
    Each public name of the package and the module that defines it (for a constant, the module its
    ``__init__`` imports it from).

  Example:
    >>> package_exports('sfa_jax')['sfa'], package_exports('sfa_jax.engine')['run_sequence']
    ('sfa_jax.transforms', 'sfa_jax.engine.run')
  """
  module = importlib.import_module(package)
  names = getattr(module, '__all__', None)
  if names is None:
    names = [n for n, v in vars(module).items() if not n.startswith('_') and not isinstance(v, type(sys))]
  exports = {}
  for name in names:
    value = getattr(module, name)
    defined = getattr(value, '__module__', None)
    if not (isinstance(defined, str) and defined.startswith(package + '.')):
      defined = _defining_module(package, name)
    exports[name] = defined
  return exports


def _defining_module(package: str, name: str) -> str:
  """The submodule that defines ``name`` for the package: the module its lazy exports name, or the
  one whose ``from ... import name`` its ``__init__`` holds (data, constants)."""
  exports = getattr(importlib.import_module(package), '_EXPORTS', {})
  if name in exports:
    return f'{package}.{exports[name]}'
  tree = ast.parse(pathlib.Path(importlib.import_module(package).__file__).read_text())
  for node in tree.body:
    if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
      return node.module
  raise ValueError(f'{package}.{name}: cannot tell which module defines it')


def module_names(modname: str) -> list[str]:
  """The public names a module defines (functions, classes, constants), in source order.

  Args:
    modname: a module's full name.

  Returns:
    The names assigned, or defined by ``def`` or ``class``, at the module's top level, without
    private names, modules, and aliases of what another module defines; only those of its
    ``__all__`` where it has one (the others serve the package's own modules).

  Raises:
    ValueError: when ``__all__`` names something the module does not define.

  Example:
    >>> module_names('sfa_jax.engine.objectives')
    ['Objective', 'CLASSIFICATION', 'regression', 'NEXT_TOKEN']
    >>> 'scalar' in module_names('sfa_jax.transforms'), 'sfa' in module_names('sfa_jax.transforms')
    (False, True)
  """
  module = importlib.import_module(modname)
  tree = ast.parse(pathlib.Path(module.__file__).read_text())
  names = []
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
      names.append(node.name)
    elif isinstance(node, ast.Assign):
      names += [t.id for t in node.targets if isinstance(t, ast.Name)]
    elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
      names.append(node.target.id)
  listed = getattr(module, '__all__', None)
  if listed is not None and set(listed) - set(names):
    raise ValueError(f'{modname}.__all__ names what the module does not define: {sorted(set(listed) - set(names))}')
  public = []
  for name in dict.fromkeys(names):
    value = getattr(module, name, None)
    if name.startswith('_') or isinstance(value, type(sys)) or (listed is not None and name not in listed):
      continue
    defined = getattr(value, '__module__', modname) if callable(value) else modname
    if defined == modname:  # not an alias of a name another module defines
      public.append(name)
  return public


def public_modules() -> list[str]:
  """Every public module of ``sfa_jax`` (no part of its name private), packages left out."""
  return sorted(
      info.name for info in pkgutil.walk_packages(sfa_jax.__path__, 'sfa_jax.')
      if not any(part.startswith('_') for part in info.name.split('.')) and not info.ispkg
  )


def page_modules() -> dict[str, list[str]]:
  """``{page: [module]}``: :data:`API_PAGES`' modules, then any public module they do not list.

  A module added to the package later is not lost: it joins the page of its package (``engine``,
  ``tasks``, ``models``, ``cli``; the core page for the others) until :data:`API_PAGES` places it.
  """
  pages = {page: [f'{package}.{m}' for m in modules] for page, (_, package, modules) in API_PAGES.items()}
  listed = {m for modules in pages.values() for m in modules}
  for modname in public_modules():
    if modname not in listed and modname not in NOT_IN_REFERENCE:
      parts = modname.split('.')
      pages[parts[1] if len(parts) > 2 and parts[1] in pages else 'core'].append(modname)
  return pages


def reference_sections() -> dict[str, dict[str, list[str]]]:
  """``{page: {module: [documented names]}}``: every name of the API reference, in page order."""
  exports = {package: package_exports(package) for package in PACKAGES}
  pages = {}
  for page, modules in page_modules().items():
    pages[page] = {}
    for modname in modules:
      reexported = {n: p for p in PACKAGES for n, m in exports[p].items() if m == modname}
      pages[page][modname] = [f'{reexported[n]}.{n}' if n in reexported else f'{modname}.{n}' for n in module_names(modname)]
  return pages


def reference_names() -> list[str]:
  """Every documented name of the API reference (``sfa_jax.sfa``, ``sfa_jax.engine.config.TrainConfig``...)."""
  return [name for sections in reference_sections().values() for names in sections.values() for name in names]


def _check_coverage() -> None:
  """Every name a package re-exports has a page (one defined in a private module would not): else the build stops."""
  documented = set(reference_names())
  missing = sorted(f'{p}.{n}' for p in PACKAGES for n in package_exports(p) if f'{p}.{n}' not in documented)
  if missing:
    raise RuntimeError(f'docs/conf.py: public names missing from the API reference: {missing}')


def constant_doc(modname: str, name: str) -> list[str]:
  """The doc of a module-level constant from its source, for a constant without a docstring of its own.

  The docstring under the group of consecutive assignments it belongs to (``UNIT``, ``UNIT_OPEN_LOW``,
  ``NON_NEGATIVE`` share one), else the comment above or beside the assignment.
  """
  path = pathlib.Path(importlib.import_module(modname).__file__)
  source = path.read_text()
  lines = source.splitlines()
  body = ast.parse(source).body
  for i, node in enumerate(body):
    if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
      break
  else:
    return []
  j = i
  while j + 1 < len(body) and isinstance(body[j + 1], ast.Assign) and body[j + 1].lineno == body[j].end_lineno + 1:
    j += 1
  after = body[j + 1] if j + 1 < len(body) else None
  if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
    return [line.strip() for line in after.value.value.strip().splitlines()]
  line = lines[node.lineno - 1]
  if '#' in line:
    return [line.split('#', 1)[1].strip()]
  above = []
  k = node.lineno - 2
  while k >= 0 and lines[k].lstrip().startswith('#'):
    above.insert(0, lines[k].lstrip()[1:].strip())
    k -= 1
  return above


def _check_constants() -> None:
  """Every constant of the reference has a doc (a page showing a bare value says nothing): else the build stops."""
  bare = []
  for name in reference_names():
    head, _, short = name.rpartition('.')
    value = getattr(importlib.import_module(head), short)
    if not (callable(value) or isinstance(value, type(sys))) and not constant_doc(_constant_module(head, short), short):
      bare.append(name)
  if bare:
    raise RuntimeError(f'docs/conf.py: constants without a doc (a docstring or comment at their assignment): {bare}')


def _constant_module(head: str, short: str) -> str:
  """The module that assigns constant ``head.short`` (a package's re-export is assigned in its module)."""
  return package_exports(head).get(short, head) if head in PACKAGES else head


def _autosummary(module: str, names: list[str]) -> list[str]:
  """An autosummary table of ``names`` of ``module``, one page per name."""
  return [f'.. currentmodule:: {module}', '', '.. autosummary::', '   :toctree: _autosummary', '   :nosignatures:', '',
          *[f'   {n}' for n in names], '']


def page_text(page: str, sections: dict[str, list[str]]) -> str:
  """The reStructuredText of one API page: the package's docstring, the names it exports, then its modules.

  Args:
    page: a key of :data:`API_PAGES`.
    sections: ``{module: [documented names]}``, the page's entry of :func:`reference_sections`.

  Returns:
    The page. The names the package exports come first (``sfa_jax.engine.run_sequence``), in
    module order; each module's section then gives its docstring and its other public names.

  Example:
    >>> text = page_text('engine', reference_sections()['engine'])
    >>> text.index('   run_sequence') < text.index('Modules') < text.index('   SFA')
    True
  """
  title, package, _ = API_PAGES[page]
  lines = ['..', '   Generated by docs/conf.py (write_api_pages); do not edit.', '', title, '=' * len(title), '',
           f'.. automodule:: {package}', '   :no-members:', '']
  exported = [n for names in sections.values() for n in names if n.rpartition('.')[0] in PACKAGES]
  if exported:
    lines += ['Public API', '----------', '', f'What ``{package}`` exports: ``{package}.NAME``.', '']
    lines += _autosummary(package, [n.rpartition('.')[2] for n in exported])
  lines += ['Modules', '-------', '']
  for modname, entries in sections.items():
    heading = f'``{modname}``'
    lines += [heading, '~' * len(heading), '', f'.. automodule:: {modname}', '   :no-members:', '']
    above = [n for n in entries if n.rpartition('.')[0] in PACKAGES]
    if above:
      lines += ['Exported (above): ' + ', '.join(f':py:obj:`~{n}`' for n in above) + '.', '']
    own = [n.rpartition('.')[2] for n in entries if n.rpartition('.')[0] == modname]
    if own:
      lines += _autosummary(modname, own)
  return '\n'.join(lines)


def write_api_pages() -> None:
  """Writes ``api/<page>.rst`` for every page of :data:`API_PAGES` (only when its text changes).

  The pages of names no longer documented (renamed, made private) are removed from ``api/_autosummary``.
  """
  _check_coverage()
  _check_constants()
  out = DOCS / 'api'
  (out / '_autosummary').mkdir(parents=True, exist_ok=True)
  sections = reference_sections()
  for page, entries in sections.items():
    text = page_text(page, entries)
    path = out / f'{page}.rst'
    if not path.exists() or path.read_text() != text:
      path.write_text(text)
  names = set(reference_names())
  for stale in (out / '_autosummary').glob('*.rst'):
    if stale.stem not in names:
      stale.unlink()


write_api_pages()


def _constant_docs(app, what, name, obj, options, lines):
  """A constant's doc comes from its source (:func:`constant_doc`), never from its type (``dict() -> ...``)."""
  if what != 'data' or not isinstance(name, str):
    return
  head, _, short = name.rpartition('.')
  lines[:] = constant_doc(_constant_module(head, short), short)


def _local_module_aliases(modname: str) -> set[str]:
  """The names under which module ``modname`` imports modules of ``sfa_jax`` (``objectives_lib``), at any depth."""
  aliases = set()
  for node in ast.walk(ast.parse(pathlib.Path(importlib.import_module(modname).__file__).read_text())):
    if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('sfa_jax'):
      package = importlib.import_module(node.module)
      if hasattr(package, '__path__'):  # from sfa_jax.engine import objectives as objectives_lib
        aliases |= {a.asname or a.name for a in node.names if importlib.util.find_spec(f'{node.module}.{a.name}')}
    elif isinstance(node, ast.Import):
      aliases |= {a.asname for a in node.names if a.asname and a.name.startswith('sfa_jax')}
  return aliases


def _source_text(node: ast.expr, aliases: set[str]) -> str:
  """``node`` as written, with the package's own module aliases dropped (``objectives_lib.Objective``: ``Objective``)."""

  class Drop(ast.NodeTransformer):
    def visit_Attribute(self, attribute):
      if isinstance(attribute.value, ast.Name) and attribute.value.id in aliases:
        return ast.Name(attribute.attr)
      return self.generic_visit(attribute)

  return ast.unparse(Drop().visit(node))


def _field_default(node: ast.expr | None, aliases: set[str]) -> str | None:
  """The default a field's assignment gives, as written (``dataclasses.field(default=...)`` read too)."""
  if node is None:
    return None
  if isinstance(node, ast.Call) and ast.unparse(node.func) in ('field', 'dataclasses.field'):
    keywords = {k.arg: k.value for k in node.keywords}
    if 'default' in keywords:
      return _source_text(keywords['default'], aliases)
    return f'{ast.unparse(keywords["default_factory"])}()' if 'default_factory' in keywords else None
  return _source_text(node, aliases)


def dataclass_signature(cls: type) -> str:
  """The constructor's signature of a dataclass of the package (a config, a Flax module), as its source writes it.

  The generated ``__init__`` would show evaluated annotations (``optax._src.base.GradientTransformation``),
  the repr of defaults (``1073741824``, an objective's functions) and a Flax module's ``parent`` and
  ``name``: this is the fields' annotations and defaults as written in the class bodies.

  Args:
    cls: a dataclass defined in ``sfa_jax``.

  Returns:
    The signature, e.g. ``"(steps: int = 10, objective: Objective = CLASSIFICATION)"``.

  Example:
    >>> from sfa_jax import engine
    >>> sig = dataclass_signature(engine.TrainConfig)
    >>> 'objective: Objective = CLASSIFICATION' in sig, 'device_data_bytes: int = 2 ** 30' in sig
    (True, True)
    >>> from sfa_jax import models
    >>> dataclass_signature(models.MLP)
    '(hidden: Sequence[int] = (256, 256), num_outputs: int = 10, num_heads: int = 1)'
  """
  written = {}
  for klass in reversed(cls.__mro__):
    if not klass.__module__.startswith('sfa_jax.'):
      continue
    aliases = _local_module_aliases(klass.__module__)
    body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
    for node in body:
      if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        written[node.target.id] = (_source_text(node.annotation, aliases), _field_default(node.value, aliases))
  params = []
  for field in dataclasses.fields(cls):
    if field.init and field.name in written:  # a Flax module's parent and name are Flax's
      annotation, default = written[field.name]
      params.append(f'{field.name}: {annotation}' + ('' if default is None else f' = {default}'))
  return f'({", ".join(params)})'


def _dataclass_signatures(app, what, name, obj, options, signature, return_annotation):
  """Gives autodoc :func:`dataclass_signature` for the package's dataclasses."""
  if what == 'class' and dataclasses.is_dataclass(obj) and obj.__module__.startswith('sfa_jax.'):
    return dataclass_signature(obj), return_annotation
  return None


DOCTEST_FLAG = re.compile(r'\s*#\s*doctest:.*$')


def _strip_doctest_flags(app, what, name, obj, options, lines):
  """Drops ``# doctest: +SKIP`` from a docstring's examples, so the page and codeautolink read the same code.

  (Sphinx trims the flags only when it highlights a block, after codeautolink has read it.)
  """
  for i, line in enumerate(lines):
    if line.lstrip().startswith(('>>>', '...')):
      lines[i] = DOCTEST_FLAG.sub('', line)


def _skip_namedtuple_aliases(app, what, name, obj, skip, options):
  """Leaves out a NamedTuple's generated field docs ("Alias for field number 0"): the class documents them."""
  if (getattr(obj, '__doc__', None) or '').startswith('Alias for field number'):
    return True
  return None


def setup(app):
  app.connect('autodoc-process-signature', _dataclass_signatures)
  app.connect('autodoc-skip-member', _skip_namedtuple_aliases)
  app.connect('autodoc-process-docstring', _constant_docs)
  app.connect('autodoc-process-docstring', _strip_doctest_flags)

"""The package's layers: the core, tasks and models, the engine, the command line.

``import sfa_jax`` loads nothing heavy and its names load the core alone; no module imports a
module of a layer above its own; no two modules import each other, directly or around a circle;
no function is longer than 80 lines of code.
"""

import ast
import io
import json
import pathlib
import subprocess
import sys
import tokenize

import sfa_jax

HEAVY = ('flax', 'orbax', 'tensorflow_datasets', 'matplotlib', 'mlxtend', 'sklearn', 'tensorflow')
CORE = {'sfa_jax', 'sfa_jax._lazy', 'sfa_jax._validation', 'sfa_jax.transforms', 'sfa_jax.anchors', 'sfa_jax.adaptive',
        'sfa_jax.fisher', 'sfa_jax.merging'}
PACKAGE = pathlib.Path(sfa_jax.__file__).parent
LAYERS = {'core': 0, 'tasks': 1, 'models': 1, 'engine': 2, 'cli': 3}
"""Each layer's rank: a module may import modules of its own rank or below."""


def _loaded_after(code: str) -> list[str]:
  script = f'import sys, json\n{code}\nprint(json.dumps(sorted(sys.modules)))'
  return json.loads(subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, check=True).stdout)


def test_import_sfa_jax_loads_no_jax():
  loaded = _loaded_after('import sfa_jax')
  assert 'jax' not in loaded and {name for name in loaded if name.startswith('sfa_jax')} == {'sfa_jax', 'sfa_jax._lazy'}


def test_the_public_names_load_the_core_only():
  names = 'sfa l2 ewc reanchor find_state set_hyperparams adaptive_sfa diagonal_fisher online_fisher ties interpolate'
  loaded = _loaded_after(f'import sfa_jax\nfor name in {names.split()!r}: getattr(sfa_jax, name)')
  assert not [name for name in loaded if name.split('.')[0] in HEAVY]
  assert {name for name in loaded if name.startswith('sfa_jax')} == CORE


def test_every_public_name_resolves():
  for name in sfa_jax.__all__:
    assert getattr(sfa_jax, name) is not None
  assert set(sfa_jax.__all__) <= set(dir(sfa_jax))


def _modules() -> dict[str, pathlib.Path]:
  """Every module of the package by its dotted name (a package by its ``__init__``)."""
  modules = {}
  for path in PACKAGE.rglob('*.py'):
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    modules['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
  return modules


def _imports(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
  """``{module: the package's modules it imports}``, at its top or inside a function alike.

  ``from package import name`` imports the submodule ``package.name`` when there is one, else the
  package (whose ``__init__`` defines or exports ``name``).
  """
  graph = {}
  for name, path in modules.items():
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        found |= {alias.name for alias in node.names}
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        found |= {f'{node.module}.{alias.name}' if f'{node.module}.{alias.name}' in modules else node.module
                  for alias in node.names}
    graph[name] = {target for target in found if target in modules and target != name and target != 'sfa_jax'}
  return graph


def _layer(module: str) -> str:
  parts = module.split('.')
  if parts[1:2] == ['__main__']:
    return 'cli'  # the entry point of `python -m sfa_jax`
  return parts[1] if len(parts) > 2 or parts[1:] and parts[1] in LAYERS else 'core'


def test_no_module_imports_a_layer_above_its_own():
  graph = _imports(_modules())
  upward = sorted((module, target) for module, targets in graph.items() for target in targets
                  if LAYERS[_layer(target)] > LAYERS[_layer(module)])
  assert not upward, upward


def test_no_import_cycle():
  graph = _imports(_modules())
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(module: str) -> list[str] | None:
    state[module] = 1
    path.append(module)
    for target in sorted(graph[module]):
      if state.get(target) == 1:
        return path[path.index(target):] + [target]
      if target not in state and (cycle := visit(target)):
        return cycle
    state[module] = 2
    path.pop()
    return None

  for module in sorted(graph):
    if module not in state:
      cycle = visit(module)
      assert cycle is None, ' -> '.join(cycle)


def test_the_core_is_at_most_twelve_modules_and_nothing_else_sits_beside_it():
  top = sorted(path.name for path in PACKAGE.glob('*.py'))
  assert len(top) <= 12, top
  assert {path.name for path in PACKAGE.iterdir() if path.is_dir() and (path / '__init__.py').exists()} == {
      'tasks', 'models', 'engine', 'cli'}


def _code_lines(path: pathlib.Path) -> dict[str, int]:
  """``{'file:line:function': lines of code}`` of every top-level function and method of ``path``:
  docstrings, comments and blank lines left out, nested functions counted toward their parent."""
  source = path.read_text()
  tree = ast.parse(source)
  docstrings = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)) and node.body:
      first = node.body[0]
      if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        docstrings.update(range(first.lineno, first.end_lineno + 1))
  skipped = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
  code = {line for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type not in skipped
          for line in range(token.start[0], token.end[0] + 1) if line not in docstrings}
  counts = {}

  def visit(node: ast.AST, prefix: str) -> None:
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
        lines = sum(1 for line in range(child.lineno, child.end_lineno + 1) if line in code)
        counts[f'{path.relative_to(PACKAGE.parent)}:{child.lineno}:{prefix}{child.name}'] = lines
      elif isinstance(child, ast.ClassDef):
        visit(child, f'{prefix}{child.name}.')

  visit(tree, '')
  return counts


def test_no_function_is_over_80_lines_of_code():
  counts = {name: lines for path in PACKAGE.rglob('*.py') for name, lines in _code_lines(path).items()}
  assert max(counts.values()) > 40  # the count sees real functions (the loop's is about 40)
  assert not {name: lines for name, lines in counts.items() if lines > 80}

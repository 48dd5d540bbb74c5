"""Regenerates the documentation's figures and quoted results from the offline demo.

Runs ``sfa-jax demo --out outputs/demo`` (about 30 s to 1 min on two CPU cores), copies the
plots the guides show into ``docs/_static/figures/`` and its ``results.json`` to
``docs/demo/results.json``, then rewrites the pages' generated blocks from it
(``docs/page_numbers.py``)::

  python docs/make_figures.py                    # run the demo, then copy its plots
  python docs/make_figures.py --from outputs/demo  # copy the output of a demo already run

The figures are the demo's own output (``sfa_jax.cli.plots``), not drawn for the docs: the accuracy
matrices of fine-tuning and SFA, and both methods' accuracy curves (SFA's shows the jumps of the
even digits' accuracy at its averaging steps).
"""

import argparse
import pathlib
import shutil
import subprocess
import sys

DOCS = pathlib.Path(__file__).resolve().parent
FIGURES = DOCS / '_static' / 'figures'
RESULTS = DOCS / 'demo' / 'results.json'
# The demo's file name (``sfa_jax.cli``: ``accuracy_<kind>_<method label>.png``) -> the docs' name.
COPIES = {
    'accuracy_matrix_finetune.png': 'demo_matrix_finetune.png',
    'accuracy_matrix_sfa_beta=0.25_p=0.25.png': 'demo_matrix_sfa.png',
    'accuracy_curves_finetune.png': 'demo_curves_finetune.png',
    'accuracy_curves_sfa_beta=0.25_p=0.25.png': 'demo_curves_sfa.png',
}


def copy_figures(demo_dir: pathlib.Path, figures: pathlib.Path = FIGURES) -> list[pathlib.Path]:
  """Copies the demo's plots that the guides show from ``demo_dir`` into ``figures``.

  Args:
    demo_dir: the ``--out`` folder of ``sfa-jax demo``.
    figures: where the docs read them (``docs/_static/figures``).

  Returns:
    The paths written.

  Raises:
    FileNotFoundError: ``demo_dir`` lacks one of the plots (not a demo's output, or another demo).
  """
  missing = [name for name in COPIES if not (demo_dir / name).is_file()]
  if missing:
    raise FileNotFoundError(f'{demo_dir} has no {", ".join(missing)}: is it the output of `sfa-jax demo`?')
  figures.mkdir(parents=True, exist_ok=True)
  written = []
  for source, target in COPIES.items():
    shutil.copyfile(demo_dir / source, figures / target)
    written.append(figures / target)
  return written


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--from', dest='demo_dir', type=pathlib.Path, help='a demo output folder to copy from (no run)')
  args = parser.parse_args(argv)
  demo_dir = args.demo_dir
  if demo_dir is None:
    demo_dir = DOCS.parent / 'outputs' / 'demo'
    subprocess.run([sys.executable, '-m', 'sfa_jax', 'demo', '--out', str(demo_dir), '--overwrite'], check=True)
  for path in copy_figures(demo_dir):
    print(path.relative_to(DOCS.parent))
  RESULTS.parent.mkdir(exist_ok=True)
  shutil.copyfile(demo_dir / 'results.json', RESULTS)
  print(RESULTS.relative_to(DOCS.parent))
  sys.path.insert(0, str(DOCS))
  import page_numbers

  for page in page_numbers.update_pages():
    print(page)


if __name__ == '__main__':
  main()

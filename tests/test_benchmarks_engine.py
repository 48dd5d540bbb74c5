"""Smoke test of benchmarks/engine_overhead.py: its --quick mode prints a ratio, and the engine and the
hand-written scan loop train to the same accuracy matrix."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow  # two compilations of the digits run: ~20 s on 2 cores
def test_engine_overhead_quick_prints_a_ratio_and_equal_matrices(tmp_path):
  figures_path = tmp_path / 'figures.json'
  env = os.environ | {'JAX_PLATFORMS': 'cpu'}
  out = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'engine_overhead.py'), '--quick', '--json', str(figures_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  ratio = re.search(r'ratio warm (\d+\.\d+)x', out.stdout)
  assert ratio and float(ratio.group(1)) > 0, out.stdout
  assert 'accuracy matrices: max difference' in out.stdout and '(agree)' in out.stdout, out.stdout
  figures = json.loads(figures_path.read_text())
  assert figures['max_matrix_difference'] <= 1e-5
  engine, hand = figures['matrices']['engine'], figures['matrices']['hand']
  assert len(engine) == len(hand) == 2 and all(len(row) == 2 for row in engine)
  assert figures['table']['warm']['train_per_step']['engine'] > 0
  assert figures['machine']['nproc'] >= 1 and figures['machine']['jax']

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

"""with_new_head: the backbone's layers, the fresh model's head."""

import jax
import numpy as np
import pytest

from sfa_jax import models
from sfa_jax.engine import steps
from sfa_jax.models.transfer import with_new_head


def test_cnn_backbone_keeps_layers_and_takes_new_head():
  sample = np.zeros((1, 28, 28, 1), np.float32)
  kwargs = {'features': (4, 8), 'hidden': 16}
  pretrained, _ = steps.initializer(models.make_model('cnn', 10, **kwargs), sample)(0)
  fresh, _ = steps.initializer(models.make_model('cnn', 2, num_heads=5, **kwargs), sample)(1)
  out = with_new_head(pretrained, fresh)
  assert jax.tree.structure(out) == jax.tree.structure(fresh)
  for name in pretrained:
    if name != 'head':
      jax.tree.map(np.testing.assert_array_equal, out[name], pretrained[name])
  jax.tree.map(np.testing.assert_array_equal, out['head'], fresh['head'])
  assert out['head']['kernel'].shape == (5, 16, 2)
  # A copy: changing the output leaves the inputs alone.
  out['Dense_0']['kernel'][...] = 0.0
  assert np.abs(np.asarray(pretrained['Dense_0']['kernel'])).sum() > 0


def test_model_state_without_head():
  state = {'bn': {'mean': np.ones(3, np.float32)}}
  out = with_new_head(state, {'bn': {'mean': np.zeros(3, np.float32)}})
  np.testing.assert_array_equal(out['bn']['mean'], 1.0)


def test_mismatch_names_the_leaf():
  with pytest.raises(ValueError, match=r"conv\['kernel'\]"):
    with_new_head({'conv': {'kernel': np.ones(3)}}, {'conv': {'kernel': np.ones(4)}})
  with pytest.raises(ValueError, match='only in the backbone'):
    with_new_head({'conv': {}, 'extra': {}}, {'conv': {}})

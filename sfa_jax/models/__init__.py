"""Flax Linen models for image classification, with a shared or per-task output head.

Every model takes NHWC float32 images in [0, 1] and is called the same way::

  logits = model.apply(variables, x, task_id=t, train=False)

``train`` is accepted by all (it only matters for ResNet18's BatchNorm) and ``task_id`` picks the
head when ``num_heads > 1`` (see :mod:`sfa_jax.models.heads`). :func:`split_variables` separates the
trainable params from the model state; :mod:`sfa_jax.models.state` explains how SFA, L2, EWC and the
merges treat each.

Importing this package loads nothing: each name loads its module when first used.
"""

from sfa_jax import _lazy

# Every public name and its module, imported when first used (PEP 562).
_EXPORTS = {
    'SmallCNN': 'cnn',
    'OutputHead': 'heads',
    'load_hf_llama': 'hf',
    'save_hf_llama': 'hf',
    'MLP': 'mlp',
    'make_model': 'registry',
    'ResNet18': 'resnet',
    'merge_variables': 'state',
    'split_variables': 'state',
    'with_new_head': 'transfer',
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS)

"""Flax Linen models for image classification, with a shared or per-task output head.

Every model takes NHWC float32 images in [0, 1] and is called the same way::

  logits = model.apply(variables, x, task_id=t, train=False)

``train`` is accepted by all (it only matters for ResNet18's BatchNorm) and ``task_id`` picks the
head when ``num_heads > 1`` (see :mod:`sfa_jax.models.heads`). :func:`split_variables` separates the
trainable params from the model state; :mod:`sfa_jax.models.state` explains how SFA, L2, EWC and the
merges treat each.
"""

from sfa_jax.models.cnn import SmallCNN
from sfa_jax.models.heads import OutputHead
from sfa_jax.models.hf import load_hf_llama
from sfa_jax.models.hf import save_hf_llama
from sfa_jax.models.mlp import MLP
from sfa_jax.models.registry import make_model
from sfa_jax.models.resnet import ResNet18
from sfa_jax.models.state import merge_variables
from sfa_jax.models.state import split_variables
from sfa_jax.models.transfer import with_new_head

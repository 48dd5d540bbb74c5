"""sfa_jax: Sequential Fine-tuning with Averaging (SFA), L2 and EWC as Optax transforms.

Chain one transform into any Optax optimizer to fight catastrophic forgetting::

  tx = optax.chain(optax.adam(1e-3), sfa_jax.sfa(anchor, p=0.25, beta=0.5, total_steps=T))

References:
  Kleiman et al, `Soup to go: mitigating forgetting during continual learning with model averaging
  <https://arxiv.org/abs/2501.05559>`_, 2025
"""

from sfa_jax.transforms import EWCState
from sfa_jax.transforms import L2State
from sfa_jax.transforms import SFAState
from sfa_jax.transforms import averaging_period
from sfa_jax.transforms import ewc
from sfa_jax.transforms import is_averaging_step
from sfa_jax.transforms import l2
from sfa_jax.transforms import sfa
from sfa_jax.anchors import check_placement
from sfa_jax.anchors import find_state
from sfa_jax.anchors import find_states
from sfa_jax.anchors import reanchor
from sfa_jax.anchors import register_anchored_state
from sfa_jax.anchors import set_hyperparams
from sfa_jax.adaptive import AdaptiveSFAState
from sfa_jax.adaptive import adaptive_sfa
from sfa_jax.fisher import diagonal_fisher
from sfa_jax.fisher import online_fisher
from sfa_jax.merging import interpolate
from sfa_jax.merging import task_arithmetic
from sfa_jax.merging import task_vectors
from sfa_jax.merging import ties
from sfa_jax.merging import trim_by_magnitude

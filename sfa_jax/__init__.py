"""sfa_jax: Sequential Fine-tuning with Averaging (SFA), L2, EWC and SI as Optax transforms.

Chain one transform into any Optax optimizer to fight catastrophic forgetting::

  tx = optax.chain(optax.adam(1e-3), sfa_jax.sfa(anchor, p=0.25, beta=0.5, total_steps=T))

References:
  Kleiman et al, `Soup to go: mitigating forgetting during continual learning with model averaging
  <https://arxiv.org/abs/2501.05559>`_, 2025
"""

from sfa_jax import _lazy

# Every public name and its module, imported when first used (PEP 562): `sfa-jax --help` and the
# command line's argument errors then answer without loading JAX.
_EXPORTS = {
    'EWCState': 'transforms',
    'L2State': 'transforms',
    'SFAState': 'transforms',
    'averaging_period': 'transforms',
    'ewc': 'transforms',
    'is_averaging_step': 'transforms',
    'l2': 'transforms',
    'sfa': 'transforms',
    'OfflineEWCState': 'transforms',
    'SIState': 'transforms',
    'offline_ewc': 'transforms',
    'si': 'transforms',
    'AGEMState': 'transforms',
    'agem': 'transforms',
    'check_placement': 'anchors',
    'find_state': 'anchors',
    'find_states': 'anchors',
    'reanchor': 'anchors',
    'register_anchored_state': 'anchors',
    'set_hyperparams': 'anchors',
    'merge_trainable': 'partial',
    'path_mask': 'partial',
    'split_trainable': 'partial',
    'train_only': 'partial',
    'trainable_value_and_grad': 'partial',
    'AdaptiveSFAState': 'adaptive',
    'adaptive_sfa': 'adaptive',
    'diagonal_fisher': 'fisher',
    'online_fisher': 'fisher',
    'fisher_merge': 'merging',
    'offline_fisher': 'fisher',
    'mas_importance': 'fisher',
    'interpolate': 'merging',
    'magmax': 'merging',
    'task_arithmetic': 'merging',
    'task_vectors': 'merging',
    'ties': 'merging',
    'trim_by_magnitude': 'merging',
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS)

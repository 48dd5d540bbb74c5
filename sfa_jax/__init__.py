"""sfa_jax: Sequential Fine-tuning with Averaging (SFA), L2 and EWC as Optax transforms.

Chain one transform into any Optax optimizer to fight catastrophic forgetting::

  tx = optax.chain(optax.adam(1e-3), sfa_jax.sfa(anchor, p=0.25, beta=0.5, total_steps=T))

References:
  Kleiman et al, `Soup to go: mitigating forgetting during continual learning with model averaging
  <https://arxiv.org/abs/2501.05559>`_, 2025
"""

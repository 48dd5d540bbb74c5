"""Methods a user writes: the test suite imports them by path, as the command line does (``module:Class``)."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sfa_jax.engine import methods


class EMAState(NamedTuple):
  decay: jax.Array  # in the state: the lanes of a sweep share one update program
  ema: Any


def params_ema(decay: float) -> optax.GradientTransformation:
  """Keeps ``ema ← decay·ema + (1 − decay)·θ`` of the params after each update; updates pass through."""

  def init(params):
    return EMAState(jnp.asarray(decay, jnp.float32), jax.tree.map(jnp.copy, params))

  def update(updates, state, params=None):
    new = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: state.decay * e + (1 - state.decay) * p, state.ema, new)
    return updates, state._replace(ema=ema)

  return optax.GradientTransformation(init, update)


class ParamsEMA(methods.Method):
  """Trains as the optimizer does; each task ends on the moving average of its params."""

  name = 'params-ema'
  hyperparams = {'decay': methods.Hyperparam(0.9, methods.Interval(0.0, 1.0, high_open=True))}

  def transform(self, optimizer):
    return optax.chain(optimizer, params_ema(self['decay']))

  def end_task(self, state, boundary):
    return state._replace(params=optax.tree.get(state.opt_state, 'ema'))


def _baked_ema(decay: float) -> optax.GradientTransformation:
  def init(params):
    return jax.tree.map(jnp.copy, params)

  def update(updates, ema, params=None):
    new = optax.apply_updates(params, updates)
    return updates, jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, new)

  return optax.GradientTransformation(init, update)


class BakedEMA(ParamsEMA):
  """The same average, its decay a constant of the update: it cannot be swept."""

  name = 'baked-ema'

  def transform(self, optimizer):
    return optax.chain(optimizer, _baked_ema(self['decay']))

  def end_task(self, state, boundary):
    return state._replace(params=state.opt_state[1])


class NotAMethod:
  name = 'not-a-method'

"""Input checks shared by the models, run at trace time on static shapes."""

from __future__ import annotations

import jax


def check_images(x: jax.Array, model_name: str) -> None:
  """Raises ``ValueError`` unless ``x`` is an image batch of shape ``(batch, height, width, C)``."""
  if x.ndim != 4:
    raise ValueError(
        f'{model_name} expects images in NHWC layout, shape (batch, height, width, channels); '
        f'got shape {x.shape}. Add a channel axis to grey-scale images: x[..., None].'
    )

"""Damage done to checkpoints on disk, shared by the checkpoint and command-line tests."""

import pathlib


def flip_bytes_in_arrays(step_dir, count=64):
  """Inverts ``count`` bytes in the middle of the largest array file of a checkpoint (same size).

  Args:
    step_dir: the checkpoint's folder, ``<checkpoints>/<step>``.
    count: how many bytes to invert.

  Returns:
    The damaged file.
  """
  files = [path for path in pathlib.Path(step_dir, 'arrays').rglob('*') if path.is_file()]
  target = max(files, key=lambda path: path.stat().st_size)
  data = bytearray(target.read_bytes())
  middle = len(data) // 2
  data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
  target.write_bytes(bytes(data))
  return target


def steps(folder):
  """The steps of the complete checkpoints in ``folder``, ascending."""
  return sorted(int(path.name) for path in pathlib.Path(folder).iterdir() if path.name.isdigit())

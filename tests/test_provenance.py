"""The project's files speak of the project: its settings, never how or when it was made.

Every text file git tracks is scanned for phrases about the work that made it (rounds of work,
issue numbers, sessions, engineers, machines lent or not, results marked superseded); a hit fails,
naming the file and line. Say the setting instead: the hardware, data, model, budget.
"""

import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

PHRASES = re.compile('|'.join((
    r'\b(this|last|previous|next|earlier) rounds?\b',
    r'\brounds? of work\b',
    r'\bissues? #?\d+\b',
    r'\bthis issue\b',
    r'\bengineers?\b',
    r"\b(was|were|is|are|be|been)(n't| not)? lent\b",
    r'\bnot lent\b',
    r'\bsuperseded\b',
    r"\b(this|that|another|other|previous|last|next|same|each|every)( \w+)? sessions?\b",
    r"\bsessions?'s? (jobs?|tests?|runs?)\b",
)), re.IGNORECASE)
"""Phrases about how the project was made. A GitHub issue's address (``.../issues/12``), a
``Session`` object and a benchmark's timing rounds are not among them."""


def provenance_lines(text: str) -> list[tuple[int, str]]:
  """The lines of ``text`` that hold a phrase of :data:`PHRASES`, as ``(line number, line)``.

  Example:
    >>> provenance_lines('settings: 2 cores\\nrerun this round')
    [(2, 'rerun this round')]
  """
  if not PHRASES.search(text):
    return []
  return [(number, line) for number, line in enumerate(text.splitlines(), 1) if PHRASES.search(line)]


def tracked_text_files() -> list[pathlib.Path]:
  """The files git tracks in the checkout that decode as UTF-8 text, this test's own file left out."""
  listing = subprocess.run(['git', 'ls-files', '-z'], cwd=ROOT, capture_output=True, check=True).stdout
  paths = [ROOT / name for name in listing.decode().split('\0') if name]
  return [path for path in paths if path.is_file() and path != pathlib.Path(__file__).resolve() and _is_text(path)]


def _is_text(path: pathlib.Path) -> bool:
  data = path.read_bytes()
  if b'\0' in data:
    return False
  try:
    data.decode('utf-8')
  except UnicodeDecodeError:
    return False
  return True


@pytest.mark.parametrize('line', [
    'Last round\'s grid failed the budget rule.',
    'The grids extended this round.',
    '# Earlier rounds (their verdicts stand)',
    'superseded (issue 18): these runs fail the rule',
    'Fixed on the way for issue #17.',
    'shared with two other engineers',
    'no GPU was lent to this issue',
    "No GPU wasn't lent.",
    'the device that the sweep is for was not lent',
    'the first seed ran beside this session\'s test runs',
    'shared with other sessions\' jobs: load 11',
    'in the first run of this work session',
])
def test_the_phrases_are_found(line):
  assert provenance_lines(f'a setting\n{line}\n') == [(2, line)]


@pytest.mark.parametrize('line', [
    'see https://github.com/google/jax/issues/1234',
    'with requests.Session() as session: ...',
    'medians of 7 interleaved rounds; the first rounds compile',
    'values that round to the same float',
    'machines lent by the cloud provider are listed in its console',  # "lent" alone is not a phrase
    'a sessionless client',
])
def test_legitimate_uses_are_left_alone(line):
  assert provenance_lines(line) == []


def test_no_tracked_file_speaks_of_how_the_project_was_made():
  try:
    files = tracked_text_files()
  except (OSError, subprocess.CalledProcessError):
    pytest.skip('not a git checkout')
  hits = [f'{path.relative_to(ROOT)}:{number}: {line.strip()[:160]}'
          for path in files for number, line in provenance_lines(path.read_text(encoding='utf-8'))]
  assert not hits, ('these lines speak of how the project was made; say the setting (hardware, data, model, '
                    'budget) instead:\n' + '\n'.join(hits))

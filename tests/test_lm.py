"""The text domains and the language-model sequence trainer, on a tiny random Llama with byte tokens."""

import logging
import os
import re

import jax
import numpy as np
import pytest

from sfa_jax import engine
from sfa_jax.cli import report
from sfa_jax.engine import lm
from sfa_jax.models.llama import Llama
from sfa_jax.models.llama import LlamaConfig
from sfa_jax.models.tokenizer import ByteTokenizer
from sfa_jax.tasks import text

TOK = ByteTokenizer()


def test_arithmetic_problems_are_seeded_and_correct():
  problems = text.arithmetic_problems(40, seed=3)
  assert problems == text.arithmetic_problems(40, seed=3)
  assert problems != text.arithmetic_problems(40, seed=4)
  for p in problems:
    a, b = (int(v) for v in re.findall(r'\d+', p.prompt)[:2])
    if 'buys' in p.prompt:
      assert p.answer == a + b
    elif 'gave' in p.prompt:
      assert p.answer == a - b and p.answer > 0
    elif 'box holds' in p.prompt:
      assert p.answer == a * b
    else:
      assert p.answer * b == a
  with pytest.raises(ValueError, match='count'):
    text.arithmetic_problems(0, seed=0)


def test_windows_and_exact_match_set():
  cut = text.windows(['abcdefg', 'hi'], TOK, seq_len=4)
  assert cut.tolist() == [[97, 98, 99, 100, 101], [102, 103, 256, 104, 105]]
  problems = [text.Problem('Q: 2+2?\nAnswer:', 4), text.Problem('Q: 10+10?\nAnswer:', 20)]
  s = text.exact_match_set(problems, TOK)
  assert s.tokens.shape == (2, len('Q: 10+10?\nAnswer: 20\n'))
  assert TOK.decode(s.tokens[0][s.answer_mask[0]]) == ' 4\n'
  assert (s.tokens[0][~s.answer_mask[0]][len('Q: 2+2?\nAnswer:'):] == TOK.eos_id).all()


@pytest.mark.skipif(not os.path.isdir(text.LAW_DIR), reason='needs Debian common-licenses')
def test_make_text_domains_is_deterministic_and_disjoint():
  kwargs = dict(train_sequences=16, heldout_sequences=4, num_problems=6, math_train_problems=200, strict=False)
  domains = text.make_text_domains(TOK, 24, **kwargs)
  again = text.make_text_domains(TOK, 24, **kwargs)
  assert [d.name for d in domains] == ['math', 'law', 'code']
  for d, e in zip(domains, again):
    assert d.train.shape == (16, 25) and d.heldout.shape == (4, 25)
    np.testing.assert_array_equal(d.train, e.train)
    assert not {r.tobytes() for r in d.train} & {r.tobytes() for r in d.heldout}
  assert 'licen' in TOK.decode(np.concatenate(domains[1].train).tolist()).lower()
  with pytest.raises(ValueError, match='windows'):
    text.make_text_domains(TOK, 24, **(kwargs | {'train_sequences': 10**6}))


def test_champ_documents():
  pytest.importorskip('champ_dataset')
  docs, sources = text.champ_documents()
  assert len(docs) == 270 and 'Answer:' in docs[0] and '270' in sources[0]


@pytest.fixture(scope='module')
def tiny():
  rng = np.random.default_rng(0)
  # Three synthetic domains (no file needed): random byte windows with different statistics.
  domains = []
  for i, name in enumerate(['math', 'law', 'code']):
    low = 32 + 20 * i
    data = rng.integers(low, low + 12, size=(20, 17)).astype(np.int32)
    problems = text.exact_match_set(text.arithmetic_problems(4, seed=i), TOK) if name == 'math' else None
    domains.append(text.TextDomain(name, data[:16], data[16:], problems, ('synthetic',)))
  model = Llama(LlamaConfig.tiny(vocab_size=TOK.vocab_size))
  params = jax.jit(model.init)(jax.random.key(0), domains[0].train[:1, :-1])['params']
  return model, params, domains


@pytest.mark.slow  # about 5 s
def test_exact_match_equals_greedy_decoding(tiny):
  model, params, _ = tiny
  # Completions that are the model's own greedy continuation (hits) or one token off (misses).
  prompts = [[65, 66, 67], [70, 71, 72], [80, 81, 82]]
  rows, masks = [], []
  for i, prompt in enumerate(prompts):
    completion = lm.greedy_generate(model, params, prompt, 3)
    if i == 1:
      completion[-1] = (completion[-1] + 1) % TOK.vocab_size
    rows.append(prompt + completion + [0])
    masks.append([False] * 3 + [True] * 3 + [False])
  problems = text.ExactMatchSet(np.asarray(rows, np.int32), np.asarray(masks))
  _, exact_match = lm.make_lm_evaluator(model, batch_size=2)
  assert exact_match(params, problems) == pytest.approx(2 / 3)


@pytest.mark.slow  # about 60 s of CPU at load 19: over this file's share of the default-suite budget
def test_run_lm_sequences_methods(tiny):
  model, params, domains = tiny
  names = [('finetune', {}), ('sfa', {'p': 0.5, 'beta': 0.5}), ('task-arithmetic', {}), ('replay', {'fraction': 0.25}),
           ('ewc', {'strength': 10.0})]
  methods = [engine.make_method(n, **h) for n, h in names]
  config = lm.LMConfig(steps_per_domain=(3, 2, 2), batch_size=2, learning_rate=3e-3, fisher_sequences=2)
  before = jax.tree.map(np.asarray, params)
  results = lm.run_lm_sequences(model, params, domains, methods, config)
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, params))  # untouched
  by_name = {r.method.split('(')[0]: r for r in results}
  for r in results:
    assert r.stages == ['initial', 'math', 'law', 'code']
    assert np.asarray(r.loss_matrix).shape == (4, 3) and np.isfinite(r.loss_matrix).all()
    # The first domain is plain fine-tuning for every method: equal up to the rounding of each
    # method's own compiled step (another chain fuses, and rounds, differently).
    np.testing.assert_allclose(r.loss_matrix[:2], results[0].loss_matrix[:2], rtol=1e-5)
    assert len(r.exact_match['math']) == 4
    assert [len(x) for x in r.train_losses] == [3, 2, 2]
  ft = by_name['finetune']
  assert ft.loss_matrix[1][0] < ft.loss_matrix[0][0]  # learning math lowers its loss
  assert ft.loss_matrix[2][1] < ft.loss_matrix[1][1]
  assert by_name['sfa'].averaging_steps == [4, 5, 6, 7]  # p·T = 1 step on each of law and code
  for name in ('sfa', 'task-arithmetic', 'replay', 'ewc'):
    assert by_name[name].loss_matrix[2:] != ft.loss_matrix[2:], name
  summary = ft.summary()
  assert summary['mean_final_loss'] == pytest.approx(np.mean(ft.loss_matrix[-1]))
  assert 'math exact match' in report.lm_markdown_table(results)


def test_run_lm_sequences_rejects_bad_input(tiny):
  model, params, domains = tiny
  with pytest.raises(TypeError, match=r'methods\[0\] must be a sfa_jax.engine.methods.Method'):
    lm.run_lm_sequences(model, params, domains, ['sfa'])
  with pytest.raises(ValueError, match='steps_per_domain'):
    lm.run_lm_sequences(model, params, domains, [], lm.LMConfig(steps_per_domain=(1, 2)))
  with pytest.raises(ValueError, match='batch_size'):
    lm.LMConfig(batch_size=0)
  with pytest.raises(ValueError, match='optimizer'):
    lm.LMConfig(optimizer='rmsprop')


def test_a_language_run_is_the_engine_loop_and_resumes_bit_exact(tiny, tmp_path, caplog):
  """The sequence runs on the one loop: checkpointed mid-domain, resumed, the same numbers. The
  resumed run compiles no train chunk: its restored state is placed as a fresh one, so the process's
  program serves it."""
  from sfa_jax.engine.checkpoint import Checkpointer
  from sfa_jax.engine import callbacks

  model, params, domains = tiny
  config = lm.LMConfig(steps_per_domain=(3, 4, 2), batch_size=2, learning_rate=3e-3)
  method = engine.make_method('sfa', p=0.5)
  (whole,) = lm.run_lm_sequences(model, params, domains, [method], config)
  assert [len(x) for x in whole.train_losses] == [3, 4, 2] and whole.averaging_steps == [5, 7, 8, 9]

  class Stop(Exception):
    pass

  def stop_in_law(event):
    if isinstance(event, callbacks.StepEvent) and (event.task, event.step) == (1, 3):
      raise Stop

  with pytest.raises(Stop):
    lm.run_lm_sequences(model, params, domains, [method], config, callbacks=stop_in_law,
                        checkpointers=[Checkpointer(tmp_path, every_steps=2)])
  jax.config.update('jax_log_compiles', True)
  try:
    with caplog.at_level(logging.WARNING):
      (resumed,) = lm.run_lm_sequences(model, params, domains, [method], config, checkpointers=[Checkpointer(tmp_path)])
  finally:
    jax.config.update('jax_log_compiles', False)
  assert not [r.getMessage() for r in caplog.records if 'Finished XLA compilation of jit(chunk)' in r.getMessage()]
  assert resumed.loss_matrix == whole.loss_matrix and resumed.exact_match == whole.exact_match
  assert resumed.averaging_steps == whole.averaging_steps

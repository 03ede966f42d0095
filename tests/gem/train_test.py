"""GEM end to end on a micro run (2 pretrain + 2 mixed-NTP + 2 contrastive steps): the workdir
contract and phases, SIGTERM + resume replays bitwise, 8 devices (2x2x2) == 1 device.

The last two are `slow` (about 3 minutes together on the shared 2-core machine, mostly compiles);
the reproduction suite's gem invariants run the same checks at smoke scale."""

import json

import jax
import numpy as np
import pytest

from common import metrics
from common import sharding
from common import train_loop
from experiments.gem.configs import base
from projects.gem import losses
from projects.gem import train

MICRO = (
  'smoke',
  'gem.pretrain_steps=2',
  'gem.mixed_steps=2',
  'gem.cl_steps=2',
  'train.num_steps=6',
  'train.log_every=1',
  'train.eval_every=6',
  'checkpoint.every_steps=2',
  'eval.ppl_texts=16',
)


def _config(*extra):
  return base.get_config(','.join(MICRO + extra))


def _one_device_mesh():
  return sharding.make_mesh(devices=jax.devices()[:1])


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('gem_ref')
  train.train_and_evaluate(_config(), str(workdir), mesh=_one_device_mesh())
  return workdir


def _rows(workdir, split):
  return [r for r in metrics.read_jsonl(workdir / 'metrics.jsonl') if r['split'] == split]


def test_run_writes_the_contract_and_follows_the_phases(reference):
  for name in ('config.json', 'metrics.jsonl', 'results.json'):
    assert (reference / name).is_file()
  train_rows = _rows(reference, 'train')
  assert [r['step'] for r in train_rows] == [1, 2, 3, 4, 5, 6]
  assert [r['alpha'] for r in train_rows] == [0, 0, 0, 0, 1, 1]
  assert [r['inserted_frac'] for r in train_rows[:2]] == [0, 0]  # the base LM's plain phase
  assert all(r['cl_loss'] == 0 for r in train_rows[:4]) and all(
    r['ntp_loss'] == 0 for r in train_rows[4:]
  )
  for r in train_rows:
    assert 1.0 <= r['logit_scale'] <= 100.0 + 1e-4
    assert r['alpha_untraced'] == 0  # the loss traced every branch the schedule selects
  assert losses.schedule_alphas(_config()) == (0.0, 1.0)
  assert losses.schedule_alphas(_config('gem.alpha_after=0.5')) == (0.0, 0.5)
  assert losses.schedule_alphas(_config('gem.pretrain_steps=0', 'gem.mixed_steps=0')) == (1.0,)
  res = json.loads((reference / 'results.json').read_text())
  for key in ('loss', 'perplexity', 'special/recall_at_10', 'mean/mrr', 'last/ndcg_at_10'):
    assert np.isfinite(res['eval'][key]), key
  assert 0.0 <= res['eval']['special/recall_at_1'] <= res['eval']['special/recall_at_10'] <= 1.0


@pytest.mark.slow
def test_sigterm_then_resume_replays_bitwise(reference, tmp_path):
  config = _config('debug.sigterm_after_step=3')
  with pytest.raises(train_loop.Preempted):
    train.train_and_evaluate(config, str(tmp_path), mesh=_one_device_mesh())
  assert [r['step'] for r in _rows(tmp_path, 'train')] == [1, 2, 3]
  train.train_and_evaluate(_config(), str(tmp_path), mesh=_one_device_mesh())
  assert metrics.read_jsonl(tmp_path / 'metrics.jsonl') == metrics.read_jsonl(
    reference / 'metrics.jsonl'
  )
  a, b = (json.loads((w / 'results.json').read_text()) for w in (reference, tmp_path))
  assert a['train'] == b['train'] and a['eval'] == b['eval']


@pytest.mark.slow
def test_eight_devices_match_one(reference, tmp_path):
  config = _config('mesh.data=2', 'mesh.fsdp=2', 'mesh.tensor=2')
  train.train_and_evaluate(config, str(tmp_path))
  ref, new = _rows(reference, 'train'), _rows(tmp_path, 'train')
  for r, n in zip(ref, new, strict=True):
    np.testing.assert_allclose(n['loss'], r['loss'], rtol=1e-5 if r['step'] <= 3 else 1e-3)
  (ref_eval,), (new_eval,) = _rows(reference, 'eval'), _rows(tmp_path, 'eval')
  np.testing.assert_allclose(new_eval['loss'], ref_eval['loss'], rtol=1e-3)


def test_bad_mode_is_a_config_error():
  from common import config as config_lib  # noqa: PLC0415

  with pytest.raises(config_lib.ConfigError, match='gem.mode'):
    losses.phases(_config('gem.mode=simcse'))


def test_optimizer_is_the_phase_recipe_with_decay_mask_and_clamp():
  """common.optim.make_optimizer with GEM's schedule, decay mask and clamp gives bitwise the updates
  and the optax state structure of the recipe runs were checkpointed with: clip -> AdamW (no decay
  on the log-temperature) -> CLIP's clamp."""
  import optax  # noqa: PLC0415

  from common import embeddings  # noqa: PLC0415

  config = _config()
  o, is_log_scale = config.optimizer, embeddings.path_endswith('log_scale')
  mask = lambda p: jax.tree_util.tree_map_with_path(lambda k, x: not is_log_scale(k, x), p)  # noqa: E731
  ref = optax.chain(
    optax.clip_by_global_norm(o.clip_norm),
    optax.adamw(train.schedule(config), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=mask),
    embeddings.clamp_transform(is_log_scale),
  )
  params = {'w': np.linspace(-1.0, 1.0, 12, dtype=np.float32), 'log_scale': np.float32(4.5)}
  got_state, ref_state = train.make_optimizer(config).init(params), ref.init(params)
  assert jax.tree.structure(got_state) == jax.tree.structure(ref_state)
  got, want = params, params
  for i in range(6):
    grads = jax.tree.map(lambda p, i=i: np.sin(p * (i + 1)) * 3.0 - 1.0, params)
    u, got_state = train.make_optimizer(config).update(grads, got_state, got)
    got = optax.apply_updates(got, u)
    u, ref_state = ref.update(grads, ref_state, want)
    want = optax.apply_updates(want, u)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(got['log_scale']) <= embeddings.LOG_SCALE_MAX

"""The GEM ablation sweep (experiments/gem/sweep.py): its variants are valid one-key ablations at the
smoke claims' budget, the table's statistics are right, and (slow) a micro sweep's variants really
continue the shared base: the default variant resumed from the base equals one uninterrupted run."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from common import config as config_lib
from common import metrics
from experiments.gem import claims
from experiments.gem import sweep
from experiments.gem.configs import base
from projects.gem import losses
from projects.gem import models
from projects.gem import train


def _flat(cfg) -> dict:
  out = {}

  def walk(d, prefix):
    for k, v in d.items():
      if isinstance(v, dict):
        walk(v, f'{prefix}{k}.')
      else:
        out[f'{prefix}{k}'] = v

  walk(config_lib.to_dict(cfg), '')
  return out


def test_the_sweep_runs_at_the_smoke_claims_budget():
  for seed in (0, 2):
    assert sweep.run_arg(sweep.SMOKE, seed) == claims._arg('smoke', seed)


def test_the_default_is_the_papers_recipe_and_the_claims_gem_run():
  g = sweep.variant_config(sweep.SMOKE, 0, sweep.BY_NAME[sweep.DEFAULT]).gem
  assert (g.mode, g.num_special, g.p_plain, g.alpha_after, g.block_specials) == (
    'gem',
    1,
    0.8,
    1.0,
    True,
  )
  assert g.pooling == 'special'  # the k specials' mean (models.pool)


@pytest.mark.parametrize('variant', sweep.VARIANTS, ids=lambda v: v.name)
def test_every_variant_builds_and_differs_from_its_reference_in_one_key(variant):
  cfg = _flat(sweep.variant_config(sweep.SMOKE, 1, variant, '/base/checkpoints/150'))
  assert cfg['checkpoint.resume_from'] == '/base/checkpoints/150'
  assert cfg['train.num_steps'] == claims.PRETRAIN + claims.MIXED + claims.CL
  if variant.reference is None:
    assert variant.name == sweep.DEFAULT and variant.overrides == ()
    return
  ref = _flat(sweep.variant_config(sweep.SMOKE, 1, sweep.BY_NAME[variant.reference], '/b'))
  diff = sorted(k for k in cfg if cfg[k] != ref[k] and k != 'checkpoint.resume_from')
  assert len(diff) == 1 and diff[0].startswith('gem.'), diff
  assert losses.phases(sweep.variant_config(sweep.SMOKE, 1, variant))[0] == claims.PRETRAIN


def test_variant_names_and_workdirs_are_unique_and_references_come_first():
  names = [v.name for v in sweep.VARIANTS]
  assert len(set(names)) == len(names)
  assert len({sweep.slug(n) for n in names}) == len(names)
  for i, v in enumerate(sweep.VARIANTS):
    assert v.reference is None or v.reference in names[:i]


def test_base_run_is_the_default_configs_first_phase():
  b = _flat(sweep.base_config(sweep.SMOKE, 0))
  d = _flat(sweep.variant_config(sweep.SMOKE, 0, sweep.BY_NAME[sweep.DEFAULT]))
  diff = {k for k in b if b[k] != d[k]}
  assert diff == {'train.num_steps', 'train.eval_every', 'checkpoint.every_steps'}
  assert b['train.num_steps'] == b['checkpoint.every_steps'] == claims.PRETRAIN
  # The default variant is the base run's own continuation: the same config up to budget/cadence.
  assert (
    config_lib.resume_differences(
      sweep.base_config(sweep.SMOKE, 0),
      sweep.variant_config(sweep.SMOKE, 0, sweep.BY_NAME[sweep.DEFAULT]),
    )
    == []
  )


def _roles(k: int, prefix: int = 3, suffix: int = 2):
  r = [models.PREFIX] * prefix + [models.SPECIAL] * k + [models.SUFFIX] * suffix
  return jnp.asarray([r])


def test_gist_tokens_need_k_above_one():
  """At k=1 no special has another to see, so block_specials=False changes nothing."""
  one = _roles(1)
  assert bool(
    jnp.all(models.gem_mask(one, block_specials=True) == models.gem_mask(one, block_specials=False))
  )
  four = _roles(4)
  assert not bool(
    jnp.all(
      models.gem_mask(four, block_specials=True) == models.gem_mask(four, block_specials=False)
    )
  )
  assert sweep.BY_NAME['gist k=4'].reference == 'k=4'


def test_selected_variants_adds_references_and_rejects_unknown_names():
  chosen = [v.name for v in sweep.selected_variants('gist k=4,p=1')]
  assert chosen == [sweep.DEFAULT, 'k=4', 'p=1', 'gist k=4']
  assert sweep.selected_variants('') == sweep.VARIANTS
  with pytest.raises(ValueError, match='unknown variants'):
    sweep.selected_variants('k=3')


def test_table_means_intervals_and_paired_deltas():
  metric_names = (sweep.KEY, 'mean/recall_at_10', 'perplexity', 'qa/answer_nll')
  vals = {'base': (0.1, 0.2, 0.3), 'default': (0.4, 0.6, 0.5), 'k=2': (0.5, 0.6, 0.7)}
  runs = {
    s: {n: dict.fromkeys(metric_names, v[i]) for n, v in vals.items()}
    for i, s in enumerate((0, 1, 2))
  }
  text = sweep.table(runs, [sweep.BY_NAME['default'], sweep.BY_NAME['k=2']], base_step=150)
  rows = {r.split(' | ')[0].lstrip('| ').split(' (')[0]: r.split(' | ') for r in text.splitlines()}
  hw = 4.303 * 0.1 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n), sd = 0.1
  assert rows['base'][2] == f'0.200 ± {hw:.3f}'
  assert rows['base'][3] == '0.100, 0.200, 0.300'
  # k=2 - default per seed: 0.1, 0.0, 0.2 -> mean 0.1, sd 0.1
  assert rows['k=2'][1] == 'default' and rows['k=2'][4] == f'0.100 ± {hw:.3f}'
  # default - base per seed: 0.3, 0.4, 0.2
  assert rows['default'][1] == 'base' and rows['default'][4] == f'0.300 ± {hw:.3f}'
  # perplexity / reference perplexity - 1 per seed: k=2 vs default 0.5/0.4-1, 0, 0.7/0.5-1
  rel = [0.5 / 0.4 - 1, 0.0, 0.7 / 0.5 - 1]
  s = sweep.reproduce.summarize(rel)
  assert rows['k=2'][5] == f'{s.mean:.3f} ± {s.spread:.3f}' and rows['base'][5] == '-'
  assert 'chatterbot' not in text.splitlines()[0]  # a metric no run has is left out


def test_check_resumable_accepts_more_specials_and_refuses_another_bpe():
  b = sweep.base_config(sweep.MICRO, 0)
  sweep.check_resumable(b, sweep.variant_config(sweep.MICRO, 0, sweep.BY_NAME['k=4']))
  other = base.get_config(sweep.run_arg(sweep.MICRO, 0, 'data.vocab_size=256'))
  with pytest.raises(ValueError, match='BPE differs'):
    sweep.check_resumable(b, other)


@pytest.mark.slow
def test_micro_sweep_variants_continue_the_shared_base(tmp_path):
  """default resumed from the base == one uninterrupted run; k=2 restores the k=1 base."""
  runs, trained = sweep.run_seed(
    tmp_path / 'sweep', sweep.MICRO, 0, sweep.selected_variants('k=2'), log=lambda _: None
  )
  assert trained == 3 and set(runs) == {'base', sweep.DEFAULT, 'k=2'}
  whole = tmp_path / 'whole'
  total = sweep.MICRO.pretrain + sweep.MICRO.mixed + sweep.MICRO.cl
  cfg = base.get_config(
    sweep.run_arg(sweep.MICRO, 0, f'train.num_steps={total}', f'train.eval_every={total}')
  )
  train.train_and_evaluate(cfg, str(whole))
  rows = metrics.read_jsonl(whole / 'metrics.jsonl')
  cont = metrics.read_jsonl(tmp_path / 'sweep' / 'seed0' / 'default' / 'metrics.jsonl')
  assert [r for r in rows if r['step'] > sweep.MICRO.pretrain] == cont
  k2 = metrics.read_jsonl(tmp_path / 'sweep' / 'seed0' / 'k2' / 'metrics.jsonl')
  assert k2[0]['step'] == sweep.MICRO.pretrain + 1
  assert np.isfinite(runs['k=2'][sweep.KEY]) and runs['k=2'] != runs[sweep.DEFAULT]

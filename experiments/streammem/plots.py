"""StreamMem's plots: accuracy and answer log-likelihood vs stream length and vs budget, per method.

  python -m experiments.streammem.plots --out=reports/streammem
  python -m experiments.streammem.plots --config=experiments/streammem/configs/base.py:smoke \
    --lengths=128,256,512,1024,2048 --budgets=8,16,24,48,96 --length_budget=24 \
    --budget_length=512 --seeds=0,1,2 --out=reports/streammem

Streams data.batch_size episodes per seed (data.seed = each of --seeds) of each length under every
method of config.eval.methods (full KV included) through projects.streammem.evaluate.sweep, and
writes OUT/sweep_<name>.json (per seed) and OUT/sweep_<name>.png: exact match and answer
log-likelihood minus full KV's (symmetric-log axis), vs stream length at --length_budget entries
per layer and vs the per-layer budget at --budget_length tokens; mean over seeds with the min-max
range shaded. --from_json=OUT/sweep_<name>.json redraws a figure without streaming. Sources:
the planted-fact smoke setup (the cached fact LM, no weights) or SmolLM2 text (text_smollm2: hours
on 2 cores). The video setup trains its model in a run, so its sweep reads finished video runs
(one trained model per seed, each streaming its own run's held-out test episodes; lengths in
frames, 4 visual tokens each):

  python -m experiments.streammem.plots --video_runs=RUN0,RUN1,RUN2 \
    --methods=streammem,oracle,fifo,uniform,streaming_llm,random --out=reports/streammem

(defaults then: --lengths=16,32,64,128,256 frames, --budgets=4,8,16,32,64,128, --length_budget=32,
--budget_length=128; the runs of `python -m experiments.reproduce --suite=full --only=streammem`
are full_seed0-2 under its workdir root; --methods narrows the runs' 13 methods to the claims').
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

from experiments.streammem.configs import base

COLOURS = {
  'full': 'black',
  'streammem': 'tab:red',
  'oracle': 'tab:purple',
  'fifo': 'tab:blue',
  'uniform': 'tab:green',
  'streaming_llm': 'tab:cyan',
  'random': 'tab:grey',
  'h2o': 'tab:orange',
}


# lengths, budgets, --length_budget, --budget_length when not given (video lengths are frames)
DEFAULTS = ('128,256,512,1024,2048', '8,16,24,48,96', 24, 512)
VIDEO_DEFAULTS = ('16,32,64,128,256', '4,8,16,32,64,128', 32, 128)


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(',') if x]


def figure(data: dict, title: str, length_budget: int, budget_length: int, unit: str = 'tokens'):
  import matplotlib  # noqa: PLC0415

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
  panels = (('length', f'stream length ({unit})'), ('budget', 'per-layer budget (entries)'))
  for col, (axis, xlabel) in enumerate(panels):
    for row, (stat, ylabel) in enumerate(
      (('em', 'exact match'), ('dloglik', 'answer log-lik. - full KV (nats)'))
    ):
      ax = axes[row, col]
      for method, cells in data[axis].items():
        xs = sorted(int(x) for x in cells)
        vals = np.asarray([cells[str(x)][stat] for x in xs])
        ax.plot(xs, vals.mean(1), 'o-', ms=3, label=method, color=COLOURS.get(method))
        ax.fill_between(xs, vals.min(1), vals.max(1), alpha=0.12, color=COLOURS.get(method))
      ax.set_xscale('log', base=2)
      if stat == 'dloglik':
        ax.set_yscale('symlog', linthresh=0.1)
      ax.set_xlabel(xlabel)
      ax.set_ylabel(ylabel)
      ax.grid(alpha=0.3)
  axes[0, 0].set_title(f'vs stream length, {length_budget} entries per layer', fontsize=10)
  axes[0, 1].set_title(f'vs budget, streams of {budget_length} {unit}', fontsize=10)
  axes[0, 1].legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return fig


def _setup(record: dict) -> str:
  if record.get('unit') == 'frames':
    return f'video, {len(record["config"].split(","))} trained models'
  return record['config'].split('/')[-1]


def _title(record: dict) -> str:
  return (
    f'StreamMem sweep ({_setup(record)}; {len(record["seeds"])} seeds x '
    f'{record["episodes_per_seed"]} streams; mean, min-max shaded; {record["seconds"]:.0f} s)'
  )


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--config', default='experiments/streammem/configs/base.py:smoke')
  p.add_argument(
    '--lengths', default='', help='default 128,...,2048 tokens (video: 16,...,256 frames)'
  )
  p.add_argument('--budgets', default='', help='default 8,16,24,48,96 (video: 4,...,128)')
  p.add_argument('--length_budget', type=int, default=0, help='default 24 (video: 32)')
  p.add_argument(
    '--budget_length', type=int, default=0, help='default 512 tokens (video: 128 frames)'
  )
  p.add_argument('--video_runs', default='', help='finished video runs (workdirs, comma-separated)')
  p.add_argument('--methods', default='', help="a subset of the config's eval.methods (comma list)")
  p.add_argument('--seeds', default='0,1,2', help="data seeds (video: each run's own)")
  p.add_argument('--out', default='reports/streammem')
  p.add_argument('--name', default='', help='file stem suffix (default: the config variant)')
  p.add_argument('--from_json', default='', help='redraw the figure of a sweep_<name>.json')
  args = p.parse_args(argv)
  if args.from_json:
    record = json.loads(pathlib.Path(args.from_json).read_text())
    fig = figure(
      record,
      _title(record),
      record['length_budget'],
      record['budget_length'],
      record.get('unit', 'tokens'),
    )
    png = pathlib.Path(args.from_json).with_suffix('.png')
    fig.savefig(png, dpi=80, metadata={'Software': None})
    print(f'wrote {png}')
    return 0
  from projects.streammem import evaluate  # noqa: PLC0415
  from projects.streammem import input_pipeline  # noqa: PLC0415
  from projects.streammem import models  # noqa: PLC0415

  video = bool(args.video_runs)
  defaults = VIDEO_DEFAULTS if video else DEFAULTS
  lengths = _ints(args.lengths or defaults[0])
  budgets = _ints(args.budgets or defaults[1])
  args.length_budget = args.length_budget or defaults[2]
  args.budget_length = args.budget_length or defaults[3]
  t0 = time.perf_counter()

  def only(config):
    """config with eval.methods narrowed to --methods (each must be one of the config's)."""
    if args.methods:
      wanted = tuple(m for m in args.methods.split(',') if m)
      unknown = sorted(set(wanted) - set(config.eval.methods))
      if unknown:
        raise SystemExit(
          f'--methods: {unknown} not in the config eval.methods {config.eval.methods}'
        )
      config.eval.methods = wanted
    return config

  def sweep(model, episodes_at, config, seeds):
    return evaluate.sweep(
      models.Streamer(model),
      episodes_at,
      config,
      lengths=lengths,
      budgets=budgets,
      length_budget=args.length_budget,
      budget_length=args.budget_length,
      seeds=seeds,
    )

  if video:
    runs = [models.load_video_run(r) for r in args.video_runs.split(',') if r]
    for c, _ in runs:
      only(c)
    seeds = [int(c.data.seed) for c, _ in runs]
    config, arg = runs[0][0], 'video'
    episodes = lambda c: lambda n, seed: evaluate.video_episodes(c, n, 1000 * seed)  # noqa: E731
    data = evaluate.merge_sweeps([sweep(m, episodes(c), c, [int(c.data.seed)]) for c, m in runs])
  else:
    path, _, arg = args.config.partition(':')
    if pathlib.Path(path).resolve() != pathlib.Path(base.__file__).resolve():
      raise SystemExit(f'--config must be {base.__file__}:<variant>, got {args.config}')
    config = only(base.get_config(arg or None))
    input_pipeline.check_config(config)
    if config.data.source == 'video':
      raise SystemExit('--config: a video config trains its model in a run; use --video_runs')
    seeds = _ints(args.seeds)
    model, tokenizer = models.create_model(config)

    def episodes_at(length, seed):
      c = base.get_config(arg or None)
      c.data.update(stream_len=length, seed=seed)
      return input_pipeline.make_episodes(c, tokenizer)(1)

    data = sweep(model, episodes_at, config, seeds)
  seconds = time.perf_counter() - t0
  name = args.name or (arg.split(',')[0] if arg else 'default')
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  record = {
    'config': args.video_runs if video else args.config,
    'lengths': lengths,
    'budgets': budgets,
    'length_budget': args.length_budget,
    'budget_length': args.budget_length,
    'seeds': seeds,
    'unit': 'frames' if video else 'tokens',
    'episodes_per_seed': config.eval.episodes if video else config.data.batch_size,
    'seconds': round(seconds, 1),
    **data,
  }
  (out / f'sweep_{name}.json').write_text(json.dumps(record, indent=1, sort_keys=True) + '\n')
  fig = figure(data, _title(record), args.length_budget, args.budget_length, record['unit'])
  fig.savefig(out / f'sweep_{name}.png', dpi=80, metadata={'Software': None})
  print(f'wrote {out}/sweep_{name}.json and .png in {seconds:.0f} s')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())

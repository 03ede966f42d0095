"""Where results go: `metrics.jsonl` + TensorBoard events in the workdir, progress lines in the log.

Only process 0 writes. Each metrics.jsonl line is `{"step", "split", "time", ...metrics}`, `time`
being the wall clock (Unix seconds) when it was written. On resume the writer drops metric lines
past the restored step (they came from work that is about to be redone) and TensorBoard purges the
same steps, so a killed-and-resumed run leaves the same metrics as an uninterrupted one; only the
wall-clock stamps differ, and `read_jsonl` leaves them out unless asked (`wall_clock=True`).
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import math
import os
import pathlib
import time
from typing import Any

from absl import logging
import jax
import numpy as np


def _scalar(v: Any) -> float | int | str:
  if isinstance(v, str | int) and not isinstance(v, bool):
    return v
  a = np.asarray(v)
  if a.size != 1:
    raise ValueError(f'metric value of shape {a.shape} is not a scalar')
  x = a.item()
  return x if isinstance(x, int) and not isinstance(x, bool) else float(x)


WALL_CLOCK = 'time'  # the stamp a replay cannot reproduce


def read_jsonl(path: str | os.PathLike, *, wall_clock: bool = False) -> list[dict]:
  """The lines of a metrics.jsonl, without their wall-clock stamps unless `wall_clock`."""
  p = pathlib.Path(path)
  if not p.exists():
    return []
  rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
  if not wall_clock:
    for r in rows:
      r.pop(WALL_CLOCK, None)
  return rows


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Atomic JSON write (temp file + rename), so readers never see half a file."""
  p = pathlib.Path(path)
  tmp = p.with_suffix(p.suffix + '.tmp')
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_scalar) + '\n')
  os.replace(tmp, p)


class MetricWriter:
  """Appends {'step', 'split', **metrics} lines to metrics.jsonl and scalars to TensorBoard."""

  def __init__(
    self, workdir: str | os.PathLike, *, resume_step: int = 0, enabled: bool | None = None
  ):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = pathlib.Path(workdir) / 'metrics.jsonl'
    self._tb = None
    if not self.enabled:
      return
    # Rows past the resumed step are replayed; a fresh start (step 0) replays everything, including
    # a step-0 evaluation of the initial state.
    kept = [
      r
      for r in read_jsonl(self.path, wall_clock=True)
      if resume_step and r.get('step', 0) <= resume_step
    ]
    tmp = self.path.with_suffix('.jsonl.tmp')
    tmp.write_text(''.join(json.dumps(r, sort_keys=True) + '\n' for r in kept))
    os.replace(tmp, self.path)
    import tensorboardX  # noqa: PLC0415 - optional heavy import, process 0 only

    # tensorboardX names the file by the second it opened it, and opens with 'wb': a writer made in
    # the same second as the previous one (a quick resume) would truncate that file. The suffix
    # makes each writer's file its own and keeps name order = time order.
    self._tb = tensorboardX.SummaryWriter(
      str(pathlib.Path(workdir) / 'tensorboard'),
      purge_step=resume_step + 1 if resume_step else None,
      filename_suffix=f'.{time.time_ns()}',
    )

  def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> dict:
    """Appends one line (with its wall-clock stamp) and the scalars; returns the metrics record."""
    record = {'step': int(step), 'split': split, **{k: _scalar(v) for k, v in metrics.items()}}
    if not self.enabled:
      return record
    with self.path.open('a') as f:
      f.write(json.dumps({**record, WALL_CLOCK: round(time.time(), 3)}, sort_keys=True) + '\n')
    for k, v in record.items():
      if k not in ('step', 'split') and isinstance(v, float | int):
        self._tb.add_scalar(f'{split}/{k}', v, int(step))
    return record

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_events(workdir: str | os.PathLike) -> dict[pathlib.Path, list[Any]]:
  """{event file: its Event protos in order} of `workdir/tensorboard`, files in name (= time) order.

  One file per writer process, so a resumed run has one per start: readers that pair consecutive
  events (step times) stay within a file. The files are TFRecords (8-byte length, 4-byte length
  CRC, payload, 4-byte payload CRC); read here with tensorboardX's proto so that neither
  TensorFlow nor TensorBoard is needed. CRCs are not checked.
  """
  import struct  # noqa: PLC0415

  from tensorboardX.proto import event_pb2  # noqa: PLC0415

  out = {}
  for path in sorted(pathlib.Path(workdir, 'tensorboard').glob('events.out.tfevents.*')):
    buf = path.read_bytes()
    events, pos = [], 0
    while pos + 12 <= len(buf):
      (length,) = struct.unpack_from('<Q', buf, pos)
      events.append(event_pb2.Event.FromString(buf[pos + 12 : pos + 12 + length]))
      pos += 12 + length + 4
    out[path] = events
  return out


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s' if m else f'{s}s'


class Progress:
  """Steps/s over the last reporting window and an ETA for the remaining steps.

  The first step of a process compiles (tens of seconds for a real model), so a rate that includes
  it predicts nothing: the loop calls `compiled(step)` once the first step's program is built, and
  the first window is measured from there. Until then a line says it includes compilation.
  """

  def __init__(self, start_step: int, num_steps: int):
    self.num_steps = num_steps
    self._last_step, self._last_time = start_step, time.perf_counter()
    self._compiled = False

  def compiled(self, step: int) -> None:
    """Compilation is over; `step` steps are done (or dispatched): rates start here."""
    self._last_step, self._last_time = step, time.perf_counter()
    self._compiled = True

  def update(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    dt = max(now - self._last_time, 1e-9)
    rate = (step - self._last_step) / dt
    self._last_step, self._last_time = step, now
    eta = (self.num_steps - step) / rate if rate > 0 else float('inf')
    return {'steps_per_sec': rate, 'eta_sec': eta, 'with_compile': not self._compiled}

  @staticmethod
  def line(
    step: int, num_steps: int, metrics: Mapping[str, Any], speed: Mapping[str, float]
  ) -> str:
    shown = ' '.join(
      f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}'
      for k, v in metrics.items()
      if k not in ('step', 'split')
    )
    eta = (
      'ETA after compilation'
      if speed.get('with_compile')
      else f'ETA {format_duration(speed["eta_sec"])}'
    )
    return f'step {step}/{num_steps} {shown} | {speed["steps_per_sec"]:.2f} steps/s {eta}'


def log(msg: str, *args) -> None:
  if jax.process_index() == 0:
    logging.info(msg, *args)

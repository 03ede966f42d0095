"""Which CPU something ran on: printed in the benchmarks' headers and recorded with the claims
suite's runs (experiments/reproduce.py) and in each run's run.json.

Why: the same code and the same jaxlib gave batch-16 decode at 1.39x transformers on one VM and
2.22x on the next (an EPYC of x86 family 26, i.e. Zen 5), and the EBPO smoke verdict flipped
between two VMs; XLA's numerics and speed depend on the core. A ratio or a value is only comparable
with one measured on the same kind of core: say which.
"""

from __future__ import annotations

import os
import platform

# AMD's x86 families; 0x19 covers Zen 3 and Zen 4 (model numbers tell them apart, not kept here).
_AMD_FAMILIES = {23: 'Zen/Zen 2', 25: 'Zen 3/Zen 4', 26: 'Zen 5'}


def parse_cpuinfo(text: str) -> dict[str, str]:
  """The first processor's `key: value` fields of a /proc/cpuinfo text."""
  fields = {}
  for line in text.splitlines():
    if not line.strip():
      if fields:
        break
      continue
    key, sep, value = line.partition(':')
    if sep:
      fields.setdefault(key.strip(), value.strip())
  return fields


def describe_cpu(fields: dict[str, str]) -> str:
  """One line: model name, x86 family/model (and AMD generation), AVX-512 or not, CPU count."""
  name = fields.get('model name') or platform.processor() or platform.machine() or 'unknown CPU'
  parts = [name]
  family, model = fields.get('cpu family'), fields.get('model')
  if family and model:
    ident = f'x86 family {family} model {model}'
    if fields.get('vendor_id') == 'AuthenticAMD' and int(family) in _AMD_FAMILIES:
      ident += f' = {_AMD_FAMILIES[int(family)]}'
    parts.append(ident)
  flags = fields.get('flags', '').split()
  if flags:
    parts.append('AVX-512' if 'avx512f' in flags else 'no AVX-512')
  return ', '.join(parts) + f'; {os.cpu_count()} CPUs'


def cpu() -> str:
  """This machine's CPU, as `describe_cpu` writes it (Linux; elsewhere the platform's name)."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      return describe_cpu(parse_cpuinfo(f.read()))
  except OSError:
    return describe_cpu({})

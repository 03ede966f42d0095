"""common.machine: the CPU line in benchmark headers and reports."""

from common import machine

_ZEN5 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
flags\t\t: fpu sse avx2 avx512f avx512_bf16

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 25
model name\t: not the first processor
"""


def test_first_processor_only():
  fields = machine.parse_cpuinfo(_ZEN5)
  assert fields['model name'] == 'AMD EPYC'
  assert fields['cpu family'] == '26'
  assert fields['model'] == '2'


def test_amd_generation_and_avx512():
  line = machine.describe_cpu(machine.parse_cpuinfo(_ZEN5))
  assert line.startswith('AMD EPYC, x86 family 26 model 2 = Zen 5, AVX-512; ')


def test_intel_and_no_avx512():
  fields = {
    'vendor_id': 'GenuineIntel',
    'cpu family': '6',
    'model': '85',
    'model name': 'Xeon',
    'flags': 'sse avx2',
  }
  line = machine.describe_cpu(fields)
  assert line.startswith('Xeon, x86 family 6 model 85, no AVX-512; ')  # no AMD generation


def test_no_cpuinfo_still_names_something():
  assert machine.describe_cpu({}).split(';')[0]

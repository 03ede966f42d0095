"""common.text: edit distance against hand-computed values."""

from common import text


def test_edit_distance_known_values():
  assert text.edit_distance('kitten', 'sitting') == 3
  assert text.edit_distance('', 'abc') == 3
  assert text.edit_distance('abc', '') == 3
  assert text.edit_distance('abc', 'abc') == 0
  assert text.edit_distance('ab', 'ba') == 2  # no transposition at cost 1


def test_edit_distance_symmetric():
  pairs = [('flaw', 'lawn'), ('intention', 'execution'), ('a', 'xyz')]
  for a, b in pairs:
    assert text.edit_distance(a, b) == text.edit_distance(b, a)
  assert text.edit_distance('intention', 'execution') == 5

"""Structural flexibility of S'MoRE (Sec. 3.5 of arXiv 2504.06426): closed forms and brute force.

Gamma counts the distinct routing structures a layer stack can express per token:
  S'MoRE:  Gamma = prod_{l=0}^{L-1} C(s_l, f_l)^{F_{l+1}},  F_l = prod_{j >= l} f_j, F_L = 1
           (every one of the F_{l+1} nodes at layer l+1 picks its own f_l-subset of children);
  MoMOR:   Gamma <= C(s_{L-1}, f_{L-1}) * prod_{l=0}^{L-2} sum_{i=f_l}^{min(F_l, s_l)} C(s_l, i)
           (with identity activation only the set of experts used per layer matters);
  S'MoRE*: Gamma*_l = C(s_{l-1}, f_{l-1}) * C(Gamma*_{l-1} + f_{l-1} - 1, f_{l-1}), Gamma*_0 = 1
           (a node's f children are a multiset of subtree types, not tied to the child's expert).
The brute-force counters enumerate the structures themselves (as nested frozensets), so the claims
check the formulas against an independent count rather than against themselves.
"""

# ruff: noqa: E741 - `l` is the paper's layer index (Eq. 3-9); renaming it would obscure the maths.

from __future__ import annotations

from collections.abc import Sequence
import functools
import itertools
import math


def _fan_products(f: Sequence[int]) -> list[int]:
  """F_0 .. F_L with F_l = prod_{j >= l} f_j and F_L = 1."""
  out = [1] * (len(f) + 1)
  for l in range(len(f) - 1, -1, -1):
    out[l] = out[l + 1] * f[l]
  return out


def gamma_smore(s: Sequence[int], f: Sequence[int]) -> int:
  F = _fan_products(f)
  return math.prod(math.comb(s[l], f[l]) ** F[l + 1] for l in range(len(s)))


def gamma_momor_bound(s: Sequence[int], f: Sequence[int]) -> int:
  F = _fan_products(f)
  L = len(s)
  out = math.comb(s[L - 1], f[L - 1])
  for l in range(L - 1):
    out *= sum(math.comb(s[l], i) for i in range(f[l], min(F[l], s[l]) + 1))
  return out


def gamma_star(s: Sequence[int], f: Sequence[int]) -> int:
  g = 1
  for l in range(len(s)):
    g = math.comb(s[l], f[l]) * math.comb(g + f[l] - 1, f[l])
  return g


# ---------------------------------------------------------------------------------------------------
# Brute force.


@functools.cache
def _smore_trees(s: tuple[int, ...], f: tuple[int, ...]) -> frozenset:
  """All routing trees of the top layer: frozensets of (expert, subtree) pairs."""
  L = len(s)
  below = _smore_trees(s[:-1], f[:-1]) if L > 1 else frozenset([None])
  trees = set()
  for experts in itertools.combinations(range(s[-1]), f[-1]):
    for subtrees in itertools.product(below, repeat=len(experts)):
      trees.add(frozenset(zip(experts, subtrees, strict=True)))
  return frozenset(trees)


def brute_smore(s: Sequence[int], f: Sequence[int]) -> int:
  return len(_smore_trees(tuple(s), tuple(f)))


def _layer_sets(tree, depth: int, out: list[set]) -> None:
  for expert, sub in tree:
    out[depth].add(expert)
    if sub is not None:
      _layer_sets(sub, depth + 1, out)


def brute_momor(s: Sequence[int], f: Sequence[int]) -> int:
  """Distinct tuples (experts used at each layer) over all trees: what identity sigma can tell."""
  seen = set()
  for tree in _smore_trees(tuple(s), tuple(f)):
    sets: list[set] = [set() for _ in s]
    _layer_sets(tree, 0, sets)
    seen.add(tuple(frozenset(x) for x in sets))
  return len(seen)


@functools.cache
def _star_types(s: tuple[int, ...], f: tuple[int, ...]) -> frozenset:
  L = len(s)
  below = sorted(_star_types(s[:-1], f[:-1]), key=repr) if L > 1 else [None]
  types = set()
  for experts in itertools.combinations(range(s[-1]), f[-1]):
    for multiset in itertools.combinations_with_replacement(range(len(below)), f[-1]):
      types.add((experts, tuple(repr(below[i]) for i in multiset)))
  return frozenset(types)


def brute_star(s: Sequence[int], f: Sequence[int]) -> int:
  return len(_star_types(tuple(s), tuple(f)))

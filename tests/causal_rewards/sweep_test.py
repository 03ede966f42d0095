"""The lambda sweep's Pareto front: higher decorrelated accuracy and lower |Spearman| both win."""

from experiments.causal_rewards import sweep


def test_pareto_marks_the_non_dominated_points():
  pts = [(0.5, 0.9), (0.6, 0.9), (0.55, 0.1), (0.5, 0.1), (0.6, 0.5)]
  assert sweep.pareto(pts) == [False, False, True, False, True]
  assert sweep.pareto([(0.5, 0.5), (0.5, 0.5)]) == [True, True]  # ties dominate nothing

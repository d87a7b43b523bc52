"""The framework-free monitors that every trainer shell drives.

- ``conditioning``: ``ConditioningMonitor``.
- ``domination``: ``WeightDominationMonitor``.
- ``readouts``: what every shell shows of them (results, findings, verdicts), defined once.
"""

"""``edgekit tune``: an Optuna study over training and compression settings, scored by measured latency.

:mod:`.config` reads the tune file, :mod:`.space` turns its ``search:`` section into Optuna
suggestions, :mod:`.study` runs the trials (train → compile → measure) on a shared storage,
and :mod:`.front` reads the finished study into a Pareto front and a best-bundle-per-budget table.
"""

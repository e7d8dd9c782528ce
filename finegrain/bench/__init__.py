"""The built-in benchmark behind ``finegrain demo``: every registered method trained under one
shared budget on the built-in synthetic scenes, evaluated on every task whose truth the scenes
know, with a report that checks the papers' directional claims (``finegrain.bench.claims``).

Modules: ``config`` (the shared budget, per-method runs), ``tasks`` (evaluation through
``finegrain.eval`` with per-image results), ``claims`` (paired bootstrap), ``figures``,
``report``, ``run`` (the orchestration and the CLI's options).
"""

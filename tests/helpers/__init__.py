"""Shared test helpers (tests import ``helpers.<module>``; no test file imports another).

- ``numerics``: ``assert_close_scaled`` and the feature-concatenation (exact accumulation) check;
- ``toy_method``: a tiny CLIP-like method + resumable loader for trainer/checkpoint tests;
- ``eval_toy``: toy methods and images for evaluation tests;
- ``shards``: webdataset tar writers, including a shard with broken samples;
- ``interop``: tiny reference models built by open_clip / transformers, and untrained runs
  saved as finegrain run directories (weights in/out tests).
"""

"""GRAIN's annotation step: MLLM describer + open-vocabulary detector -> region annotations.

Submodules are imported on demand (``transformers`` is heavy): ``parse`` (answer parsing),
``models`` (``Describer`` / ``Grounder`` protocols and their Hugging Face implementations),
``pipeline`` (``AnnotateConfig``, ``annotate``), ``cli`` (``main(argv)``).
"""

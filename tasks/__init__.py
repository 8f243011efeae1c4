"""One module per pipeline stage: read params and files, call the library, write outputs.

Each module runs as ``python -m tasks.<stage>`` (what ``dvc.yaml`` calls) and exposes
``run(params, ...)`` for tests and the Prefect flow.
"""

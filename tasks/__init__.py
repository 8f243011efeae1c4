"""One module per pipeline stage: read params and files, call the library, write outputs.

Each module runs as ``python -m tasks.<stage>`` (what ``dvc.yaml`` calls) and exposes
``run(params, ...)`` for tests and the Prefect flow.
"""

import gc
import itertools
import sys


def _started_as_a_stage() -> bool:
    """Whether this process is ``python -m tasks.<stage>``, now locating that module (while
    it does, ``sys.argv[0]`` is ``-m``); not a process that imports the stage modules."""
    argv = sys.orig_argv
    return sys.argv[:1] == ["-m"] and any(
        a == "-m" and b.startswith(f"{__name__}.") for a, b in itertools.pairwise(argv)
    )


# A stage process first imports torch, MLflow, pandas and scikit-learn: ~660k objects that
# live as long as it does. The collector's passes over them while they are being imported
# cost ~0.7 s of every stage (2 cores). It stays off until `tasks._stage.stage_main` has
# frozen what the imports made (gc.freeze) and turns it back on.
if _started_as_a_stage():
    gc.disable()

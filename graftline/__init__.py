"""graftline: pretrain, fine-tune, evaluate and deploy models reproducibly.

The library layer: it never imports Prefect and does nothing at import time.
"""

__version__ = "0.1.0"

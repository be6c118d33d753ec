"""Thin kopf handlers, by resource: `jobs` (DreamBoothJob), `inference` (InferenceService), `startup` (every kopf
setting and the shared state); `state` is what they share and `loop` the one reconcile loop both kinds run.

Importing this package registers every handler with kopf's default registry (main.py does so).
"""

from dreambooth_operator.handlers import inference, jobs, startup

__all__ = ["inference", "jobs", "startup"]

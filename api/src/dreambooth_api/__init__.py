"""The DreamBoothJob and InferenceService API: typed models, names, and the CRD schema generator.

`job` and `inference` hold the pydantic models of the operator-owned parts of each spec and of each status;
the trainer-owned sections of a DreamBoothJob spec stay plain dicts here and are validated by the trainer.
"""

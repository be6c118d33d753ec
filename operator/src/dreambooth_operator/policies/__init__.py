"""The decisions of a DreamBoothJob's reconcile, one policy per module (as JobSet does); reconcile.py applies them
in order. Each takes the PlanBuilder (plan.py) and the classified attempt (observed.py), and is pure."""

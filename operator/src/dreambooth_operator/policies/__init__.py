"""Pure policies applied by the reconcile loop, one concern per module (as JobSet does)."""

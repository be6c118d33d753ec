"""The `dreambooth` command line (also installed as the kubectl plugin `kubectl-dreambooth`)."""

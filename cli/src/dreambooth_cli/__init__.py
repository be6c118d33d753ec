"""The `dreambooth` command line (also the kubectl plugin `kubectl-dreambooth`), the typed Python client under it
(`dreambooth_cli.client.DreamBoothClient`) and the HTML report (`dreambooth_cli.report`)."""

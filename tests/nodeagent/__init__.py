"""A test-only node agent: fake Kubernetes nodes whose pods run as local processes.

It plays the kubelet for the e2e tests: it registers fake GPU nodes, keeps them Ready, runs the pods that the
scheduler binds to them as process groups on this machine, reports their status, serves ``kubectl logs`` and
maps pod hostnames in ``/etc/hosts``. See ``agent.py`` for the design and ``plugin.py`` for the pytest fixture.

Modules use relative imports so that the package works both as ``nodeagent`` (``tests/`` on ``sys.path``, as
pytest's rootdir conftest arranges) and as ``tests.nodeagent``.
"""

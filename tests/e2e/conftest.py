"""e2e tier: tests whose pods really run, as processes started by the test node agent.

The ``node_agent`` fixture comes from ``tests/nodeagent/plugin.py`` (loaded by the root conftest); ``cluster``
and ``namespace`` come from ``tests/infra/fixtures.py``.
"""

"""Test infrastructure: real servers on loopback (etcd, kube-apiserver, controllers, SeaweedFS S3, Prometheus).

`tests/infra/fixtures.py` is the pytest plugin (loaded by tests/conftest.py) that exposes them as fixtures.
"""

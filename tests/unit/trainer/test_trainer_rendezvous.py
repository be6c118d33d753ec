"""Rank 0 serves the rendezvous store on MASTER_ADDR only (distributed.serve_rendezvous), not on every address of the
machine as torch's own store does: two gangs whose pods share a network namespace (the test cluster's node agent,
hostNetwork pods) then no longer collide on the rendezvous port. Before, the later gang's rank 0 failed to listen
(EADDRINUSE: exit 11, a gang restart counted as a failure) and its peer joined the other gang's store through the
wildcard listener and hung until SIGKILL (tests/e2e/test_operator_gang.py ran attempt 2 that way).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from dreambooth_api.exitcodes import ExitCode, RetryableError
from dreambooth_trainer import distributed
from dreambooth_trainer.distributed import DistEnv, global_rank, serve_rendezvous

ADDRESS = "127.0.0.2"
OTHER = "127.0.0.3"


@pytest.fixture(autouse=True)
def _stop_serving() -> Iterator[None]:
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    distributed._served.clear()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((ADDRESS, 0))
        port: int = s.getsockname()[1]
        return port


def _listen(address: str, port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((address, port))
    s.listen()
    return s


def test_rank0_serves_on_its_own_address_and_the_process_group_uses_that_store(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = _free_port()
    assert serve_rendezvous(DistEnv(2, 1, 0, ADDRESS, port), rank=0)
    # Another gang's rank 0 on another address of the machine gets the same port (torch's store took every address).
    with _listen(OTHER, port):
        client = dist.TCPStore(ADDRESS, port, is_master=False, timeout=timedelta(seconds=10))
        client.set("k", "v")
        assert client.get("k") == b"v"
        # The process group (Fabric's env:// init) finds the served store instead of listening on every address,
        # which the listener above would refuse (EADDRINUSE).
        monkeypatch.setenv("MASTER_ADDR", ADDRESS)
        monkeypatch.setenv("MASTER_PORT", str(port))
        dist.init_process_group("gloo", rank=0, world_size=1, timeout=timedelta(seconds=10))
        t = torch.ones(2)
        dist.all_reduce(t)
        assert t.tolist() == [1.0, 1.0]
    with pytest.raises(OSError, match="in use"):  # still served: the address and port are taken
        _listen(ADDRESS, port).close()


def test_other_ranks_one_process_and_foreign_addresses_leave_the_store_to_torch() -> None:
    port = _free_port()
    assert not serve_rendezvous(DistEnv(2, 1, 1, ADDRESS, port), rank=1)
    assert not serve_rendezvous(DistEnv(1, 1, 0, ADDRESS, port), rank=0)
    assert not serve_rendezvous(DistEnv(2, 1, 0, "192.0.2.1", port), rank=0)  # TEST-NET-1: not this machine's
    assert distributed._served == []
    _listen(ADDRESS, port).close()  # nothing was left listening


def test_a_taken_rendezvous_address_is_a_retryable_error() -> None:
    port = _free_port()
    with _listen(ADDRESS, port), pytest.raises(RetryableError, match=f"rendezvous port {port}") as err:
        serve_rendezvous(DistEnv(2, 1, 0, ADDRESS, port), rank=0)
    assert err.value.exit_code is ExitCode.RETRYABLE
    assert distributed._served == []


def test_global_rank_from_rank_or_node_and_local_rank() -> None:
    d = DistEnv(2, 2, 1, ADDRESS, 29500)
    assert global_rank(d, {}) == 2
    assert global_rank(d, {"LOCAL_RANK": "1"}) == 3
    assert global_rank(d, {"RANK": "0", "LOCAL_RANK": "1"}) == 0

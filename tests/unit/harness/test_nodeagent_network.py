"""Pod IP allocation and the /etc/hosts block of the test node agent."""

from __future__ import annotations

import ipaddress
import os
import subprocess
from pathlib import Path

import pytest

from tests.nodeagent.hostsfile import (
    BEGIN,
    END,
    HostsFile,
    PodHost,
    names_of_others,
    pod_names,
    render_block,
    render_view,
    replace_block,
    write_in_place,
)
from tests.nodeagent.ipalloc import IPAllocator, claim_subnet
from tests.nodeagent.runtime import child_setup, private_hosts_supported

HOSTS = "127.0.0.1 localhost\n::1 localhost ip6-localhost\n"


def test_allocator_hands_out_unique_addresses_in_its_subnet() -> None:
    alloc = IPAllocator(42)
    ips = [alloc.allocate() for _ in range(500)]
    assert len(set(ips)) == 500
    assert ips[:2] == ["127.42.0.2", "127.42.0.3"]
    assert all(ipaddress.IPv4Address(ip) in ipaddress.IPv4Network("127.42.0.0/16") for ip in ips)
    assert "127.42.0.1" not in ips


def test_allocator_does_not_reuse_a_released_address_while_others_are_free() -> None:
    alloc = IPAllocator(42)
    first = alloc.allocate()
    alloc.release(first)
    assert alloc.allocate() != first
    assert first not in alloc.in_use()


def test_allocator_wraps_around_and_reports_exhaustion() -> None:
    alloc = IPAllocator(7)
    total = 2**16 - 3  # .0.0, .0.1 and .255.255 are never handed out
    ips = {alloc.allocate() for _ in range(total)}
    assert len(ips) == total
    assert "127.7.255.255" not in ips
    with pytest.raises(RuntimeError, match="no free pod IP"):
        alloc.allocate()
    alloc.release("127.7.3.4")
    assert alloc.allocate() == "127.7.3.4"


@pytest.mark.parametrize("octet", [0, 255])
def test_allocator_rejects_reserved_subnets(octet: int) -> None:
    with pytest.raises(ValueError, match="second octet"):
        IPAllocator(octet)


def test_subnet_claims_are_exclusive_until_closed(tmp_path: Path) -> None:
    first = claim_subnet(tmp_path, range(10, 13))
    second = claim_subnet(tmp_path, range(10, 13))
    assert (first.second_octet, second.second_octet) == (10, 11)
    first.close()
    third = claim_subnet(tmp_path, range(10, 13))
    assert third.second_octet == 10
    fourth = claim_subnet(tmp_path, range(10, 13))
    with pytest.raises(RuntimeError, match="claimed"):
        claim_subnet(tmp_path, range(10, 13))
    for claim in (second, third, fourth):
        claim.close()


def test_pod_names_follow_cluster_dns() -> None:
    assert pod_names("job-0", "job", "ns") == [
        "job-0.job",
        "job-0.job.ns",
        "job-0.job.ns.svc",
        "job-0.job.ns.svc.cluster.local",
    ]
    assert pod_names("job-0", "", "ns") == []
    assert pod_names("", "job", "ns") == []


def test_block_is_appended_replaced_and_removed() -> None:
    block = render_block("a1", 100, {"127.10.0.3": ["b.s"], "127.10.0.2": ["a.s", "a.s.ns"]})
    assert block.splitlines()[0] == f"{BEGIN} a1 pid=100"
    assert block.splitlines()[-1] == f"{END} a1"
    assert block.splitlines()[2:4] == ["127.10.0.2\ta.s a.s.ns", "127.10.0.3\tb.s"]
    text = replace_block(HOSTS, "a1", block, lambda pid: True)
    assert text == HOSTS + block
    updated = replace_block(text, "a1", render_block("a1", 100, {}), lambda pid: True)
    assert "127.10.0.2" not in updated
    assert updated.count(BEGIN) == 1
    assert replace_block(updated, "a1", None, lambda pid: True) == HOSTS


def test_other_agents_blocks_are_kept_unless_their_process_is_dead() -> None:
    alive = render_block("live", 1, {"127.11.0.2": ["x.s"]})
    dead = render_block("dead", 2, {"127.12.0.2": ["y.s"]})
    text = HOSTS + alive + dead
    result = replace_block(text, "me", render_block("me", 3, {}), lambda pid: pid == 1)
    assert alive in result
    assert dead not in result
    assert result.startswith(HOSTS)


def test_hosts_file_round_trip(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost")  # no trailing newline
    agent = HostsFile("t1", hosts, tmp_path / "lock")
    agent.write({"127.10.0.2": ["a.s"]})
    assert hosts.read_text().splitlines()[0] == "127.0.0.1 localhost"
    assert f"{BEGIN} t1 pid={os.getpid()}" in hosts.read_text()
    assert "127.10.0.2\ta.s" in hosts.read_text()
    assert oct(hosts.stat().st_mode & 0o777) == "0o644"
    agent.remove()
    assert hosts.read_text() == "127.0.0.1 localhost\n"


def test_names_that_another_live_agent_maps_are_reported(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(HOSTS)
    lock = tmp_path / "lock"
    other = HostsFile("other", hosts, lock)
    other.write({"127.11.0.2": ["job-0.job", "job-0.job.ns1"]})
    mine = HostsFile("mine", hosts, lock)
    shadowed = mine.write({"127.12.0.2": ["job-0.job", "job-0.job.ns2"]})
    assert shadowed == {"job-0.job"}
    assert names_of_others(hosts.read_text(), "mine") == {"job-0.job", "job-0.job.ns1"}
    other.remove()
    assert mine.write({"127.12.0.2": ["job-0.job"]}) == set()


def test_namespace_view_has_short_names_of_its_own_namespace_only() -> None:
    machine = HOSTS + render_block("someone", 1, {"127.11.0.2": ["x.s"]})
    pods = [
        PodHost("127.10.0.3", "other", "job-0", "job"),
        PodHost("127.10.0.2", "ns", "job-0", "job"),
        PodHost("127.10.0.4", "ns"),  # no hostname: nothing to resolve
    ]
    assert render_view(machine, pods, "ns") == HOSTS + (
        "# node agent: pod names as seen from namespace ns\n"
        "127.10.0.2\tjob-0.job job-0.job.ns job-0.job.ns.svc job-0.job.ns.svc.cluster.local\n"
        "127.10.0.3\tjob-0.job.other job-0.job.other.svc job-0.job.other.svc.cluster.local\n"
    )


def test_write_in_place_keeps_the_inode(tmp_path: Path) -> None:
    view = tmp_path / "view"
    write_in_place(view, "a much longer first version\n")
    inode = view.stat().st_ino
    write_in_place(view, "short\n")
    assert view.read_text() == "short\n"
    assert view.stat().st_ino == inode


def test_a_process_sees_its_private_view(tmp_path: Path) -> None:
    view = tmp_path / "view"
    write_in_place(view, "127.0.0.1 localhost\n127.10.9.9 only-in-the-view.test\n")
    if not private_hosts_supported(view):
        pytest.skip("no mount namespaces here (needs root); the agent falls back to the machine's /etc/hosts")
    argv = ["getent", "hosts", "only-in-the-view.test"]
    inside = subprocess.run(argv, preexec_fn=child_setup(view), capture_output=True, text=True, check=False)
    assert inside.stdout.split() == ["127.10.9.9", "only-in-the-view.test"]
    write_in_place(view, "127.0.0.1 localhost\n127.10.9.8 only-in-the-view.test\n")  # views change while pods run
    inside = subprocess.run(argv, preexec_fn=child_setup(view), capture_output=True, text=True, check=False)
    assert inside.stdout.split()[0] == "127.10.9.8"
    outside = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert outside.returncode != 0

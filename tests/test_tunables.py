from __future__ import annotations

import pytest

from asyncdb import tunables
from asyncdb.process import node_environment


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(tunables, "_decided", {})
    monkeypatch.setattr(tunables, "probe_figures", {})


def test_the_probe_copies_out_of_memfd_memory_in_a_child_process():
    assert tunables.memfd_copy_probe(None, nbytes=1 << 20) > 0
    assert tunables.memfd_copy_probe(tunables.NT_THRESHOLD, nbytes=1 << 20) > 0


@pytest.mark.parametrize(("default", "lowered", "choice"), [
    (4.0, 9.0, tunables.NT_THRESHOLD),  # clearly faster: node processes get it
    (9.0, 4.0, None),                   # slower: glibc's default
    (8.0, 8.4, None),                   # within the margin: glibc's default
])
def test_the_lower_threshold_is_chosen_only_where_it_measured_faster(
        fresh, monkeypatch, default, lowered, choice):
    figures = {None: default, tunables.NT_THRESHOLD: lowered}
    calls = []

    def probe(setting, nbytes=tunables.PROBE_BYTES):
        calls.append(setting)
        return figures[setting]

    monkeypatch.setattr(tunables, "memfd_copy_probe", probe)
    assert tunables.node_tunables() == choice
    assert tunables.node_tunables() == choice
    assert len(calls) == 4  # measured once per process
    env = node_environment(1)
    assert env.get("GLIBC_TUNABLES") == choice
    assert tunables.probe_figures == {"default_gbps": default, "nt_4mib_gbps": lowered}


def test_a_users_setting_is_kept(fresh, monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    monkeypatch.setattr(tunables, "memfd_copy_probe", lambda *a, **k: pytest.fail("probed"))
    assert node_environment(None)["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"


def test_a_failing_probe_leaves_glibcs_default(fresh, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("no memfd here")

    monkeypatch.setattr(tunables, "memfd_copy_probe", broken)
    assert tunables.node_tunables() is None
    assert "GLIBC_TUNABLES" not in node_environment(None)

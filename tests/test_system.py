"""The system actor: who may spawn what, stop, dial and shut down, judged by the
channel a request came on, never by what the message says."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import asyncdb
from asyncdb.data import SharedArrays, from_network, inline_arrays, open_arrays
from asyncdb.models import MLP
from asyncdb.system import PeerPolicy
from asyncdb.transport.base import open_pair


class Probe(asyncdb.Actor):
    async def receive(self, message):
        return message


@pytest.fixture
async def linked():
    """A `server` node and a `client` node over a real websocket on loopback; the
    client is a network peer of the server, which does not trust it."""
    server, client = asyncdb.Node("server", ask_timeout=10), asyncdb.Node("client", ask_timeout=10)
    a, b = await open_pair("ws")
    client.connect("server", a)
    server.connect("client", b)
    yield server, client
    await client.close()
    await server.close()


def replica_config(data, model=None):
    model = model or MLP([4, 3, 2])
    shard = asyncdb.ActorRef(None, "client", "fake-shard")  # travels, never asked here
    return {"index": 0, "model": model.to_config(), "shards": [shard],
            "bounds": [[0, model.num_params()]], "data": data,
            "algorithm": asyncdb.Downpour(batch_size=4).to_config()}


async def test_a_network_peer_cannot_name_a_path_on_the_host(linked, tmp_path):
    server, client = linked
    canary = tmp_path / "canary"
    canary.write_bytes(b"secret bytes of the serve host!!")
    spec = {"kind": "shared", "arrays": {
        "x": {"path": str(canary), "dtype": "<f4", "shape": [2, 4]},
        "y": {"path": str(canary), "dtype": "|u1", "shape": [2]}}}
    with pytest.raises(asyncdb.ConfigError, match="inline"):
        await client.spawn("asyncdb.Replica", node="server", config=replica_config(spec))
    # Even a memfd-looking path of this very process is refused to a network peer.
    arrays = {"x": np.ones((8, 4), np.float32), "y": np.zeros(8, np.uint8)}
    with SharedArrays(arrays) as shared, pytest.raises(asyncdb.ConfigError, match="inline"):
        await client.spawn("asyncdb.Replica", node="server", config=replica_config(shared.spec))
    assert server.actors() == []


async def test_an_actor_spawned_for_a_network_peer_never_maps_a_path_later():
    with SharedArrays({"x": np.ones(4, np.float32)}) as shared:
        assert open_arrays(shared.spec)["x"].sum() == 4  # this process, trusted
        with from_network():
            with pytest.raises(asyncdb.ConfigError, match="cannot name a path"):
                open_arrays(shared.spec)

            async def later():
                return open_arrays(shared.spec)

            task = asyncio.ensure_future(later())  # tasks inherit where they came from
        with pytest.raises(asyncdb.ConfigError, match="cannot name a path"):
            await task
    with pytest.raises(asyncdb.ConfigError, match="memfd"):
        open_arrays({"kind": "shared", "arrays": {
            "x": {"path": "/etc/passwd", "dtype": "|u1", "shape": [4]}}})


async def test_a_network_peer_may_spawn_a_replica_with_inline_data(linked):
    server, client = linked
    data = inline_arrays({"x": np.ones((8, 4), np.float32), "y": np.zeros(8, np.int64)})
    ref = await client.spawn("asyncdb.Replica", node="server", config=replica_config(data))
    assert server.actors() == [ref.name]
    assert server.owned_by("client") == [ref.name]


async def test_registered_actors_check_network_configs(linked):
    server, client = linked
    shard = {"index": 0, "values": np.zeros(4, np.float32),
             "optimizer": asyncdb.SGD().to_config()}
    with pytest.raises(asyncdb.ConfigError, match="threads"):
        await client.spawn("asyncdb.ParameterShard", node="server",
                           config={**shard, "threads": 100_000})
    with pytest.raises(asyncdb.ConfigError, match="cannot be spawned by a network peer"):
        await client.spawn("asyncdb.Coordinator", node="server", config={})
    with pytest.raises(asyncdb.ConfigError, match="cannot be spawned by a network peer"):
        await client.spawn("asyncdb.System", node="server", config={})
    with pytest.raises(asyncdb.ConfigError, match="cannot be spawned by a network peer"):
        await client.spawn("asyncdb.PartitionInbox", node="server", config={"exchange": {}})
    data = inline_arrays({"x": np.ones((8, 4), np.float32), "y": np.zeros(8, np.int64)})
    partition = {**replica_config(data), "part": 0, "parts": 10**9, "peers": []}
    with pytest.raises(asyncdb.ConfigError, match="partitions here"):
        await client.spawn("asyncdb.Partition", node="server", config=partition)
    with pytest.raises(asyncdb.ConfigError, match="unknown actor type"):
        await client.spawn(Probe, node="server")  # importable here, but not for a peer
    assert server.actors() == []


async def test_limits_refuse_before_allocating(linked):
    server, client = linked
    server.policy = PeerPolicy(max_params=1 << 20, max_data_bytes=1 << 20, max_actors=2)
    data = inline_arrays({"x": np.ones((8, 4), np.float32), "y": np.zeros(8, np.int64)})
    huge = replica_config(data, model=MLP([20000] * 4))  # 19 GB of buffers if built
    with pytest.raises(asyncdb.ConfigError, match="limit of 1048576"):
        await client.spawn("asyncdb.Replica", node="server", config=huge)
    with pytest.raises(asyncdb.ConfigError, match="2097152 parameters is over"):
        await client.spawn("asyncdb.ParameterShard", node="server", config={
            "index": 0, "values": np.zeros(2 << 20, np.float32),
            "optimizer": asyncdb.SGD().to_config()})
    big = inline_arrays({"x": np.ones((1 << 17, 4), np.float32),
                         "y": np.zeros(1 << 17, np.int64)})
    with pytest.raises(asyncdb.ConfigError, match="bytes of arrays"):
        await client.spawn("asyncdb.Replica", node="server", config=replica_config(big))
    for _ in range(2):
        await client.spawn("asyncdb.Replica", node="server", config=replica_config(data))
    with pytest.raises(asyncdb.ConfigError, match="already owns 2 actors"):
        await client.spawn("asyncdb.Replica", node="server", config=replica_config(data))
    assert len(server.actors()) == 2


async def test_owner_is_the_connection_not_a_message_field(linked):
    server, client = linked
    system = client.ref("server", "_system")
    data = inline_arrays({"x": np.ones((8, 4), np.float32), "y": np.zeros(8, np.int64)})
    ref = await system.ask({"op": "spawn", "type": "asyncdb.Replica",
                            "config": replica_config(data), "owner": "somebody-else"})
    assert server.owned_by("client") == [ref.name]
    assert server.owned_by("somebody-else") == []
    await client.close()  # the connection is lost: what it spawned stops
    for _ in range(200):
        if not server.actors():
            break
        await asyncio.sleep(0.02)
    assert server.actors() == []


async def test_a_network_peer_stops_only_its_own_actors(linked):
    server, client = linked
    mine = await server.spawn(Probe, name="operator-owned")
    system = client.ref("server", "_system")
    with pytest.raises(asyncdb.ConfigError, match="only actors it spawned"):
        await system.ask({"op": "stop", "name": mine.name})
    assert server.actors() == ["operator-owned"]


async def test_shutdown_and_dial_are_the_operators(linked):
    server, client = linked
    system = client.ref("server", "_system")
    with pytest.raises(asyncdb.ConfigError, match="shutdown"):
        await system.ask({"op": "shutdown"})
    assert not server.closed
    dialled = []

    async def dialer(url):
        dialled.append(url)
        return "elsewhere"

    server.dialer = dialer
    server.policy = PeerPolicy(dial=("ws://10.0.0.2:7070", "peer.example"))
    for url in ("ws://127.0.0.1:22", "ws://10.0.0.2:7071", "http://10.0.0.2:7070",
                "ws://10.0.0.2", "ws://evil.example:7070"):
        with pytest.raises(asyncdb.ConfigError, match="peers its operator listed"):
            await system.ask({"op": "dial", "url": url})
    assert dialled == []
    assert await system.ask({"op": "dial", "url": "ws://10.0.0.2:7070"}) == "elsewhere"
    assert await system.ask({"op": "dial", "url": "wss://PEER.example:9000/"}) == "elsewhere"
    server.policy = PeerPolicy(allow_shutdown=True)
    await system.ask({"op": "shutdown"})
    await asyncio.wait_for(server.wait_closed(), 10)


async def test_local_requests_and_trusted_peers_may_do_everything():
    async with asyncdb.Node("driver", ask_timeout=10) as node:
        system = node.ref(node.id, "_system")
        ref = await system.ask({"op": "spawn", "type": "tests.test_system:Probe",
                                "config": {}})
        with SharedArrays({"x": np.ones((8, 4), np.float32),
                           "y": np.zeros(8, np.int64)}) as shared:
            replica = await node.spawn(asyncdb.Replica, config=replica_config(shared.spec))
        await system.ask({"op": "stop", "name": ref.name})
        assert node.actors() == [replica.name]

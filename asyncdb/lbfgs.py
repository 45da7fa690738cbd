"""The Sandblaster coordinator: L-BFGS driven from scalars.

It holds no parameter-sized vector. Every vector (x, g, the direction d, the trial
point xt and its gradient gt, the history pairs s_k, y_k) lives on the shards, sliced;
the coordinator sends programs of vector operations through `ShardClient.vectors` and
keeps only scalars: the loss, rho_k = 1 / (s_k . y_k), the two-loop's alpha_i, the
step length. Gradient and loss evaluations are passes of portions over the replicas
(`sandblaster.Passes`); the line search (`linesearch.StrongWolfe`) asks for loss-only
passes at trial points and a gradient pass only where sufficient decrease holds.

At each iteration boundary (after `accept`) the shards hold x, g and the history ring
of the same iteration, and their version is the iteration number, so a checkpoint
taken there is consistent: every `checkpoint_every` seconds the coordinator takes one
round of every shard's vectors with its own scalars (`Point`). When a shard fails, the
run goes back to that round: the failed shard is re-created from it, the others are
restored to it, and the iterations since are done again. The passes use no random
numbers (portions go in order), so a round needs no RNG state, and no queue is open
at a boundary.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .actor import Actor, ActorRef
from .errors import CheckpointError, RunError, TrainingFailed
from .linesearch import Step, StrongWolfe
from .passes import LOST, Passes, ShardsRestored, shard_generations
from .recovery import Checkpointer, Events, Recovery
from .registry import register_actor
from .sandblaster import Sandblaster, wire_bytes
from .shard_client import ShardClient

log = logging.getLogger("asyncdb.lbfgs")


MAX_REWINDS = 5  # going back to a checkpoint this often in a row ends the run


@dataclass
class Point:
    """Where the run is at an iteration boundary, beside the shards' vectors: what a
    checkpoint round saves of the coordinator (plain data)."""

    iteration: int
    loss: float
    gnorm: float
    history: list[dict[str, Any]]
    ring: list[list[float]] = field(default_factory=list)  # [slot, rho], oldest first
    gamma: float = 1.0
    pairs: int = 0
    elapsed: float = 0.0  # seconds of training before this point

    def to_state(self) -> dict[str, Any]:
        return copy.deepcopy({"algorithm": "sandblaster", **asdict(self)})

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Point:
        try:
            return cls(int(state["iteration"]), float(state["loss"]), float(state["gnorm"]),
                       copy.deepcopy(list(state["history"])),
                       [[int(slot), float(rho)] for slot, rho in state["ring"]],
                       float(state["gamma"]), int(state["pairs"]),
                       float(state.get("elapsed", 0.0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"a Sandblaster checkpoint's state is malformed: "
                                  f"{exc!r}") from exc


@register_actor("asyncdb.SandblasterCoordinator")
class SandblasterCoordinator(Actor):
    """Runs one Sandblaster run: `run` replicas, evaluator -> history and counters.
    `on_progress` (a callable: spawn it in the driver's process) sees each entry.
    With a `checkpointer`, rounds are taken at iteration boundaries every
    `checkpoint_every` seconds; with `recovery` too, failed shards and replicas are
    re-created and the run goes on; `resumed` is the point a resumed run starts from
    (its shards already hold that round)."""

    network_spawn = False  # lives on the driver's node

    def __init__(self, client: ShardClient, rows: int, algorithm: dict[str, Any],
                 l2: float = 0.0, on_progress: Any = None, recovery: Recovery | None = None,
                 checkpointer: Checkpointer | None = None, checkpoint_every: float = 10.0,
                 events: Events | None = None, resumed: dict[str, Any] | None = None) -> None:
        self.settings = Sandblaster.from_config(algorithm)
        self.shards = client
        client.meter = self._count
        self.rows = rows
        self.l2 = float(l2)
        self.on_progress = on_progress
        self.recovery = recovery
        self.checkpointer = checkpointer
        self.checkpoint_every = checkpoint_every
        self.events = events or Events()
        self.saved = None if resumed is None else Point.from_state(resumed)
        self.received = 0  # bytes of every reply this coordinator got during the run
        self.ring: list[tuple[int, float]] = []  # (slot, rho), oldest first
        self.gamma = 1.0
        self.pairs = 0
        self.rewinds = 0
        self.iterations_redone = 0

    def _count(self, reply: Any) -> None:
        self.received += wire_bytes(reply)

    async def receive(self, message: dict[str, Any]) -> Any:
        if message.get("op") == "run":
            return await self.run(message["replicas"], message["evaluator"])
        raise TrainingFailed(f"Sandblaster coordinator: unknown op {message.get('op')!r}")

    # -- objective -------------------------------------------------------------------

    async def _finish_gradient(self, point: str, grad: str) -> float:
        """Turn the accumulated sum at `grad` into the objective's gradient at `point`
        (mean, plus the L2 term, once per pass); answers 0.5 l2 |point|^2."""
        [square] = await self.shards.vectors(
            ["scale", 1.0 / self.rows, grad], ["paxpy", self.l2, point, grad],
            ["pdot", point, point])
        return 0.5 * self.l2 * square

    async def _objective(self, passes: Passes) -> tuple[float, float]:
        """Loss and gradient norm at x; the gradient is left in g."""
        loss = await passes.run("grad", "x", "g") / self.rows
        loss += await self._finish_gradient("x", "g")
        [gg] = await self.shards.vectors(["dot", "g", "g"])
        return loss, math.sqrt(gg)

    # -- the two-loop recursion -------------------------------------------------------

    async def _direction(self) -> float:
        """d = -H g from the history ring (Nocedal & Wright, algorithm 7.4); answers
        the slope g . d. Each round trip runs the last axpy and the next dot."""
        ops: list[list[Any]] = [["copy", "d", "g"]]
        alphas: dict[int, float] = {}
        for slot, rho in reversed(self.ring):
            [v] = await self.shards.vectors(*ops, ["dot", f"s{slot}", "d"])
            alphas[slot] = rho * v
            ops = [["axpy", -alphas[slot], f"y{slot}", "d"]]
        ops.append(["scale", self.gamma, "d"])
        for slot, rho in self.ring:
            [v] = await self.shards.vectors(*ops, ["dot", f"y{slot}", "d"])
            ops = [["axpy", alphas[slot] - rho * v, f"s{slot}", "d"]]
        [slope] = await self.shards.vectors(*ops, ["scale", -1.0, "d"], ["dot", "g", "d"])
        return slope

    async def _accept(self, iteration: int) -> float:
        """Move to the trial point: push the pair (xt - x, gt - g) into the ring, then
        x = xt, g = gt. Answers |g|^2 at the new point."""
        slot = self.pairs % self.settings.memory
        self.ring = [(s, rho) for s, rho in self.ring if s != slot]
        sy, yy = await self.shards.vectors(["history", slot, "xt", "x", "gt", "g"])
        [gg] = await self.shards.vectors(["copy", "x", "xt"], ["copy", "g", "gt"],
                                         ["dot", "g", "g"], ["version", iteration])
        if sy > 1e-10 * yy and yy > 0:  # curvature condition: keep the pair
            self.ring.append((slot, 1.0 / sy))
            self.gamma = sy / yy
            self.pairs += 1
        else:
            log.warning("iteration %d: pair skipped (s.y = %.3g)", iteration, sy)
        return gg

    async def _line_search(self, passes: Passes, loss: float, slope: float,
                           alpha: float) -> Step:
        async def phi(a: float) -> float:
            [square] = await self.shards.vectors(["copy", "xt", "x"], ["axpy", a, "d", "xt"],
                                                 ["pdot", "xt", "xt"])
            return await passes.run("loss", "xt") / self.rows + 0.5 * self.l2 * square

        async def dphi(a: float) -> float:
            await passes.run("grad", "xt", "gt")
            await self._finish_gradient("xt", "gt")
            [s] = await self.shards.vectors(["dot", "gt", "d"])
            return s

        search = StrongWolfe(phi, dphi, max_evaluations=self.settings.max_line_search)
        return await search.search(loss, slope, alpha)

    # -- the run -------------------------------------------------------------------

    async def run(self, replicas: list[ActorRef], evaluator: ActorRef) -> dict[str, Any]:
        passes = Passes(self.shards, replicas, self.rows, self.settings, self._count,
                        self.recovery)
        began = time.perf_counter()
        last = None if self.saved is None else self.saved.elapsed
        self.started = began - (last or 0.0)
        self.checkpointed = time.perf_counter()
        point = None
        while True:
            try:
                point = await self._start(passes, evaluator)
                stop = await self._iterate(point, passes, evaluator)
                break
            except (ShardsRestored, *LOST) as exc:
                try:
                    await self._rewind(passes, exc)
                except RunError as error:  # the run cannot go on: with its history
                    raise type(error)(str(error), [] if point is None
                                      else point.history) from error
            except RunError as error:
                raise type(error)(str(error), [] if point is None else point.history) \
                    from error
        if point.history[-1].get("test_accuracy") is None:
            point.history[-1]["test_accuracy"] = await evaluator.ask({"op": "evaluate"})
        return self._summary(point, passes, time.perf_counter() - self.started, stop)

    async def _start(self, passes: Passes, evaluator: ActorRef) -> Point:
        """The point of the last checkpoint round (the shards hold it), or the first."""
        if self.saved is not None:
            point = Point.from_state(self.saved.to_state())
            self.ring = [(int(slot), rho) for slot, rho in point.ring]
            self.gamma, self.pairs = point.gamma, point.pairs
            return point
        self.ring, self.gamma, self.pairs = [], 1.0, 0
        loss, gnorm = await self._objective(passes)
        point = Point(0, loss, gnorm, [])
        point.history.append(await self._entry(point, None, passes, evaluator))
        await self._boundary(point)
        return point

    async def _iterate(self, point: Point, passes: Passes, evaluator: ActorRef) -> str:
        """Iterations from `point` until a stopping rule holds; answers which."""
        settings = self.settings
        while point.iteration < settings.iterations:
            if point.gnorm <= settings.gtol:
                return "gtol"
            if settings.max_seconds is not None \
                    and time.perf_counter() - self.started >= settings.max_seconds:
                return "max_seconds"
            point.iteration += 1
            slope = await self._direction()
            first = 1.0 if self.ring else min(1.0, 1.0 / max(point.gnorm, 1e-300))
            step = await self._line_search(passes, point.loss, slope, first)
            if not step.ok:
                point.history.append(await self._entry(point, step, passes, evaluator))
                if not self.ring:
                    return f"line search failed: {step.reason}"
                log.warning("iteration %d: line search failed (%s); history dropped, "
                            "trying steepest descent", point.iteration, step.reason)
                self.ring = []
                await self._boundary(point)
                continue
            previous = point.loss
            point.gnorm = math.sqrt(await self._accept(point.iteration))
            point.loss = step.f
            last = point.iteration == settings.iterations or point.gnorm <= settings.gtol
            point.history.append(await self._entry(
                point, step, passes, evaluator if last or point.iteration
                % settings.eval_every == 0 else None))
            self.rewinds = 0  # an iteration got through
            await self._boundary(point)
            if (previous - point.loss) <= settings.ftol * max(abs(previous), abs(point.loss),
                                                              1.0):
                return "ftol"
        return "iterations"

    async def _boundary(self, point: Point) -> None:
        """At an iteration boundary: a checkpoint round, if one is due."""
        checkpointer = self.checkpointer
        if checkpointer is None \
                or time.perf_counter() - self.checkpointed < self.checkpoint_every:
            return
        point.ring = [[slot, rho] for slot, rho in self.ring]
        point.gamma, point.pairs = self.gamma, self.pairs
        point.elapsed = time.perf_counter() - self.started
        state = {**point.to_state(), "shards": len(self.shards), "rows": self.rows}
        checkpointer.state = lambda: state
        await checkpointer.take(whole=True)
        self.saved = Point.from_state(state)
        self.checkpointed = time.perf_counter()

    async def _rewind(self, passes: Passes, exc: BaseException) -> None:
        """A shard or a node failed mid-iteration: once recovery has re-created what
        failed, put every shard back to the last checkpoint round and go on from it."""
        recovery, checkpointer = self.recovery, self.checkpointer
        if recovery is None or checkpointer is None:
            raise exc
        self.rewinds += 1
        if self.rewinds > MAX_REWINDS:
            raise TrainingFailed(f"the run went back to its checkpoint {MAX_REWINDS} times "
                                 f"without getting through an iteration: {exc}") from exc
        recovery.suspect([node for site in recovery.sites.values() for node in site.nodes])
        await recovery.settled()
        if shard_generations(recovery, len(self.shards)) == passes.generations:
            await asyncio.sleep(min(0.05 * 2 ** self.rewinds, 1.0))  # a report may come
            await recovery.settled()
        back_to = 0 if self.saved is None else self.saved.iteration
        if checkpointer.latest:
            await checkpointer.restore()
        passes.generations = shard_generations(recovery, len(self.shards))
        self.events.record("rewound", iteration=back_to, reason=f"{type(exc).__name__}: "
                           f"{exc}")
        log.warning("going back to iteration %d after %s: %s", back_to,
                    type(exc).__name__, exc)

    async def _entry(self, point: Point, step: Step | None, passes: Passes,
                     evaluator: ActorRef | None) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.started  # before the evaluation: not ours
        accuracy = None if evaluator is None else await evaluator.ask({"op": "evaluate"})
        entry = {
            "iteration": point.iteration, "time": round(elapsed, 4),
            "loss": point.loss, "grad_norm": point.gnorm,
            "step": None if step is None else step.alpha,
            "line_search_losses": 0 if step is None else step.losses,
            "line_search_gradients": 0 if step is None else step.gradients,
            "line_search": "ok" if step is None or step.ok else f"failed: {step.reason}",
            "test_accuracy": accuracy, "replicas": len(passes.live),
            "coordinator_bytes": self.received,
        }
        if self.on_progress is not None:
            self.on_progress(entry)
        return entry

    def _summary(self, point: Point, passes: Passes, seconds: float,
                 stop: str) -> dict[str, Any]:
        history = point.history
        final = history[-1]
        final["stop"] = stop
        final["coordinator_bytes_per_iteration"] = self.received / max(1, point.iteration)
        final["portions_per_replica"] = {str(k): v for k, v in
                                         passes.portions_per_replica.items()}
        final.update(passes.totals)
        final["rewinds"] = sum(1 for e in self.events.entries if e["event"] == "rewound")
        return {"history": history, "seconds": seconds, "lost": passes.lost,
                "live": sorted(passes.live), "live_refs": sorted(passes.live.items())}

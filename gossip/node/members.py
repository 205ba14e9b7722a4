"""A node's membership: joining through seeds, the gossip loop, and the Join/Sync/Leave calls.

The rules (heartbeats, merging, suspicion) are pure and live in
:mod:`gossip.core.membership` (and :mod:`gossip.core.swim` for
``--member-protocol swim``); this is their I/O. Every round the node beats,
sweeps, and starts a sync with a random member as its own task: a peer that
takes the call and never answers holds one of a few sync slots until its
deadline, never the heartbeat. With swim the sync is the round's probe: it goes
to the next member of the probe order and carries news, not the table; an
answer is a sign of life, a failure a suspicion.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any

from gossip.config import NodeConfig
from gossip.core.errors import PeerError, Refused
from gossip.core.membership import MemberRecord, Membership
from gossip.core.swim import Swim
from gossip.transport import serde
from gossip.transport.channels import GOSSIP, Channels, transfer_timeout
from gossip.transport.frames import WireError

log = logging.getLogger(__name__)

# Member syncs of this node's own in flight at once: a peer that takes the call and
# never answers (paused, overloaded) holds one until its deadline, the others go on.
MAX_SYNCS_IN_FLIGHT = 3
# Chance per round that the sync goes to a member declared dead: a probe every
# ~10 rounds (5 s) finds a paused or cut-off member again, at the cost of one call.
PROBE_DEAD = 0.1
# The shortest deadline a swim probe gets, however low --suspect-after is: a fresh
# connection's handshake or one lost packet must not make a suspicion.
PROBE_FLOOR = 1.0


class JoinError(RuntimeError):
    """None of the seeds could be reached in time."""


class Members:
    """The member table of one node and the calls that keep it current."""

    def __init__(
        self,
        me: MemberRecord,
        config: NodeConfig,
        channels: Channels,
        rng: random.Random,
        on_join: Callable[[MemberRecord], None] = lambda m: None,
    ) -> None:
        self.swim: Swim | None = None
        self.table: Membership
        if config.membership.member_protocol == "swim":
            self.table = self.swim = Swim(me, config.membership)
            self.swim.spread(me.node_id)  # its own record is news to everyone
        else:
            self.table = Membership(me, config.membership)
        self.config = config
        self.channels = channels
        self.rng = rng
        self.on_join = on_join  # a member is new or came back (alive)
        self.indirect_saves = 0  # failed probes another member's probe answered (swim)
        self.protocol = config.membership.member_protocol
        self.mismatched: set[str] = set()  # addresses already warned of running another protocol

    @property
    def me(self) -> MemberRecord:
        return self.table.me

    @property
    def probe_timeout(self) -> float:
        """How long a call that says whether a member is there may take: the whole RPC deadline
        for heartbeat's table swaps (silence is judged by heartbeats, not by calls), and with swim
        at most ``suspect_after`` (but at least PROBE_FLOOR), so a member that holds calls without
        answering (stopped, frozen) is suspected after that, not after the RPC deadline."""
        if self.swim is None:
            return self.config.rpc_timeout
        return min(self.config.rpc_timeout, max(self.config.membership.suspect_after, PROBE_FLOOR))

    def encoded(self, full: bool = True, to: str = "") -> bytes:
        """This node's table; with swim and not ``full``, its news and what it claims of ``to``."""
        if self.swim is None:
            return serde.table_to_bytes(self.table.me, self.table.gossip_records())
        if full:
            # Counted when built: a call that then fails, and the answer to a Join, count too.
            # Harmless: a newcomer's first probes carry the whole table on.
            self.swim.sent_whole_table()
            records = self.table.gossip_records()
        else:
            records = [*self.swim.news(), *self.swim.claims_about(to)]
        return serde.table_to_bytes(self.table.me, records, full=full, protocol="swim")

    def merge(self, data: bytes) -> tuple[str, bool]:
        """Fold a peer's table in; its sender, and whether it sent its whole table. WireError if
        it does not decode, Refused (and nothing merged) if its sender runs another protocol."""
        try:
            sender, records, full = serde.table_message_from_bytes(data, self.protocol)
        except serde.ProtocolMismatch as exc:
            raise Refused("FAILED_PRECONDITION", str(exc)) from None
        if self.swim is not None:
            self.swim.answered(sender.node_id)
        for node_id in self.table.merge([sender, *records]):
            m = self.table.members.get(node_id)
            if m is None:
                continue  # replaced in the same message (a later record at its address)
            if m.fingerprint and m.fingerprint != self.me.fingerprint:
                log.warning(
                    "member %s (%s) runs a different model; it will not be picked", node_id, m.address
                )
            else:
                log.info("member %s (%s, rank %d) is alive", node_id, m.address, m.rank)
            self.on_join(m)
        return sender.node_id, full

    def warn_mismatch(self, message: str) -> None:
        """Log a member of another protocol once (a bounded set of them), not at every call."""
        if message in self.mismatched or len(self.mismatched) >= 256:
            return
        self.mismatched.add(message)
        log.warning("%s; it is not taken in", message)

    # --- joining ---------------------------------------------------------------------

    async def join(self) -> None:
        """Swap tables with the first seed that answers; JoinError after ``join_timeout``."""
        deadline = time.monotonic() + self.config.join_timeout
        errors: dict[str, str] = {}
        while True:
            # In a random order: nodes started together do not all queue at the first seed.
            for seed in self.rng.sample(self.config.peers, len(self.config.peers)):
                if seed == self.me.address:
                    continue
                try:
                    reply = await self.channels.unary(
                        seed, GOSSIP + "Join", self.encoded(), self.config.rpc_timeout
                    )
                    self.merge(reply)
                    log.info("joined through %s", seed)
                    return
                except Refused as exc:  # the seed runs another membership protocol
                    raise JoinError(f"seed {seed}: {exc.message}") from None
                except PeerError as exc:
                    if exc.code == "FAILED_PRECONDITION":  # the seed refused our protocol
                        raise JoinError(f"seed {seed} refused this node: {exc.details}") from None
                    errors[seed] = exc.code
                except WireError as exc:
                    errors[seed] = str(exc)
            if time.monotonic() >= deadline:
                detail = ", ".join(f"{k} ({v})" for k, v in errors.items()) or "none given"
                raise JoinError(f"could not reach any seed within {self.config.join_timeout:.0f} s: {detail}")
            await asyncio.sleep(0.2)

    async def wait_for(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` nodes (this one included) are alive; False on timeout."""
        deadline = time.monotonic() + timeout
        while len(self.table.alive()) + 1 < count:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    # --- the gossip loop -------------------------------------------------------------------

    async def loop(
        self, spawn: Callable[[Coroutine[Any, Any, Any]], Any], on_round: Callable[[], None]
    ) -> None:
        """Beat, sweep and start a sync every round, on time whatever the peers do."""
        ms = self.table
        interval = self.config.membership.interval
        loop = asyncio.get_running_loop()
        syncing: set[str] = set()
        last = loop.time()  # when the previous round began
        while True:
            pause = interval * self.rng.uniform(0.8, 1.2)
            await asyncio.sleep(pause)
            # Measured from the previous round's start, not from this sleep's: a pause that
            # lands while a round runs (after its own check) is caught by the next round.
            now = loop.time()
            late = now - last - pause
            last = now
            if late > interval:
                # Paused (SIGSTOP), starved or blocked: no gossip was heard meanwhile.
                ms.discount(late)
                level = logging.WARNING if late > ms.config.suspect_after / 2 else logging.DEBUG
                log.log(level, "membership loop %.1f s late; that silence is not held against peers", late)
            if self.swim is None:
                ms.beat()
            for node_id in ms.sweep():
                log.warning("member %s (%s) declared dead", node_id, ms.members[node_id].address)
            on_round()
            if len(syncing) >= MAX_SYNCS_IN_FLIGHT:
                continue
            full = self.swim is None or self.swim.full_sync_due()
            target = self._sync_target()
            if target is None or target[1] in syncing:
                continue
            syncing.add(target[1])
            spawn(self._sync_with(*target, syncing, full))

    def _sync_target(self) -> tuple[str, str] | None:
        """(id, address) of a member to swap tables with: alive or suspect (with swim: the next
        of the probe order), now and then a dead one, else a seed (id unknown: empty)."""
        target = None
        if self.rng.random() < PROBE_DEAD:
            target = self.table.pick_dead(self.rng)
        if target is None:
            target = (
                self.swim.next_probe(self.rng)
                if self.swim is not None
                else self.table.pick_gossip_target(self.rng)
            )
        if target is not None:
            return (target.node_id, target.address) if target.address != self.me.address else None
        if self.config.peers:
            address = self.rng.choice(self.config.peers)
            return None if address == self.me.address else ("", address)
        return None

    async def _sync_with(self, node_id: str, address: str, syncing: set[str], full: bool) -> None:
        """Swap tables (swim: news) with ``address``, which stays in ``syncing`` until the call ended."""
        try:
            request = self.encoded(full, node_id)
            # The probe's deadline, stretched for a whole table (anti-entropy) both ways.
            deadline = transfer_timeout(self.probe_timeout, 2 * len(request))
            reply = await self.channels.unary(address, GOSSIP + "Sync", request, deadline)
            self.merge(reply)
        except Refused as exc:
            # A reply from another protocol: no sign of life; with swim the member is
            # suspected, then dead, so never picked.
            self.warn_mismatch(exc.message)
            if self.swim is not None and node_id:
                self.swim.probe_failed(node_id)
        except PeerError as exc:
            log.debug("member sync with %s failed: %s", address, exc.code)
            if exc.code == "FAILED_PRECONDITION":
                self.warn_mismatch(f"{address} refused this node's table: {exc.details[:200]}")
            if self.swim is not None and node_id:
                await self._probe_indirectly(node_id, address)
        except WireError as exc:
            log.warning("bad member table from %s: %s", address, exc)
        finally:
            syncing.discard(address)

    async def _probe_indirectly(self, node_id: str, address: str) -> None:
        """Ask a few other members to probe ``node_id``; suspect it only if none reaches it."""
        assert self.swim is not None
        request = serde.probe_to_bytes(node_id, address)

        async def ask(helper: MemberRecord) -> bool:
            try:
                reply = await self.channels.unary(
                    helper.address, GOSSIP + "Probe", request, self.probe_timeout
                )
                return serde.probe_reply_from_bytes(reply)
            except (PeerError, WireError):
                return False

        helpers = self.swim.helpers(node_id, self.rng)
        reached = await asyncio.gather(*(ask(h) for h in helpers))
        if any(reached):
            log.debug(
                "member %s answered %d of %d others, not this node", node_id, sum(reached), len(helpers)
            )
            self.swim.answered(node_id)
            self.indirect_saves += 1
        else:
            self.swim.probe_failed(node_id)

    async def leave(self) -> None:
        """Tell every member not known dead that this life of the node is over."""
        request = serde.leave_to_bytes(self.me.node_id, self.me.incarnation)
        targets = [m.address for m in self.table.members.values() if m.state in ("alive", "suspect")]
        await asyncio.gather(
            *(
                self.channels.unary(a, GOSSIP + "Leave", request, self.config.rpc_timeout / 2)
                for a in targets
            ),
            return_exceptions=True,
        )

    # --- the calls peers make ----------------------------------------------------------------

    async def on_sync(self, request: bytes) -> bytes:
        """Join and Sync: fold the caller's table in, answer with ours (swim: with our news and
        what we claim of the caller, unless it sent its whole table)."""
        sender, full = self.merge(request)
        return self.encoded(full, sender)

    async def on_probe(self, request: bytes) -> bytes:
        """Probe a member of this node's table for another node (swim's ping-req): the answer
        says whether it answered. A node or an address this table does not hold is refused:
        a peer cannot make this node dial anywhere."""
        node_id, address = serde.probe_from_bytes(request)
        m = self.table.members.get(node_id)
        if m is None or m.address != address or m.state not in ("alive", "suspect"):
            raise Refused("FAILED_PRECONDITION", f"{node_id!r:.80} at {address!r:.80} is not a member here")
        try:
            reply = await self.channels.unary(
                address, GOSSIP + "Sync", self.encoded(False, node_id), self.probe_timeout / 2
            )
            sender, _ = self.merge(reply)
        except (PeerError, WireError, Refused):
            return serde.probe_reply_to_bytes(False)
        return serde.probe_reply_to_bytes(sender == node_id)  # not another process at that address

    async def on_leave(self, request: bytes) -> bytes:
        node_id, incarnation = serde.leave_from_bytes(request)
        if self.table.mark_left(node_id, incarnation):
            log.info("member %s left", node_id)
        return serde.EMPTY

"""The boundary every site reply crosses before it counts: who sent it, and whether it is well-formed.

* **Who**: with a sites registry (run config ``site-registry``, the
  ``sites.json`` ``medfed deploy`` writes) a node's site is the one its
  authenticated key is registered to (:mod:`shared.site_identity`); nodes
  whose keys the registry does not know never receive a message. Without a
  registry (simulations, localhost trials) a node's site is the id it
  declared at the roll call, and a second node claiming a site already
  claimed is refused. Either way a reply counts for the site of the node it
  came from (the SuperLink checks the sender), never for the ``site-id`` it
  writes into itself: a reply claiming another site is rejected as an
  impostor.
* **Well-formed**: every training and evaluation reply goes through
  :class:`shared.validation.ReplyScreen` (keys, shapes, dtypes, finite
  values, ``num-examples``, update norms, consistent counts). A rejected
  reply is never aggregated; the site and the reason are recorded.
* **Enough**: a round whose valid replies are fewer than ``min-sites`` is
  refused (the global model stays as it was), so one hospital's update is
  never released as the global model.

Accepted replies are returned sorted by site, so aggregation sums them in the
same order in every run (float sums depend on order).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from shared import protocol
from shared.console import console_line
from shared.site_identity import NodeIdentities, identify_nodes, load_site_fingerprints, reply_node_id
from shared.site_policy import TRAIN
from shared.validation import ReplyScreen, SiteReply, Verdict, filter_round

logger = logging.getLogger(__name__)

__all__ = ["GateResult", "ReplyGate", "SiteDirectory", "declared_site_id"]

IMPOSTOR = "impostor"
UNKNOWN_NODE = "unknown-node"


def declared_site_id(msg: Message) -> str | None:
    """The ``site-id`` a reply writes into itself (a claim, not an identity)."""
    rec = msg.content.config_records.get(protocol.SITE) if msg.has_content() else None
    if rec is not None and protocol.SITE_ID in rec:
        return str(rec[protocol.SITE_ID])
    return None


@dataclass
class SiteDirectory:
    """Which site each Flower node is, and its role (train or holdout).

    Parameters
    ----------
    registry:
        Path of the federation's ``sites.json`` ('' = no registry: the
        roll call's declared ids, each claimable once).
    """

    registry: str = ""
    sites: dict[int, str] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    refused: dict[str, dict[str, Any]] = field(default_factory=dict)
    _authenticated: NodeIdentities | None = None

    def refresh(self, grid: Grid) -> list[int]:
        """The connected nodes this directory will talk to (with a registry: the registered ones)."""
        if not self.registry:
            return sorted(grid.get_node_ids())
        nodes = list(grid.get_nodes())  # type: ignore[attr-defined]
        ids = identify_nodes({int(n.node_id): n.public_key for n in nodes}, load_site_fingerprints(self.registry))
        for node_id in ids.unknown:
            logger.warning(console_line("warning", f"node {node_id} authenticated with a key the sites registry does "
                                                   "not know: it is ignored (register it with medfed deploy)"))
        self._authenticated = ids
        return sorted(n for n in ids.sites)

    def claim(self, node_id: int, declared: str | None) -> str | None:
        """Bind ``node_id`` to its site; returns the site, or None when the claim is refused (logged)."""
        if node_id in self.sites:
            return self.sites[node_id]
        if self._authenticated is not None:
            site = self._authenticated.site_of(node_id)
            if site is None:
                return None
            if declared is not None and declared != site:
                logger.warning(console_line("warning", f"node of site {site} declares itself '{declared}': "
                                                       f"it is known as {site}"))
        else:
            if not declared:
                return None
            if declared in self.sites.values():
                logger.warning(console_line("warning", f"a second node claims site '{declared}': refused "
                                                       f"(node {node_id}); the first node keeps the name"))
                return None
            site = declared
        self.sites[node_id] = site
        return site

    def site_of(self, node_id: int) -> str | None:
        """The site of a node already seen, or None."""
        return self.sites.get(node_id)

    def nodes(self, role: str | None = None) -> list[int]:
        """The known nodes (of one role), sorted by site."""
        out = [n for n, s in self.sites.items()
               if s not in self.refused and (role is None or self.roles.get(s, TRAIN) == role)]
        return sorted(out, key=lambda n: self.sites[n])


@dataclass
class GateResult:
    """What a batch of replies amounts to after the gate."""

    accepted: list[tuple[str, Message]]
    # replies that are errors (site or SuperLink), with the node's site or "node-<id>"
    failed: list[tuple[str, Message]]
    rejected: list[dict[str, Any]]  # {"site", "reason", "detail"} of replies the gate refused
    refusal: str | None = None  # the round may not proceed (fewer valid replies than min-sites)
    no_reply: list[str] = field(default_factory=list)  # sites (or "node-<id>") asked that sent nothing in time

    def record(self) -> dict[str, Any]:
        """JSON for the round record."""
        return {"accepted": len(self.accepted), "rejected": self.rejected,
                **({"refused": self.refusal} if self.refusal else {}),
                **({"no-reply": self.no_reply} if self.no_reply else {})}


class ReplyGate:
    """Identity, validation and the min-sites rule for one run's replies."""

    def __init__(self, directory: SiteDirectory, screen: ReplyScreen, min_sites: int) -> None:
        self.directory = directory
        self.screen = screen
        self.min_sites = min_sites

    def _no_reply(self, messages: Sequence[Message], replies: Sequence[Message]) -> list[str]:
        """The sites (or ``node-<id>``) that were sent a message and sent nothing back within the wait.

        E.g. a node restarted before the SuperLink reported it unavailable: its
        pending instruction is never delivered again, so no reply, not even an
        error, ever comes for it.
        """
        answered = {r.metadata.reply_to_message_id for r in replies}
        missing = [m.metadata.dst_node_id for m in messages if m.metadata.message_id not in answered]
        return sorted(self.directory.site_of(n) or f"node-{n}" for n in missing)

    def _identify(self, messages: Sequence[Message], replies: Iterable[Message]
                  ) -> tuple[list[tuple[str, Message]], list[tuple[str, Message]], list[dict[str, Any]]]:
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        ok: list[tuple[str, Message]] = []
        failed: list[tuple[str, Message]] = []
        rejected: list[dict[str, Any]] = []
        seen: set[str] = set()
        for reply in replies:
            node = reply_node_id(reply.metadata.src_node_id, reply.metadata.reply_to_message_id, sent)
            site = self.directory.site_of(node) if node is not None else None
            label = site or f"node-{node if node is not None else reply.metadata.src_node_id}"
            if reply.has_error():
                failed.append((label, reply))
                continue
            if site is None:
                rejected.append({"site": label, "reason": UNKNOWN_NODE, "detail": "a reply from a node that is not a "
                                 "known site"})
                continue
            declared = declared_site_id(reply)
            if declared is not None and declared != site:
                rejected.append({"site": site, "reason": IMPOSTOR,
                                 "detail": f"the reply claims to come from site '{declared}'"})
                continue
            if site in seen:
                rejected.append({"site": site, "reason": "duplicate", "detail": "a second reply for this site"})
                continue
            seen.add(site)
            ok.append((site, reply))
        ok.sort(key=lambda item: item[0])
        return ok, failed, rejected

    def _decide(self, ok: list[tuple[str, Message]], failed: list[tuple[str, Message]], rejected: list[dict[str, Any]],
                verdicts: list[Verdict], min_sites: int) -> GateResult:
        decision = filter_round(ok, verdicts, min_sites)
        rejected = rejected + [{"site": v.site_id, "reason": str(v.reason),
                                "detail": v.detail} for v in decision.rejected]
        for r in rejected:
            logger.warning(console_line("warning", f"reply of {r['site']} rejected ({r['reason']}): {r['detail']}"))
        return GateResult(decision.accepted, failed, rejected, None if decision.proceed else decision.refusal)

    def train(self, messages: Sequence[Message], replies: Iterable[Message], global_arrays: Any) -> GateResult:
        """Identify and validate a training round's replies; refuse the round below ``min-sites``."""
        replies = list(replies)
        ok, failed, rejected = self._identify(messages, replies)
        sr = [SiteReply.from_records(site, m.content.array_records, m.content.metric_records) for site, m in ok]
        verdicts = self.screen.train([site for site, _ in ok], sr, global_arrays)
        result = self._decide(ok, failed, rejected, verdicts, self.min_sites)
        result.no_reply = self._no_reply(messages, replies)
        return result

    def evaluate(self, messages: Sequence[Message], replies: Iterable[Message], *, min_sites: int | None = None
                 ) -> GateResult:
        """Identify and validate an evaluation round's replies (counts consistent, sizes within what was announced)."""
        replies = list(replies)
        ok, failed, rejected = self._identify(messages, replies)
        sr = [SiteReply.from_records(site, m.content.array_records, m.content.metric_records) for site, m in ok]
        verdicts = self.screen.evaluate([site for site, _ in ok], sr)
        result = self._decide(ok, failed, rejected, verdicts, self.min_sites if min_sites is None else min_sites)
        result.no_reply = self._no_reply(messages, replies)
        return result

    def post_training(self, messages: Sequence[Message], replies: Iterable[Message],
                      check: Callable[[list[str], list[SiteReply]], list[Verdict]]) -> GateResult:
        """Identify and validate the replies of a post-training message (``check`` gives one verdict per reply).

        The same rules as a round: a reply counts for the node's site, an
        invalid one is rejected with its reason, and fewer than ``min-sites``
        valid replies refuse the phase (no single site's statistics become
        the federation's).
        """
        ok, failed, rejected = self._identify(messages, replies)
        sr = [SiteReply.from_records(site, m.content.array_records, m.content.metric_records) for site, m in ok]
        verdicts = check([site for site, _ in ok], sr)
        return self._decide(ok, failed, rejected, verdicts, self.min_sites)

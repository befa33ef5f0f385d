"""A stand-in for Flower's Grid in unit tests: pushing delivers each message at once, pulling collects the replies."""

from __future__ import annotations

from collections.abc import Iterable
from uuid import uuid4

from flwr.app import Message


class FakeGridBase:
    """``push_messages``/``pull_messages`` over :meth:`deliver` (what :func:`server.rounds.exchange` uses).

    Subclasses implement ``deliver(message) -> reply or None`` (None: the
    message was lost, so its reply never arrives) and ``get_node_ids``.
    """

    def __init__(self) -> None:
        self._replies: dict[str, Message] = {}

    def deliver(self, msg: Message) -> Message | None:
        """The reply of the site behind ``msg``'s node id, or None."""
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Give each message an id and deliver it now; keep its reply for :meth:`pull_messages`."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = mid = str(uuid4())
            reply = self.deliver(msg)
            if reply is not None:
                self._replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """The replies that arrived for ``message_ids``, in the order they arrived (each is handed out once)."""
        wanted = set(message_ids)
        return [self._replies.pop(i) for i in list(self._replies) if i in wanted]

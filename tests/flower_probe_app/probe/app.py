"""Probe app: what a Flower 1.41 ServerApp observes about nodes, and which nodes run an app.

The ServerApp writes ``run_config['out']`` (JSON): every node ``grid.get_nodes()``
returns (id, status, public key, registered name) and every node's reply to one
``query`` message (the site id from its node config, or the error code).
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    """Record the nodes, query each once, write the JSON."""
    nodes = list(grid.get_nodes())
    info = {
        str(n.node_id): {
            "status": n.status,
            "public-key": n.public_key.decode("ascii"),
            "name": n.name if n.HasField("name") else None,
        }
        for n in nodes
    }
    messages = [
        Message(RecordDict({"q": ConfigRecord({"ask": "site-id"})}), dst_node_id=n.node_id, message_type="query")
        for n in nodes
    ]
    replies = {}
    for r in grid.send_and_receive(messages, timeout=float(context.run_config["timeout"])):
        if r.has_error():
            replies[str(r.metadata.src_node_id)] = {"error-code": r.error.code, "reason": r.error.reason}
        else:
            replies[str(r.metadata.src_node_id)] = {"site-id": str(r.content.config_records["a"]["site-id"])}
    Path(str(context.run_config["out"])).write_text(json.dumps({"nodes": info, "replies": replies}, indent=2))


@client.query()
def query(msg: Message, context: Context) -> Message:
    """Answer with the site id of the node config (a self-declared claim)."""
    site_id = str(context.node_config.get("site-id", ""))
    return Message(RecordDict({"a": ConfigRecord({"site-id": site_id})}), reply_to=msg)

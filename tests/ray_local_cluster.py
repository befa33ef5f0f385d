"""A throwaway two-node Ray cluster on this machine, for tests; run as a script, driven through stdin/stdout.

``python tests/ray_local_cluster.py`` starts a head node and one worker node
(``ray.cluster_utils.Cluster``, 1 CPU each, no dashboard) and prints one
JSON line: ``{"address": <GCS address>, "head": <node id>, "worker": <node id>}``.
Then it answers commands read from stdin, one per line:

``actors``
    one JSON line: ``[{"class": ..., "node": <node id>, "state": ...}, ...]``
    for every actor the cluster has seen (alive or dead; read from the GCS,
    which needs no dashboard);
``stop`` (or end of input)
    shut the cluster down (every Ray process it started) and exit.

Set ``RAY_TMPDIR`` to a private short folder before starting it: Ray writes
the cluster's address to ``$RAY_TMPDIR/ray/ray_current_cluster``, where a
plain ``ray.init()`` of anybody else on the machine would otherwise find it.

Every node listens on 127.0.0.1 only: the script sets
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, without which Ray replaces a
loopback address by the machine's network address (``resolve_ip_for_localhost``);
a driver joining the cluster needs the same variable.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray reads its constants

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

LOOPBACK = "127.0.0.1"
"""Every node listens on the loopback address only."""


def _actors() -> list[dict[str, str]]:
    # ray.util.state needs the dashboard; the GCS actor table does not (private API, fine for a test helper)
    from ray._private import state

    out = []
    for info in state.actors().values():
        node = (info.get("Address") or {}).get("NodeID", "")
        out.append({"class": str(info.get("ActorClassName", "")), "node": str(node),
                    "state": str(info.get("State", ""))})
    return out


def main() -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                                "node_ip_address": LOOPBACK})
    worker = cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    print(json.dumps({"address": cluster.address, "head": cluster.head_node.node_id, "worker": worker.node_id}),
          flush=True)
    try:
        for line in sys.stdin:
            command = line.strip()
            if command == "actors":
                print(json.dumps(_actors()), flush=True)
            elif command == "stop":
                break
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()

"""Which hospital a Flower node is, from the key it authenticated with.

With SuperNode authentication on (``flower-superlink --enable-supernode-auth``),
every SuperNode signs each Fleet API request with its private key, and the
SuperLink only accepts keys registered with ``flwr supernode register``. A
node id is therefore bound to one registered public key, and the
federation's sites registry (``sites.json``, written by ``medfed deploy``)
binds that key to a site name. A ``site-id`` a site writes into its own
replies is only a claim; the name obtained here is what the server should
key replies by.

What the ServerApp can observe in Flower 1.41 (read from the installed
source): ``grid.get_nodes()`` returns ``flwr.proto.node_pb2.NodeInfo``
objects for the run's online nodes, each with ``node_id``, ``public_key``
(PEM SubjectPublicKeyInfo bytes, as registered) and ``name`` (the
``--name`` given to ``flwr supernode register``); every reply carries
``message.metadata.src_node_id``, which the SuperLink checks against the
instruction's destination node, except replies the SuperLink makes itself
(``src_node_id`` 1, e.g. NODE_UNAVAILABLE for a node that went offline).
:func:`identify_nodes` turns the first into a ``node_id -> site`` map;
:func:`reply_node_id` gives the node a reply is about.

Framework-free: no Flower import; ``cryptography`` does the key parsing.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import UserError

__all__ = [
    "NodeIdentities",
    "RegistryError",
    "identify_nodes",
    "key_fingerprint",
    "load_site_fingerprints",
    "reply_node_id",
]

SUPERLINK_NODE_ID = 1
"""``src_node_id`` of replies the SuperLink makes itself (Flower 1.41 ``SUPERLINK_NODE_ID``), e.g. the
NODE_UNAVAILABLE error for a message whose node went offline."""


class RegistryError(UserError):
    """The sites registry is missing, unreadable or inconsistent."""


def key_fingerprint(public_key: bytes | str) -> str:
    """The OpenSSH-style fingerprint ``SHA256:<base64>`` of a public key.

    Parameters
    ----------
    public_key : bytes or str
        A PEM ``SubjectPublicKeyInfo`` (what Flower's ``NodeInfo.public_key``
        holds) or an OpenSSH public key line (``ecdsa-sha2-nistp384 AAAA...``,
        what a site kit's ``node.pub`` holds). Both forms of one key give the
        same fingerprint, equal to ``ssh-keygen -lf node.pub``.

    Raises
    ------
    RegistryError
        When the bytes are not a public key in either form.
    """
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    data = public_key.encode("ascii") if isinstance(public_key, str) else bytes(public_key)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_ssh_public_key(data.strip())
        line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise RegistryError(
            "expected a public key (PEM 'BEGIN PUBLIC KEY' or an OpenSSH 'ecdsa-sha2-...' line), "
            f"could not parse the {len(data)} bytes given ({type(exc).__name__}); check the key file"
        ) from exc
    blob = base64.b64decode(line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")


def load_site_fingerprints(registry_path: str | Path) -> dict[str, str]:
    """``fingerprint -> site name`` for every active site of a ``sites.json``.

    Revoked sites are left out, so their nodes come out as unknown.

    Raises
    ------
    RegistryError
        When the file is missing or malformed, or two sites share a key.
    """
    path = Path(registry_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        sites = data["sites"]
        pairs = [(str(entry["fingerprint"]), str(name)) for name, entry in sites.items()]
    except FileNotFoundError as exc:
        raise RegistryError(
            f"sites registry {path} not found: give the sites.json of a folder made by 'medfed deploy init'"
        ) from exc
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RegistryError(
            f"sites registry {path} is not a medfed sites.json ({type(exc).__name__}): "
            "restore it from the federation folder's backup"
        ) from exc
    out: dict[str, str] = {}
    for fp, name in pairs:
        if fp in out:
            raise RegistryError(f"sites registry {path}: sites '{out[fp]}' and '{name}' share one key; revoke one")
        out[fp] = name
    return out


@dataclass(frozen=True)
class NodeIdentities:
    """The result of :func:`identify_nodes`.

    Attributes
    ----------
    sites : dict[int, str]
        ``node_id -> site name`` for nodes whose key is in the registry.
    unknown : dict[int, str]
        ``node_id -> key fingerprint`` (or ``"no key"``) for the others:
        registered at the SuperLink but not (or no longer) in the registry.
        The server should send them nothing and ignore their replies.
    """

    sites: dict[int, str] = field(default_factory=dict)
    unknown: dict[int, str] = field(default_factory=dict)

    def site_of(self, node_id: int) -> str | None:
        """The site name of ``node_id``, or None when the node is not a registered site."""
        return self.sites.get(node_id)


def identify_nodes(node_keys: Mapping[int, bytes | str], fingerprints: Mapping[str, str]) -> NodeIdentities:
    """Map node ids to site names by the public key each node authenticated with.

    Parameters
    ----------
    node_keys : Mapping[int, bytes or str]
        ``node_id -> public key`` as the server observes it, e.g.
        ``{n.node_id: n.public_key for n in grid.get_nodes()}`` in a Flower
        1.41 ServerApp (PEM bytes). An empty key counts as unknown.
    fingerprints : Mapping[str, str]
        ``fingerprint -> site name``, from :func:`load_site_fingerprints`.

    Returns
    -------
    NodeIdentities
        Known sites and unknown nodes. Two nodes can never map to one site
        (Flower refuses a public key registered twice).
    """
    sites: dict[int, str] = {}
    unknown: dict[int, str] = {}
    for node_id, key in node_keys.items():
        if not key:
            unknown[int(node_id)] = "no key"
            continue
        try:
            fp = key_fingerprint(key)
        except RegistryError:
            unknown[int(node_id)] = "unparseable key"
            continue
        name = fingerprints.get(fp)
        if name is None:
            unknown[int(node_id)] = fp
        else:
            sites[int(node_id)] = name
    return NodeIdentities(sites=sites, unknown=unknown)


def reply_node_id(src_node_id: int, reply_to_message_id: str, sent: Mapping[str, int]) -> int | None:
    """The node a reply is about, for keying it by site.

    Parameters
    ----------
    src_node_id : int
        ``reply.metadata.src_node_id``.
    reply_to_message_id : str
        ``reply.metadata.reply_to_message_id``.
    sent : Mapping[str, int]
        ``message_id -> dst_node_id`` of the instructions sent this round
        (Flower 1.41's grid sets ``message.metadata.message_id`` on each
        message it pushes).

    Returns
    -------
    int or None
        The instruction's destination node. A node's own reply always comes
        from it (the SuperLink refuses a reply whose source is not the
        instruction's destination), but replies the SuperLink makes itself
        carry ``src_node_id`` 1: those are attributed through
        ``reply_to_message_id``. None for a reply to nothing sent here, or
        one whose source contradicts the instruction.
    """
    dst = sent.get(reply_to_message_id)
    if dst is None:
        return None
    if src_node_id not in (dst, SUPERLINK_NODE_ID):
        return None
    return int(dst)

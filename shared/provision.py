"""Provisioning of a hospital federation: a CA, TLS for the SuperLink, one startup kit per site.

``medfed deploy init`` / ``add-site`` / ``revoke-site`` call these functions
(the CLI only adds the optional ``flwr supernode register/unregister``
calls). Everything here is framework-free (no Flower import); keys and
certificates come from the ``cryptography`` library, never from shelling
out to openssl or ssh-keygen.

A federation folder holds::

    federation.json            name, SuperLink address, CA fingerprint, validity dates
    sites.json                 the sites registry: site name <-> node public key (fingerprint), node id
    ca/ca.key, ca/ca.pem       the federation's certificate authority (key 0600; never leaves this folder)
    superlink/                 superlink.key (0600), superlink.pem, ca.pem, start-superlink.sh, state/
    admin/config.toml          Flower CLI connection (FLWR_HOME) for flwr run / flwr supernode ...
    sites/<name>/              one site kit per hospital (0700): ca.pem, node.key (0600), node.pub,
                               node-config.toml, start-supernode.sh, README.md
    revoked/<name>-<utc>/      kits of revoked sites, kept for the record

Key formats are what Flower 1.41 expects (read from its source):

* SuperLink TLS (``--ssl-certfile/--ssl-keyfile/--ssl-ca-certfile``): PEM
  certificate and PKCS#8 PEM key; ``flower-supernode --root-certificates`` and
  ``root-certificates`` of the Flower CLI config take the CA certificate (PEM).
* SuperNode authentication (``--auth-supernode-private-key``): an EC private key
  in OpenSSH format (``load_ssh_private_key``, EC only; ``flwr supernode
  register`` wants the OpenSSH public key on a NIST curve). P-384 is used.

The SuperLink certificate always holds the IP SAN ``127.0.0.1``: with
``--host 0.0.0.0`` Flower's SuperLink starts its own ``flower-superexec``,
which connects to ``127.0.0.1:<port>`` over TLS and checks the certificate
against that address (``resolve_bind_address`` in ``flwr/supercore/address.py``,
``SuperLinkLifespan._start_superexec_if_needed`` in
``flwr/superlink/cli/flower_superlink.py``). Without it no ServerApp can run.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import json
import logging
import os
import re
import shlex
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.atomic import atomic_open
from shared.errors import UserError
from shared.kit_templates import FLWR_ENV, KIT_README, NODE_CONFIG, SUPERLINK_SCRIPT, SUPERNODE_SCRIPT
from shared.pki import cert_fingerprint, make_ca, make_server_cert, node_key_pair, pem_private_key
from shared.site_identity import key_fingerprint

__all__ = [
    "FEDERATION_FILE",
    "REGISTRY_FILE",
    "Federation",
    "ProvisionError",
    "RevokedSite",
    "SiteKit",
    "SuperLinkAddress",
    "add_site",
    "init_federation",
    "load_federation",
    "load_registry",
    "parse_superlink_address",
    "record_node_id",
    "revoke_site",
    "validate_name",
]

logger = logging.getLogger(__name__)

FORMAT = "medfed-federation/1"
REGISTRY_FORMAT = "medfed-sites/1"
FEDERATION_FILE = "federation.json"
REGISTRY_FILE = "sites.json"
LOOPBACK_SAN = "127.0.0.1"
DATA_PATH_PLACEHOLDER = "/REPLACE/with/this/site/image/folder/or/manifest.csv"

_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class ProvisionError(UserError):
    """A provisioning request that cannot be done as given (the message says how to fix it)."""


# ---------------------------------------------------------------------------
# Names and addresses
# ---------------------------------------------------------------------------


def validate_name(name: str, what: str = "site name") -> str:
    """Return ``name`` if it is a safe federation or site name, else raise.

    Names become folder names, node-config values and words in shell
    scripts, so only lowercase letters, digits and inner hyphens are allowed
    (1-63 characters, like a DNS label).
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ProvisionError(
            f"{what} must be 1-63 lowercase letters, digits or inner hyphens (e.g. 'hospital-a'), "
            f"got {name!r}"
        )
    return name


@dataclass(frozen=True)
class SuperLinkAddress:
    """Where SuperNodes and the Flower CLI reach the SuperLink."""

    host: str
    port: int

    @property
    def is_ip(self) -> bool:
        """Whether ``host`` is an IP address (else a DNS name)."""
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _is_dns_name(text: str) -> bool:
    if len(text) > 253 or text.endswith("."):
        return False
    labels = text.split(".")
    return all(_DNS_LABEL.match(label) for label in labels) and not labels[-1].isdigit()


def parse_superlink_address(text: str) -> SuperLinkAddress:
    """Parse ``HOST:PORT`` (a DNS name, an IPv4 address or ``[IPv6]``).

    Raises
    ------
    ProvisionError
        For a URL, a missing or out-of-range port, or a malformed host.
    """
    hint = "give the SuperLink's address as HOST:PORT, e.g. fl.hospital.org:8000 or 10.0.0.5:8000"
    raw = text.strip() if isinstance(text, str) else ""
    if "://" in raw:
        raise ProvisionError(f"--superlink takes HOST:PORT without a scheme, got {text!r}; {hint}")
    m = re.match(r"^\[([0-9A-Fa-f:.]+)\]:(\d{1,5})$", raw) or re.match(r"^([^:\[\]]+):(\d{1,5})$", raw)
    if not m:
        raise ProvisionError(f"malformed --superlink {text!r}; {hint}")
    host, port = m.group(1), int(m.group(2))
    if not 1 <= port <= 65535:
        raise ProvisionError(f"--superlink port must be 1-65535, got {port}; {hint}")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        if ":" in host or not _is_dns_name(host):
            raise ProvisionError(f"--superlink host {host!r} is neither a DNS name nor an IP address; {hint}") from None
        host = host.lower()
    return SuperLinkAddress(host=host, port=port)


def _parse_san(value: str) -> str:
    text = value.strip()
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        pass
    if not _is_dns_name(text):
        raise ProvisionError(f"--san takes a DNS name or an IP address, got {value!r}")
    return text.lower()


# ---------------------------------------------------------------------------
# Files: atomic writes, private keys created 0600
# ---------------------------------------------------------------------------


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` atomically (temp file + fsync + ``os.replace``) with ``mode`` from creation on."""
    with atomic_open(path, "wb", permissions=mode) as f:
        f.write(data)


def _write_text(path: Path, text: str, mode: int = 0o644) -> None:
    _write(path, text.encode("utf-8"), mode)


def _write_json(path: Path, data: Any) -> None:
    _write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def _mkdir_private(path: Path) -> None:
    path.mkdir(mode=0o700)
    os.chmod(path, 0o700)  # mkdir's mode is masked by the umask


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Serialize changes to one federation folder (two add-site at once must not lose a site)."""
    with open(root / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _iso(t: dt.datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def _load_site_public_key(path: Path) -> str:
    """An OpenSSH EC public key (NIST curve) a site generated itself; its private key stays at the site."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ProvisionError(f"--public-key {path}: cannot read it ({exc.strerror})") from exc
    if b"PRIVATE KEY" in data:
        raise ProvisionError(f"--public-key {path} holds a PRIVATE key: give the .pub file; the private key "
                             "stays at the site")
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ProvisionError(
            f"--public-key {path} is not an OpenSSH public key line; create one at the site with "
            "'ssh-keygen -t ecdsa -b 384 -N \"\" -f node.key' and give node.key.pub"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in ("secp256r1", "secp384r1",
                                                                              "secp521r1"):
        raise ProvisionError(f"--public-key {path}: Flower 1.41 SuperNode authentication needs an ECDSA key "
                             "on a NIST curve (P-256/384/521); create one with 'ssh-keygen -t ecdsa -b 384'")
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode("ascii")
    return line


# ---------------------------------------------------------------------------
# Federation
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Federation:
    """What ``federation.json`` records."""

    root: Path
    name: str
    superlink: SuperLinkAddress
    sans: tuple[str, ...]
    ca_fingerprint: str

    @property
    def ca_cert(self) -> Path:
        """The CA certificate (public)."""
        return self.root / "ca" / "ca.pem"

    @property
    def flwr_home(self) -> Path:
        """The folder to use as ``FLWR_HOME`` for ``flwr run`` / ``flwr supernode``."""
        return self.root / "admin"

    @property
    def superlink_script(self) -> Path:
        """The SuperLink start script."""
        return self.root / "superlink" / "start-superlink.sh"

    @property
    def registry(self) -> Path:
        """The sites registry."""
        return self.root / REGISTRY_FILE

    def kit(self, site: str) -> Path:
        """The kit folder of ``site``."""
        return self.root / "sites" / site


def _connection_toml(name: str, address: SuperLinkAddress, ca: Path) -> str:
    return (
        "# Flower CLI connection to the medfed federation's SuperLink (TLS; no 'insecure').\n"
        f"# Use: FLWR_HOME={shlex.quote(str(ca.parent.parent / 'admin'))} flwr run . {name} --stream "
        f"--run-config \"site-registry='{ca.parent.parent / REGISTRY_FILE}'\"\n"
        "# or copy the [superlink.NAME] table into ~/.flwr/config.toml.\n"
        "[superlink]\n"
        f'default = "{name}"\n\n'
        f"[superlink.{name}]\n"
        f'address = "{address}"\n'
        f"root-certificates = {json.dumps(str(ca))}\n"
    )


def init_federation(root: str | Path, superlink: str, sans: Sequence[str] = (), name: str | None = None) -> Federation:
    """Create a federation folder: CA, SuperLink TLS, connection config, empty sites registry.

    Parameters
    ----------
    root : str or Path
        The folder to create (or an empty existing folder).
    superlink : str
        ``HOST:PORT`` where SuperNodes and the Flower CLI reach the SuperLink.
        The host goes into the certificate's SANs.
    sans : sequence of str
        More host names or IP addresses for the certificate (e.g. an internal
        DNS name). ``localhost`` is added only when given; ``127.0.0.1`` is
        always added (see the module docstring).
    name : str, optional
        The federation's name (default: the folder's name, lowercased).

    Raises
    ------
    ProvisionError
        When ``root`` already holds a federation or other files, or for a
        malformed address, SAN or name.
    """
    root = Path(root).expanduser().absolute()
    address = parse_superlink_address(superlink)
    if name is None:
        name = re.sub(r"[^a-z0-9-]+", "-", root.name.lower()).strip("-")[:63] or "medfed"
    validate_name(name, "federation name")
    names = [address.host]
    for s in [*(_parse_san(v) for v in sans), LOOPBACK_SAN]:
        if s not in names:
            names.append(s)
    if (root / FEDERATION_FILE).exists():
        raise ProvisionError(f"{root} already holds a federation ({FEDERATION_FILE} exists): choose a new folder; "
                             "add sites with 'medfed deploy add-site'")
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ProvisionError(f"{root} exists and is not an empty folder: choose a new folder for the federation")

    now = _now()
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    os.chmod(staging, 0o700)
    try:
        ca_key, ca_cert = make_ca(name, now)
        srv_key, srv_cert = make_server_cert(ca_key, ca_cert, names, now)
        from cryptography.hazmat.primitives import serialization

        ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
        for sub in ("ca", "superlink", "admin", "sites", "revoked"):
            _mkdir_private(staging / sub)
        _write(staging / "ca" / "ca.key", pem_private_key(ca_key), 0o600)
        _write(staging / "ca" / "ca.pem", ca_pem)
        _write(staging / "superlink" / "superlink.key", pem_private_key(srv_key), 0o600)
        _write(staging / "superlink" / "superlink.pem", srv_cert.public_bytes(serialization.Encoding.PEM))
        _write(staging / "superlink" / "ca.pem", ca_pem)
        _write_text(staging / "superlink" / "start-superlink.sh",
                    SUPERLINK_SCRIPT.format(name=name, env=FLWR_ENV, port=address.port), 0o755)
        _write_text(staging / "admin" / "config.toml", _connection_toml(name, address, root / "ca" / "ca.pem"))
        _write_json(staging / REGISTRY_FILE, {"format": REGISTRY_FORMAT, "federation": name, "sites": {},
                                              "revoked": []})
        _write_json(staging / FEDERATION_FILE, {
            "format": FORMAT, "name": name, "superlink": str(address), "sans": names,
            "created-at": _iso(now), "ca-fingerprint": cert_fingerprint(ca_cert),
            "ca-not-after": _iso(ca_cert.not_valid_after_utc),
            "superlink-cert-not-after": _iso(srv_cert.not_valid_after_utc),
            "node-auth": "ecdsa-p384-openssh", "supernode-auth": True, "tls": True,
        })
        if root.exists():
            root.rmdir()  # empty, checked above
        os.replace(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.debug("federation %s created in %s", name, root)
    return load_federation(root)


def load_federation(root: str | Path) -> Federation:
    """Read ``federation.json`` of a federation folder.

    Raises
    ------
    ProvisionError
        When ``root`` holds no federation.
    """
    root = Path(root).expanduser().absolute()
    try:
        data = json.loads((root / FEDERATION_FILE).read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise ValueError(data.get("format"))
        return Federation(root=root, name=data["name"], superlink=parse_superlink_address(data["superlink"]),
                          sans=tuple(data["sans"]), ca_fingerprint=data["ca-fingerprint"])
    except FileNotFoundError as exc:
        raise ProvisionError(f"{root} holds no federation ({FEDERATION_FILE} not found): create one with "
                             "'medfed deploy init DIR --superlink HOST:PORT'") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ProvisionError(f"{root / FEDERATION_FILE} is not a medfed federation file ({type(exc).__name__}); "
                             "restore it from a backup") from exc


def load_registry(root: str | Path) -> dict[str, Any]:
    """The sites registry of a federation folder (``sites.json``)."""
    fed = load_federation(root)
    try:
        data = json.loads(fed.registry.read_text(encoding="utf-8"))
        if data.get("format") != REGISTRY_FORMAT or not isinstance(data.get("sites"), dict):
            raise ValueError("format")
        return data
    except (OSError, ValueError) as exc:
        raise ProvisionError(f"{fed.registry} is not a medfed sites registry ({type(exc).__name__}); "
                             "restore it from a backup") from exc


# ---------------------------------------------------------------------------
# Sites
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteKit:
    """A provisioned site."""

    name: str
    kit: Path
    fingerprint: str
    public_key: Path
    has_private_key: bool


def add_site(root: str | Path, name: str, public_key: str | Path | None = None) -> SiteKit:
    """Provision site ``name``: its key pair, its kit folder and its registry entry.

    Parameters
    ----------
    root : str or Path
        The federation folder.
    name : str
        The site's name (see :func:`validate_name`); becomes its ``site-id``.
    public_key : str or Path, optional
        An OpenSSH ECDSA public key the site generated itself. Then the kit
        holds no private key and ``start-supernode.sh`` expects the site's own
        key as ``node.key`` in the kit folder.

    Raises
    ------
    ProvisionError
        For an existing site name, a bad name or key, or no federation.
    """
    validate_name(name)
    fed = load_federation(root)
    site_pub = _load_site_public_key(Path(public_key).expanduser()) if public_key is not None else None
    with _locked(fed.root):
        registry = load_registry(fed.root)
        if name in registry["sites"]:
            raise ProvisionError(f"site '{name}' already exists in {fed.registry}: choose another name, or "
                                 f"revoke it first with 'medfed deploy revoke-site {fed.root} {name}'")
        kit = fed.kit(name)
        if kit.exists():
            raise ProvisionError(f"kit folder {kit} exists but '{name}' is not in the registry: move the folder "
                                 "away, then try again")
        if site_pub is None:
            private, pub_line = node_key_pair(name)
        else:
            private, pub_line = None, f"{site_pub} medfed-site-{name}"
        fp = key_fingerprint(pub_line)
        for other, entry in registry["sites"].items():
            if entry.get("fingerprint") == fp:
                raise ProvisionError(f"this public key is already site '{other}''s key: each site needs its own key")
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=kit.parent))
        try:
            os.chmod(staging, 0o700)
            if private is not None:
                _write(staging / "node.key", private, 0o600)
            _write_text(staging / "node.pub", pub_line + "\n")
            _write(staging / "ca.pem", fed.ca_cert.read_bytes())
            _write_text(staging / "node-config.toml", NODE_CONFIG.format(site=name, placeholder=DATA_PATH_PLACEHOLDER))
            _write_text(staging / "start-supernode.sh", SUPERNODE_SCRIPT.format(
                site=name, name=fed.name, address=shlex.quote(str(fed.superlink)), env=FLWR_ENV,
                placeholder=DATA_PATH_PLACEHOLDER), 0o755)
            _write_text(staging / "README.md", KIT_README.format(
                site=name, name=fed.name, address=fed.superlink, fingerprint=fp))
            os.replace(staging, kit)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        registry["sites"][name] = {
            "fingerprint": fp, "public-key": pub_line, "node-id": None,
            "added-at": _iso(_now()), "key-generated-by": "medfed" if private is not None else "site",
        }
        _write_json(fed.registry, registry)
    logger.debug("site %s added to federation %s (key %s)", name, fed.name, fp)
    return SiteKit(name=name, kit=kit, fingerprint=fp, public_key=kit / "node.pub", has_private_key=private is not None)


def record_node_id(root: str | Path, name: str, node_id: int) -> None:
    """Record the node id the SuperLink gave site ``name`` at registration."""
    fed = load_federation(root)
    with _locked(fed.root):
        registry = load_registry(fed.root)
        entry = _site_entry(registry, name, fed)
        entry["node-id"] = int(node_id)
        entry["registered-at"] = _iso(_now())
        _write_json(fed.registry, registry)


def _site_entry(registry: dict[str, Any], name: str, fed: Federation) -> dict[str, Any]:
    entry = registry["sites"].get(name)
    if entry is None:
        known = ", ".join(sorted(registry["sites"])) or "none"
        raise ProvisionError(f"unknown site '{name}' in federation '{fed.name}' (sites: {known}); "
                             "see 'medfed deploy list'")
    return entry


@dataclass(frozen=True)
class RevokedSite:
    """A revoked site: what the SuperLink must now refuse."""

    name: str
    fingerprint: str
    node_id: int | None
    moved_to: Path | None


def revoke_site(root: str | Path, name: str) -> RevokedSite:
    """Remove site ``name`` from the registry and move its kit to ``revoked/``.

    The SuperLink still accepts the key until it is unregistered there
    (``flwr supernode unregister NODE_ID``; the CLI does it with
    ``--unregister``). The name can then be given to a new kit.

    Raises
    ------
    ProvisionError
        For an unknown site.
    """
    validate_name(name)
    fed = load_federation(root)
    with _locked(fed.root):
        registry = load_registry(fed.root)
        entry = _site_entry(registry, name, fed)
        stamp = _now()
        moved: Path | None = None
        kit = fed.kit(name)
        if kit.exists():
            moved = fed.root / "revoked" / f"{name}-{stamp.strftime('%Y%m%dT%H%M%SZ')}"
            os.replace(kit, moved)
        del registry["sites"][name]
        registry.setdefault("revoked", []).append({
            "name": name, "fingerprint": entry["fingerprint"], "public-key": entry["public-key"],
            "node-id": entry.get("node-id"), "revoked-at": _iso(stamp),
        })
        _write_json(fed.registry, registry)
    logger.debug("site %s revoked in federation %s", name, fed.name)
    return RevokedSite(name=name, fingerprint=entry["fingerprint"], node_id=entry.get("node-id"), moved_to=moved)

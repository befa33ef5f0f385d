"""``medfed deploy``: provision a hospital federation (CA, SuperLink TLS, one startup kit per site).

Only parses arguments and delegates to :mod:`shared.provision` (files, keys,
certificates) and :mod:`simulation.deploy_admin` (calls to the running
SuperLink). Output names files, fingerprints and node ids only: it never
holds key material, so it can be pasted into a log or a ticket. Exit codes:
0 done, 1 the SuperLink could not do its part (the exact command to run
later is printed), 2 a request that cannot be done as given.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from shared.errors import UserError

if TYPE_CHECKING:
    from shared.provision import Federation

__all__ = ["add_deploy_parser"]


def add_deploy_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``deploy`` command (``init``, ``add-site``, ``register``, ``revoke-site``, ``list``).

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        What ``parser.add_subparsers()`` returned; ``args.func(args)`` then
        runs the chosen sub-command and returns its exit code.
    """
    deploy = subparsers.add_parser(
        "deploy",
        help="provision a hospital federation: CA, SuperLink TLS, site startup kits",
        description=(
            "Provision a federation of hospital sites with TLS and SuperNode authentication on: "
            "'init' creates the federation folder (CA, SuperLink certificate and start script, Flower CLI "
            "connection), 'add-site' one startup kit per hospital, 'revoke-site' shuts a site out."
        ),
    )
    sub = deploy.add_subparsers(dest="deploy_command", metavar="SUBCOMMAND")
    sub.required = True

    p = sub.add_parser("init", help="create a federation folder",
                       description="Create DIR with a CA, the SuperLink's TLS certificate (signed by the CA), "
                                   "the SuperLink start script (TLS + SuperNode authentication), the Flower CLI "
                                   "connection for 'flwr run' and an empty sites registry.")
    p.add_argument("dir", help="the federation folder to create (must not exist, or be empty)")
    p.add_argument("--superlink", required=True, metavar="HOST:PORT",
                   help="address where sites and 'flwr run' reach the SuperLink, e.g. fl.hospital.org:8000")
    p.add_argument("--san", action="append", default=[], metavar="NAME_OR_IP",
                   help="another DNS name or IP address of the SuperLink for its certificate; repeatable "
                        "(127.0.0.1 is always included: Flower's SuperLink connects to itself there)")
    p.add_argument("--name", default=None, help="federation name (default: the folder's name)")
    p.set_defaults(func=_cmd_init)

    p = sub.add_parser("add-site", help="create a hospital's startup kit and register its key",
                       description="Create the site's authentication key pair and its kit folder "
                                   "(DIR/sites/NAME) and record NAME <-> public key in the sites registry.")
    p.add_argument("dir", help="the federation folder")
    p.add_argument("name", help="the site's name, e.g. hospital-a (lowercase letters, digits, hyphens)")
    p.add_argument("--public-key", default=None, metavar="FILE",
                   help="use this OpenSSH ECDSA public key, made by the site itself (its private key then "
                        "never leaves the site), instead of generating a key pair")
    p.add_argument("--register", action="store_true",
                   help="register the key with the running SuperLink now (flwr supernode register)")
    p.set_defaults(func=_cmd_add_site)

    p = sub.add_parser("register", help="register sites' keys with the running SuperLink",
                       description="Register every site not registered yet (or the named ones) with the "
                                   "running SuperLink, and record their node ids.")
    p.add_argument("dir", help="the federation folder")
    p.add_argument("names", nargs="*", help="sites to register (default: all not yet registered)")
    p.set_defaults(func=_cmd_register)

    p = sub.add_parser("revoke-site", help="remove a site and make the SuperLink refuse its key",
                       description="Remove the site from the registry (its kit moves to DIR/revoked/) and "
                                   "unregister its key at the SuperLink, so its SuperNode is refused.")
    p.add_argument("dir", help="the federation folder")
    p.add_argument("name", help="the site to revoke")
    p.add_argument("--unregister", action="store_true",
                   help="unregister the key at the running SuperLink now (flwr supernode unregister)")
    p.set_defaults(func=_cmd_revoke)

    p = sub.add_parser("list", help="list the federation's sites",
                       description="List the sites of the registry with key fingerprints and node ids.")
    p.add_argument("dir", help="the federation folder")
    p.set_defaults(func=_cmd_list)


def _fail(exc: Exception) -> int:
    print(f"medfed deploy: {exc}", file=sys.stderr)
    return 2


def _cmd_init(args: argparse.Namespace) -> int:
    from shared.provision import init_federation

    try:
        fed = init_federation(args.dir, args.superlink, args.san, name=args.name)
    except UserError as exc:
        return _fail(exc)
    print(f"medfed deploy: federation '{fed.name}' created in {fed.root}")
    print(f"  SuperLink          {fed.superlink}  (certificate names: {', '.join(fed.sans)})")
    print(f"  CA fingerprint     {fed.ca_fingerprint}")
    print(f"  start the SuperLink  {fed.superlink_script}")
    print(f"  flwr CLI           FLWR_HOME={fed.flwr_home} flwr run . {fed.name} --stream "
          f"--run-config \"site-registry='{fed.registry}'\"")
    print("                     (site-registry: the server names each node by the site its key is registered to, "
          "and ignores nodes whose key is not in the registry)")
    print(f"                     (or copy the [superlink.{fed.name}] table of {fed.flwr_home / 'config.toml'} "
          "into ~/.flwr/config.toml)")
    print(f"  next               medfed deploy add-site {fed.root} <site-name> [--register]")
    print(f"Private keys: {fed.root / 'ca' / 'ca.key'} and {fed.root / 'superlink' / 'superlink.key'} "
          "(mode 0600) never leave this folder.")
    return 0


def _register_and_report(fed: Federation, name: str) -> int:
    from shared.provision import record_node_id
    from simulation.deploy_admin import FlowerAdminError, register_command, register_site, shell_line

    try:
        node_id = register_site(fed, name)
    except FlowerAdminError as exc:
        print(f"medfed deploy: {exc}", file=sys.stderr)
        print(f"  register '{name}' later with:  medfed deploy register {fed.root} {name}", file=sys.stderr)
        print(f"  or:  {shell_line(fed, register_command(fed, name))}", file=sys.stderr)
        return 1
    record_node_id(fed.root, name, node_id)
    print(f"  registered         '{name}' is node {node_id} at {fed.superlink}")
    return 0


def _cmd_add_site(args: argparse.Namespace) -> int:
    from shared.provision import add_site, load_federation
    from simulation.deploy_admin import register_command, shell_line

    try:
        fed = load_federation(args.dir)
        site = add_site(fed.root, args.name, public_key=args.public_key)
    except UserError as exc:
        return _fail(exc)
    print(f"medfed deploy: site '{site.name}' added to federation '{fed.name}'")
    print(f"  kit                {site.kit}  (mode 0700; start with start-supernode.sh, see its README.md)")
    print(f"  key fingerprint    {site.fingerprint}")
    code = 0
    if args.register:
        code = _register_and_report(fed, site.name)
    else:
        print(f"  not registered yet: with the SuperLink running, run  medfed deploy register {fed.root} {site.name}")
        print(f"                     or  {shell_line(fed, register_command(fed, site.name))}")
    if site.has_private_key:
        print("Send the kit folder to the site over a secure channel: it holds the site's private key "
              "(node.key, mode 0600). Then delete the copy here.")
    else:
        print("The kit holds no private key: the site puts its own key in the kit as node.key (mode 0600).")
    return code


def _cmd_register(args: argparse.Namespace) -> int:
    from shared.provision import load_federation, load_registry, validate_name

    try:
        fed = load_federation(args.dir)
        sites = load_registry(fed.root)["sites"]
        for n in args.names:
            validate_name(n)
            if n not in sites:
                raise UserError(f"unknown site '{n}' (sites: {', '.join(sorted(sites)) or 'none'})")
    except UserError as exc:
        return _fail(exc)
    todo = args.names or [n for n, e in sorted(sites.items()) if e.get("node-id") is None]
    if not todo:
        print("medfed deploy: every site is registered already")
        return 0
    print(f"medfed deploy: registering {', '.join(todo)} at {fed.superlink}")
    codes = [_register_and_report(fed, n) for n in todo]
    return max(codes)


def _cmd_revoke(args: argparse.Namespace) -> int:
    from shared.provision import load_federation, revoke_site
    from simulation.deploy_admin import FlowerAdminError, list_nodes, shell_line, unregister_command, unregister_node

    try:
        fed = load_federation(args.dir)
        revoked = revoke_site(fed.root, args.name)
    except UserError as exc:
        return _fail(exc)
    print(f"medfed deploy: site '{revoked.name}' removed from the registry (key {revoked.fingerprint})")
    if revoked.moved_to is not None:
        print(f"  its kit moved to   {revoked.moved_to}")
    node_id = revoked.node_id
    if args.unregister:
        try:
            if node_id is None:  # registered by hand: find the node by its key
                matches = [n for n in list_nodes(fed) if n.fingerprint == revoked.fingerprint
                           and n.status != "unregistered"]
                if not matches:
                    print(f"  the SuperLink at {fed.superlink} holds no active registration of this key: "
                          "nothing to unregister")
                    return 0
                node_id = matches[0].node_id
            unregister_node(fed, node_id)
        except FlowerAdminError as exc:
            print(f"medfed deploy: {exc}", file=sys.stderr)
            cmd = (shell_line(fed, unregister_command(fed, node_id)) if node_id is not None
                   else f"FLWR_HOME={fed.flwr_home} flwr supernode list {fed.name}  (then unregister its node id)")
            print(f"  THE SUPERLINK STILL ACCEPTS THIS KEY until you run:  {cmd}", file=sys.stderr)
            return 1
        print(f"  unregistered       node {node_id} at {fed.superlink}: its SuperNode is refused from now on")
        return 0
    if node_id is not None:
        print("  The SuperLink still accepts this key until you run:  "
              f"{shell_line(fed, unregister_command(fed, node_id))}")
    else:
        print("  medfed never registered this key. If it was registered by hand, the SuperLink accepts it until "
              f"you unregister its node:  FLWR_HOME={fed.flwr_home} flwr supernode list {fed.name}  then  "
              f"flwr supernode unregister NODE_ID {fed.name}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from shared.provision import load_federation, load_registry

    try:
        fed = load_federation(args.dir)
        reg = load_registry(fed.root)
    except UserError as exc:
        return _fail(exc)
    print(f"federation '{fed.name}' at {fed.superlink}: {len(reg['sites'])} site(s), "
          f"{len(reg.get('revoked', []))} revoked")
    for name, e in sorted(reg["sites"].items()):
        node = e.get("node-id")
        print(f"  {name:<24} {e['fingerprint']}  {'node ' + str(node) if node is not None else 'not registered'}")
    for e in reg.get("revoked", []):
        print(f"  {e['name']:<24} {e['fingerprint']}  revoked {e['revoked-at']}")
    return 0

"""The ``medfed`` commands, one module each.

Every module registers its command on the ``medfed`` parser with one
function, ``register(subparsers)``: it calls ``subparsers.add_parser(...)``,
adds the options and ``set_defaults(func=run)``, where ``run(args) -> int``
returns the exit code. :mod:`simulation.cli` only assembles them, from its
:data:`~simulation.cli.COMMANDS` list.

Adding a command
----------------
1. Write ``simulation/commands/<name>.py`` (or any module) with
   ``register(subparsers)`` as above.
2. Add one line, ``"<module>:<function>"``, to ``COMMANDS`` in
   ``simulation/cli.py``, e.g. ``"simulation.deploy_cli:add_deploy_parser"``.
3. Keep the module import-light: ``medfed --help`` builds every parser, so
   torch, MONAI, Flower & co. are imported inside ``run``, never at module
   level (``tests/test_cli.py`` checks this for every command).
4. Do not catch errors to print them: raise a :class:`shared.errors.UserError`
   (or a subclass) for anything the user can fix; ``medfed`` prints it as one
   line ``medfed <command>: <message>`` and exits with code 2. A
   :class:`simulation.runner.SimulationError` exits with 1; anything else is a
   bug and shows its traceback. Return 0, or the command's documented code.
5. Format numbers with :func:`shared.formatting.fmt_metric` and document the
   command in README.md.
"""

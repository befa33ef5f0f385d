"""``python -m simulation ...`` runs the ``medfed`` command line (same as the ``medfed`` script)."""

from simulation.cli import main

raise SystemExit(main())

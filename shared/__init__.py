"""medfed core: framework-free code shared by the server and the client.

Nothing in this package imports Flower; ``server/`` and ``client/`` are thin
adapters around it.
"""

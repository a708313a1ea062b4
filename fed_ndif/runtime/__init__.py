"""Starting and supervising Flower's processes: SuperLinks, SuperNodes, ``flwr run``, warm pools.

Kept apart from the model, training and experiment code so that those never import process
machinery, and so that the simulation and the real deployment start their SuperLink one way.

- :mod:`.processes`: launching, stopping and finding the processes we start.
- :mod:`.superlink`: the one way to start a SuperLink and run the app on it.
- :mod:`.coordinator`: ``fed-ndif coordinator`` (TLS SuperLink, site keys, the run).
- :mod:`.site`: ``fed-ndif site`` (a site's SuperNode, its warm pool).
- :mod:`.supervisor`: keeps a site's SuperNode running across coordinator restarts and crashes.
- :mod:`.reach`: why a site cannot reach its coordinator; releasing a crashed node's connection.
- :mod:`.prefork`: the sites' warm ClientApp pool.
- :mod:`.simulation`: a Flower simulation of the federation on 127.0.0.1.
"""

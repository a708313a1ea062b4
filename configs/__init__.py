"""Hydra config tree of fed-ndif (installed as the package ``fed_ndif.configs``)."""

"""The coordinator: checked FedAvg, global checkpoints and resume (fed_ndif.server.app)."""

"""The site client: Flower ClientApp over the single-site trainer (fed_ndif.client.app)."""

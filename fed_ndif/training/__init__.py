"""One site's train / evaluate / fine-tune loop with checkpoints; Flower-free (reused by the
Flower ClientApp)."""

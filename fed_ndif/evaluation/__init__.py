"""Evaluation: whole-volume image metrics, lesion metrics, the multi-site comparison report."""

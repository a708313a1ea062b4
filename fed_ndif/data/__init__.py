"""PET data: volumes, synthetic sites, file formats, manifests. No training code, no Flower."""

"""``fed-ndif simulate``: synthetic sites + a Flower simulation of the federation, one run folder.

This module makes (or checks) the sites; the stages after them (federations, personalization,
baselines, evaluation, report) and the run folder's layout are in :mod:`fed_ndif.experiment`,
and the Flower simulation itself in :mod:`fed_ndif.runtime.simulation`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

from fed_ndif.config import load_config
from fed_ndif.data.sites import SITE_CONFIG_KEYS, write_sites
from fed_ndif.errors import FedNdifError
from fed_ndif.experiment import check_engine, run_experiment

log = logging.getLogger(__name__)

__all__ = ["simulate"]


def simulate(overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Make the sites if missing, then every stage of the comparison; return report.md."""
    cfg = load_config("simulate", overrides)
    check_engine(cfg)  # before anything is written
    out_dir = Path(cfg.out_dir).resolve()
    sites_dir = out_dir / "sites"
    out_dir.mkdir(parents=True, exist_ok=True)
    site_cfg = OmegaConf.create({key: cfg[key] for key in SITE_CONFIG_KEYS if key in cfg})
    if sites_dir.exists():
        made = OmegaConf.load(sites_dir / "config.yaml") if (
            sites_dir / "config.yaml").is_file() else None
        if made != site_cfg:
            raise FedNdifError(f"{sites_dir} holds sites made with other settings; use a new "
                               "out_dir or delete that folder")
        log.info("using the existing sites in %s", sites_dir)
    else:
        write_sites(sites_dir, cfg)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    report = run_experiment(cfg, out_dir, sites_dir)
    log.info("report: %s", report)
    return report

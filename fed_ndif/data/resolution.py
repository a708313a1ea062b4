"""A site's image resolution (FWHM in mm along z, y, x), for lesion insertion.

A simulated site's folder holds the scanner profile it was made with (``scanner.json``); the
reconstructed resolution is the system PSF and the post-filter added in quadrature. A real
site states its own in the same file: ``{"resolution_fwhm_mm": 6.5}`` or ``[z, y, x]`` (from
the scanner's acceptance tests, e.g. NEMA NU 2, combined with the reconstruction's filter).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from fed_ndif.errors import FedNdifError

RESOLUTION_FILE = "scanner.json"
STATED = "resolution_fwhm_mm"


def site_resolution(site_dir: Path) -> tuple[float, float, float] | None:
    """The site's FWHM (z, y, x) in mm, or None when its folder does not say."""
    path = Path(site_dir) / RESOLUTION_FILE
    if not path.is_file():
        return None
    try:
        profile = json.loads(path.read_text())
        if STATED in profile:
            value = profile[STATED]
            fwhm = (value,) * 3 if isinstance(value, int | float) else tuple(value)
        else:
            post = float(profile.get("postfilter_fwhm_mm") or 0.0)
            fwhm = (math.hypot(float(profile["axial_fwhm_mm"]), post),
                    math.hypot(float(profile["psf_fwhm_mm"]), post),
                    math.hypot(float(profile["psf_fwhm_mm"]), post))
        fwhm = tuple(float(v) for v in fwhm)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise FedNdifError(f"{path}: cannot read the site's resolution ({type(exc).__name__}: "
                           f"{exc}); give \"{STATED}\": FWHM_MM or [Z, Y, X]") from None
    if len(fwhm) != 3 or not all(0 < v < 50 for v in fwhm):
        raise FedNdifError(f"{path}: {STATED} must be one FWHM or three (z, y, x), each "
                           f"between 0 and 50 mm, got {list(fwhm)}")
    return fwhm  # type: ignore[return-value]

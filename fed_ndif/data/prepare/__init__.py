"""A hospital's DICOM export -> a site folder (SUV NIfTI pairs and a manifest), with no PHI.

Split by role: :mod:`.scan` reads the export's headers and groups its PET series by study,
:mod:`.pairing` pairs each low-count series with its full-count series (frame durations,
counts, or the user's pairs file, never a guess), :mod:`.privacy` keeps identities out of what
is written and logged, and :mod:`.site` writes the site folder (staged, resumable).
"""

from fed_ndif.data.prepare.site import PrepareResult, prepare_site

__all__ = ["PrepareResult", "prepare_site"]

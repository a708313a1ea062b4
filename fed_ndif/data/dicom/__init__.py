"""PET DICOM series in (a SUV volume) and derived PET series out.

Split by role: :mod:`.series` finds the PET series in a folder, :mod:`.geometry` stacks its
slices, :mod:`.times` and :mod:`.suv` turn Bq/ml into SUV, :mod:`.read` puts them together, and
:mod:`.header` and :mod:`.write` write a volume back as a series. See ``docs/dicom.md``.
"""

from fed_ndif.data.dicom.header import SyntheticPatient
from fed_ndif.data.dicom.read import PetSeriesInfo, read_pet_series
from fed_ndif.data.dicom.suv import check_weight_and_dose
from fed_ndif.data.dicom.write import write_pet_series

__all__ = [
    "PetSeriesInfo",
    "SyntheticPatient",
    "check_weight_and_dose",
    "read_pet_series",
    "write_pet_series",
]

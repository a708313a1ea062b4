"""When the scan started and when the tracer was injected, from DICOM dates and times.

The dose decay between the two sets every SUV, so a malformed value is an error that names the
attribute, and a time without a date is placed on the day that keeps it next to its reference.
"""

from __future__ import annotations

import logging
from datetime import date, datetime, time, timedelta
from typing import Any

from pydicom.dataset import Dataset
from pydicom.valuerep import DA, DT, TM

from fed_ndif.data.dicom.series import DicomFile, one_line
from fed_ndif.errors import FedNdifError

log = logging.getLogger(__name__)


def _why(exc: ValueError) -> str:
    """Why a date or time could not be read, without the value (a date can identify)."""
    return f"not a valid DICOM date/time; {one_line(exc)}"


def _date(value: Any) -> date | None:
    """A DA value; ISO dashes and dots are allowed and characters past the eighth ignored."""
    text = str(value or "").strip().replace(".", "").replace("-", "")
    if not text:
        return None
    try:
        # A seven-character value has a one-digit day (how these values have always been read).
        parsed = DA(text[:6] + text[6:8].rjust(2, "0"))
    except ValueError:
        if len(text) == 8:
            raise
        parsed = DA(text)  # pydicom's error message for a value of the wrong length
    return date(parsed.year, parsed.month, parsed.day)


def _time(value: Any) -> time | None:
    """A TM value; colons (HH:MM:SS) are allowed."""
    return TM(str(value or "").strip().replace(":", ""))


def _datetime(value: Any) -> datetime | None:
    parsed = DT(str(value or "").strip())
    if parsed is None:
        return None
    # A UTC offset, if any, is assumed to be the local time of the other attributes.
    return datetime.combine(parsed.date(), parsed.time())


def _combine(day: date | None, clock: time | None, near: datetime | None = None
             ) -> datetime | None:
    """Date + time; without a date, the time on ``near``'s day within 12 h of ``near``."""
    if clock is None:
        return None
    if day is None:
        if near is None:
            return None
        day = near.date()
        result = datetime.combine(day, clock)
        if result - near > timedelta(hours=12):
            result -= timedelta(days=1)
        elif near - result > timedelta(hours=12):
            result += timedelta(days=1)
        return result
    return datetime.combine(day, clock)


def _timestamp(f: DicomFile, what: str, date_kw: str, time_kw: str) -> datetime | None:
    try:
        day = _date(f.header.get(date_kw))
        clock = _time(f.header.get(time_kw))
    except ValueError as exc:
        raise FedNdifError(f"{f.path}: {what} is malformed ({_why(exc)})") from exc
    return _combine(day, clock)


def slice_acquisition(f: DicomFile, reference: datetime | None) -> datetime | None:
    """When the slice's frame started (AcquisitionDateTime, or AcquisitionDate/Time)."""
    try:
        combined = _datetime(f.header.get("AcquisitionDateTime"))
        if combined is not None:
            return combined
        day = _date(f.header.get("AcquisitionDate"))
        clock = _time(f.header.get("AcquisitionTime"))
    except ValueError as exc:
        raise FedNdifError(f"{f.path}: AcquisitionDate/Time is malformed ({_why(exc)})"
                           ) from exc
    return _combine(day, clock, reference)


def scan_start(files: list[DicomFile]) -> tuple[datetime, str]:
    """The START decay reference: SeriesDate/Time, or the earliest acquisition (QIBA rule)."""
    series = _timestamp(files[0], "SeriesDate/SeriesTime", "SeriesDate", "SeriesTime")
    acquisitions = [t for t in (slice_acquisition(f, series) for f in files) if t is not None]
    earliest = min(acquisitions) if acquisitions else None
    if series is not None and (earliest is None or series <= earliest):
        return series, "SeriesDate/SeriesTime"
    if earliest is None:
        raise FedNdifError("SeriesDate/SeriesTime (0008,0021/0031) and AcquisitionDate/Time "
                           "(0008,0022/0032) are missing: the scan time, needed to decay-correct "
                           "the dose, is unknown")
    if series is not None:
        log.warning("SeriesTime is later than the earliest AcquisitionTime (series re-created "
                    "after the scan?); decaying the dose to the earliest AcquisitionDate/Time")
    return earliest, "earliest AcquisitionDate/AcquisitionTime"


def injection_time(item: Dataset, scan: datetime) -> datetime:
    """The injection (RadiopharmaceuticalStartDateTime, or StartTime on the scan's day)."""
    try:
        full = _datetime(item.get("RadiopharmaceuticalStartDateTime"))
        clock = _time(item.get("RadiopharmaceuticalStartTime"))
    except ValueError as exc:
        raise FedNdifError(f"RadiopharmaceuticalStartTime/StartDateTime is malformed "
                           f"({_why(exc)})") from exc
    if full is not None:
        return full
    if clock is None:
        raise FedNdifError(
            "RadiopharmaceuticalStartTime (0018,1072) and RadiopharmaceuticalStartDateTime "
            "(0018,1078) are missing: the injection time, needed to decay-correct the dose, is "
            "unknown")
    injected = datetime.combine(scan.date(), clock)
    if injected > scan:  # injected before midnight, scanned after
        injected -= timedelta(days=1)
    return injected

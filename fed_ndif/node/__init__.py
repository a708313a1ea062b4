"""The DICOM node (``fed-ndif serve``): a C-STORE receiver next to the scanner or PACS that
denoises each PET series it is sent and sends the derived series on, losing nothing.

:mod:`.spool` keeps the queue on disk, :mod:`.receive` is the storage SCP, :mod:`.deliver` the
C-STORE to the destination, :mod:`.config` the checked settings and :mod:`.service` the loop.
"""

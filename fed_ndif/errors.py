"""The one exception type user-facing commands turn into a single clear line on stderr."""


class FedNdifError(Exception):
    """A problem with the user's input, configuration or files (not a bug in fed-ndif).

    The message must name the file, setting or value at fault and must not contain
    patient-identifying information.
    """

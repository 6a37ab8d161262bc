"""User-facing errors. The CLI prints them as one line and exits non-zero; nothing else is caught."""


class SFMPError(Exception):
    """A problem with the user's input (files, flags, model, checkpoint)."""


class FormatError(SFMPError):
    """A checkpoint that does not match the SFMP format; the message names layer and tensor."""

"""User-facing errors. The CLI prints them as one line and exits non-zero; nothing else is caught."""


class SFMPError(Exception):
    """A problem with the user's input (files, flags, model, checkpoint)."""


class FormatError(SFMPError):
    """A checkpoint that does not match the SFMP format; the message names layer and tensor."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """A library's exception message as one line (some span several, with the cause last)."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    text = text or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."

"""Errors that become a clip's `status="error"` row instead of stopping the run."""


class ClipError(Exception):
    """A problem with one clip's input or processing, stated in one sentence."""


class ClipTimeout(ClipError):
    """The clip ran past `resources.clip_timeout_s`."""


def one_sentence(exc: BaseException) -> str:
    """A one-line, one-sentence description of an exception, for an error row."""
    if isinstance(exc, ClipError):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}"
    text = " ".join(text.split())
    if len(text) > 400:
        text = text[:397] + "..."
    if text and text[-1] not in ".!?":
        text += "."
    return text

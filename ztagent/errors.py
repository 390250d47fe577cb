"""The error families shared by every part of ztagent.

`LocalError` is our side's problem (bad flag, bad file, misuse of an API); `RemoteError` is a
peer's violation and carries the code to answer it with on the wire. Either ends one operation,
one connection or one config object with a clear message, never the process.
"""


class ZtagentError(Exception):
    """Base of every error ztagent raises on purpose; the CLI prints it as one line."""


class LocalError(ZtagentError):
    """Our side: bad configuration, bad input file, or an API used wrongly."""


class RemoteError(ZtagentError):
    """The peer broke the protocol or refused us; `code` is the wire code that goes with it."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code

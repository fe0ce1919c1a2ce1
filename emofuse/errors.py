"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad config, missing file, locked store, mismatched cache: the user can fix it."""


class PrepareError(Exception):
    """One utterance cannot be prepared for an encoder (unreadable media, no face, empty text).

    The pipeline records it in failures.jsonl with `stage` and `reason` and goes on.
    """

    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason

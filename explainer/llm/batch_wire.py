"""What the Batch API client (batch_api.py) and the folder standing in for it (batch_files.py)
share: a call the endpoint refused, with its HTTP status. batch.py decides per call whether a
refusal is a user error (most) or an answer (no batch list to adopt from; a batch the endpoint
forgot, sent again)."""

from __future__ import annotations


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

"""Request ids: one per request, in the `X-Request-Id` header, the production log and feedback.
They become parts of store keys, so only a safe, bounded form is accepted from a client."""

from __future__ import annotations

import re
import uuid
from typing import Annotated

from pydantic import StringConstraints

MAX_LENGTH = 128
PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"
"""Letters, digits, '.', '_', ':' and '-', starting with a letter or digit (a UUID fits)."""
_COMPILED = re.compile(PATTERN)

RequestId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_LENGTH, pattern=PATTERN)]
"""A request id as a pydantic field."""

RULE = f"1-{MAX_LENGTH} letters, digits, '.', '_', ':' or '-', starting with a letter or digit"
"""The rule in words, for error messages."""


def is_valid(request_id: str) -> bool:
    return 0 < len(request_id) <= MAX_LENGTH and _COMPILED.match(request_id) is not None


def new_request_id() -> str:
    return uuid.uuid4().hex

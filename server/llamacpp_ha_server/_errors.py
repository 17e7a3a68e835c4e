from __future__ import annotations

import json

__all__ = ["error_body"]


def error_body(message: str, error_type: str, code: str) -> bytes:
    """An error in OpenAI's shape."""
    return json.dumps({"error": {"message": message, "type": error_type, "code": code}}).encode()

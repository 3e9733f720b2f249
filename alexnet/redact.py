"""Secrets never reach a store: every string the project records (params, tags, the failure reason,
the command line, a trial's attributes, trials.csv) and every store URI it prints goes through
`redact`.

Masked: the password in `scheme://user:PASSWORD@host`, the token in `https://TOKEN@host`, the value
after `--password`, `--token`, `--secret` or `--api-key` (with a space or `=`), and the value of any
`KEY=value` or `"key": "value"` whose key names a password, token, secret or key (`PGPASSWORD=`,
`MLFLOW_TRACKING_TOKEN=`, `access_token=`, `api_key=` ...).
"""

from __future__ import annotations

import re

_SECRET_WORD = r"(?:password|passwd|pwd|token|secret|api[_-]?key|access[_-]?key|private[_-]?key)"
_PATTERNS = [
    # scheme://user:password@host (may over-mask `host:port/a@b`: harmless)
    (re.compile(r"(://[^/\s:@]*):[^\s@/]*@"), r"\1:***@"),
    # https://TOKEN@host: a bare user part on a web URL is a token (GitHub, Hugging Face, ...)
    (re.compile(r"(?i)(\bhttps?://)[^/\s:@]+@"), r"\1***@"),
    # --password x, --token=x
    (re.compile(rf"(?i)(--{_SECRET_WORD}[\w-]*)(=|\s+)(?!-)\S+"), r"\1\2***"),
    # KEY=value, "key": "value", key: value
    (re.compile(rf"(?i)(\b\w*{_SECRET_WORD}\w*[\"']?\s*(?:=|:\s*)\s*[\"']?)(?!\*\*\*)[^\s\"'&,;}}]+"), r"\1***"),
]


def redact(text: str) -> str:
    """`text` with every secret it holds replaced by `***`."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def redact_tags(tags: dict) -> dict[str, str]:
    return {str(k): redact(str(v)) for k, v in tags.items()}


def first_line(error: BaseException, limit: int = 200) -> str:
    """An error as one line for a message: its type and the first line of its text, redacted."""
    text = str(error).strip()
    text = text.splitlines()[0][:limit] if text else ""
    return f"{type(error).__name__}: {redact(text)}" if text else type(error).__name__

"""Credentials out of everything we print, log or save: `redact` masks the password (or a bare user, which is
often a token) of every `scheme://user:password@` and the value of every token/password-like query parameter
in a string. URIs keep their shape, so a redacted line still says which server was meant.

Only copies are redacted: the Tracker connects with the real URI. MLflow also reads credentials from
$MLFLOW_TRACKING_USERNAME / $MLFLOW_TRACKING_PASSWORD / $MLFLOW_TRACKING_TOKEN, which never reach a file.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
# userinfo cannot hold '/', '@' or whitespace; the password part is optional
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:@/\s]*)(?::(?P<password>[^@/\s]*))?@")
# ?token=..., &api_key=..., &X-Amz-Signature=..., ;password=... (over-masking a harmless value costs nothing)
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&;][^=&#\s]*(?:token|passw|pwd|secret|key|auth|credential|signature|sig)[^=&#\s]*)=(?P<value>[^&#\s]*)",
    re.IGNORECASE,
)


def _userinfo(match: re.Match) -> str:
    if match.group("password") is not None:
        return f"{match.group('scheme')}{match.group('user')}:{MASK}@"
    return f"{match.group('scheme')}{MASK}@"


def redact(text: str) -> str:
    """`text` with every credential in the URIs it holds replaced by `***`."""
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(_userinfo, text)
    return _SECRET_QUERY.sub(lambda m: f"{m.group('key')}={MASK}", text)


def redact_values(obj: Any) -> Any:
    """A copy of a dict / list tree (a config as a dict, MLflow params) with every string redacted."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_values(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_values(v) for v in obj)
    return obj


def is_redacted(text: str) -> bool:
    """True when `text` went through `redact` and lost a credential (it cannot be used to connect)."""
    return MASK in text


def without_userinfo(uri: str) -> str:
    """`uri` with any `user:password@` dropped entirely (a browser asks for the login itself)."""
    return _USERINFO.sub(lambda m: m.group("scheme"), uri)

"""Secret redaction: what may leave the process (config.yaml, logger parameters, logs) never holds one."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

MASK = "***"

# A key holding one of these words names a secret (matched case-insensitively, anywhere in the key).
SECRET_KEY_WORDS = ("token", "password", "passwd", "secret", "api_key", "apikey", "credential", "auth")

# Words that contain a secret word but name harmless settings ("max_tokens", "tokenizer", "author").
_HARMLESS_WORDS = re.compile(r"tokeniz\w*|tokens(?:_|$)|author(?!i[sz])")
_SECRET_KEY = re.compile("|".join(re.escape(word) for word in SECRET_KEY_WORDS))

# Credentials before a URL's host: scheme://user:password@host, and scheme://token@host. The scheme may
# be followed by a single slash: a URL that went through pathlib.Path (a run_dir) reads https:/bob:pw@host.
# The password runs to the last "@" before the host, since one with an unencoded "@" or "/" is still a
# password (bob:p@ss@host); a port followed by a path (host:8080/@alice) is not one.
_URL_CREDENTIALS = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*:/{1,2})(?P<user>[^\s/:@?#\"'<>]+)"
    r"(?::(?!\d+(?:[/?#]|$))(?P<password>[^\s\"'<>]*))?@(?=[^\s/@\"'<>])"
)
# A user name with no password is a token when it is this long (GitHub, GitLab and Hugging Face tokens
# all are); shorter ones name an account (ssh://git@github.com) and stay.
_MIN_TOKEN_USER_CHARS = 16
# ...?token=abc&page=2 -> ...?token=***&page=2 for query parameters whose name is a secret key.
_QUERY_SECRET = re.compile(r"(?P<head>[?&](?P<name>[^=&#\s]+)=)(?P<value>[^&#\s]+)")
# Query parameters that carry a secret without a secret key word in their name: Google API keys (key=),
# Azure SAS and signed URLs (sig=, X-Amz-Signature=, X-Goog-Signature=), passwords (pwd=).
_SECRET_QUERY_NAME = re.compile(r"(?:^|[_\-.])(?:key|sig|signature|pwd|pass)$", re.IGNORECASE)

# Short values would mask ordinary words everywhere; a real credential is longer than this.
_MIN_ENV_SECRET_CHARS = 6


def is_secret_key(key: str) -> bool:
    """Whether a config or environment key names a secret (``hf_token``, ``DB_PASSWORD``, ``apiKey``).

    Example:
        >>> is_secret_key("WANDB_API_KEY"), is_secret_key("max_tokens")
        (True, False)
    """
    lowered = key.lower().replace("-", "_")
    return bool(_SECRET_KEY.search(_HARMLESS_WORDS.sub("", lowered)))


def redact_text(text: str, known_secrets: Iterable[str] = ()) -> str:
    """Mask URL passwords, secret query parameters and every occurrence of ``known_secrets`` in a string.

    Example:
        >>> redact_text("postgresql://bob:hunter2@db:5432/runs")
        'postgresql://bob:***@db:5432/runs'
        >>> redact_text("https://ghp_0123456789abcdef@github.com/org?key=AIza123")
        'https://***@github.com/org?key=***'
    """
    text = _URL_CREDENTIALS.sub(_mask_credentials, text)
    text = _QUERY_SECRET.sub(lambda m: m["head"] + MASK if _is_secret_query(m["name"]) else m[0], text)
    # Longest first, so a secret that contains another one is masked whole.
    for secret in sorted({s for s in known_secrets if s}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def _mask_credentials(match: re.Match[str]) -> str:
    user = match["user"]
    if len(user) >= _MIN_TOKEN_USER_CHARS:
        user = MASK  # a token as the user name: https://ghp_...@github.com, https://ghp_...:x-oauth-basic@...
    if match["password"] is None:
        return f"{match['head']}{user}@"
    return f"{match['head']}{user}:{MASK}@"


def _is_secret_query(name: str) -> bool:
    return is_secret_key(name) or bool(_SECRET_QUERY_NAME.search(name))


def redact(config: Mapping[str, Any], known_secrets: Iterable[str] = ()) -> dict[str, Any]:
    """Return a copy of ``config`` safe to write or send to a logger.

    Values under secret-looking keys (see ``SECRET_KEY_WORDS``) become ``"***"`` (``None`` and empty
    strings stay, they hold nothing); in every other string, nested dicts and lists included, URL
    passwords, secret query parameters and the ``known_secrets`` (for example ``secret_env_values()``)
    are masked. The input is not modified.

    Example:
        >>> redact({"hf_token": "hf_abc123", "tracking": "https://me:pw@mlflow.example.com", "lr": 0.1})
        {'hf_token': '***', 'tracking': 'https://me:***@mlflow.example.com', 'lr': 0.1}
    """
    secrets = tuple(known_secrets)
    return {key: _redact_value(key, value, secrets) for key, value in config.items()}


def _redact_value(key: Any, value: Any, secrets: tuple[str, ...]) -> Any:
    if isinstance(key, str) and is_secret_key(key) and value not in (None, ""):
        return MASK
    if isinstance(value, Mapping):
        return redact(value, secrets)
    if isinstance(value, list | tuple):
        return [_redact_value(None, item, secrets) for item in value]
    if isinstance(value, str):
        return redact_text(value, secrets)
    return value


def redact_argument(argument: str, known_secrets: Iterable[str] = ()) -> str:
    """One command-line argument, masked: a ``key=value`` override whose key names a secret, and
    whatever :func:`redact_text` masks.

    Example:
        >>> redact_argument("hub_token=hf_abc"), redact_argument("run_dir=https://bob:pw@host/x")
        ('hub_token=***', 'run_dir=https://bob:***@host/x')
    """
    key, sep, _ = argument.partition("=")
    if sep and is_secret_key(key.lstrip("-")):
        return f"{key}={MASK}"
    return redact_text(argument, known_secrets)


def secret_env_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """The values of environment variables whose names look secret (``HF_TOKEN``, ``WANDB_API_KEY``).

    Pass them to ``redact`` so a secret copied from the environment into a config is masked too.

    Example:
        >>> secret_env_values({"HF_TOKEN": "hf_abcdef", "HOME": "/root"})
        ['hf_abcdef']
    """
    environ = os.environ if environ is None else environ
    return [
        value
        for name, value in environ.items()
        if is_secret_key(name) and len(value) >= _MIN_ENV_SECRET_CHARS
    ]


def find_secrets(text: str, secrets: Iterable[str]) -> list[str]:
    """The members of ``secrets`` that occur in ``text`` (empty list: the text is clean).

    Example:
        >>> find_secrets("lr=0.1 token=***", ["hunter2"])
        []
    """
    return [secret for secret in secrets if secret and secret in text]


def find_secrets_in_files(path: str | Path, secrets: Iterable[str]) -> list[tuple[Path, str]]:
    """``(file, secret)`` for each secret found in a file, or in any file under a directory.

    Files are searched as bytes (UTF-8 encoded secrets), so binary stores such as SQLite databases and
    TensorBoard event files are covered too.

    Example:
        >>> find_secrets_in_files("runs/demo", ["hunter2"])  # doctest: +SKIP
        []
    """
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    needles = [(secret, secret.encode()) for secret in secrets if secret]
    found = []
    for file in files:
        data = file.read_bytes()
        found.extend((file, secret) for secret, needle in needles if needle in data)
    return found

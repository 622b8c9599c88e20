"""Secret redaction: config dicts, URLs, query strings, environment values, and the file scanner."""

from __future__ import annotations

import copy

import pytest

from steadyfit.secrets import (
    MASK,
    find_secrets,
    find_secrets_in_files,
    is_secret_key,
    redact,
    redact_text,
    secret_env_values,
)


@pytest.mark.parametrize(
    "key",
    ["token", "hf_token", "HF_TOKEN", "db_password", "passwd", "client_secret", "api_key", "apiKey",
     "wandb-api-key", "aws_credentials", "Authorization", "auth_tokens"],
)  # fmt: skip
def test_secret_keys_are_recognised_case_insensitively(key):
    assert is_secret_key(key)


@pytest.mark.parametrize("key", ["lr", "max_tokens", "num_tokens", "tokenizer", "tokens_per_sec", "author"])
def test_harmless_keys_containing_a_secret_word_are_not_masked(key):
    assert not is_secret_key(key)
    assert redact({key: "value"}) == {key: "value"}


def test_redact_masks_secret_keys_at_any_depth_and_leaves_the_rest_and_the_input_alone():
    config = {
        "lr": 0.001,
        "hf_token": "hf_abcdef123",
        "loggers": ["csv", "mlflow"],
        "tracking": {"uri": "https://mlflow.example.com", "password": "hunter22", "retries": 3},
        "callbacks": [{"name": "notify", "api_key": "k-123456"}],
        "empty_token": "",
        "unset_secret": None,
    }
    original = copy.deepcopy(config)

    redacted = redact(config)

    assert redacted == {
        "lr": 0.001,
        "hf_token": MASK,
        "loggers": ["csv", "mlflow"],
        "tracking": {"uri": "https://mlflow.example.com", "password": MASK, "retries": 3},
        "callbacks": [{"name": "notify", "api_key": MASK}],
        "empty_token": "",
        "unset_secret": None,
    }
    assert config == original


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://bob:hunter2@db:5432/runs", "postgresql://bob:***@db:5432/runs"),
        ("https://user:p%40ss@example.com/x", "https://user:***@example.com/x"),
        ("see s3://u:pw@bucket/a and http://v:pw2@host", "see s3://u:***@bucket/a and http://v:***@host"),
        ("https://host/api?token=abc123&page=2", "https://host/api?token=***&page=2"),
        ("https://host/x?page=2&api_key=zz#top", "https://host/x?page=2&api_key=***#top"),
        ("ssh://git@github.com/org/repo", "ssh://git@github.com/org/repo"),
        ("https://example.com/a?page=2", "https://example.com/a?page=2"),
        ("no url here: a:b@c", "no url here: a:b@c"),
    ],
)
def test_redact_text_masks_url_passwords_and_secret_query_parameters(text, expected):
    assert redact_text(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # A token as the user name, without a password (how GitHub and GitLab tokens are used).
        ("https://ghp_TOKENASUSERNAME99@github.com/x", "https://***@github.com/x"),
        ("http://hf_abcdefghijklmnop@mlflow-host/", "http://***@mlflow-host/"),
        ("https://glpat-abcdefghijklmnop:x-oauth-basic@gitlab.com/a", "https://***:***@gitlab.com/a"),
        # Passwords holding an unencoded "@" or "/": masked through the last "@" before the host.
        ("http://bob:p@ss@127.0.0.1:9/", "http://bob:***@127.0.0.1:9/"),
        ("https://bob:p4ss/word@host/x", "https://bob:***@host/x"),
        # Path normalisation leaves one slash after the scheme (a run_dir through pathlib.Path).
        ("runs/https:/bob:hunter2@example.com/exp/ckpt", "runs/https:/bob:***@example.com/exp/ckpt"),
        ("runs/https:/ghp_TOKENASUSERNAME99@github.com/x", "runs/https:/***@github.com/x"),
        # Query parameters whose names hold no secret word, in any case.
        ("https://maps.example.com/api?key=AIzaSyFAKEKEY12345&z=3", "https://maps.example.com/api?key=***&z=3"),
        ("https://a.blob.core.windows.net/c?sv=2022&SIG=abc%2Fdef&se=1", "https://a.blob.core.windows.net/c?sv=2022&SIG=***&se=1"),
        ("https://b.s3.amazonaws.com/k?X-Amz-Date=1&X-Amz-Signature=deadbeef", "https://b.s3.amazonaws.com/k?X-Amz-Date=1&X-Amz-Signature=***"),
        ("https://host/cb?Access_Token=abc123&state=9", "https://host/cb?Access_Token=***&state=9"),
        ("runs/x?key=AIzaSyFAKEKEY12345", "runs/x?key=***"),
    ],
)  # fmt: skip
def test_redact_text_masks_token_users_odd_passwords_single_slash_urls_and_signed_queries(text, expected):
    assert redact_text(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "mail user@example.com when done",
        "git@github.com:org/repo",
        "ssh://git@github.com/org/repo",
        "https://medium.com/@alice/post",
        "https://example.com:8080/@alice",
        "runs/https:/example.com/exp",
        "https://host/x?monkey=1&page=2",
    ],
)
def test_redact_text_leaves_addresses_and_urls_without_credentials_alone(text):
    assert redact_text(text) == text


def test_redact_masks_urls_inside_nested_strings_and_lists():
    config = {"data": {"sources": ["https://ann:s3cr3t@data.example.com/train", "local/path"]}}

    assert redact(config) == {"data": {"sources": ["https://ann:***@data.example.com/train", "local/path"]}}


def test_known_secrets_are_masked_wherever_they_appear():
    secret = "hf_FROM_ENVIRONMENT_42"
    config = {"note": f"pushed with {secret}", "nested": [{"cmd": f"login --key={secret}"}]}

    redacted = redact(config, known_secrets=[secret])

    assert find_secrets(str(redacted), [secret]) == []
    assert redacted["note"] == "pushed with ***"


def test_secret_env_values_takes_secret_looking_names_only():
    environ = {"HF_TOKEN": "hf_abcdef", "WANDB_API_KEY": "0123456789", "HOME": "/root", "MY_TOKEN": "x"}

    # MY_TOKEN is too short to be a credential: masking "x" everywhere would wreck every string.
    assert sorted(secret_env_values(environ)) == ["0123456789", "hf_abcdef"]


def test_find_secrets_in_files_searches_binary_files_under_a_directory(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "clean.txt").write_text("lr: 0.1\n")
    (tmp_path / "sub" / "store.db").write_bytes(b"\x00\x01SQLite\x00hunter22\x00")

    assert find_secrets_in_files(tmp_path, ["hunter22", "absent-secret"]) == [
        (tmp_path / "sub" / "store.db", "hunter22")
    ]
    assert find_secrets_in_files(tmp_path / "clean.txt", ["hunter22"]) == []

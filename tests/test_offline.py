"""Tests that need no broker: settings, wire encoding, retry policy, validation, exports."""

from __future__ import annotations

from typing import Any

import pytest

import aio_workq
from aio_workq import ConfigurationError, Queue, RetryPolicy, SerializationError, Worker
from aio_workq._link.settings import check_flag, redact_url, resolve_url
from aio_workq._publish.serialization import decode_body, encode_body


def test_exported_members_are_sorted_and_complete() -> None:
    public = sorted(
        (name for name in vars(aio_workq) if not name.startswith("_") or name == "__version__"),
        key=str.casefold,
    )
    public = [
        name
        for name in public
        if name != "annotations" and not isinstance(getattr(aio_workq, name), type(aio_workq))
    ]
    assert aio_workq.__all__ == sorted(aio_workq.__all__, key=str.casefold)
    assert sorted(aio_workq.__all__, key=str.casefold) == public


# --- settings -------------------------------------------------------------------------------


def test_url_precedence_explicit_then_amqp_url_then_parts_then_default() -> None:
    env = {
        "AMQP_URL": "amqp://a:b@envhost/",
        "RABBITMQ_HOST": "parthost",
        "RABBITMQ_PASSWORD": "pw",
    }
    assert resolve_url("amqp://x:y@explicit/", env) == "amqp://x:y@explicit/"
    assert resolve_url(None, env) == "amqp://a:b@envhost/"
    del env["AMQP_URL"]
    assert resolve_url(None, env) == "amqp://guest:pw@parthost:5672/%2F"
    assert resolve_url(None, {}) == "amqp://guest:guest@localhost/"


def test_url_from_lapinmq_variables_quotes_credentials_and_vhost() -> None:
    env = {
        "RABBITMQ_HOST": "h",
        "RABBITMQ_PORT": "5673",
        "RABBITMQ_USERNAME": "us@r",
        "RABBITMQ_PASSWORD": "p/ss:w",
        "RABBITMQ_VHOST": "prod",
    }
    assert resolve_url(None, env) == "amqp://us%40r:p%2Fss%3Aw@h:5673/prod"


@pytest.mark.parametrize(
    "url",
    ["http://guest:secret@host/", "amqp://guest:secret@/", "amqp://guest:secret@host:notaport/"],
)
def test_invalid_url_is_a_configuration_error_without_the_password(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        resolve_url(url, {})
    assert "secret" not in str(info.value)
    assert "amqp://" in str(info.value)


def test_bad_port_variable_is_named() -> None:
    with pytest.raises(ConfigurationError, match="RABBITMQ_PORT"):
        resolve_url(None, {"RABBITMQ_HOST": "h", "RABBITMQ_PORT": "abc"})


def test_redact_url_hides_only_the_password() -> None:
    assert redact_url("amqp://user:hunter2@host:5672/vh") == "amqp://user:***@host:5672/vh"
    assert redact_url("amqp://host/") == "amqp://host/"


def test_reprs_hide_the_password() -> None:
    producer = aio_workq.Producer("amqp://user:hunter2@host/")
    worker = Worker("amqp://user:hunter2@host/", queue="q", handler=lambda job: None)
    assert "hunter2" not in repr(producer)
    assert "hunter2" not in repr(worker)
    assert "***" in repr(producer)


# --- bodies ---------------------------------------------------------------------------------


def test_bodies_encode_by_type() -> None:
    assert encode_body(b"\x00raw") == (b"\x00raw", None)
    assert encode_body("héllo") == ("héllo".encode(), "text/plain; charset=utf-8")
    assert encode_body({"a": [1, 2]}) == (b'{"a":[1,2]}', "application/json")
    assert decode_body(b'{"a":1}', "application/json") == {"a": 1}
    assert decode_body(b"hi", "text/plain; charset=utf-8") == "hi"
    assert decode_body(b"hi", None) == b"hi"


@pytest.mark.parametrize("body", [object(), {"x": {1, 2}}, float("nan")])
def test_unserialisable_body_raises_a_serialization_error(body: object) -> None:
    with pytest.raises(SerializationError, match="cannot encode"):
        encode_body(body)


# --- retry policy and settings validation ----------------------------------------------------


def test_retry_policy_backoff_is_exponential_and_capped() -> None:
    policy = RetryPolicy(max_attempts=6, initial_delay=1, multiplier=3, max_delay=20, jitter=0)
    assert [policy.delay(n) for n in range(1, 6)] == [1, 3, 9, 20, 20]
    assert policy.levels_ms() == (1000, 3000, 9000, 20000)
    assert policy.jittered_ms(9000) == 9000


def test_retry_jitter_only_shortens_within_the_level() -> None:
    policy = RetryPolicy(jitter=0.5)
    values = {policy.jittered_ms(10_000) for _ in range(200)}
    assert min(values) >= 5000 and max(values) <= 10_000 and len(values) > 10


def test_explicit_retry_delay_rounds_up_to_a_level() -> None:
    policy = RetryPolicy(max_attempts=3, initial_delay=1, multiplier=2, jitter=0)
    assert policy.level_for(2) == 2000
    assert policy.level_for(3) == 5000
    assert policy.level_for(10**9) == 86_400_000


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"initial_delay": 0},
        {"multiplier": 0.5},
        {"max_delay": 0.5, "initial_delay": 1},
        {"jitter": 1.0},
    ],
)
def test_nonsense_retry_policy_raises_value_error(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="RetryPolicy"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_retry_signal_rejects_negative_delay() -> None:
    with pytest.raises(ValueError):
        aio_workq.Retry(delay=-1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": 5, "prefetch": 2}, "prefetch"),
        ({"queue_type": "stream"}, "queue_type"),
        ({"handler_timeout": 0}, "handler_timeout"),
        ({"handler_timeout": float("nan")}, "handler_timeout"),
        ({"shutdown_timeout": "5"}, "shutdown_timeout"),
        ({"connect_timeout": "5"}, "connect_timeout"),
        ({"wait_for_broker": -1}, "wait_for_broker"),
        ({"binding_keys": "a.b"}, "binding_keys"),
        ({"binding_keys": ["a"]}, "exchange"),
        ({"handler": 42}, "handler"),
        # sideroads4: each failed at start() with a bare AttributeError / TypeError
        ({"concurrency": 1.5}, "concurrency must be a whole number"),
        ({"concurrency": True}, "concurrency must be a whole number"),
        ({"concurrency": "2"}, "concurrency must be a whole number"),
        ({"prefetch": 2.5}, "prefetch must be a whole number"),
        ({"retry": 5}, "retry must be a RetryPolicy"),
        ({"retry": True}, "retry must be a RetryPolicy"),
        # leftovers: a non-str name reached the broker's client properties; an exchange or
        # binding key failed at start() with a bare TypeError
        ({"name": 5}, "name must be a str.*int 5"),
        ({"name": b"w"}, "name must be a str.*bytes"),
        ({"exchange": 5}, "exchange must be a name"),
        ({"exchange": "amq.topic", "binding_keys": [5]}, "binding_keys must be str keys"),
    ],
)
def test_invalid_worker_settings_raise_configuration_error(
    kwargs: dict[str, object], match: str
) -> None:
    settings: dict[str, object] = {"queue": "q", "handler": lambda job: None, **kwargs}
    with pytest.raises(ConfigurationError, match=match):
        Worker("amqp://localhost/", **settings)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window": 0}, "window must"),
        ({"window_bytes": 0}, "window_bytes"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": "5"}, "timeout"),
        ({"timeout": float("nan")}, "timeout"),
        ({"timeout": float("inf")}, "timeout"),
        ({"connect_timeout": True}, "connect_timeout"),
        ({"on_reconnect": "drop"}, "on_reconnect"),
        ({"queue_type": "stream"}, "queue_type"),
        ({"name": 5}, "name must be a str.*int 5"),  # leftovers: was accepted
        ({"fail_fast": "no"}, "fail_fast must be True or False, got 'no'"),  # was True
    ],
)
def test_invalid_producer_settings_raise_configuration_error(
    kwargs: dict[str, object], match: str
) -> None:
    with pytest.raises(ConfigurationError, match=match):
        aio_workq.Producer("amqp://localhost/", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["no", 0, 1, None], ids=repr)
def test_every_bool_setting_refuses_a_non_bool_in_the_same_words(value: object) -> None:
    # leftovers2: the Producer's fail_fast, the worker's presence and the publish flags each
    # had their own check; one `check_flag` now says the same thing with the same fix
    assert check_flag("x", True) is True
    assert check_flag("x", False) is False
    bad: Any = value
    for build, what in (
        (lambda: check_flag("publish option persistent=", bad), "publish option persistent="),
        (lambda: aio_workq.Producer("amqp://localhost/", fail_fast=bad), "fail_fast"),
        (lambda: Worker("amqp://localhost/", queue="q", handler=print, presence=bad), "presence"),
    ):
        with pytest.raises(ConfigurationError) as info:
            build()
        assert str(info.value) == f"{what} must be True or False, got {value!r}: pass a bool"


async def test_a_connection_name_that_is_not_a_str_is_refused() -> None:
    # leftovers: connect(name=5), Connection(name=5) and a Producer sharing a connection
    # took it (nothing connects here: the check comes first)
    with pytest.raises(ConfigurationError, match="name must be a str.*int 5"):
        await aio_workq.connect("amqp://localhost/", name=5)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="name must be a str.*int 5"):
        aio_workq.Connection("amqp://localhost/", name=5)  # type: ignore[arg-type]
    connection = aio_workq.Connection("amqp://localhost/")
    with pytest.raises(ConfigurationError, match="name must be a str.*list"):
        aio_workq.Producer(connection=connection, name=["p"])  # type: ignore[arg-type]


def test_queue_arguments_quorum_and_classic() -> None:
    quorum = Queue("tasks").arguments_for_work_queue()
    assert quorum == {
        "x-queue-type": "quorum",
        "x-overflow": "reject-publish",
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "tasks.dlq",
        "x-dead-letter-strategy": "at-least-once",
        "x-delivery-limit": 20,
    }
    classic = Queue("tasks", type="classic").arguments_for_work_queue()
    assert classic == {
        "x-queue-type": "classic",
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "tasks.dlq",
    }
    delay = Queue("tasks", type="classic").arguments_for_delay_queue(5000)
    assert delay["x-message-ttl"] == 5000 and delay["x-dead-letter-routing-key"] == "tasks"
    with pytest.raises(ValueError, match="type"):
        Queue("tasks", type="stream")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["with space", "ünïcode", "x" * 201, "a/b"])
def test_queue_and_exchange_names_outside_amqp_are_configuration_errors(name: str) -> None:
    with pytest.raises(ConfigurationError, match="name"):
        Queue(name)
    with pytest.raises(ConfigurationError, match="name"):
        aio_workq.Exchange(name + "x" * 60)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("amqp://a,amqp://b", ["amqp://a", "amqp://b"]),
        (" amqp://u:p@a:5672/v?x=1,2 , amqps://b/ ", ["amqp://u:p@a:5672/v?x=1,2", "amqps://b/"]),
        (["amqp://a/", "amqp://b/"], ["amqp://a/", "amqp://b/"]),
    ],
)
def test_host_lists_split_on_commas_but_not_inside_a_query(
    url: object, expected: list[str]
) -> None:
    assert aio_workq.resolve_urls(url, {}) == expected  # type: ignore[arg-type]


def test_rabbitmq_host_may_list_hosts_sharing_credentials() -> None:
    env = {"RABBITMQ_HOST": "a, b:5673", "RABBITMQ_PASSWORD": "p@ss"}
    assert aio_workq.resolve_urls(None, env) == [
        "amqp://guest:p%40ss@a:5672/%2F",
        "amqp://guest:p%40ss@b:5673/%2F",
    ]


def test_redaction_hides_every_password_of_a_list_even_unencoded() -> None:
    shown = aio_workq.redact_url("amqp://u:s3cr#t/x@a/,amqp://v:other@b/")
    assert "s3cr" not in shown and "other" not in shown
    assert shown == "amqp://u:***@a/,amqp://v:***@b/"


def test_an_ssl_context_with_a_plain_url_is_refused_not_silently_ignored() -> None:
    import ssl

    context = ssl.create_default_context()
    with pytest.raises(ConfigurationError, match="amqps://"):
        aio_workq.Connection("amqp://u:secret@h/", ssl_context=context)
    with pytest.raises(ConfigurationError) as info:
        aio_workq.Producer("amqps://u:secret@a/,amqp://u:secret@b/", ssl_context=context)
    assert "secret" not in str(info.value)

"""Config and Utilities: OLLAMA_HOST parsing, Go durations, keep_alive, Ollama's human formats."""
import datetime

import pytest

import ollama


@pytest.mark.parametrize("value,expected", [
    ("", ("http", "127.0.0.1", 11434)),
    ("0.0.0.0", ("http", "0.0.0.0", 11434)),
    ("0.0.0.0:8080", ("http", "0.0.0.0", 8080)),
    ("http://example.com", ("http", "example.com", 80)),
    ("https://example.com", ("https", "example.com", 443)),
    ("https://example.com:99/path", ("https", "example.com", 99)),
    ("[::1]:8080", ("http", "::1", 8080)),
    ("127.0.0.1:99999", ("http", "127.0.0.1", 11434)),        # invalid port: the default
])
def test_ollama_host_is_parsed_like_envconfig(value, expected):
    assert ollama.parse_host(value) == expected


@pytest.mark.parametrize("text,seconds", [
    ("5m", 300.0), ("1h30m", 5400.0), ("1.5s", 1.5), ("300ms", 0.3), ("0", 0.0), ("-1m", -60.0),
    ("2h45m10.5s", 9910.5),
])
def test_go_durations_parse(text, seconds):
    assert ollama.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "m", "1x", "1h-5m", " "])
def test_bad_go_durations_are_rejected(text):
    with pytest.raises(ValueError):
        ollama.parse_duration(text)


@pytest.mark.parametrize("seconds,text", [
    (0, "0s"), (1.5, "1.5s"), (0.0042, "4.2ms"), (3725.5, "1h2m5.5s"), (60, "1m0s"), (2e-6, "2µs"),
    (5e-7, "500ns"),
])
def test_durations_print_like_go(seconds, text):
    assert ollama.format_duration(seconds) == text


def test_keep_alive_numbers_are_seconds_strings_are_durations_negative_is_forever():
    assert ollama.parse_keep_alive(None, 300.0) == 300.0
    assert ollama.parse_keep_alive(30, 300.0) == 30.0
    assert ollama.parse_keep_alive("10m", 300.0) == 600.0
    assert ollama.parse_keep_alive(-1, 300.0) == ollama.FOREVER
    assert ollama.parse_keep_alive("-1m", 300.0) == ollama.FOREVER
    with pytest.raises(ollama.BadRequest, match="missing unit"):
        ollama.parse_keep_alive("3600", 300.0)
    assert ollama.parse_keep_alive("3600", 300.0, env=True) == 3600.0      # OLLAMA_KEEP_ALIVE only
    with pytest.raises(ollama.BadRequest):
        ollama.parse_keep_alive(True, 300.0)


def test_config_reads_the_environment_once():
    c = ollama.Config({"HOME": "/h", "OLLAMA_HOST": "'0.0.0.0:1234'", "OLLAMA_KEEP_ALIVE": "-1",
                       "OLLAMA_NUM_PARALLEL": "4", "OLLAMA_CONTEXT_LENGTH": "8192", "OLLAMA_DEBUG": "1"})
    assert (c.host, c.port) == ("0.0.0.0", 1234)
    assert str(c.models) == "/h/.ollama/models" and c.keep_alive == ollama.FOREVER
    assert (c.num_parallel, c.context_length, c.debug) == (4, 8192, 1)


@pytest.mark.parametrize("ts", [0, 1691176965.499127, 1691176965.0, 1691176965.9999996, 1e9 + 0.1])
def test_rfc3339_matches_the_datetime_formatting(ts):
    dt = datetime.datetime.fromtimestamp(ts, datetime.timezone.utc)
    expected = dt.strftime("%Y-%m-%dT%H:%M:%S.%f").rstrip("0").rstrip(".") + "Z"
    assert ollama.rfc3339(ts) == expected


@pytest.mark.parametrize("n,text", [(512, "512 B"), (1000, "1 KB"), (1500, "1.5 KB"), (934e6, "934 MB"),
                                    (4.7e9, "4.7 GB"), (12.3e9, "12 GB")])
def test_human_bytes_uses_si_units(n, text):
    assert ollama.human_bytes(n) == text


def test_human_time_reads_like_ollama():
    now = 1_000_000_000
    assert ollama.human_time(now - 0.5, now) == "Less than a second ago"
    assert ollama.human_time(now - 90, now) == "About a minute ago"
    assert ollama.human_time(now - 2 * 86400, now) == "2 days ago"
    assert ollama.human_time(now + 4 * 60 + 1, now) == "4 minutes from now"
    assert ollama.human_time(now + 300 * 365 * 86400, now) == "Forever"

"""--url must name a server on this machine: parsed and resolved, not matched as a prefix."""

from __future__ import annotations

import pytest

from profiler.live.__main__ import main
from profiler.live.loopback import check_loopback_url
from simulator.records.errors import ConfigError


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000",
                                 "http://127.0.0.5:8000/", "https://127.0.0.1:8443"])
def test_loopback_urls_are_accepted(url):
    assert check_loopback_url(url) == url.rstrip("/")


@pytest.mark.parametrize("url, why", [
    ("http://127.0.0.1.invalid:8000", "does not resolve"),
    ("http://10.0.0.1:8000", "not loopback"),
    ("http://0.0.0.0:8000", "not loopback"),
    ("http://example.invalid:8000", "does not resolve"),
    ("http://localhost.invalid:8000", "does not resolve"),
    ("http://127.0.0.1@10.0.0.1:8000", "credentials"),
    ("file:///etc/passwd", "scheme 'file'"),
    ("127.0.0.1:8000", "scheme"),
    ("//127.0.0.1:8000", "scheme 'missing'"),
    ("http://127.0.0.1", "no port"),
    ("http://127.0.0.1:99999", "not a URL"),
    ("http://:8000", "no host"),
])
def test_other_urls_are_refused_naming_the_flag(url, why):
    with pytest.raises(ConfigError) as err:
        check_loopback_url(url)
    assert err.value.field == "--url" and why in str(err.value) and "\n" not in str(err.value)


def test_a_name_that_resolves_outside_loopback_is_refused(monkeypatch):
    """A host name is judged by every address it resolves to (here one loopback, one not)."""
    import socket

    def fake(host, *args, **kwargs):
        assert host == "mixed.test"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.7", 0))]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    with pytest.raises(ConfigError, match=r"not loopback \(resolves to 192\.0\.2\.7\)"):
        check_loopback_url("http://mixed.test:8000")


def test_the_command_line_gives_one_line_and_exit_2(tmp_path, capsys):
    code = main(["run", "--workload", "poisson", "--url", "http://127.0.0.1.invalid:8000",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --url: ")
    assert not (tmp_path / "run").exists()

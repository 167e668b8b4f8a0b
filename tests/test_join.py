"""A node joins with a one-time token (agent/join.py): the operator's service signs only the
token holder's request, for the token's name, once; the node trusts only the token's CA. The
hostile cases are a stolen-but-altered token, a spent or expired one, a request for another
name, and an impostor service."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from migctl.agent import certs, join
from migctl.common.errors import InvalidArgument, Refused
from migctl.common.tls import TLSFiles


@contextlib.contextmanager
def service(ca: Path) -> Iterator[str]:
    with join.Service(("127.0.0.1", 0), ca) as svc:
        threading.Thread(target=svc.serve_forever, daemon=True).start()
        try:
            yield f"127.0.0.1:{svc.server_address[1]}"
        finally:
            svc.shutdown()


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    d = tmp_path / "ca"
    certs.init(d, [], ["client"])
    return d


def test_a_node_joins_with_a_token_and_its_key_never_leaves(ca: Path, tmp_path: Path) -> None:
    node_dir = tmp_path / "nodeD-tls"
    with service(ca) as address:
        crt = join.join(join.mint(ca, "nodeD", address), node_dir)
    assert crt == node_dir / "nodeD.crt"
    assert not list(ca.rglob("nodeD.key")), "a key reached the operator's folder"
    files = TLSFiles.from_dir(node_dir, "nodeD")  # what its agent's --tls-dir reads
    assert files.ca.read_bytes() == (ca / "ca.crt").read_bytes()
    cert = x509.load_pem_x509_certificate((node_dir / "nodeD.crt").read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(files.ca.read_bytes()))
    ou = cert.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value
    assert ou == "migctl-node"
    assert oct(os.stat(node_dir / "nodeD.key").st_mode & 0o777) == "0o600"
    assert not (ca / "private" / join.PENDING / "nodeD.json").exists(), "the token is spent"


def test_a_token_is_spent_by_its_first_join(ca: Path, tmp_path: Path) -> None:
    with service(ca) as address:
        token = join.mint(ca, "nodeD", address)
        join.join(token, tmp_path / "first")
        with pytest.raises(Refused, match="no token is pending for nodeD"):
            join.join(token, tmp_path / "second")
    assert not (tmp_path / "second" / "nodeD.crt").exists()


def test_a_token_with_another_secret_is_refused_and_the_real_one_still_works(
        ca: Path, tmp_path: Path) -> None:
    with service(ca) as address:
        real = join.mint(ca, "nodeD", address)
        t = join.Token.decode(real)
        forged = join.Token(t.node, t.server, bytes(32), t.ca_sha256).encode()
        with pytest.raises(Refused, match="not signed by its token"):
            join.join(forged, tmp_path / "forged")
        assert not (tmp_path / "forged" / "nodeD.crt").exists()
        join.join(real, tmp_path / "real")


def test_an_expired_token_is_refused(ca: Path, tmp_path: Path) -> None:
    with service(ca) as address:
        token = join.mint(ca, "nodeD", address, ttl=0.001)
        time.sleep(0.01)
        with pytest.raises(Refused, match="expired"):
            join.join(token, tmp_path / "n")


def test_minting_again_revokes_the_token_before(ca: Path, tmp_path: Path) -> None:
    with service(ca) as address:
        old = join.mint(ca, "nodeD", address)
        new = join.mint(ca, "nodeD", address)
        with pytest.raises(Refused, match="not signed by its token"):
            join.join(old, tmp_path / "old")
        join.join(new, tmp_path / "new")


def request_line(token: join.Token, csr: str, node: str | None = None) -> bytes:
    node = node or token.node
    return json.dumps({"node": node, "csr": csr,
                       "mac": join._mac(token.secret, "request", node, csr)}).encode()


def test_a_token_cannot_be_spent_on_another_name(ca: Path, tmp_path: Path) -> None:
    """The holder of nodeD's token asks, correctly signed, for a certificate naming nodeA."""
    token = join.Token.decode(join.mint(ca, "nodeD", "127.0.0.1:1"))
    csr = certs.request(tmp_path / "evil", "nodeA").read_text()
    reply = join.answer(ca, request_line(token, csr), days=1)
    assert "nodeD's, the request is for nodeA" in reply["error"]
    assert (ca / "private" / join.PENDING / "nodeD.json").exists(), "not spent by a refusal"
    reply = join.answer(ca, request_line(token, csr, node="nodeA"), days=1)
    assert "no token is pending for nodeA" in reply["error"]


@pytest.mark.parametrize("line", [b"", b"{}", b"not json", b'{"node": "../../etc", '
                                  b'"csr": "x", "mac": "y"}'])
def test_a_malformed_request_is_refused_by_name(ca: Path, line: bytes) -> None:
    assert "error" in join.answer(ca, line, days=1)


def test_an_oversized_request_is_refused(ca: Path) -> None:
    with service(ca) as address:
        host, port = address.split(":")
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(b"x" * (join.MAX_LINE + 10) + b"\n")
            assert b"65536 bytes" in s.makefile("rb").readline()


def impostor(reply: object) -> tuple[str, threading.Thread]:
    """A service at an address the token names that answers REPLY to anything."""
    return raw_impostor(json.dumps(reply).encode())


def raw_impostor(line: bytes) -> tuple[str, threading.Thread]:
    srv = socket.create_server(("127.0.0.1", 0))

    def run() -> None:
        conn, _ = srv.accept()
        with conn, srv:
            conn.makefile("rb").readline()
            conn.sendall(line + b"\n")

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return f"127.0.0.1:{srv.getsockname()[1]}", t


def test_an_impostor_service_is_not_believed(ca: Path, tmp_path: Path) -> None:
    """One that knows the token's secret (it stole the token) still cannot hand the node
    another CA; one that does not cannot sign its reply at all. Nothing is written."""
    rogue = tmp_path / "rogue"
    certs.init(rogue, ["nodeD"], ["client"])
    crt = (certs.node_dir(rogue, "nodeD") / "nodeD.crt").read_text()
    ca_pem = (rogue / "ca.crt").read_text()
    for knows_secret in (True, False):
        address, t = impostor({})
        token = join.Token.decode(join.mint(ca, "nodeD", address))
        mac = join._mac(token.secret if knows_secret else bytes(32), "reply", "nodeD", crt,
                        ca_pem)
        address, t = impostor({"crt": crt, "ca": ca_pem, "mac": mac})
        token = join.Token(token.node, address, token.secret, token.ca_sha256)
        node_dir = tmp_path / f"node-{knows_secret}"
        with pytest.raises(Refused, match="not the one the token names" if knows_secret
                           else "not signed by the token"):
            join.join(token.encode(), node_dir)
        t.join(5)
        assert not (node_dir / "ca.crt").exists() and not (node_dir / "nodeD.crt").exists()


@pytest.mark.parametrize("text", ["", "migctl-join1:", "migctl-join1:bm90IGpzb24=",
                                  "token-of-something-else"])
def test_a_damaged_token_is_refused_by_name(text: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="join token"):
        join.join(text, tmp_path)


def test_a_token_naming_an_unsafe_node_is_refused(ca: Path) -> None:
    with pytest.raises(InvalidArgument):
        join.mint(ca, "../evil", "127.0.0.1:1")


def test_the_commands_as_processes(ca: Path, tmp_path: Path) -> None:
    """`certs token` at the operator, `certs serve` running, `certs join -` on the node (the
    token on stdin, out of the process list)."""
    cli = [sys.executable, "-m", "migctl.client.cli", "certs"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    served = subprocess.Popen([*cli, "serve", "--dir", str(ca), "--listen", f"127.0.0.1:{port}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert "join service on" in (served.stdout.readline() if served.stdout else "")
        token = subprocess.run([*cli, "token", "--dir", str(ca), "--server",
                                f"127.0.0.1:{port}", "nodeE"], capture_output=True, text=True,
                               check=True).stdout.strip()
        done = subprocess.run([*cli, "join", "--dir", str(tmp_path / "e"), "-"], input=token,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "joined" in done.stdout and (tmp_path / "e" / "nodeE.crt").is_file()
        again = subprocess.run([*cli, "join", "--dir", str(tmp_path / "f"), "-"], input=token,
                               capture_output=True, text=True)
        assert again.returncode != 0 and "no token is pending for nodeE" in again.stderr
    finally:
        served.terminate()
        served.wait(10)


def test_a_thief_in_the_middle_cannot_add_its_ca(ca: Path, tmp_path: Path) -> None:
    """With the token's secret (a stolen token), a party between the node and the service
    passes the request on and appends its own CA to the reply, MAC recomputed: the node trusts
    only the token's CA, or nothing."""
    rogue = tmp_path / "rogue"
    certs.init(rogue, [], ["client"])
    with service(ca) as real:
        token = join.Token.decode(join.mint(ca, "nodeD", real))
        host, port = real.split(":")

        def relay(line: bytes) -> dict:
            with socket.create_connection((host, int(port)), timeout=5) as s:
                s.sendall(line)
                reply = json.loads(s.makefile("rb").readline())
            reply["ca"] += (rogue / "ca.crt").read_text()
            reply["mac"] = join._mac(token.secret, "reply", "nodeD", reply["crt"], reply["ca"])
            return reply

        srv = socket.create_server(("127.0.0.1", 0))

        def middle() -> None:
            conn, _ = srv.accept()
            with conn, srv:
                conn.sendall(json.dumps(relay(conn.makefile("rb").readline())).encode() + b"\n")

        threading.Thread(target=middle, daemon=True).start()
        via = join.Token(token.node, f"127.0.0.1:{srv.getsockname()[1]}", token.secret,
                         token.ca_sha256)
        with pytest.raises(Refused, match="2 CA"):
            join.join(via.encode(), tmp_path / "n")
    assert not (tmp_path / "n" / "ca.crt").exists()


def test_a_token_minted_again_while_a_request_is_signed_waits_for_it(
        ca: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The old token's request, begun before, is answered; the new token is not spent by it."""
    old = join.Token.decode(join.mint(ca, "nodeD", "127.0.0.1:1"))
    minted: list[str] = []
    real_sign = certs.sign

    def sign_while_minting(*args, **kwargs):
        again = threading.Thread(target=lambda: minted.append(
            join.mint(ca, "nodeD", "127.0.0.1:1")))
        again.start()
        again.join(0.3)
        assert again.is_alive(), "minting did not wait for the request being signed"
        sign_while_minting.thread = again  # type: ignore[attr-defined]
        return real_sign(*args, **kwargs)

    monkeypatch.setattr(join.certs, "sign", sign_while_minting)
    csr = certs.request(tmp_path / "d", "nodeD").read_text()
    assert "crt" in join.answer(ca, request_line(old, csr), days=1)
    sign_while_minting.thread.join(5)  # type: ignore[attr-defined]
    monkeypatch.setattr(join.certs, "sign", real_sign)
    new = join.Token.decode(minted[0])
    assert "crt" in join.answer(ca, request_line(new, csr), days=1)


@pytest.mark.parametrize("reply", [[], "x", 1, None, "[" * 100000])
def test_an_impostors_odd_reply_is_a_refusal(tmp_path: Path, reply) -> None:
    address, t = impostor(reply) if not isinstance(reply, str) or len(reply) < 10 else \
        raw_impostor(reply.encode())
    token = join.Token("nodeD", address, bytes(32), "0" * 64)
    with pytest.raises(Refused):
        join.join(token.encode(), tmp_path)
    t.join(5)


def test_a_slow_or_silent_client_is_cut_off_and_many_are_turned_away(
        ca: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole request has IO_TIMEOUT_S, however the bytes drip; past MAX_HANDLERS clients
    at once, the next is told the service is busy rather than given a thread."""
    monkeypatch.setattr(join, "IO_TIMEOUT_S", 0.5)
    monkeypatch.setattr(join, "MAX_HANDLERS", 2)
    with service(ca) as address:
        host, port = address.split(":")
        with socket.create_connection((host, int(port)), timeout=5) as s:
            got = b""
            for _ in range(30):  # a byte every 0.1 s: each within any per-read timeout
                try:
                    s.sendall(b" ")
                except OSError:
                    break
                s.settimeout(0.1)
                with contextlib.suppress(TimeoutError):
                    got += s.recv(4096)
                if got:
                    break
            assert b"no complete request" in got
        silent = [socket.create_connection((host, int(port)), timeout=5) for _ in range(2)]
        try:
            time.sleep(0.1)  # both are being handled
            with socket.create_connection((host, int(port)), timeout=5) as third:
                assert b"busy" in third.makefile("rb").readline()
        finally:
            for s in silent:
                s.close()

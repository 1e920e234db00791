"""Where bundles may come from (issue 13): http(s) hosts checked where the worker
connects (redirects too), one error shape for every failed download, and local
bundles only under ``--bundle-roots``. Real sockets on loopback, real files."""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, succeed
from twisted.logger import capturedLogs
from twisted.python import usage
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from fluster_worker.bundles import http_fetch, local
from fluster_worker.bundles.cache import BundleCache, BundleError, BundleLease
from fluster_worker.bundles.hosts import AddressPolicy, bundle_http_client, parse_private_hosts
from fluster_worker.main import Options
from fluster_worker.testing.bundle import RecordingPool

reactor: Any = _reactor
pytestmark = pytest.mark.timeout(60)
FAILED = "download failed (the worker's log has the cause)"


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buf.getvalue()


BODY = zip_bytes({"main.py": b"print('hi')"})


class Server(Resource):
    """Answers every GET from a table path -> (code, headers, body); records paths."""

    isLeaf = True

    def __init__(self, routes: dict[bytes, tuple[int, dict[bytes, bytes], bytes]] | None = None) -> None:
        super().__init__()
        self.routes = routes or {b"/b.zip": (200, {}, BODY)}
        self.seen: list[bytes] = []

    def render_GET(self, request: Any) -> bytes:
        self.seen.append(request.path)
        code, headers, body = self.routes.get(request.path, (404, {}, b"no such bundle"))
        request.setResponseCode(code)
        for name, value in headers.items():
            request.setHeader(name, value)
        return body


class Silent(Resource):
    """Takes the request and never answers (a timeout), or answers half (a cut body)."""

    isLeaf = True

    def __init__(self, half: bool = False) -> None:
        super().__init__()
        self.half = half
        self.requests: list[Any] = []

    def render_GET(self, request: Any) -> int:
        self.requests.append(request)
        if self.half:
            request.setHeader(b"content-length", str(len(BODY) * 10).encode())
            request.write(BODY[:50])
            reactor.callLater(0.05, request.channel.transport.abortConnection)
        return NOT_DONE_YET


@pytest.fixture
def pool() -> Iterator[RecordingPool]:
    p = RecordingPool(reactor, "bundle-sources")
    p.startService()
    yield p
    p.pool.stop()


@pytest_twisted.async_yield_fixture
async def serve() -> AsyncIterator[Callable[..., str]]:
    """serve(resource, interface="127.0.0.1") -> base URL; stopped after the test."""
    ports: list[Any] = []

    def start(resource: Resource, interface: str = "127.0.0.1") -> str:
        port = reactor.listenTCP(0, Site(resource), interface=interface)
        ports.append(port)
        host = f"[{interface}]" if ":" in interface else interface
        return f"http://{host}:{port.getHost().port}"

    yield start
    for port in ports:
        await port.stopListening()


@pytest_twisted.async_yield_fixture
async def make_cache(pool: RecordingPool, tmp_path: Path) -> AsyncIterator[Callable[..., BundleCache]]:
    """make_cache(private=(), resolve=None, tls=None, **cache options): the worker's client and cache."""
    made: list[tuple[BundleCache, Any]] = []

    def make(private: tuple[str, ...] = (), resolve: Any = None, tls: Any = None, **kw: Any) -> BundleCache:
        client, connections = bundle_http_client(reactor, private, resolve=resolve, tls=tls)
        cache = BundleCache(reactor, pool, tmp_path / f"cache{len(made)}", client, **kw)
        made.append((cache, connections))
        return cache

    yield make
    for cache, connections in made:
        await cache.idle()
        await connections.closeCachedConnections()


async def error_of(d: Deferred[BundleLease]) -> str:
    with pytest.raises(BundleError) as info:
        await d
    message = str(info.value)
    assert "\n" not in message
    return message


def names(mapping: dict[str, list[str]]) -> Callable[[str], Deferred[Sequence[str]]]:
    """A resolver from a table; any other name is resolved by nobody (an error)."""

    def resolve(host: str) -> Deferred[Sequence[str]]:
        return succeed(mapping[host])

    return resolve


# The address check.


@pytest_twisted.ensureDeferred
async def test_loopback_is_refused_by_default(make_cache: Any, serve: Any) -> None:
    server = Server()
    base = serve(server)
    port = base.rsplit(":", 1)[1]
    cache = make_cache()  # the system resolver
    for url in (f"{base}/b.zip", f"http://localhost:{port}/b.zip", f"http://0.0.0.0:{port}/b.zip",
                f"http://2130706433:{port}/b.zip", f"http://127.1:{port}/b.zip"):
        message = await error_of(cache.acquire(url))
        assert "is not allowed (a private address; see --allow-private-bundle-hosts)" in message, url
    # Names that resolve to other refused addresses: refused before any connection.
    table = {f"h{i}.example": [a] for i, a in enumerate(
        ["::1", "::ffff:127.0.0.1", "fe80::1", "169.254.169.254", "10.0.0.1", "192.168.1.1", "fd00::1"])}
    resolving = make_cache(resolve=names(table))
    for host in table:
        message = await error_of(resolving.acquire(f"http://{host}:{port}/b.zip"))
        assert message.startswith(f"bundle host {host} is not allowed"), host
    assert server.seen == []  # no request reached the server


@pytest_twisted.ensureDeferred
async def test_a_name_is_checked_by_what_it_resolves_to(make_cache: Any, serve: Any) -> None:
    server = Server()
    port = serve(server).rsplit(":", 1)[1]
    resolve = names({"bundles.example": ["203.0.113.9", "127.0.0.1"]})  # one bad address is enough
    message = await error_of(make_cache(resolve=resolve).acquire(f"http://bundles.example:{port}/b.zip"))
    assert message == (
        "bundle host bundles.example is not allowed (a private address; see --allow-private-bundle-hosts): "
        f"http://bundles.example:{port}/b.zip"
    )
    assert server.seen == []


@pytest_twisted.ensureDeferred
async def test_the_checked_address_is_the_one_connected_to(make_cache: Any, serve: Any) -> None:
    """No second lookup (DNS rebinding): the name is resolved once, by the check,
    and the connection goes to that address (the system knows no such name)."""
    server = Server()
    port = serve(server, "127.0.0.3").rsplit(":", 1)[1]
    asked: list[str] = []

    def resolve(host: str) -> Deferred[Sequence[str]]:
        asked.append(host)
        return succeed(["127.0.0.3"])

    cache = make_cache(("127.0.0.3/32",), resolve=resolve)
    lease = await cache.acquire(f"http://rebind.invalid:{port}/b.zip")
    assert (lease.bundle.path / "main.py").read_bytes() == b"print('hi')"
    assert asked == ["rebind.invalid"] and server.seen == [b"/b.zip"]


@pytest_twisted.ensureDeferred
async def test_private_hosts_allowed_with_the_option(make_cache: Any, serve: Any) -> None:
    server = Server()
    base = serve(server)
    for private in (parse_private_hosts("yes"), parse_private_hosts("127.0.0.0/8")):
        lease = await make_cache(private).acquire(f"{base}/b.zip")
        assert (lease.bundle.path / "main.py").exists()
    # Allowed networks are just those named: another loopback address stays refused.
    other = serve(Server(), "127.0.0.2")
    message = await error_of(make_cache(("127.0.0.1/32",)).acquire(f"{other}/b.zip"))
    assert "is not allowed" in message
    assert server.seen == [b"/b.zip", b"/b.zip"]


def test_address_policy() -> None:
    default = AddressPolicy.of(())
    refused = ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
               "0.0.0.0", "224.0.0.1", "255.255.255.255", "240.0.0.1", "::1", "::", "fe80::1", "fc00::1",
               "fd12::1", "ff02::1", "fec0::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254",
               "2002:7f00:1::", "64:ff9b::a00:1", "2001:0:4136:e378:8000:63bf:3fff:fdd2", "fe80::1%lo",
               "not-an-address"]
    allowed = ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8", "2002:808:808::", "64:ff9b::808:808"]
    assert [a for a in refused if default.allows(a)] == []
    assert [a for a in allowed if not default.allows(a)] == []
    private = AddressPolicy.of(parse_private_hosts("10.0.0.0/8, 192.168.0.0/16"))
    assert private.allows("10.9.8.7") and private.allows("192.168.1.1") and private.allows("::ffff:10.0.0.1")
    assert not private.allows("127.0.0.1") and not private.allows("172.16.0.1") and not private.allows("::1")
    everything = AddressPolicy.of(parse_private_hosts("yes"))
    assert all(everything.allows(a) for a in refused[:-1])
    assert parse_private_hosts("no") == () and parse_private_hosts("") == ()
    with pytest.raises(ValueError, match="not an address"):
        parse_private_hosts("10.0.0.0/8,bogus")


# Redirects.


@pytest_twisted.ensureDeferred
async def test_redirects_are_checked_like_the_first_host(make_cache: Any, serve: Any) -> None:
    target = Server()
    inner = serve(target)  # 127.0.0.1: not allowed
    hop = Server({
        b"/to-loopback": (302, {b"location": f"{inner}/b.zip".encode()}, b""),
        b"/to-localhost": (307, {b"location": f"http://localhost:{inner.rsplit(':', 1)[1]}/b.zip".encode()}, b""),
        b"/to-metadata": (301, {b"location": b"http://169.254.169.254/latest/meta-data/"}, b""),
        b"/relative": (302, {b"location": b"/b.zip"}, b""),
        b"/b.zip": (200, {}, BODY),
    })
    outer = serve(hop, "127.0.0.2")  # the "public" host of this test
    cache = make_cache(("127.0.0.2/32",))
    for path in ("/to-loopback", "/to-localhost", "/to-metadata"):
        message = await error_of(cache.acquire(f"{outer}{path}"))
        assert message == (
            "bundle URL redirects to a host that is not allowed (a private address; see "
            f"--allow-private-bundle-hosts): {outer}{path}"
        )
    assert target.seen == []
    lease = await cache.acquire(f"{outer}/relative")  # an allowed redirect is followed
    assert (lease.bundle.path / "main.py").exists()


@pytest_twisted.ensureDeferred
async def test_redirects_are_bounded(make_cache: Any, serve: Any) -> None:
    loop = Server({f"/r{i}".encode(): (302, {b"location": f"/r{i + 1}".encode()}, b"") for i in range(20)})
    base = serve(loop)
    message = await error_of(make_cache(("127.0.0.0/8",)).acquire(f"{base}/r0"))
    assert message == f"cannot download bundle {base}/r0: {FAILED}"
    assert len(loop.seen) == http_fetch.MAX_REDIRECTS + 1


# One error shape.


@pytest_twisted.ensureDeferred
async def test_every_failed_download_says_the_same(
    make_cache: Any, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closed port, HTTP statuses, a server that never answers, a cut body, a bad
    redirect, a body over the cap: a job cannot tell them apart (so it cannot map
    ports through the worker); the worker's log has each cause."""
    monkeypatch.setattr(http_fetch, "RESPONSE_TIMEOUT", 0.5)
    closed = reactor.listenTCP(0, Site(Server()), interface="127.0.0.1")
    closed_port = closed.getHost().port
    await closed.stopListening()
    statuses = Server({
        b"/404": (404, {}, b"nope"), b"/403": (403, {}, b""), b"/500": (500, {}, b"boom"),
        b"/401": (401, {b"www-authenticate": b"Basic"}, b""),
        b"/bad-redirect": (302, {b"location": b"file:///etc/passwd"}, b""),
        b"/no-location": (302, {}, b""),
        b"/big": (200, {}, b"x" * 5000),
    })
    base = serve(statuses)
    urls = [f"http://127.0.0.1:{closed_port}/b.zip"]
    urls += [f"{base}{p}" for p in ("/404", "/403", "/500", "/401", "/bad-redirect", "/no-location", "/big")]
    urls += [f"{serve(Silent())}/b.zip", f"{serve(Silent(half=True))}/b.zip"]
    cache = make_cache(("127.0.0.0/8",), max_download_bytes=2000)
    with capturedLogs() as events:
        messages = [await error_of(cache.acquire(url)) for url in urls]
    assert messages == [f"cannot download bundle {url}: {FAILED}" for url in urls]
    logged = " | ".join(str(e.get("detail", "")) for e in events if "detail" in e)
    for cause in ("Connection refused", "HTTP 404", "HTTP 500", "timed out", "interrupted", "Location",
                  "over 2000 bytes"):
        assert cause in logged, logged


# Local bundles under --bundle-roots.


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/ (the roots), root/job/b.zip, outside/x.zip, and links between them."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "job").mkdir(parents=True)
    outside.mkdir()
    (root / "job" / "b.zip").write_bytes(BODY)
    (outside / "x.zip").write_bytes(zip_bytes({"secret.py": b"x"}))
    (root / "escape.zip").symlink_to(outside / "x.zip")
    (root / "escape-dir").symlink_to(outside)
    (root / "alias").symlink_to(root / "job")  # a link that stays inside
    return tmp_path


@pytest_twisted.ensureDeferred
async def test_file_bundles_outside_the_roots_are_refused(make_cache: Any, tree: Path) -> None:
    cache = make_cache(bundle_roots=[tree / "root"])
    root, outside = tree / "root", tree / "outside"
    refused = [
        str(outside / "x.zip"),
        f"file://{outside / 'x.zip'}",
        f"file://{root}/../outside/x.zip",
        str(root / "escape.zip"),
        str(root / "escape-dir" / "x.zip"),
        "/etc/passwd",
        "/no/such/file.zip",  # the same answer as for a file that exists
        str(root),
        f"{root}-sibling/b.zip",
    ]
    for url in refused:
        message = await error_of(cache.acquire(url))
        path = url.removeprefix("file://")
        assert message == f"bundle path is outside the allowed roots (--bundle-roots): {path}", url


@pytest_twisted.ensureDeferred
async def test_file_bundles_inside_the_roots_are_read(make_cache: Any, tree: Path) -> None:
    root = tree / "root"
    cache = make_cache(bundle_roots=[tree / "elsewhere", root])
    for url in (str(root / "job" / "b.zip"), f"file://{root}/job/b.zip", str(root / "alias" / "b.zip"),
                f"file://{root}/job/../job/b.zip"):
        lease = await cache.acquire(url)
        assert (lease.bundle.path / "main.py").read_bytes() == b"print('hi')"
    assert "bundle not found" in await error_of(cache.acquire(str(root / "job" / "missing.zip")))
    (root / "dir.zip").mkdir()
    os.mkfifo(root / "fifo.zip")  # never opened: it could block
    for odd in ("dir.zip", "fifo.zip"):
        assert "is not a regular file" in await error_of(cache.acquire(str(root / odd)))


@pytest_twisted.ensureDeferred
async def test_without_roots_any_path_with_a_warning(make_cache: Any, tree: Path) -> None:
    with capturedLogs() as events:
        cache = make_cache()
    assert any("--bundle-roots" in str(e.get("log_format", "")) for e in events)
    lease = await cache.acquire(str(tree / "outside" / "x.zip"))
    assert (lease.bundle.path / "secret.py").exists()
    with capturedLogs() as events:
        make_cache(bundle_roots=[tree / "root"])
    assert not any("--bundle-roots" in str(e.get("log_format", "")) for e in events)


@pytest.mark.parametrize("swapped", ["file", "directory"])
def test_a_link_swapped_in_after_the_check_is_not_followed(
    tree: Path, swapped: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check resolved root/job/b.zip; then b.zip (or job/) became a link out
    of the root. The open, one component at a time with O_NOFOLLOW, refuses."""
    root = tree / "root"
    checked = local.under_roots(str(root / "job" / "b.zip"), [str(root)])
    assert checked == (str(root), ["job", "b.zip"])
    if swapped == "file":
        (root / "job" / "b.zip").unlink()
        (root / "job" / "b.zip").symlink_to(tree / "outside" / "x.zip")
    else:
        (root / "job").rename(root / "job-old")
        (root / "job").symlink_to(tree / "outside")
        (tree / "outside" / "b.zip").write_bytes(b"outside")
    monkeypatch.setattr(local, "under_roots", lambda path, roots: checked)
    with pytest.raises(local.LocalBundleError, match="changed while being opened"):
        local.open_bundle(str(root / "job" / "b.zip"), [str(root)])


# Options.


def parsed(*argv: str) -> Any:
    options = Options()
    options.parseOptions(list(argv))
    return options.config


def test_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("FLUSTER_WORKER_BUNDLE_ROOTS", "FLUSTER_WORKER_ALLOW_PRIVATE_BUNDLE_HOSTS"):
        monkeypatch.delenv(name, raising=False)
    default = parsed()
    assert default.bundle_roots == () and default.allow_private_bundle_hosts == ()
    config = parsed("--bundle-roots", "/srv/bundles, /mnt/shared/bundles",
                    "--allow-private-bundle-hosts", "10.0.0.0/8,fd00::/8")
    assert config.bundle_roots == (Path("/srv/bundles"), Path("/mnt/shared/bundles"))
    assert config.allow_private_bundle_hosts == ("10.0.0.0/8", "fd00::/8")
    assert parsed("--allow-private-bundle-hosts", "yes").allow_private_bundle_hosts == ("0.0.0.0/0", "::/0")
    monkeypatch.setenv("FLUSTER_WORKER_ALLOW_PRIVATE_BUNDLE_HOSTS", "192.168.0.0/16")
    assert parsed().allow_private_bundle_hosts == ("192.168.0.0/16",)
    for bad in (["--bundle-roots", "relative/dir"], ["--allow-private-bundle-hosts", "10.0.0.0/33"]):
        with pytest.raises(usage.UsageError, match=bad[0]):
            parsed(*bad)
    assert os.path.isabs(str(config.bundle_roots[0]))


# https: TLS over the checked connection, verified against the URL's host name.


def certificate_for(name: str) -> tuple[Any, Any]:
    """(a CA's certificate, TLS server options with a certificate for ``name`` it signed)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from OpenSSL import crypto
    from twisted.internet import ssl

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    options = ssl.CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key), certificate=crypto.X509.from_cryptography(leaf)
    )
    return ssl.Certificate(crypto.X509.from_cryptography(ca)), options


@pytest_twisted.ensureDeferred
async def test_https_checks_the_address_and_verifies_the_name(make_cache: Any) -> None:
    from twisted.web.client import BrowserLikePolicyForHTTPS

    ca, options = certificate_for("bundles.test")
    server = Server()
    port = reactor.listenSSL(0, Site(server), options, interface="127.0.0.1")
    try:
        number = port.getHost().port
        table = {"bundles.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]}
        tls = BrowserLikePolicyForHTTPS(trustRoot=ca)
        # Refused by the address check before any TLS, like http.
        refused = make_cache(resolve=names(table), tls=tls)
        assert "is not allowed" in await error_of(refused.acquire(f"https://bundles.test:{number}/b.zip"))
        assert server.seen == []
        cache = make_cache(("127.0.0.0/8",), resolve=names(table), tls=tls)
        lease = await cache.acquire(f"https://bundles.test:{number}/b.zip")
        assert (lease.bundle.path / "main.py").exists()
        # Connected to the same checked address, but the certificate names bundles.test:
        # the name of the URL is what TLS verifies.
        message = await error_of(cache.acquire(f"https://other.test:{number}/b.zip"))
        assert message == f"cannot download bundle https://other.test:{number}/b.zip: {FAILED}"
        assert server.seen == [b"/b.zip"]
    finally:
        await port.stopListening()

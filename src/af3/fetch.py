"""Downloading audio over http(s) from untrusted URLs, and the limits every audio source is held to.

:class:`FetchPolicy` is the one place where the defaults live: the byte cap on encoded input that arrives over a
network or from a client (downloads, ``data:`` URIs, raw bytes; local files have their own cap, off by default),
the total deadline of a download, whether private networks may be
reached, how many redirects are followed, and the longest audio a whole-file load decodes. ``af3.audio``
takes a policy (or per-call keyword overrides) and a server only configures one.

:func:`fetch` is the downloader. Against a hostile server or URL it guarantees:

* a **total deadline** over name resolution, connect, TLS, headers and body: every socket operation gets the
  time that is left, body reads are small (``read1``), and a watchdog shuts the socket down at the deadline,
  so a server that trickles one byte at a time (even inside the headers) cannot hold it longer;
* a **byte cap**: a Content-Length above it is refused before the body is read, and the body is cut off as
  soon as it passes the cap, so an endless body costs at most ``max_bytes``;
* a body **shorter or longer than its Content-Length**, or an empty one, is refused;
* **no private-network access** unless ``allow_private_network=True``: every address the host name resolves
  to must be public (not loopback, private RFC 1918 / fc00::/7, link-local 169.254/16 / fe80::/10 — which
  includes cloud metadata services —, multicast, unspecified, reserved or otherwise non-global, also when
  embedded in an IPv6 address), and the connection goes to the address that was checked (no second lookup,
  so DNS rebinding cannot swap it); https still verifies the certificate for the host name (SNI and Host
  are the name). Each redirect hop is checked the same way; only http(s) redirects are followed, at most
  ``max_redirects``.

Proxies from the environment (``HTTP_PROXY`` ...) are not used: the address checks would be meaningless.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import ipaddress
import math
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

from .errors import AudioError

_MIB = 1 << 20
_READ_SIZE = 64 * 1024  # bytes asked for per read; read1 returns what has arrived, never waits for more
_REDIRECTS = (301, 302, 303, 307, 308)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_METADATA = ipaddress.ip_address("169.254.169.254")
_USER_AGENT = "af3-audio-loader"
_GRACE_S = 0.25  # how long to wait for the end of a connection after a complete Content-Length body


@dataclass(frozen=True)
class FetchPolicy:
    """What a single audio load may cost; the defaults are the library's. Override per call with keyword
    arguments of :func:`af3.audio.load_audio` / :func:`af3.audio.open_audio` or a whole policy
    (``dataclasses.replace(FetchPolicy(), max_bytes=10 << 20)``).

    ``max_bytes``: the most bytes of *encoded* input accepted from a download, a ``data:`` URI or raw bytes;
    None for no limit. ``max_file_bytes``: the same for local files, None (no limit) by default: a local path
    is the caller's own file, and decoding reads only what is used (a server that lets clients name local files
    sets it). ``deadline_s``: the total time a download may take,
    connect to last byte; None for none. ``allow_private_network``: let URLs reach loopback, private,
    link-local (cloud metadata) and other non-public addresses — an operator's opt-in for trusted callers.
    ``max_redirects``: http(s) redirects followed per download. ``max_duration_s``: the longest audio that
    a whole-file :func:`~af3.audio.load_audio` decodes (it bounds the decoded array, which a small file at a
    low sampling rate can make huge); loads with ``max_seconds`` decode only what they use, and streaming with
    ``open_audio`` keeps memory flat, so neither needs it (``open_audio`` takes a ``max_duration_s`` of its
    own). Arrays, already in memory, are exempt. None (or inf) for no limit.
    """

    max_bytes: int | None = 100 * _MIB
    max_file_bytes: int | None = None
    deadline_s: float | None = 60.0
    allow_private_network: bool = False
    max_redirects: int = 5
    #: Origins (``host:port`` exactly as written in the URL, e.g. ``"127.0.0.1:8123"``) that may be fetched although
    #: they are not public: a narrow allow-list (tests, one trusted internal host) instead of all private networks.
    allowed_origins: tuple[str, ...] = ()
    max_duration_s: float | None = 4 * 3600.0

    def __post_init__(self) -> None:
        for name in ("deadline_s", "max_duration_s"):  # infinity means no limit
            value = getattr(self, name)
            if isinstance(value, float) and math.isinf(value) and value > 0:
                object.__setattr__(self, name, None)
        _check_positive_int(self.max_bytes, "max_bytes", allow_none=True)
        _check_positive_int(self.max_file_bytes, "max_file_bytes", allow_none=True)
        _check_positive_number(self.deadline_s, "deadline_s", allow_none=True)
        _check_positive_number(self.max_duration_s, "max_duration_s", allow_none=True)
        if not isinstance(self.allowed_origins, tuple) or not all(isinstance(o, str) and ":" in o
                                                                    for o in self.allowed_origins):
            raise AudioError(f"allowed_origins must be a tuple of 'host:port' strings, got {self.allowed_origins!r}")
        if not isinstance(self.allow_private_network, bool):
            raise AudioError(f"allow_private_network must be True or False, got {self.allow_private_network!r}")
        if isinstance(self.max_redirects, bool) or not isinstance(self.max_redirects, int) \
                or not 0 <= self.max_redirects <= 50:
            raise AudioError(f"max_redirects must be a whole number from 0 to 50, got {self.max_redirects!r}")

    def with_overrides(self, **overrides: Any) -> FetchPolicy:
        """This policy with the overrides that are not None (None means "keep the policy's value")."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **changes) if changes else self


def _check_positive_int(value: Any, what: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AudioError(f"{what} must be a positive whole number of bytes (or None for no limit), got {value!r}")


def _check_positive_number(value: Any, what: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or math.isnan(value) or value <= 0:
        raise AudioError(f"{what} must be a positive number of seconds (or None for no limit), got {value!r}")


DEFAULT_POLICY = FetchPolicy()


# ----------------------------------------------------------------------------------------------------------
# addresses


def blocked_reason(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``ip`` is not a public unicast address (e.g. "a loopback address"), or None if it is one."""
    if ip.version == 6:
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            reason = blocked_reason(embedded)
            if reason:
                return f"{reason} ({embedded} inside an IPv6 address)"
    if ip.is_loopback:
        return "a loopback address"
    if ip == _METADATA:
        return "a link-local address (the cloud metadata service)"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_unspecified:
        return "the unspecified address"
    if ip.is_private:
        return "a private address"
    if ip.is_reserved:
        return "a reserved address"
    if not ip.is_global:
        return "a non-public address"
    return None


def _resolve(host: str, port: int, deadline: float | None) -> list[tuple[Any, ...]]:
    """getaddrinfo in a helper thread, so that a slow resolver cannot outlast the deadline."""
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        family = socket.AF_INET6 if literal.version == 6 else socket.AF_INET
        return [(family, socket.SOCK_STREAM, 0, "", (host, port))]
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except BaseException as e:  # handed to the caller's thread
            result["error"] = e

    worker = threading.Thread(target=work, name="af3-resolve", daemon=True)
    worker.start()
    worker.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    if worker.is_alive():
        raise TimeoutError("name resolution timed out")
    if "error" in result:
        raise result["error"]
    return result["infos"]


def check_url_addresses(url: str, policy: FetchPolicy = DEFAULT_POLICY, deadline: float | None = None
                        ) -> list[tuple[Any, ...]]:
    """Resolve the host of an http(s) ``url`` → its addresses (getaddrinfo tuples), refusing any that is not
    public unless ``policy.allow_private_network``. Opens no connection."""
    host, port, _ = _split(url)
    try:
        infos = _resolve(host, port, deadline)
    except socket.gaierror:
        raise AudioError(f"could not download audio from {_short(url)!r}: the host name {host!r} could not "
                         "be resolved; check the URL") from None
    except UnicodeError:
        raise AudioError(f"could not download audio from {_short(url)!r}: {host!r} is not a valid host "
                         "name") from None
    if not infos:
        raise AudioError(f"could not download audio from {_short(url)!r}: {host!r} has no address")
    if not policy.allow_private_network and f"{host}:{port}" not in policy.allowed_origins:
        for info in infos:
            ip = ipaddress.ip_address(info[4][0])
            reason = blocked_reason(ip)
            if reason:
                shown = host if str(ip) == host else f"{host!r} resolves to {ip}, which"
                raise AudioError(
                    f"refusing to download audio from {_short(url)!r}: {shown} is {reason}; only public "
                    "addresses may be fetched (an operator can allow private networks: allow_private_network=True, "
                    "or af3 --allow-private-urls)"
                )
    return infos


# ----------------------------------------------------------------------------------------------------------
# connections pinned to a checked address


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to ``host`` (Host header) that connects to the already-checked ``infos``."""

    def __init__(self, host: str, port: int, infos: list[tuple[Any, ...]], deadline: _Deadline):
        super().__init__(host, port, timeout=deadline.remaining())
        self._infos = infos
        self._deadline = deadline

    def _connect_tcp(self) -> socket.socket:
        last: OSError | None = None
        for family, type_, proto, _, sockaddr in self._infos:
            sock = socket.socket(family, type_, proto)
            try:
                sock.settimeout(self._deadline.remaining())
                sock.connect(sockaddr)
            except OSError as e:
                sock.close()
                last = e
                if isinstance(e, TimeoutError):
                    break
                continue
            self._deadline.watch(sock)
            return sock
        raise last if last is not None else OSError("no address to connect to")

    def connect(self) -> None:
        self.sock = self._connect_tcp()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    """The same over TLS: the certificate is verified for ``host``, which is also the SNI name."""

    default_port = http.client.HTTPS_PORT

    def connect(self) -> None:
        sock = self._connect_tcp()
        context = ssl.create_default_context()
        sock.settimeout(self._deadline.remaining())
        self.sock = context.wrap_socket(sock, server_hostname=self.host)


class _Deadline:
    """Time left until a monotonic deadline, and a watchdog that shuts the watched sockets down when it
    passes (a blocked read then returns at once, whatever the server trickles)."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.end = None if seconds is None else time.monotonic() + seconds
        self._lock = threading.Lock()
        self._watched: list[socket.socket] = []
        self.fired = False
        self._timer = None
        if seconds is not None:
            self._timer = threading.Timer(seconds, self._fire)
            self._timer.daemon = True
            self._timer.start()

    def remaining(self) -> float | None:
        if self.end is None:
            return None
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        return left

    def watch(self, sock: socket.socket) -> None:
        dup = sock.dup()  # survives the TLS wrapper detaching the original socket object
        with self._lock:
            self._watched.append(dup)
            fired = self.fired
        if fired:
            self._shutdown(dup)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            watched = list(self._watched)
        for sock in watched:
            self._shutdown(sock)

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            watched, self._watched = self._watched, []
        for sock in watched:
            sock.close()

    def expired(self) -> bool:
        return self.fired or (self.end is not None and time.monotonic() >= self.end)


# ----------------------------------------------------------------------------------------------------------
# fetching


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _split(url: str) -> tuple[str, int, str]:
    """http(s) URL → (host, port, path with query). Raises AudioError for what cannot be fetched."""
    name = _short(url)
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise AudioError(f"invalid audio URL {name!r}: {e}; check the URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise AudioError(f"unsupported URL scheme '{scheme}://' in {name!r}; use an http(s) URL")
    if parts.username is not None or parts.password is not None:
        raise AudioError(f"audio URL {name!r} holds a user name or password; credentials in URLs are not "
                         "supported")
    host = parts.hostname
    if not host:
        raise AudioError(f"invalid audio URL {name!r}: it names no host")
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise AudioError(f"invalid audio URL {name!r}: it contains spaces or control characters; "
                         "percent-encode them")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise AudioError(f"invalid audio URL {name!r}: {host!r} is not a valid host name") from None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    path = urllib.parse.quote(path, safe="/?&=%:@!$'()*+,;~-._")  # non-ASCII → UTF-8 %-escapes
    return host, port or (443 if scheme == "https" else 80), path


def fetch(url: str, policy: FetchPolicy = DEFAULT_POLICY) -> bytes:
    """GET an http(s) ``url`` under ``policy`` → the body. Every failure is an :class:`AudioError`."""
    deadline = _Deadline(policy.deadline_s)
    name = _short(url)
    try:
        return _fetch(url, policy, deadline)
    except AudioError:
        raise
    except TimeoutError:
        raise _timed_out(name, policy) from None
    except Exception as e:  # network failures of every kind → one readable line
        if deadline.expired():
            raise _timed_out(name, policy) from None
        raise AudioError(f"could not download audio from {name!r}: {_describe_network_error(e)}") from None
    finally:
        deadline.close()


def _timed_out(name: str, policy: FetchPolicy) -> AudioError:
    return AudioError(f"could not download audio from {name!r}: timed out after {policy.deadline_s:g} s "
                      "(deadline_s); the server is too slow or not answering")


def _describe_network_error(e: Exception) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"the server's TLS certificate could not be verified ({e.verify_message})"
    if isinstance(e, ssl.SSLError):
        return "the TLS handshake failed (is it really an https server?)"
    if isinstance(e, ConnectionRefusedError):
        return "the connection was refused (nothing listens at that host and port)"
    if isinstance(e, (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected)):
        return "the server closed the connection before it answered"
    if isinstance(e, http.client.IncompleteRead):
        return f"the server closed the connection after {len(e.partial)} bytes, before the end of the body"
    if isinstance(e, http.client.HTTPException):
        return "the server's answer is not valid HTTP"
    if isinstance(e, OSError) and e.strerror:
        return f"network error: {e.strerror.lower()}"
    return f"network error ({type(e).__name__})"


def _fetch(url: str, policy: FetchPolicy, deadline: _Deadline) -> bytes:
    current = url
    for hop in range(policy.max_redirects + 1):
        host, port, path = _split(current)
        infos = check_url_addresses(current, policy, deadline.end)
        https = urllib.parse.urlsplit(current).scheme.lower() == "https"
        cls = _PinnedHTTPSConnection if https else _PinnedHTTPConnection
        conn = cls(host, port, infos, deadline)
        try:
            conn.request("GET", path, headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity",
                                               "Connection": "close"})
            sock = conn.sock  # getresponse hands the socket to the response and forgets it
            sock.settimeout(deadline.remaining())
            response = conn.getresponse()
            if response.status in _REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise AudioError(f"could not download audio from {_short(url)!r}: HTTP {response.status} "
                                     "redirect without a Location")
                target = urllib.parse.urljoin(current, location.strip())
                if urllib.parse.urlsplit(target).scheme.lower() not in ("http", "https"):
                    raise AudioError(f"refusing a redirect from {_short(current)!r} to non-http(s) "
                                     f"{_short(target)!r}")
                if hop == policy.max_redirects:
                    raise AudioError(f"could not download audio from {_short(url)!r}: more than "
                                     f"{policy.max_redirects} redirects (max_redirects); is it a redirect loop?")
                current = target
                continue
            if response.status != 200:
                reason = "".join(c for c in " ".join(str(response.reason).split()) if c.isprintable())[:80]
                raise AudioError(f"could not download audio from {_short(url)!r}: HTTP {response.status} "
                                 f"{reason}".rstrip())
            try:
                return _read_body(response, sock, _short(url), policy, deadline)
            finally:
                response.close()
        finally:
            conn.close()
    raise AssertionError("unreachable")  # the loop returns or raises


def _read_body(response: http.client.HTTPResponse, sock: socket.socket, name: str,
               policy: FetchPolicy, deadline: _Deadline) -> bytes:
    cap = policy.max_bytes
    declared_text = response.getheader("Content-Length")
    chunked = (response.getheader("Transfer-Encoding") or "").lower().strip().endswith("chunked")
    declared: int | None = None
    if declared_text is not None and not chunked:
        if not declared_text.strip().isdigit():
            raise AudioError(f"could not download audio from {name!r}: invalid Content-Length "
                             f"{_short(declared_text, 40)!r}")
        declared = int(declared_text.strip())
        if cap is not None and declared > cap:
            raise AudioError(f"the download from {name!r} is too large: {declared} bytes (Content-Length), the "
                             f"limit is {cap} bytes (max_bytes)")
        if declared == 0:
            raise AudioError(f"the download from {name!r} is empty (0 bytes)")
    # Chunked bodies go through http.client (it removes the framing); others are read from the socket file
    # directly, so that the Content-Length is ours to enforce (http.client silently stops at it).
    read1 = response.read1 if chunked else response.fp.read1
    buf = bytearray()
    while True:
        want = _READ_SIZE if declared is None else min(_READ_SIZE, declared + 1 - len(buf))
        timeout = deadline.remaining()
        if declared is not None and len(buf) == declared:
            # One byte more would mean the body is longer than declared. We asked for "Connection: close", so
            # the server should close now; one that keeps the connection open gets a short grace.
            timeout = _GRACE_S if timeout is None else min(timeout, _GRACE_S)
        sock.settimeout(timeout)
        try:
            chunk = read1(want)
        except TimeoutError:
            if declared is not None and len(buf) == declared:
                break  # the server kept the connection open after a complete body
            raise
        except OSError:
            if deadline.expired():
                raise TimeoutError from None
            raise
        if deadline.expired():
            raise TimeoutError
        if not chunk:
            break
        buf += chunk
        if cap is not None and len(buf) > cap:
            raise AudioError(f"the download from {name!r} is too large: more than {cap} bytes, the limit is "
                             f"{cap} bytes (max_bytes)")
        if declared is not None and len(buf) > declared:
            raise AudioError(f"the download from {name!r} is longer than its Content-Length ({declared} bytes): "
                             "the server's answer is malformed")
    if declared is not None and len(buf) < declared:
        raise AudioError(f"the download from {name!r} was cut off: {len(buf)} of the {declared} bytes its "
                         "Content-Length promises arrived; try again")
    if not buf:
        raise AudioError(f"the download from {name!r} is empty (0 bytes)")
    return bytes(buf)

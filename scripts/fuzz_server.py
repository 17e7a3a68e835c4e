"""Fuzz the server's HTTP surface over raw sockets: malformed and mutated requests, nothing spared.

    python scripts/fuzz_server.py [--requests 3000] [--concurrency 16] [--seed 1]

Starts two simulated llama-servers and a ``llamacpp-ha-server`` process (header and body read
deadlines of 2 s, so incomplete requests are answered inside the run), then sends requests built
at random from valid ones and mutations of every part: odd methods, request lines and HTTP
versions; paths that are long, encoded, absolute or not UTF-8; header names and values with
non-ASCII bytes, control characters, duplicates and lengths up to 100 KB; bodies that are
hostile JSON (lone surrogates, 5,000 levels deep, wrong types everywhere), invalid UTF-8,
truncated, shorter or longer than their ``Content-Length``, badly chunked, or 17 MiB. Exits 1
unless:

- no response >= 500 was made by the server itself (a backend's own error carries the
  ``x-llamacpp-ha-backend`` header and is forwarded as it is);
- every error response (>= 400) has a body in OpenAI's shape ``{"error": {"message", "type", "code"}}``;
- every request was answered within 10 s (a connection closed without an answer counts as
  unanswered).

Traffic goes to 127.0.0.1 only and is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import h11

from llamacpp_ha._routes import ROUTES
from llamacpp_ha.sim import SimProcess, free_port, free_ports

ANSWER_WITHIN_S = 10.0
MODEL = "tiny-random-llama"
_PATHS = [*ROUTES, "/v1/models", "/health", "/monitor", "/monitor/data", "/metrics", "/", "/props", "/slots"]
_METHODS = ["POST", "POST", "POST", "GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "FOO", "CONNECT", "TRACE"]


def _json_value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, -5, 1, 2**63, -(2**63), 10**30])
    if kind == 3:
        return rng.choice([0.5, -0.0, 1e308, -1e-308, 3.14])
    if kind in (4, 5):
        return rng.choice(["", "x", "user", "assistant", "\u00e9t\u00e9", "\U0001f600", "a" * 3000, "\x00\x1f"])
    if kind in (6, 7):
        return [_json_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["role", "content", "x", ""]): _json_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def _body(rng: random.Random, path: str) -> bytes:
    valid: dict[str, object] = {"model": MODEL, "max_tokens": rng.randint(1, 8), "stream": rng.random() < 0.3}
    if "chat" in path or path in ("/v1/messages", "/v1/responses", "/apply-template"):
        valid["messages"] = [{"role": "user", "content": "hi " + str(rng.random())}]
    if "complet" in path or path in ("/infill", "/tokenize"):
        valid["prompt"] = "Once upon a time " + str(rng.random())
        valid["content"] = valid["prompt"]
    if path == "/v1/responses":
        valid["input"] = "hello"
    kind = rng.randrange(14)
    if kind < 4:
        return json.dumps(valid).encode()
    if kind < 7:  # one field replaced by anything
        field = rng.choice([*valid, "messages", "prompt", "n", "temperature", "id_slot", "input", "documents"])
        return json.dumps({**valid, field: _json_value(rng)}).encode()
    if kind == 7:
        return json.dumps(_json_value(rng)).encode()
    if kind == 8:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    if kind == 9:
        return rng.choice([b"", b"{", b'{"messages": [', b"\xff\xfe{}", b"null", b"[]", b'{"model": 1e999}'])
    if kind == 10:
        return rng.choice(
            [b'{"model": "\\ud800", "messages": []}', b'{"messages": [{"role": "user", "content": "\\udfff"}]}']
        )
    if kind == 11:
        depth = rng.choice([100, 2000, 5000])
        return rng.choice([b"[" * depth + b"]" * depth, b'{"a": ' * depth + b"1" + b"}" * depth])
    if kind == 12:
        return json.dumps(valid).encode()[: rng.randrange(1, 20)]
    return b'{"model": "' + MODEL.encode() + b'", "prompt": "' + b"x" * (17 * 1024 * 1024) + b'"}'


def _request(rng: random.Random) -> tuple[str, bytes]:
    """One request as raw bytes, and a label of what was mutated."""
    method = rng.choice(_METHODS)
    path = rng.choice(_PATHS)
    label = "valid-ish"
    body = _body(rng, path) if method in ("POST", "PUT", "PATCH") or rng.random() < 0.1 else b""
    target = path.encode()
    mutation = rng.randrange(12)
    if mutation == 0:
        target, label = rng.choice([
            b"/" + b"a" * 10_000, b"/v1/chat/completions%00", b"/v1/../admin", b"*", b"http://evil.example/x",
            b"//", b"/v1/chat/completions?x=\xff\xfe", b"/\xc3\x28", b"/v1/chat/completions#frag", b"",
        ]), "path"  # fmt: skip
    headers: list[tuple[bytes, bytes]] = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")]
    if mutation == 1:
        name, value = rng.choice([
            (b"x-title", "caf\u00e9".encode("latin-1")), (b"x-title", b"\xff\xfe\xfd"),
            (b"x-title", b"a\x01b"), (b"x bad", b"1"), (b"x-big", b"v" * 100_000), (b"x-big", b"v" * 16_000),
            (b"authorization", b"Bearer \xff"), (b"x-session-id", b"\xe2\x82\xac" * 100), (b"", b"empty name"),
        ])  # fmt: skip
        headers.append((name, value))
        label = "header"
    if mutation == 2:
        headers += [(f"x-h{i}".encode(), b"1") for i in range(rng.choice([100, 300]))]
        label = "many headers"
    version = b"HTTP/1.1"
    if mutation == 3:
        version, label = rng.choice([b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x", b"HTTP/9", b""]), "version"
    if mutation == 4:
        method, label = rng.choice(["G ET", "", "P\x00ST", "post", "X" * 200]), "method"
    length = str(len(body)).encode()
    framing = [(b"content-length", length)]
    if mutation == 5:
        framing, label = rng.choice([
            [(b"content-length", b"-1")], [(b"content-length", b"abc")],
            [(b"content-length", length), (b"content-length", b"3")], [(b"content-length", b"99999999999999999999")],
            [(b"content-length", str(len(body) + 10).encode())],  # shorter than announced: a body deadline
        ]), "content-length"  # fmt: skip
    chunked = mutation == 6
    if chunked:
        framing, label = [(b"transfer-encoding", b"chunked")], "chunked"
    if mutation == 7:
        headers.append((b"upgrade", b"websocket"))
        headers.append((b"connection", b"upgrade"))
        label = "upgrade"
    if mutation == 8:
        headers = [(b"host", b"127.0.0.1")]
        label = "no content-type"
    head = method.encode("latin-1", "replace") + b" " + target + (b" " + version if version else b"") + b"\r\n"
    head += b"".join(name + b": " + value + b"\r\n" for name, value in [*headers, *framing]) + b"\r\n"
    if chunked:
        payload = rng.choice([
            hex(len(body))[2:].encode() + b"\r\n" + body + b"\r\n0\r\n\r\n", b"zz\r\n" + body + b"\r\n0\r\n\r\n",
            hex(len(body) + 5)[2:].encode() + b"\r\n" + body + b"\r\n0\r\n\r\n",
        ])  # fmt: skip
        return label, head + payload
    if len(body) > 1 << 20:
        label = "17 MiB body"
    return label, head + body


async def _exchange(port: int, raw: bytes) -> tuple[int | None, dict[bytes, bytes], bytes, str]:
    """Send one raw request and read one response: (status, headers, body, problem)."""
    head_request = raw.startswith(b"HEAD ")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = h11.Connection(h11.CLIENT)
    status: int | None = None
    headers: dict[bytes, bytes] = {}
    body = bytearray()
    try:
        with contextlib.suppress(ConnectionError):
            writer.write(raw)
            await writer.drain()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                conn.receive_data(data)
                if not data and status is None:
                    return None, headers, bytes(body), "closed without an answer"
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.lower(): v for k, v in event.headers}
                if head_request or conn.their_state is h11.DONE:
                    break  # an answer to HEAD has no body, whatever its content-length says
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
    except h11.RemoteProtocolError as exc:
        return status, headers, bytes(body), f"unparsable response: {exc}"
    except ConnectionError:
        if status is None:
            return None, headers, bytes(body), "connection reset without an answer"
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return status, headers, bytes(body), ""


def _judge(method: str, status: int | None, headers: dict[bytes, bytes], body: bytes, problem: str) -> str:
    """'' when the answer is acceptable, else what is wrong."""
    if problem:
        return problem
    assert status is not None
    if status >= 500 and b"x-llamacpp-ha-backend" not in headers:
        return f"{status} made by the server"
    if status >= 400 and method != "HEAD" and body:
        try:
            error = json.loads(body)["error"]
            if not {"message", "type", "code"} <= set(error):
                return f"{status} error without message/type/code"
        except (ValueError, KeyError, TypeError):
            return f"{status} body not in OpenAI's shape: {body[:80]!r}"
    elif status >= 400 and method != "HEAD":
        return f"{status} with an empty body"
    return ""


async def run(args: argparse.Namespace) -> int:
    sims = [
        SimProcess(port=port, slots=4, decode_tokens_per_s=2000, prefill_tokens_per_s=200_000).launch()
        for port in free_ports(2)
    ]
    server: subprocess.Popen[bytes] | None = None
    try:
        for sim in sims:
            sim.wait_ready()
        port = free_port()
        config = {
            "backends": [{"url": sim.url} for sim in sims],
            "poll_interval_s": 0.5,
            "server": {"port": port, "header_timeout_s": 2, "body_timeout_s": 2},
        }
        path = Path(tempfile.mkdtemp()) / "config.json"
        path.write_text(json.dumps(config))
        command = [sys.executable, "-m", "llamacpp_ha_server", "--config", str(path), "--log-level", "error"]
        server = await asyncio.to_thread(subprocess.Popen, command)
        for _ in range(100):
            with contextlib.suppress(OSError):
                status, _, _, _ = await _exchange(port, b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
                if status == 200:
                    break
            await asyncio.sleep(0.1)
        rng = random.Random(args.seed)
        requests = [_request(rng) for _ in range(args.requests)]
        statuses: Counter[str] = Counter()
        labels: Counter[str] = Counter()
        defects: Counter[str] = Counter()
        examples: dict[str, bytes] = {}
        semaphore = asyncio.Semaphore(args.concurrency)
        started = time.monotonic()

        async def one(label: str, raw: bytes) -> None:
            method = raw.split(b" ", 1)[0].decode("latin-1")
            async with semaphore:
                try:
                    answer = await asyncio.wait_for(_exchange(port, raw), ANSWER_WITHIN_S)
                except TimeoutError:
                    answer = (None, {}, b"", f"no answer in {ANSWER_WITHIN_S:g} s")
            status, headers, body, problem = answer
            labels[label] += 1
            statuses[str(status) if status is not None else "none"] += 1
            verdict = _judge(method, status, headers, body, problem)
            if verdict:
                key = f"{verdict} ({label})"
                defects[key] += 1
                examples.setdefault(key, raw[:300] + b"\n           answered: " + body[:300])

        await asyncio.gather(*(one(label, raw) for label, raw in requests))
        elapsed = time.monotonic() - started
        health, _, _, _ = await _exchange(port, b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
        for sim in sims:
            sim.kill()
    print(f"{args.requests} requests in {elapsed:.0f} s; server healthy afterwards: {health == 200}")
    print("  mutations: " + ", ".join(f"{k} {v}" for k, v in labels.most_common()))
    print("  statuses:  " + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())))
    for defect, count in defects.most_common():
        print(f"  DEFECT {count:5d}  {defect}\n           e.g. {examples[defect]!r}")
    ok = not defects and health == 200
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())

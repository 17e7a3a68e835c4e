"""`llamacpp-ha-server --demo`: the curl it prints works as pasted."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import time

import httpx2

from llamacpp_ha.sim import free_port


def test_the_demo_prints_a_curl_that_works() -> None:
    port = free_port()
    command = [sys.executable, "-m", "llamacpp_ha_server", "--demo", "--port", str(port), "--log-level", "warning"]
    demo = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert demo.stdout is not None
        deadline = time.monotonic() + 30
        curl = None
        while curl is None and time.monotonic() < deadline:
            line = demo.stdout.readline()
            assert line, "the demo exited"
            if line.strip().startswith("try:"):
                curl = line.split("try:", 1)[1].strip()
        assert curl is not None
        args = shlex.split(curl)
        assert args[0] == "curl"
        url = next(a for a in args if a.startswith("http://"))
        assert re.fullmatch(rf"http://127\.0\.0\.1:{port}/v1/chat/completions", url)
        body = json.loads(args[args.index("-d") + 1])
        headers = dict([args[args.index("-H") + 1].split(": ", 1)])
        while True:  # printed just before the server listens (a person pasting is slower)
            try:
                if httpx2.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            assert time.monotonic() < deadline, "the demo server did not come up"
            time.sleep(0.05)
        response = httpx2.post(url, content=json.dumps(body), headers=headers, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"]
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(timeout=15)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.wait(timeout=10)
        if demo.stdout is not None:
            demo.stdout.close()

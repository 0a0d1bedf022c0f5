#!/usr/bin/env python3
"""Drive Dify plugins over stdio exactly like the plugin daemon does, and record transcripts.

Stdlib only; run it with any Python >= 3.9 after tests/tooling/setup-venvs.sh:

    python3 tests/tooling/stdio_capture.py              # write tests/fixtures/transcripts/*
    python3 tests/tooling/stdio_capture.py --measure 5  # only time start -> first heartbeat

Every plugin process is started as the daemon starts a local plugin: `<venv>/bin/python -m main`,
cwd = plugin dir, INSTALL_METHOD=local, stdin/stdout/stderr pipes. Stdin is kept open for the
whole life of the process (closing it makes the SDK's reader spin); processes are stopped with
SIGTERM, then SIGKILL, on their own process group.

Each capture runs in a fresh process and sends its request right after the first heartbeat
(which the SDK prints immediately at start), so no periodic heartbeat (every 10 s) lands inside
a request transcript.

Files written per capture (<plugin>-<case>-<py>):
    .txt         exact stdout bytes: for `startup`, from process start to the end of the first
                 heartbeat; otherwise from the moment the request line was written to the end of
                 that session's `end` event (or to process exit / a fixed wait, see below)
    .stdin.txt   exact bytes written to stdin for the case (envelopes, backwards responses)
    .stderr.txt  stderr bytes seen during the case, only when non-empty
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENVS = {"py312": ROOT / ".venv/py312/bin/python", "py311": ROOT / ".venv/py311/bin/python"}
PLUGINS = {
    "sample": ROOT / "template/plugin",
    "faults": ROOT / "tests/fixtures/plugins/faults",
    "import_error": ROOT / "tests/fixtures/plugins/import_error",
}
OUT_DIR = ROOT / "tests/fixtures/transcripts"

HEARTBEAT = b'{"event":"heartbeat","session_id":null,"data":{}}\n\n'
DEMO_KEY = "sri-demo-key"


def end_marker(session_id: str) -> bytes:
    return (
        '{"event":"session","session_id":"%s","data":{"type":"end","data":{}}}\n\n' % session_id
    ).encode()


def dumps(obj: object) -> bytes:
    # Compact JSON like Go's encoding/json (the daemon); key order as given.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def envelope(session_id: str, event: str, data: dict) -> dict:
    # Same keys, same order as the daemon's session_manager.pluginInStreamMessage.
    return {
        "session_id": session_id,
        "conversation_id": None,
        "message_id": None,
        "app_id": None,
        "endpoint_id": None,
        "context": {},
        "event": event,
        "data": data,
    }


def invoke_tool(session_id: str, provider: str, tool: str, params: dict, creds: dict) -> dict:
    # data keys sorted, as the daemon sends them.
    return envelope(
        session_id,
        "request",
        {
            "action": "invoke_tool",
            "credential_type": "api-key",
            "credentials": creds,
            "provider": provider,
            "tool": tool,
            "tool_parameters": params,
            "type": "tool",
            "user_id": "u1",
        },
    )


def validate(session_id: str, provider: str, creds: dict) -> dict:
    return envelope(
        session_id,
        "request",
        {
            "action": "validate_tool_credentials",
            "credentials": creds,
            "provider": provider,
            "type": "tool",
            "user_id": "u1",
        },
    )


def backwards_response(session_id: str, request_id: str, event: str, message: str, data) -> dict:
    # Same keys, same order as the daemon's BackwardsInvocationResponseEvent.
    return envelope(
        session_id,
        "backwards_response",
        {"backwards_request_id": request_id, "event": event, "message": message, "data": data},
    )


class PluginProcess:
    def __init__(self, python: Path, plugin_dir: Path, env: dict | None = None) -> None:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        full_env["INSTALL_METHOD"] = "local"
        full_env["PYTHONDONTWRITEBYTECODE"] = "1"  # keep __pycache__ out of the plugin dirs
        full_env.update(env or {})
        self.out = bytearray()
        self.err = bytearray()
        self.cv = threading.Condition()
        self.first_heartbeat_at: float | None = None
        self.first_stdout_at: float | None = None
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [str(python), "-m", "main"],
            cwd=plugin_dir,
            env=full_env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.out, True), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.err, False), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _pump(self, stream, buf: bytearray, is_stdout: bool) -> None:
        fd = stream.fileno()
        while True:
            chunk = os.read(fd, 1 << 20)
            now = time.monotonic()
            with self.cv:
                if not chunk:
                    self.cv.notify_all()
                    return
                buf.extend(chunk)
                if is_stdout:
                    if self.first_stdout_at is None:
                        self.first_stdout_at = now - self.t0
                    if self.first_heartbeat_at is None and HEARTBEAT in buf:
                        self.first_heartbeat_at = now - self.t0
                self.cv.notify_all()

    def wait_for(self, pred, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.cv:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                if self.proc.poll() is not None and not any(t.is_alive() for t in self._threads):
                    return pred()
                self.cv.wait(min(left, 0.05))
            return True

    def wait_stdout(self, needle: bytes, start: int, timeout: float) -> int:
        """Return the index just past `needle` in stdout (searching from `start`), or -1."""
        found = [-1]

        def pred() -> bool:
            i = self.out.find(needle, start)
            if i >= 0:
                found[0] = i + len(needle)
                return True
            return False

        self.wait_for(pred, timeout)
        return found[0]

    def send(self, obj) -> bytes:
        line = obj if isinstance(obj, bytes) else dumps(obj)
        self.proc.stdin.write(line)
        self.proc.stdin.flush()
        return line

    def stop(self) -> int:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(3)
        for t in self._threads:
            t.join(2)
        if self.proc.stdin:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        return self.proc.returncode


def write(name: str, data: bytes) -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / name).write_bytes(bytes(data))


def sid(n: int) -> str:
    return "00000000-0000-4000-8000-%012d" % n


class Capture:
    """One case: fresh plugin process, wait for the first heartbeat, run `body`, save files."""

    def __init__(self, py: str, plugin: str, case: str, env: dict | None = None) -> None:
        self.py, self.plugin, self.case = py, plugin, case
        self.env = env
        self.stdin = bytearray()
        self.notes: dict = {}

    def __enter__(self) -> "Capture":
        self.p = PluginProcess(VENVS[self.py], PLUGINS[self.plugin], self.env)
        hb_end = self.p.wait_stdout(HEARTBEAT, 0, 60)
        if hb_end < 0:
            self.p.stop()
            raise RuntimeError(
                f"{self.plugin}/{self.py}: no heartbeat; stderr:\n{self.p.err.decode(errors='replace')}"
            )
        self.startup = bytes(self.p.out[:hb_end])
        self.out_start = hb_end
        self.err_start = len(self.p.err)
        return self

    def send(self, obj) -> bytes:
        line = self.p.send(obj)
        self.stdin.extend(line)
        return line

    def mark(self) -> None:
        """Transcript starts here (call right before the request is written)."""
        self.out_start = len(self.p.out)
        self.err_start = len(self.p.err)

    def save(self, out_end: int | None = None) -> None:
        base = f"{self.plugin}-{self.case}-{self.py}"
        end = len(self.p.out) if out_end is None or out_end < 0 else out_end
        write(base + ".txt", self.p.out[self.out_start : end])
        write(base + ".stdin.txt", self.stdin)
        err = self.p.err[self.err_start :]
        if err:
            write(base + ".stderr.txt", err)
        print(f"  {base}: {end - self.out_start} stdout bytes, {len(err)} stderr bytes {self.notes or ''}")

    def __exit__(self, *exc) -> None:
        self.notes.setdefault("rc", self.p.stop())


def run_request(c: Capture, session_id: str, obj: dict, timeout: float = 30) -> int:
    c.mark()
    c.send(obj)
    end = c.p.wait_stdout(end_marker(session_id), c.out_start, timeout)
    if end < 0:
        raise RuntimeError(f"{c.plugin}/{c.case}/{c.py}: no end event; stdout tail: {bytes(c.p.out[-500:])!r}")
    return end


def capture_all(py: str) -> None:
    creds = {"api_key": DEMO_KEY}
    print(f"== {py}")

    # --- sample plugin ---
    with Capture(py, "sample", "startup") as c:
        write(f"sample-startup-{py}.txt", c.startup)
        print(f"  sample-startup-{py}: {len(c.startup)} bytes")
    with Capture(py, "sample", "echo") as c:
        c.save(run_request(c, sid(1), invoke_tool(sid(1), "sample", "echo", {"text": "hello world"}, creds)))
    with Capture(py, "sample", "stream") as c:
        c.save(
            run_request(c, sid(2), invoke_tool(sid(2), "sample", "stream", {"n": 3, "delay_ms": 10}, creds))
        )
    with Capture(py, "sample", "whoami") as c:
        c.save(run_request(c, sid(3), invoke_tool(sid(3), "sample", "whoami", {}, creds)))
    with Capture(py, "sample", "validate_ok") as c:
        c.save(run_request(c, sid(4), validate(sid(4), "sample", creds)))
    with Capture(py, "sample", "validate_fail") as c:
        c.save(run_request(c, sid(5), validate(sid(5), "sample", {"api_key": "wrong-key"})))
    with Capture(py, "sample", "unknown_tool") as c:
        c.save(run_request(c, sid(6), invoke_tool(sid(6), "sample", "nope", {}, creds)))
    with Capture(py, "sample", "unknown_action") as c:
        env = envelope(sid(8), "request", {"action": "no_such_action", "type": "tool", "user_id": "u1"})
        c.save(run_request(c, sid(8), env))
    with Capture(py, "sample", "invalid_request") as c:
        # invoke_tool without "provider"/"tool": the request model fails to validate
        env = envelope(sid(9), "request", {"action": "invoke_tool", "credentials": {}, "tool_parameters": {},
                                           "type": "tool", "user_id": "u1"})
        c.save(run_request(c, sid(9), env))
    with Capture(py, "sample", "malformed_line") as c:
        c.mark()
        c.send(b"this is not json\n")
        c.send(b'{"session_id":"x","event":"request"}\n')  # valid JSON, missing "data"
        c.send(b'{"session_id":"x","event":"bogus","data":{}}\n')  # unknown event
        c.p.wait_for(lambda: c.p.out.count(b'"event":"error"', c.out_start) >= 3, 5)
        time.sleep(0.5)
        c.save()
    with Capture(py, "sample", "unknown_backwards_response") as c:
        c.mark()
        c.send(backwards_response(sid(7), "0" * 32, "response", "struct", {"data": "00"}))
        time.sleep(1.0)
        c.save()

    # --- faults plugin ---
    with Capture(py, "faults", "startup") as c:
        write(f"faults-startup-{py}.txt", c.startup)
        print(f"  faults-startup-{py}: {len(c.startup)} bytes")

    value = b"hello from dify"
    with Capture(py, "faults", "callback") as c:
        s = sid(11)
        c.mark()
        c.send(invoke_tool(s, "faults", "callback", {"key": "greeting"}, {}))
        invoke_end = c.p.wait_stdout(b'"type":"invoke"', c.out_start, 30)
        invoke_end = c.p.wait_stdout(b"\n\n", invoke_end, 5)
        line = bytes(c.p.out[c.out_start : invoke_end]).strip().splitlines()[-1]
        rid = json.loads(line)["data"]["data"]["backwards_request_id"]
        write(f"faults-callback-invoke-{py}.txt", bytes(c.p.out[c.out_start : invoke_end]))
        c.send(backwards_response(s, rid, "response", "struct", {"data": value.hex()}))
        c.send(backwards_response(s, rid, "end", "", None))
        c.save(c.p.wait_stdout(end_marker(s), c.out_start, 30))
    with Capture(py, "faults", "callback_error") as c:
        s = sid(12)
        c.mark()
        c.send(invoke_tool(s, "faults", "callback", {"key": "missing"}, {}))
        invoke_end = c.p.wait_stdout(b'"type":"invoke"', c.out_start, 30)
        invoke_end = c.p.wait_stdout(b"\n\n", invoke_end, 5)
        line = bytes(c.p.out[c.out_start : invoke_end]).strip().splitlines()[-1]
        rid = json.loads(line)["data"]["data"]["backwards_request_id"]
        msg = "load data failed, please check if the key is correct or you have not set it"
        c.send(backwards_response(s, rid, "error", msg, None))
        c.send(backwards_response(s, rid, "end", "", None))
        c.save(c.p.wait_stdout(end_marker(s), c.out_start, 30))
    with Capture(py, "faults", "callback_timeout", env={"MAX_INVOCATION_TIMEOUT": "2"}) as c:
        s = sid(13)
        t = time.monotonic()
        end = run_request(c, s, invoke_tool(s, "faults", "callback", {}, {}), timeout=30)
        c.notes["seconds"] = round(time.monotonic() - t, 2)
        c.save(end)
    with Capture(py, "faults", "garbage") as c:
        c.save(run_request(c, sid(14), invoke_tool(sid(14), "faults", "garbage", {}, {})))
    with Capture(py, "faults", "leak_secret") as c:
        end = run_request(c, sid(15), invoke_tool(sid(15), "faults", "leak_secret", {}, {"api_key": "s3cr3t-value"}))
        c.p.wait_for(lambda: b"\n" in c.p.err[c.err_start :], 2)
        c.save(end)
    with Capture(py, "faults", "crash") as c:
        c.mark()
        c.send(invoke_tool(sid(16), "faults", "crash", {}, {}))
        c.p.proc.wait(30)
        c.p.wait_for(lambda: False, 0.3)  # let the pumps drain
        c.notes["rc"] = c.p.proc.returncode
        c.save()
    with Capture(py, "faults", "hang") as c:
        c.mark()
        c.send(invoke_tool(sid(17), "faults", "hang", {}, {}))
        c.p.wait_stdout(b'"text":"hanging"', c.out_start, 30)
        time.sleep(2)
        c.save()
    with Capture(py, "faults", "huge") as c:
        # Not saved as a transcript (6 MiB); record the size of the stream line instead.
        s = sid(18)
        c.mark()
        c.send(invoke_tool(s, "faults", "huge", {}, {}))
        end = c.p.wait_stdout(end_marker(s), c.out_start, 60)
        lines = bytes(c.p.out[c.out_start : end]).split(b"\n")
        print(f"  faults-huge-{py}: longest stdout line {max(len(x) for x in lines)} bytes")

    # --- import_error plugin ---
    p = PluginProcess(VENVS[py], PLUGINS["import_error"])
    try:
        rc = p.proc.wait(60)
    finally:
        p.stop()
    p.wait_for(lambda: False, 0.3)
    write(f"import_error-startup-{py}.txt", p.out)
    write(f"import_error-startup-{py}.stderr.txt", p.err)
    print(f"  import_error-startup-{py}: rc={rc} after {time.monotonic() - p.t0:.2f}s, stdout {len(p.out)} bytes")


def measure(py: str, runs: int) -> dict:
    hb, first = [], []
    for _ in range(runs):
        p = PluginProcess(VENVS[py], PLUGINS["sample"])
        try:
            p.wait_stdout(HEARTBEAT, 0, 60)
            hb.append(p.first_heartbeat_at)
            first.append(p.first_stdout_at)
            # The second heartbeat arrives HEARTBEAT_INTERVAL (10 s) later; not waited for here.
        finally:
            p.stop()
    return {
        "python": py,
        "runs": runs,
        "first_heartbeat_s": [round(x, 3) for x in hb],
        "first_heartbeat_median_s": round(statistics.median(hb), 3),
        "first_stdout_median_s": round(statistics.median(first), 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--py", choices=sorted(VENVS), action="append", help="venv(s) to use (default: both)")
    ap.add_argument("--measure", type=int, metavar="N", help="only measure start -> first heartbeat, N runs")
    args = ap.parse_args()
    pys = args.py or ["py312", "py311"]
    for py in pys:
        if not VENVS[py].exists():
            print(f"missing {VENVS[py]}: run tests/tooling/setup-venvs.sh", file=sys.stderr)
            return 2
    if args.measure:
        for py in pys:
            print(json.dumps(measure(py, args.measure)))
        return 0
    for py in pys:
        capture_all(py)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make loadtest`: a locust spike against flashsale, then the oversell / lost check.

Against FLASHSALE_URL when set (with FLASHSALE_ADMIN_TOKEN and FLASHSALE_JWT_SECRET
of that service, e.g. the ones `make run` prints), else against a `flashsale up`
it starts itself (the servers of FLASHSALE_REDIS_URL / FLASHSALE_DATABASE_URL,
or embedded ones in a temporary directory). It creates a hot sale through the
admin API, runs locust headless with the spike shape of loadtest/locustfile.py
(bounded in time), writes locust's CSV and HTML report under loadtest/results/,
waits for the queue to drain and prints the check:

  oversell: accepted (the buyers' 202s, and the ledger) <= stock
  lost:     ledger consistent (every accepted order persisted or compensated)

Exit status 0 only when both hold.

    python -m loadtest.run [--stock 2000] [--peak-users 150] [--plateau 30]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests

from flashsale.run.embedded.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
READY_TIMEOUT_S = 90.0
DRAIN_TIMEOUT_S = 120.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__.splitlines()[0])
    p.add_argument("--stock", type=int, default=2000, help="the hot sale's stock (default 2000)")
    p.add_argument("--peak-users", type=int, default=150, help="spike peak (default 150)")
    p.add_argument("--ramp", type=float, default=5.0, help="seconds from 0 to peak (default 5)")
    p.add_argument("--plateau", type=float, default=30.0, help="seconds at peak (default 30)")
    p.add_argument("--decay", type=float, default=15.0, help="seconds back to 0 (default 15)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    return p


def _wait_ready(url: str, proc: subprocess.Popen[bytes] | None, log: Path | None) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            raise SystemExit(f"loadtest: flashsale up exited ({proc.returncode}):\n{tail}")
        try:
            resp = requests.get(f"{url}/readyz", timeout=2)
            if resp.status_code == 200:
                return
            last = f"HTTP {resp.status_code}"
        except requests.RequestException as exc:
            last = repr(exc)
        time.sleep(0.25)
    raise SystemExit(f"loadtest: {url} not ready in {READY_TIMEOUT_S:.0f}s ({last})")


@contextlib.contextmanager
def service() -> Iterator[tuple[str, str, str]]:
    """(url, admin token, JWT secret): the given service, or a `flashsale up` of ours."""
    given = os.environ.get("FLASHSALE_URL")
    if given:
        admin = os.environ.get("FLASHSALE_ADMIN_TOKEN")
        secret = os.environ.get("FLASHSALE_JWT_SECRET")
        if not admin or not secret:
            raise SystemExit("loadtest: with FLASHSALE_URL set FLASHSALE_ADMIN_TOKEN and "
                             "FLASHSALE_JWT_SECRET must be too (`make run` prints them)")
        url = given.rstrip("/")
        _wait_ready(url, None, None)
        yield url, admin, secret
        return
    work = Path(tempfile.mkdtemp(prefix="flashsale-loadtest-"))
    work.chmod(0o755)
    port = free_port()
    admin, secret = secrets.token_urlsafe(24), secrets.token_urlsafe(32)
    env = dict(os.environ)
    env.update({
        "FLASHSALE_PORT": str(port), "FLASHSALE_HOST": "127.0.0.1",
        "FLASHSALE_DATA_DIR": str(work / "data"), "FLASHSALE_ADMIN_TOKEN": admin,
        "FLASHSALE_JWT_SECRET": secret, "FLASHSALE_WEBHOOK_SECRET": secrets.token_urlsafe(32),
        "FLASHSALE_KEY_PREFIX": "lt" + secrets.token_hex(4), "FLASHSALE_LOG_LEVEL": "WARNING",
    })
    log = work / "flashsale-up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flashsale", "up"], env=env, stdout=out,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, log)
        print(f"loadtest: flashsale up at {url} (log {log})", flush=True)
        yield url, admin, secret
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _admin(url: str, admin: str, method: str, path: str, body: Any = None) -> Any:
    resp = requests.request(method, f"{url}{path}", json=body, timeout=10,
                            headers={"Authorization": f"Bearer {admin}"})
    if resp.status_code >= 300:
        raise SystemExit(f"loadtest: {method} {path}: HTTP {resp.status_code} {resp.text[:300]}")
    return resp.json()


def _locust(url: str, admin: str, secret: str, sale_id: str, a: argparse.Namespace,
            summary: Path) -> int:
    a.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update({
        "FLASHSALE_ADMIN_TOKEN": admin, "FLASHSALE_JWT_SECRET": secret,
        "LOADTEST_SALE_ID": sale_id, "LOADTEST_SHAPE": "spike",
        "LOADTEST_PEAK_USERS": str(a.peak_users), "LOADTEST_RAMP_S": str(a.ramp),
        "LOADTEST_PLATEAU_S": str(a.plateau), "LOADTEST_DECAY_S": str(a.decay),
        "LOADTEST_SUMMARY": str(summary),
    })
    bound = a.ramp + a.plateau + a.decay  # the shape stops the run; the timeout is a backstop
    argv = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url,
        "--csv", str(a.out / "spike"), "--html", str(a.out / "spike.html"),
        "--stop-timeout", "10", "--only-summary",
        "--exit-code-on-error", "0", "--loglevel", "WARNING",
    ]
    print(f"loadtest: locust spike to {a.peak_users} users: {a.ramp:g} s up, {a.plateau:g} s "
          f"plateau, {a.decay:g} s down", flush=True)
    try:
        return subprocess.run(argv, env=env, cwd=ROOT, timeout=bound + 60, check=False).returncode
    except subprocess.TimeoutExpired:
        print("loadtest: locust overran its bound and was stopped", file=sys.stderr)
        return 1


def _drained_ledger(url: str, admin: str, sale_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while True:
        led: dict[str, Any] = _admin(url, admin, "GET", f"/api/v1/admin/sales/{sale_id}/ledger")
        if led.get("pending") == 0 or time.monotonic() > deadline:
            return led
        time.sleep(0.5)


def check(led: dict[str, Any], counts: dict[str, int], stock: int) -> tuple[bool, list[str]]:
    holding = led["awaiting_payment"] + led["paid"] + led["shipped"]
    released = led["cancelled"] + led["expired"] + led["failed"]
    accepted_client = counts.get("accepted", 0)
    taken = led["stock"] - led["available"] + released
    oversell = max(0, accepted_client - stock - released, holding + led["pending"] - stock)
    lost = max(0, accepted_client - (holding + released + led["pending"]))
    ok = oversell == 0 and lost == 0 and bool(led["consistent"]) and led["pending"] == 0
    lines = [
        f"stock {stock}, accepted by buyers (202) {accepted_client}, taken per ledger {taken}",
        f"ledger: available {led['available']} pending {led['pending']} awaiting_payment "
        f"{led['awaiting_payment']} paid {led['paid']} shipped {led['shipped']} released "
        f"{released} consistent {led['consistent']}",
        f"oversell: {oversell}  (accepted <= stock: {'yes' if oversell == 0 else 'NO'})",
        f"lost: {lost}  (ledger consistent after drain: {'yes' if led['consistent'] else 'NO'})",
    ]
    return ok, lines


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    summary = Path(tempfile.mkstemp(prefix="flashsale-locust-", suffix=".json")[1])
    try:
        with service() as (url, admin, secret):
            sale = _admin(url, admin, "POST", "/api/v1/sales", {
                "sku": "LOCUST-1", "name": "locust spike", "price_cents": 2500,
                "stock": a.stock, "per_user_limit": 1,
            })
            sale_id = str(sale["sale_id"])
            print(f"loadtest: sale {sale_id} with stock {a.stock}", flush=True)
            code = _locust(url, admin, secret, sale_id, a, summary)
            counts: dict[str, int] = {}
            with contextlib.suppress(OSError, ValueError):
                counts = dict(json.loads(summary.read_text()).get("counts", {}))
            led = _drained_ledger(url, admin, sale_id)
    finally:
        summary.unlink(missing_ok=True)
    ok, lines = check(led, counts, a.stock)
    print()
    print("buyers' counts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print("\n".join(lines))
    print(f"locust report: {a.out / 'spike.html'}, CSV: {a.out / 'spike_stats.csv'} (and "
          "_history, _failures, _exceptions)")
    print("loadtest: " + ("OK" if ok and code == 0 else "FAILED"))
    return 0 if ok and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

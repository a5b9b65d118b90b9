"""`flashsale` command line: up, serve, consume, compensate, migrate, token, reconcile,
status."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence

import asyncpg
import orjson
from redis.exceptions import RedisError

from flashsale import auth, errors
from flashsale.commerce.integrations import Integrations
from flashsale.config import ConfigError, Settings
from flashsale.core import ledger, migrate
from flashsale.core.backends import open_backends
from flashsale.ops import heartbeat, status, worker_http
from flashsale.ops.metrics import Metrics
from flashsale.run import roles, runtime
from flashsale.run.embedded.servers import EmbeddedError
from flashsale.web import front
from flashsale.web.app import Workers, create_app

WORKERS_MAX = 64


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashsale", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("up", help="all in one: servers, migrations, HTTP, consumer, compensator")
    serve = sub.add_parser("serve", help="the HTTP front only")
    serve.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    sub.add_parser("consume", help="the stream consumer (persists orders)")
    sub.add_parser(
        "compensate", help="the compensator (expiry, releases, Redis rebuilds) and the saga"
    )
    sub.add_parser("migrate", help="apply database migrations")
    tok = sub.add_parser("token", help="print a buyer JWT")
    tok.add_argument("user_id")
    tok.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    rec = sub.add_parser(
        "reconcile", help="print a sale's ledger, or check every live sale with --all "
        "(exit 1 when inconsistent)",
    )
    rec.add_argument("sale_id", nargs="?")
    rec.add_argument("--repair", action="store_true", help="rebuild Redis from PostgreSQL first")
    rec.add_argument("--all", action="store_true", dest="all_live",
                     help="check every live sale (progress on stderr)")
    st = sub.add_parser("status", help="a table of the live sales (the dashboard's numbers)")
    st.add_argument("--watch", action="store_true", help="redraw until Ctrl-C")
    st.add_argument("--interval", type=float, default=1.0,
                    help="seconds between redraws with --watch (0.2..60, default 1)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"flashsale: configuration error: {exc}", file=sys.stderr)
        return 2
    runtime.setup_logging(settings.log_format, settings.log_level)
    try:
        return _dispatch(args, settings)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a clear message, never a traceback
        # a server that refuses us (unknown database, bad password, Redis
        # down...) is an environment problem, not a bug: say what it said
        if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError):
            print(f"flashsale: PostgreSQL: {exc}", file=sys.stderr)
            return 1
        if isinstance(exc, RedisError):
            print(f"flashsale: Redis: {exc}", file=sys.stderr)
            return 1
        if isinstance(exc, EmbeddedError | ConnectionError | OSError):
            print(f"flashsale: {exc}", file=sys.stderr)
            return 1
        raise


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    cmd = args.command
    if cmd == "token":
        return _token(settings, args.user_id, args.ttl)
    if cmd == "reconcile" and (args.all_live == (args.sale_id is not None) or
                               (args.all_live and args.repair)):
        print("flashsale: reconcile takes a SALE_ID, or --all (without --repair)",
              file=sys.stderr)
        return 2
    settings = runtime.keep_generated_secrets(settings)
    if cmd == "serve" and args.workers != 1:
        return _serve_many(settings, args.workers)
    with runtime.backing_servers(settings) as s:
        if cmd == "up":
            return runtime.run(lambda: _up(s))
        if cmd == "serve":
            return runtime.run(lambda: _serve(s, Workers(), announce=False))
        if cmd == "consume":
            return runtime.run(lambda: _loop(s, "consumer"))
        if cmd == "compensate":
            return runtime.run(lambda: _loop(s, "compensator"))
        if cmd == "migrate":
            return runtime.run(lambda: _migrate(s))
        if cmd == "reconcile":
            if args.all_live:
                return runtime.run(lambda: _reconcile_all(s))
            return runtime.run(lambda: _reconcile(s, args.sale_id, args.repair))
        if cmd == "status":
            return runtime.run(lambda: _status(s, args.watch, args.interval))
    raise AssertionError(cmd)


def _token(settings: Settings, user_id: str, ttl: int) -> int:
    if not 1 <= ttl <= 30 * 86_400:
        print("flashsale: --ttl must be 1..2592000 seconds", file=sys.stderr)
        return 2
    settings = runtime.keep_generated_secrets(settings)
    try:
        print(auth.mint(settings.jwt_secret, user_id, ttl))
    except errors.Unauthorized as exc:
        print(f"flashsale: {exc.message}", file=sys.stderr)
        return 2
    return 0


async def _migrate(s: Settings) -> int:
    assert s.database_url
    conn = await asyncpg.connect(s.database_url)
    try:
        done = await migrate.migrate(conn)
    finally:
        await conn.close()
    for m in done:
        print(f"applied {m.version:04d}_{m.name}")
    if not done:
        print("migrations are current")
    return 0


async def _up(s: Settings) -> int:
    await _migrate(s)
    return await _serve(s, Workers(consumer=True, compensator=True), announce=True)


async def _serve(s: Settings, workers: Workers, *, announce: bool) -> int:
    stop = runtime.stop_event()
    runner = await front.start(create_app(s, workers, roles.loops), s, s.host, s.port,
                               reuse_port=True, backlog=4096)
    port = front.bound_port(runner)
    if announce:
        _announce(s, port)
    await stop.wait()
    await runner.cleanup()
    return 0


def _announce(s: Settings, port: int) -> None:
    url = f"http://{s.host}:{port}"
    lines = [
        f"flashsale is up at {url}  (readiness: {url}/readyz)",
        f"admin token:  {s.admin_token}",
        "mint a buyer token:  .venv/bin/flashsale token alice   "
        "(uses the secrets kept in FLASHSALE_DATA_DIR/secrets.json)",
        f"  or: FLASHSALE_JWT_SECRET={s.jwt_secret} .venv/bin/flashsale token alice",
        f"webhook secret: {s.webhook_secret}",
        "Ctrl-C stops everything.",
    ]
    print("\n".join(lines), flush=True)


async def _loop(s: Settings, which: str) -> int:
    stop = runtime.stop_event()
    async with open_backends(s) as b:
        m = Metrics()
        consumer = which == "consumer"
        integrations = None if consumer else Integrations.from_settings(s)
        loops = roles.loops(b, m, consumer=consumer, compensator=not consumer, saga=False,
                            integrations=integrations)
        port = s.consume_metrics_port if consumer else s.compensate_metrics_port
        tasks = [asyncio.ensure_future(loop(stop)) for loop in loops]
        beats = heartbeat.start(b, consumer, not consumer, tasks, stop)
        try:
            async with worker_http.serving(s.metrics_host, port, m, which, tasks):
                await asyncio.gather(*tasks, *beats)
        finally:
            if integrations is not None:
                await integrations.close()
    return 0


async def _reconcile(s: Settings, sale_id: str, repair: bool) -> int:
    async with open_backends(s) as b:
        try:
            figures = await ledger.reconcile(b, sale_id, repair=repair)
        except errors.FlashsaleError as exc:
            print(f"flashsale: {exc.message}", file=sys.stderr)
            return 2
    print(orjson.dumps(figures, option=orjson.OPT_INDENT_2).decode())
    return 0 if figures["consistent"] else 1


async def _reconcile_all(s: Settings) -> int:
    async with open_backends(s) as b:
        return await status.reconcile_all(b, sys.stdout)


async def _status(s: Settings, watch: bool, interval_s: float) -> int:
    stop = runtime.stop_event()
    async with open_backends(s) as b:
        return await status.status(b, watch=watch, interval_s=interval_s, out=sys.stdout,
                                   stop=stop)


def _serve_many(settings: Settings, workers: int) -> int:
    """N front processes sharing the port (SO_REUSEPORT); signals are forwarded."""
    if not 1 <= workers <= WORKERS_MAX:
        print(f"flashsale: --workers must be 1..{WORKERS_MAX}", file=sys.stderr)
        return 2
    with runtime.backing_servers(settings) as s:
        env = dict(os.environ)
        env.update({
            "FLASHSALE_REDIS_URL": s.redis_url or "",
            "FLASHSALE_DATABASE_URL": s.database_url or "",
            "FLASHSALE_ADMIN_TOKEN": s.admin_token, "FLASHSALE_JWT_SECRET": s.jwt_secret,
            "FLASHSALE_WEBHOOK_SECRET": s.webhook_secret,
            "FLASHSALE_PASS_SECRET": s.pass_secret,  # every front verifies the room's passes
        })
        cmd = [sys.executable, "-m", "flashsale", "serve", "--workers", "1"]
        children = [subprocess.Popen(cmd, env=env) for _ in range(workers)]

        def forward(signum: int, _frame: object) -> None:
            for c in children:
                with contextlib.suppress(ProcessLookupError):
                    c.send_signal(signum)

        signal.signal(signal.SIGINT, forward)
        signal.signal(signal.SIGTERM, forward)
        # an embedded server that died for good stops the workers too
        runtime.on_server_failure(lambda _reason: forward(signal.SIGTERM, None))
        codes = [c.wait() for c in children]
    return max(codes, default=0)

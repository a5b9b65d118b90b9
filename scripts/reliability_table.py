"""Render docs/RELIABILITY.md's table from .flashsale/chaos-figures.json.

    .venv/bin/python scripts/reliability_table.py              # run the reused
        # integration tests (bad input, webhooks, cross-buyer, mass assignment,
        # admission: ~10 s), record their figures, then render the table
    .venv/bin/python scripts/reliability_table.py --no-run     # render only

The chaos tests (``make chaos``) write their own figures into the file (the
``figures`` fixture of tests/chaos/conftest.py). The table goes between the
``<!-- reliability-table:begin -->`` and ``<!-- reliability-table:end -->``
markers of docs/RELIABILITY.md; the prose around them is kept as is. Every
test in the figures file gets a row: the ones this script knows have a
written summary; any other one a generic rendering of its figures.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.chaos.harness import FIGURES_FILE, write_figures  # noqa: E402

DOC = REPO / "docs" / "RELIABILITY.md"
BEGIN, END = "<!-- reliability-table:begin -->", "<!-- reliability-table:end -->"
PYTEST = ".venv/bin/pytest -q -s"

F = Mapping[str, Any]


def _n(value: Any) -> str:
    """1234 -> '1,234'; other values as they are."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.2f}".rstrip("0").rstrip(".") if value % 1 else f"{int(value):,}"
    return str(value)


def _ledger(f: F, key: str = "ledger") -> str:
    led = f.get(key)
    if not isinstance(led, Mapping):
        return ""
    return "ledger consistent" if led.get("consistent") else "**ledger INCONSISTENT**"


def _hist(f: F) -> str:
    h = f.get("history")
    if not isinstance(h, Mapping):
        return ""
    return (f"history: lost {h.get('lost')}, duplicated {h.get('duplicated')}, "
            f"unexpected {h.get('unexpected')}")


def _statuses(d: Any) -> str:
    if not isinstance(d, Mapping):
        return ""
    return ", ".join(f"{k} ×{_n(v)}" for k, v in sorted(d.items()))


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Row:
    key: str  # the test's name in the figures file
    group: str
    title: str
    what: str
    figure: Callable[[F], str]
    reproduce: str


def _chaos(path: str, test: str | None = None) -> str:
    node = f"tests/chaos/{path}" + (f"::{test}" if test else "")
    return f"`{PYTEST} -m chaos {node}`"


ROWS: list[Row] = [
    # -- issue 6: faults ------------------------------------------------------
    Row(
        "test_lost_reply_retry_same_key_one_reservation", "faults",
        "Reply lost after the reservation ran",
        "TcpProxy front↔Redis swallows replies (then resets) or drops them with a reset, "
        "in windows during a burst; front `redis_timeout_s` 0.3 s answers 503 \"outcome "
        "unknown\"; buyers retry with the same key; 1 request in 6 has no key",
        lambda f: _join(
            f"{_n(f.get('keys'))} keys, {_n(f.get('attempts'))} requests: "
            f"{_n(f.get('keys_with_unknown_outcome'))} keys heard 503, "
            f"**{_n(f.get('reserved_while_client_heard_503'))} of them had reserved** and got "
            f"that order back on retry",
            f"orders per key > 1: {f.get('keys_with_more_than_one_order')}, unresolved "
            f"{f.get('unresolved')}, accepted {_n(f.get('accepted'))} + "
            f"{f.get('keyless_unknown_that_reserved')} key-less unknowns = stock",
            _hist(f), _ledger(f),
        ),
        _chaos("test_fault_lost_reply.py"),
    ),
    Row(
        "test_redis_paused_10s_in_a_burst", "faults",
        "Redis paused 10 s in a burst",
        "SIGSTOP/SIGCONT of a dedicated redis-server child during 16 s of reservations "
        "(150/s, buyers honour Retry-After); waiting line 128, Redis timeout 2 s",
        lambda f: _join(
            f"p99 **{_n(f.get('p99_ms'))} ms** (p50 {_n(f.get('p50_ms'))} ms, max "
            f"{_n(f.get('max_ms'))} ms, bound {_n(f.get('latency_bound_ms'))} ms)",
            f"5xx other than 503: **{f.get('server_errors_not_503')}**, 503 without "
            f"Retry-After: {f.get('retry_after_missing')}, client timeouts "
            f"{f.get('client_timeouts')}",
            f"503: {_n((f.get('statuses') or {}).get('503:unavailable'))} unavailable + "
            f"{_n((f.get('statuses') or {}).get('503:overloaded'))} overloaded",
            f"/healthz max {_n(f.get('healthz_max_in_pause_ms'))} ms in the pause",
            f"unresolved {f.get('unresolved')}", _ledger(f),
        ),
        _chaos("test_fault_redis_pause.py"),
    ),
    Row(
        "test_script_cache_flushed_mid_burst_no_double_execution", "faults",
        "Script cache flushed mid-burst",
        "`SCRIPT FLUSH` ×6 during a burst, then kill -9 and restart of a dedicated AOF "
        "(`appendfsync always`) Redis: data back, script cache empty",
        lambda f: _join(
            f"NOSCRIPT answered {_n(f.get('noscript_replies'))}× (after each flush "
            f"{f.get('noscript_after_each_flush')}, after the restart "
            f"{f.get('noscript_after_restart')})",
            f"**double executions 0**: orders {_n(f.get('orders_in_postgres'))} = holds "
            f"{_n(f.get('redis_holds'))} = accepted {_n(f.get('accepted'))} (stock sold out "
            f"exactly), orders per key > 1: {f.get('keys_with_more_than_one_order')}",
            f"unresolved {f.get('unresolved')}", _ledger(f),
        ),
        _chaos("test_fault_script_flush.py"),
    ),
    Row(
        "test_kill9_cycles_front_consumer_compensator", "faults",
        "50 kill -9 cycles: front, consumer, compensator",
        "real children (`serve`, `consume`, `compensate`); each cycle kill -9s one "
        "(shuffled deck) and restarts it, under 80 reservations/s with cancels and 2 s "
        "holds; buyers retry transport errors with the same key",
        lambda f: _join(
            f"{f.get('cycles')} cycles in {_n(f.get('cycles_s'))} s "
            f"({_statuses(f.get('kills'))})",
            f"{_n(f.get('requests_cut_by_a_front_kill'))} requests cut by a front kill",
            f"accepted {_n(f.get('accepted'))}: **lost {f.get('lost')}, duplicated "
            f"{f.get('duplicated')}**, unexpected {f.get('unexpected')}, unresolved "
            f"{f.get('unresolved')}",
            f"releases {_n(f.get('releases'))} (one per order), stock back once",
            _ledger(f),
        ),
        _chaos("test_kill_cycles.py"),
    ),
    Row(
        "test_appendfsync_always_cost", "faults",
        "The price of a zero loss window (AOF `always`)",
        "the same front against a dedicated Redis with `appendfsync everysec` and "
        "`always`: a burst of 4,000 reservations (200 buyers at once), then 300 one by one",
        lambda f: _join(
            f"burst {_n((f.get('everysec') or {}).get('burst_per_s'))}/s → "
            f"{_n((f.get('always') or {}).get('burst_per_s'))}/s "
            f"(**×{f.get('burst_throughput_ratio')}**)",
            f"one at a time: p50 {_n((f.get('everysec') or {}).get('sequential_p50_ms'))} → "
            f"{_n((f.get('always') or {}).get('sequential_p50_ms'))} ms "
            f"(**{float(f.get('sequential_p50_added_ms') or 0):+.1f} ms**)",
            "every key accepted once in both",
        ),
        _chaos("test_fault_aof_cost.py"),
    ),
    Row(
        "test_scalper_gets_the_limit_and_calm_buyers_keep_their_p99", "abuse",
        "Scalper: 200 concurrent requests",
        "one buyer on 200 connections hammering with fresh keys (never honouring "
        "Retry-After) beside calm buyers at 80/s; real per-buyer limit (10/s, burst 20, "
        "429 held ~1 s); calm and scalper windows alternate",
        lambda f: _join(
            f"scalper: {_n(f.get('scalper_requests'))} requests "
            f"({_n(f.get('scalper_rps'))}/s), **{f.get('scalper_accepted')} accepted** "
            f"(limit {f.get('per_user_limit')}), "
            f"{_n((f.get('scalper_answers') or {}).get('429:rate_limited'))} × 429",
            f"calm p99 **{_n(f.get('calm_p99_ms'))} ms alone → {_n(f.get('busy_p99_ms'))} ms "
            f"beside it (×{f.get('p99_ratio')})**; its first wave: max "
            f"{_n(f.get('arrival_wave_max_ms'))} ms",
            f"front CPU {f.get('front_cpu_calm_pct')}% → {f.get('front_cpu_busy_pct')}%",
        ),
        _chaos("test_scalper.py"),
    ),
    # -- issue 6: model-based and fuzzing ---------------------------------------
    Row(
        "test_state_machine", "model",
        "Hypothesis state machine",
        "reserve, replay, pay, webhook, cancel, expire, restock, consumer crash "
        "before/after commit, lost replies (TcpProxy) against a Python model of the "
        "ledger, on the real service",
        lambda f: _join(
            f"**{_n(f.get('examples_run'))} examples, {_n(f.get('steps_run'))} steps, "
            f"{f.get('failing_examples')} failing** (seed {f.get('seed')})",
            f"{_n(f.get('reservations'))} reservations", _hist(f),
        ),
        _chaos("test_state_machine.py", "test_state_machine"),
    ),
    Row(
        "test_state_machine_lifecycle_walk", "model",
        "State machine: fixed lifecycle walk",
        "every rule and transition of the same machine once, in a fixed order",
        lambda f: _join(f"{_n(f.get('steps'))} steps, {len(f.get('rules') or {})} rules",
                        _hist(f)),
        _chaos("test_state_machine.py", "test_state_machine_lifecycle_walk"),
    ),
    Row(
        "test_schemathesis_zero_failures", "model",
        "Schemathesis on /openapi.json",
        "all checks + cross-identity isolation, stateful links, every operation",
        lambda f: _join(
            f"**{_n(f.get('test_cases'))} test cases, {f.get('unique_failures')} failures**",
            f"{f.get('operations_tested')} operations, links {f.get('links_covered')}, "
            f"{_n(f.get('stateful_scenarios'))} stateful scenarios",
            f"{_n(f.get('intruder_probes'))} cross-buyer and "
            f"{_n(f.get('buyer_on_admin_probes'))} buyer-on-admin probes",
        ),
        _chaos("test_schemathesis.py"),
    ),
    # -- reused: bad input and forged requests (integration tests) --------------
    Row(
        "integration/test_bad_input", "input",
        "Bad inputs across every endpoint",
        "a table of malformed bodies, types, ids, headers and credentials on every "
        "endpoint; each must get its exact 4xx in the contract's error shape and change "
        "nothing (every table's row count, the ledger, Redis)",
        lambda f: _join(
            f"**{_n(f.get('rows'))} distinct bad inputs on {f.get('endpoints')} method/path "
            f"combinations: "
            f"{_n(f.get('rows_passed'))} → the exact 4xx, 0 5xx, 0 changes**",
            f"statuses {_statuses(f.get('statuses'))}",
        ),
        "`.venv/bin/pytest -q tests/integration/test_bad_input.py`",
    ),
    Row(
        "integration/test_forged_webhooks", "input",
        "Forged and replayed webhooks",
        "missing/garbled/wrong-secret/tampered/stale (±301 s) signatures, malformed "
        "signed bodies, then one event delivered 5 times",
        lambda f: _join(
            f"**{f.get('forged')} forged → 400, {f.get('malformed')} malformed → 400, "
            f"0 accepted, 0 rows**",
            f"a replay ×{f.get('deliveries')}: 1 state change, 1 saga, 1 event",
        ),
        "`.venv/bin/pytest -q tests/integration/test_payments.py -k forged`",
    ),
    Row(
        "integration/test_cross_buyer", "input",
        "Cross-buyer access",
        "another buyer reads, cancels and pays a pending and a persisted order",
        lambda f: f"**{f.get('probes')} probes → 404 `order_not_found`, 0 accepted**, "
                  "0 payments created",
        "`.venv/bin/pytest -q tests/integration/test_payments.py -k another_buyers`",
    ),
    Row(
        "integration/test_mass_assignment", "input",
        "Mass assignment",
        "server-owned fields (amount, status, user, ids, sold, available...) in pay, "
        "order, sale and settle bodies; a buyer on the admin settle endpoint",
        lambda f: f"**{f.get('bodies')} bodies → 400 `invalid_request`, 0 accepted**; "
                  "buyer on settle → 401; order, payments and ledger unchanged",
        "`.venv/bin/pytest -q tests/integration/test_payments.py -k server_owned`",
    ),
    Row(
        "integration/test_admission", "abuse",
        "Admission control (in-process)",
        "200 concurrent requests of one buyer at 5/s burst 10 → per-user limit, the rest "
        "429 with Retry-After; a full waiting line sheds 503 `overloaded`, nothing reserved",
        lambda f: f"{f.get('tests_passed')}/{f.get('tests')} passed",
        "`.venv/bin/pytest -q tests/integration/test_admission.py`",
    ),
    # -- issue 3: crash recovery, outages, races --------------------------------
    Row(
        "test_consumer_kill9_under_load", "recovery",
        "Consumer kill -9 ×20+ under load",
        "the consumer child killed before commit, after commit before ack, mid-batch and "
        "while starting; PostgreSQL replies delayed 20 ms",
        lambda f: _join(
            f"{f.get('cycles')} cycles ({_statuses(f.get('kills'))})",
            f"accepted {_n(f.get('accepted'))} = persisted {_n(f.get('persisted'))} + "
            f"compensated {_n(f.get('compensated'))}, duplicates {f.get('duplicates')}",
            f"final drain {_n(f.get('final_consumer_drain_s'))} s", _ledger(f),
        ),
        _chaos("test_consumer_kill9.py", "test_consumer_kill9_under_load"),
    ),
    Row(
        "test_committed_entry_past_max_deliveries_is_acked_not_dead_lettered", "recovery",
        "Committed entry past max deliveries",
        "a consumer that commits and dies before the ack, again and again",
        lambda f: _join(f"dead-lettered {f.get('dead_lettered')}, rows "
                        f"{_statuses(f.get('rows'))}", _ledger(f)),
        _chaos("test_consumer_kill9.py",
               "test_committed_entry_past_max_deliveries_is_acked_not_dead_lettered"),
    ),
    Row(
        "test_exhausted_entry_dead_lettered_once_across_a_crash", "recovery",
        "Exhausted entry dead-lettered once across a crash",
        "a consumer dies between recording an exhausted entry failed and dead-lettering it",
        lambda f: _join(f"dead-lettered {f.get('dead_lettered')}, rows "
                        f"{_statuses(f.get('rows'))}", _ledger(f)),
        _chaos("test_consumer_kill9.py", "test_exhausted_entry_dead_lettered_once_across_a_crash"),
    ),
    Row(
        "test_exhausted_entries_of_crashed_consumers_are_persisted_alone", "recovery",
        "Exhausted entries of crashed consumers",
        "entries past max deliveries because their consumers crashed are retried alone",
        lambda f: _join(f"rows {_statuses(f.get('rows'))}, dead-lettered "
                        f"{len(f.get('dead_lettered') or [])}", _ledger(f)),
        _chaos("test_consumer_kill9.py",
               "test_exhausted_entries_of_crashed_consumers_are_persisted_alone"),
    ),
    Row(
        "test_compensator_kill9_mid_release", "recovery",
        "Compensator kill -9 mid-release",
        "1 s holds and cancels; a second compensator killed between a release's commit and "
        "its Redis step, while the first runs",
        lambda f: _join(
            f"{f.get('compensator_kills')} kills, {f.get('kills_mid_release')} mid-release",
            f"accepted {_n(f.get('accepted'))}, releases {_statuses(f.get('releases'))}",
            f"available above stock {f.get('available_above_stock')} times in "
            f"{_n(f.get('available_samples'))} samples", _ledger(f),
        ),
        _chaos("test_compensator_kill9.py"),
    ),
    Row(
        "test_postgres_unreachable_10s_under_load", "recovery",
        "PostgreSQL unreachable 10 s under load",
        "TcpProxy cut between flashsale and PostgreSQL for 10 s at 150 reservations/s",
        lambda f: _join(
            f"accepted {_n(f.get('accepted'))} ({_n(f.get('accepted_during_outage'))} during "
            f"the outage), backlog max {_n(f.get('stream_backlog_max'))}",
            f"**drained {_n(f.get('drain_after_heal_s'))} s after the heal**, /readyz ok after "
            f"{_n(f.get('readyz_ok_after_heal_s'))} s",
            f"persisted {_n(f.get('persisted'))}, failed {f.get('failed')}", _ledger(f),
        ),
        _chaos("test_postgres_outage.py"),
    ),
    Row(
        "test_redis_restarted_empty_mid_sale", "recovery",
        "Redis restarted empty mid-sale",
        "a dedicated Redis kill -9'd and restarted without data mid-sale; rebuild from "
        "PostgreSQL, then a rush for the rest",
        lambda f: _join(
            f"503 until rebuilt for {_n(f.get('unavailable_until_rebuilt_s'))} s",
            f"lost in the stated window: {f.get('lost_in_window')} (unpersisted only)",
            f"rush: {_n(f.get('rush_accepted'))} accepted of {_n(f.get('rush_requests'))}, "
            f"sold {_n(f.get('sold_after_rush'))} = stock, no oversell",
            _ledger(f, "ledger_after_rebuild"),
        ),
        _chaos("test_redis_loss.py"),
    ),
    Row(
        "test_poison_entries_dead_lettered_others_persisted", "recovery",
        "Poison entries",
        "malformed entries, an unknown sale, an INSERT refused forever",
        lambda f: _join(
            f"dead-lettered {_n(f.get('dead_lettered_total'))} after "
            f"{_n(f.get('poison_dead_lettered_after_s'))} s (max deliveries "
            f"{f.get('max_deliveries')})",
            f"good entries persisted in {_n(f.get('good_persisted_s'))} s, never blocked",
        ),
        _chaos("test_poison.py"),
    ),
    Row(
        "test_hold_expires_within_2s_under_load", "recovery",
        "Hold of 1 s expires within 2 s",
        "1 s holds under background load",
        lambda f: _join(
            f"{f.get('expired')}/{f.get('orders')} expired, lag max "
            f"{_n((f.get('lag') or {}).get('observed_max_s'))} s", _ledger(f),
        ),
        _chaos("test_expiry.py", "test_hold_expires_within_2s_under_load"),
    ),
    Row(
        "test_unpersisted_hold_expires_and_is_not_resurrected", "recovery",
        "Unpersisted hold expires, not resurrected",
        "holds expire before the consumer persists them",
        lambda f: _join(
            f"{f.get('expired')}/{f.get('orders')} expired, lag max "
            f"{_n((f.get('lag') or {}).get('observed_max_s'))} s",
            _ledger(f, "ledger_after_consumer"),
        ),
        _chaos("test_expiry.py", "test_unpersisted_hold_expires_and_is_not_resurrected"),
    ),
    Row(
        "test_cancel_vs_expiry_one_winner", "recovery",
        "Race: cancel vs expiry",
        "cancels racing the expiry sweep",
        lambda f: _join(f"{f.get('orders')} orders, winners {_statuses(f.get('winners'))}",
                        _ledger(f)),
        _chaos("test_races.py", "test_cancel_vs_expiry_one_winner"),
    ),
    Row(
        "test_two_compensators_at_once", "recovery",
        "Race: two compensators at once",
        "two compensators on the same due holds and outbox",
        lambda f: _join(
            f"{_n(f.get('due_persisted'))} + {_n(f.get('due_unpersisted'))} due, releases "
            f"{_statuses(f.get('releases_by_compensator'))} (one each)",
            _ledger(f, "outbox_ledger"),
        ),
        _chaos("test_races.py", "test_two_compensators_at_once"),
    ),
    Row(
        "test_expiry_vs_late_persistence", "recovery",
        "Race: expiry vs late persistence",
        "holds expire while the consumer persists them",
        lambda f: _join(f"{f.get('orders')} orders, {_statuses(f.get('releases'))}",
                        _ledger(f)),
        _chaos("test_races.py", "test_expiry_vs_late_persistence"),
    ),
]

GROUPS = {
    "faults": "Fault injection (issue 6)",
    "abuse": "Admission control and abuse (issue 6)",
    "model": "Model-based testing and fuzzing (issue 6)",
    "input": "Bad input and forged requests (reused integration tests)",
    "recovery": "Crash recovery, outages and races (issue 3)",
    "other": "Other tests in the figures file",
}


def _generic(f: F) -> str:
    parts: list[str] = []
    for k, v in f.items():
        if isinstance(v, (int, float, str, bool)) and len(parts) < 8:
            parts.append(f"{k} {_n(v)}")
    return _join(", ".join(parts), _ledger(f))


# --------------------------------------------------------------------------- reused tests

REUSED = {
    "integration/test_bad_input": ["tests/integration/test_bad_input.py"],
    "integration/test_forged_webhooks": [
        "tests/integration/test_payments.py::"
        "test_forged_webhooks_are_rejected_and_a_replay_changes_state_once"
    ],
    "integration/test_cross_buyer": [
        "tests/integration/test_payments.py::test_another_buyers_order_is_404_for_get_cancel_and_pay"
    ],
    "integration/test_mass_assignment": [
        "tests/integration/test_payments.py::test_server_owned_fields_are_rejected"
    ],
    "integration/test_admission": ["tests/integration/test_admission.py"],
}


def _function(path: str, name: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    tree = ast.parse((REPO / path).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            return node
    return None


def _list_len(fn: ast.AST | None, var: str) -> int | None:
    """Length of the list literal first assigned to ``var`` in ``fn``."""
    for node in ast.walk(fn) if fn is not None else ():
        if isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, ast.List):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == var for t in targets):
                return len(node.value.elts)
    return None


def _static_figures() -> dict[str, dict[str, Any]]:
    """What the reused tests check, read from their source (no hand-kept numbers)."""
    from tests.integration import test_bad_input as bad

    statuses = Counter(f"{c.status}:{c.code}" for c in bad.CASES)
    endpoints = {(c.method, c.path.split("?")[0]) for c in bad.CASES}
    pay = "tests/integration/test_payments.py"
    webhooks = _function(pay, "test_forged_webhooks_are_rejected_and_a_replay_changes_state_once")
    deliveries = None
    for node in ast.walk(webhooks) if webhooks is not None else ():
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == "range" and node.args
                and isinstance(node.args[0], ast.Constant)):
            deliveries = node.args[0].value
    mass = _function(pay, "test_server_owned_fields_are_rejected")
    bodies = sum(
        1 for node in ast.walk(mass) if mass is not None and isinstance(node, ast.List | ast.Tuple)
        for e in node.elts if isinstance(e, ast.Dict)
    ) if mass is not None else None
    return {
        "integration/test_bad_input": {
            "rows": len(bad.CASES), "endpoints": len(endpoints), "statuses": dict(statuses),
        },
        "integration/test_forged_webhooks": {
            "forged": _list_len(webhooks, "forged"), "malformed": _list_len(webhooks, "malformed"),
            "deliveries": deliveries,
        },
        "integration/test_cross_buyer": {"probes": 3 * 2},  # get, cancel, pay x 2 orders
        "integration/test_mass_assignment": {"bodies": bodies},
        "integration/test_admission": {},
    }


def run_reused() -> None:
    """Run the reused integration tests once and record their figures."""
    static = _static_figures()
    nodes = [n for ns in REUSED.values() for n in ns]
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             f"--junitxml={xml}", *nodes],
            cwd=REPO, capture_output=True, text=True, check=False,
        )
        if not xml.exists():
            raise SystemExit(f"pytest did not run:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        cases = ET.parse(xml).getroot().iter("testcase")
        results = [
            (c.get("classname", "").replace(".", "/") + ".py::" + c.get("name", ""),
             not any(ch.tag in ("failure", "error") for ch in c), float(c.get("time", 0)))
            for c in cases
        ]
    servers = "machine" if os.environ.get("FLASHSALE_REDIS_URL") else "embedded"
    for key, ns in REUSED.items():
        mine = [(n, ok, t) for n, ok, t in results
                if any(n == x or n.startswith((x + "::", x + "[")) for x in ns)]
        passed = sum(ok for _n, ok, _t in mine)
        figures = dict(static[key])
        figures.update(tests=len(mine), tests_passed=passed)
        if key == "integration/test_bad_input":
            figures["rows_passed"] = sum(ok for n, ok, _t in mine if "::test_bad_input[" in n)
        outcome = "passed" if mine and passed == len(mine) else "failed"
        write_figures(key, {
            "outcome": outcome, "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "wall_s": round(sum(t for _n, _ok, t in mine), 2), "servers": servers,
            "figures": figures,
        })
        print(f"{key}: {passed}/{len(mine)} passed")
    if proc.returncode != 0:
        print(proc.stdout[-3000:])


# --------------------------------------------------------------------------- render


def render(data: Mapping[str, Any]) -> str:
    known = {r.key for r in ROWS}
    rows = list(ROWS) + [
        Row(k, "other", k, "", _generic, "") for k in sorted(data) if k not in known
    ]
    lines: list[str] = []
    chaos = {k: v for k, v in data.items() if not k.startswith("integration/")}
    finished = sorted(str(v.get("finished_at", "")) for v in data.values())
    total = sum(float(v.get("wall_s", 0)) for v in chaos.values())
    failed = [k for k, v in data.items() if v.get("outcome") != "passed"]
    servers = sorted({str(v.get("servers")) for v in data.values()})
    lines.append(
        f"Latest figures: {len(data)} tests, {len(failed)} not passed; recorded "
        f"{finished[0] if finished else '-'} … {finished[-1] if finished else '-'} "
        f"(UTC) against {' and '.join(servers)} servers; the chaos tests' own time "
        f"{total:.0f} s."
    )
    for group, title in GROUPS.items():
        members = [r for r in rows if r.group == group]
        if not members:
            continue
        lines += ["", f"### {title}", "",
                  "| test | what it does | figure (latest run) | reproduce |",
                  "| --- | --- | --- | --- |"]
        for r in members:
            entry = data.get(r.key)
            if entry is None:
                fig = "*not run yet*"
            else:
                outcome = str(entry.get("outcome"))
                mark = "✅" if outcome == "passed" else f"❌ {outcome}"
                try:
                    text = r.figure(entry.get("figures") or {})
                except Exception as exc:  # a figure that changed shape must not stop the doc
                    text = f"(figures unreadable: {exc!r})"
                fig = f"{mark} {text} ({_n(entry.get('wall_s'))} s)"
            cells = [f"**{r.title}**<br>`{r.key}`", r.what, fig, r.reproduce]
            lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ")
                                          for c in cells) + " |")
    return "\n".join(lines)


def write_doc(table: str) -> None:
    text = DOC.read_text() if DOC.exists() else f"# Reliability\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _old, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--no-run", action="store_true", help="do not run the reused tests")
    p.add_argument("--print", action="store_true", help="print the table, do not write")
    args = p.parse_args(argv)
    if not args.no_run:
        run_reused()
    data: dict[str, Any] = json.loads(FIGURES_FILE.read_text()) if FIGURES_FILE.exists() else {}
    table = render(data)
    if args.print:
        print(table)
    else:
        write_doc(table)
        print(f"wrote {DOC.relative_to(REPO)} ({len(data)} tests)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

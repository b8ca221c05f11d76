"""``edgekit fleet prune``: fold old raw telemetry into hour rows and delete what is past its retention."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from .exits import handle_errors
from .options import DbOpt, JsonOpt
from .output import console, print_json


@handle_errors
def prune_cmd(
    db: str = DbOpt,
    keep_raw: str = typer.Option("7d", "--keep-raw", help="Keep raw telemetry this long (36h, 7d; older: "
                                 "rolled up into hour rows, to the hour below)"),
    keep_rollups: str = typer.Option("400d", "--keep-rollups", help="Keep hour rows, closed gaps and closed "
                                     "alerts this long"),
    keep_events: Optional[str] = typer.Option(None, "--keep-events", help="Keep events, acks and state messages "
                                              "this long [default: the longer of --keep-raw and 30d]"),
    vacuum: bool = typer.Option(False, "--vacuum", help="Rewrite the store afterwards to give freed space back "
                                "to the disk (SQLite: blocks the monitor's writes meanwhile; without it freed "
                                "pages are reused by new rows)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Count what would be rolled up and deleted; write nothing"),
    batch_rows: int = typer.Option(10_000, "--batch-rows", min=1, hidden=True,
                                   help="Rows per write transaction (ingest waits at most one)"),
    now: Optional[float] = typer.Option(None, "--now", hidden=True, help="UNIX seconds to prune as of (tests)"),
    as_json: bool = JsonOpt,
) -> None:
    """Roll up raw telemetry older than --keep-raw into per-hour rows, then delete old rows in small steps.

    Safe beside a running monitor; run it from cron or a systemd timer (hourly is plenty).
    """
    from ..fleet.retention import parse_duration, prune, store_bytes
    from ..fleet.stores import describe, is_pg_url, open_store

    raw_s = parse_duration(keep_raw, "--keep-raw")
    rollups_s = parse_duration(keep_rollups, "--keep-rollups")
    events_s = None if keep_events is None else parse_duration(keep_events, "--keep-events")
    sqlite = not is_pg_url(db)
    with open_store(db, create=False, readonly=dry_run) as store:
        before = store_bytes(db) if sqlite else None
        result = prune(store, raw_s, rollups_s, now, keep_events_s=events_s, batch_rows=batch_rows,
                       dry_run=dry_run, vacuum=vacuum)
        if sqlite and not dry_run:
            store.checkpoint()  # (the WAL's copies of the deleted pages go into the file's free list)
    out = {"db": describe(db), **result.as_dict(), "bytes_before": before,
           "bytes_after": store_bytes(db) if sqlite else None}
    if as_json:
        print_json(out)
        return
    verb = "would be" if dry_run else "were"
    table = Table(show_header=False, title=f"prune {out['db']}" + (" (dry run)" if dry_run else ""))
    for label, key in (("raw telemetry rows rolled up into hours", "rolled_up"), ("hour rows written", "hours_written"),
                       ("events/acks/state deleted", "events_deleted"), ("hour rows deleted", "hours_deleted"),
                       ("closed gaps deleted", "gaps_deleted"), ("closed alerts deleted", "alerts_deleted")):
        if not (dry_run and key == "hours_written"):
            table.add_row(label.replace("deleted", f"{verb} deleted") if dry_run else label, str(out[key]))
    if not dry_run:
        table.add_row("write transactions (longest)",
                      f"{out['transactions']} ({out['longest_transaction_s'] * 1e3:.0f} ms)")
    if before is not None:
        table.add_row("store size", f"{before / 2**20:.1f} MiB → {out['bytes_after'] / 2**20:.1f} MiB"
                      + ("" if vacuum or dry_run else " (freed pages are reused; --vacuum gives them back)"))
    console.print(table)

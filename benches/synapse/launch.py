#!/usr/bin/env python3
"""Starts Synapse with every SQLite connection set to PRAGMA synchronous = $SYNAPSE_SQLITE_SYNCHRONOUS.

Used by run.sh only when SYNAPSE_SQLITE_SYNCHRONOUS is set. Stock Synapse turns on WAL but leaves
SQLite's default synchronous = FULL (an fsync per commit), while Hearth uses WAL with NORMAL; this
lets a benchmark compare the two at the same durability. Everything else is stock Synapse.
"""

import os
import sys

mode = os.environ["SYNAPSE_SQLITE_SYNCHRONOUS"].upper()
if mode not in ("OFF", "NORMAL", "FULL", "EXTRA"):
    sys.exit(f"SYNAPSE_SQLITE_SYNCHRONOUS must be OFF, NORMAL, FULL or EXTRA, not {mode!r}")

from synapse.storage.engines.sqlite import Sqlite3Engine  # noqa: E402

_stock_on_new_connection = Sqlite3Engine.on_new_connection


def _on_new_connection(self, db_conn):  # type: ignore[no-untyped-def]
    _stock_on_new_connection(self, db_conn)
    db_conn.execute(f"PRAGMA synchronous = {mode};")
    db_conn.commit()


Sqlite3Engine.on_new_connection = _on_new_connection  # type: ignore[method-assign]

from synapse.app.homeserver import main  # noqa: E402

main()

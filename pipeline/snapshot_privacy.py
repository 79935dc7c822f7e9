"""Privacy of the snapshot files: pseudonymous user ids, erasing a user's rows, retention.

- `pseudonymizer(key)`: with `RECUR_SNAPSHOT_USER_KEY` set, the snapshots' `user_id` column holds
  HMAC-SHA256(key, user id) in hex instead of the id. Training only groups events by user, so it
  works unchanged; whoever holds the key (the worker) can still find a user's rows.
- `forget_rows(root, ids)`: remove every row of these (stored) user ids from every snapshot file
  that holds one; each file is rewritten under a temporary name and renamed over the old one
  (or deleted when nothing is left), as atomic as a new snapshot file.
- `expire(root, days, now_ms)`: delete the files of event hours older than `days`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.snapshot_files import entries, is_snapshot, open_root, write_atomic

HOUR_FOLDER = re.compile(r"(?:^|/)dt=(\d{4}-\d{2}-\d{2})/hour=(\d{2})/")
DAY_MS = 86_400_000


def pseudonymizer(key: str) -> Callable[[str], str]:
    """-> user id -> what the snapshots store for it: the id itself without a key, else
    HMAC-SHA256(key, id) as 64 hex digits."""
    if not key:
        return lambda user: user
    secret = key.encode()

    def pseudonym(user: str) -> str:
        return hmac.new(secret, user.encode(), hashlib.sha256).hexdigest()

    return pseudonym


@dataclass
class Forgotten:
    files_rewritten: int = 0  # files that kept other users' rows
    files_removed: int = 0  # files that held only these users' rows
    rows_removed: int = 0  # (user, partition) rows: each holds one user's events of one file
    events_removed: int = 0
    files_scanned: int = 0


def forget_rows(root: str, stored_ids: Iterable[str]) -> Forgotten:
    """Remove the rows of `stored_ids` (as the files store them: pseudonyms when a key is set)
    from every snapshot file under `root`. Reads only the user_id column of files without them."""
    wanted = pa.array(sorted(set(stored_ids)), pa.string())
    done = Forgotten()
    if len(wanted) == 0:
        return done
    filesystem, base = open_root(root)
    for rel, info in entries(filesystem, base):
        if not is_snapshot(rel):
            continue
        done.files_scanned += 1
        users = pq.read_table(info.path, filesystem=filesystem, columns=["user_id"])["user_id"]
        if not pc.any(pc.is_in(users, value_set=wanted)).as_py():
            continue
        table = pq.read_table(info.path, filesystem=filesystem)
        hit = pc.is_in(table["user_id"], value_set=wanted)
        keep = table.filter(pc.invert(hit))
        done.rows_removed += table.num_rows - keep.num_rows
        done.events_removed += sum(len(v) for v in table.filter(hit)["offsets"].to_pylist())
        if keep.num_rows:
            write_atomic(filesystem, info.path, keep)  # same name: its offsets still bound what is left
            done.files_rewritten += 1
        else:
            filesystem.delete_file(info.path)
            done.files_removed += 1
    return done


@dataclass
class Expired:
    files_removed: int = 0
    oldest_kept: str = ""  # dt=.../hour=.. of the oldest hour left, "" when none


def expire(root: str, days: float, now_ms: int) -> Expired:
    """Delete every snapshot file whose event hour ended more than `days` days before `now_ms`."""
    filesystem, base = open_root(root)
    cutoff = now_ms - int(days * DAY_MS)
    done = Expired()
    for rel, info in entries(filesystem, base):
        match = HOUR_FOLDER.search(rel)
        if not match or not is_snapshot(rel):
            continue
        start = datetime.strptime(f"{match.group(1)} {match.group(2)}", "%Y-%m-%d %H").replace(tzinfo=UTC)
        hour_end_ms = int(start.timestamp() * 1000) + 3_600_000
        if hour_end_ms <= cutoff:
            filesystem.delete_file(info.path)
            done.files_removed += 1
        elif not done.oldest_kept or match.group(0) < done.oldest_kept:
            done.oldest_kept = match.group(0).strip("/")
    return done

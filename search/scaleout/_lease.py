"""The coordinator lease: exactly one process at a time drives a coordinated optimizer.

A coordinated optimizer (nevergrad, the baselines) keeps its state outside the study, so two
processes driving it would fork its history. Whoever holds the study's lease is the coordinator;
the others wait and take over, from the checkpoint, once the holder has stopped renewing it.

`DatabaseLease`: one row per study in a table of our own, ``evomerge_coordinator``: owner,
heartbeat (the holder's clock) and the checkpoint, so a coordinator on another machine can resume
it. Taking the lease is one ``UPDATE ... WHERE owner = me OR heartbeat < now - ttl``: the database
serializes a race's two updates and the second matches no row, so two processes cannot both win.
Checkpoint writes carry ``WHERE owner = me``: a coordinator that lost the lease (paused past the
ttl) cannot overwrite its successor's state, and stops. Clocks must agree well within the ttl (NTP).
"""

from __future__ import annotations

import time

import sqlalchemy as sa

LEASE_TABLE = "evomerge_coordinator"

_metadata = sa.MetaData()
_table = sa.Table(
    LEASE_TABLE,
    _metadata,
    sa.Column("study_name", sa.String(512), primary_key=True),
    sa.Column("owner", sa.String(256), nullable=False),
    sa.Column("heartbeat", sa.Float, nullable=False),
    sa.Column("checkpoint", sa.LargeBinary, nullable=True),
)


class LeaseLost(RuntimeError):
    """This process no longer holds the lease: another coordinator took over."""


class DatabaseLease:
    """A lease row in the study's own database (PostgreSQL, SQLite), see the module docstring; also
    the store of the coordinator's checkpoint (`CheckpointStore`)."""

    def __init__(self, engine: sa.engine.Engine, study_name: str, owner: str, *, ttl: float) -> None:
        self.engine, self.study_name, self.owner, self.ttl = engine, study_name, owner, float(ttl)
        for attempt in range(5):
            try:
                _metadata.create_all(engine, checkfirst=True)
                break
            except (sa.exc.IntegrityError, sa.exc.ProgrammingError):
                # workers starting together race to create the table: PostgreSQL fails the
                # loser's CREATE (duplicate type or relation); the next check finds it
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
        try:
            with engine.begin() as conn:
                conn.execute(sa.insert(_table).values(study_name=study_name, owner="", heartbeat=0.0))
        except sa.exc.IntegrityError:
            pass  # the row exists (another process created it first)

    def _update(self, where: sa.ColumnElement[bool], **values: object) -> bool:
        with self.engine.begin() as conn:
            result = conn.execute(sa.update(_table).where(_table.c.study_name == self.study_name, where).values(**values))
        return result.rowcount == 1

    def acquire(self) -> bool:
        """Take the lease if it is free, expired or already ours; True when we hold it."""
        now = time.time()
        free = sa.or_(_table.c.owner == self.owner, _table.c.heartbeat < now - self.ttl)
        return self._update(free, owner=self.owner, heartbeat=now)

    def renew(self) -> bool:
        """Heartbeat; False when the lease was lost (the caller must stop coordinating)."""
        return self._update(_table.c.owner == self.owner, heartbeat=time.time())

    def release(self) -> None:
        """Let a waiting coordinator take over at once (a clean stop)."""
        self._update(_table.c.owner == self.owner, owner="", heartbeat=0.0)

    def read(self) -> bytes | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(_table.c.checkpoint).where(_table.c.study_name == self.study_name)).first()
        return None if row is None or row[0] is None else bytes(row[0])

    def write(self, data: bytes) -> None:
        """Store the checkpoint; raises `LeaseLost` when another process holds the lease."""
        if not self._update(_table.c.owner == self.owner, checkpoint=data, heartbeat=time.time()):
            raise LeaseLost(f"coordinator {self.owner} lost the lease of study {self.study_name!r}")

    def __str__(self) -> str:
        return f"{LEASE_TABLE}[{self.study_name}]"

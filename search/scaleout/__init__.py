"""Several workers, one search (docs/scale-out.md): heartbeats and stale-trial retries on a shared
database ledger (`Crew`), and the lease under which one worker at a time drives a coordinated
optimizer (`Coordinator`, `search.scaleout._lease`). The loop itself is `search.run_search`."""

from ._coordinator import Coordinator
from ._lease import LEASE_TABLE, DatabaseLease, LeaseLost
from ._worker import Crew

__all__ = ["Coordinator", "Crew", "DatabaseLease", "LEASE_TABLE", "LeaseLost"]

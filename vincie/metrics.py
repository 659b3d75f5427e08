"""Prometheus metrics of one training process (one rank), in a registry the trainer owns. Names as DESIGN.md
"Operations" fixes them (base units, `vincie_` prefix). The HTTP endpoint and the other training metrics arrive
with the operations issue; these are the data path's.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from vincie.data import SKIP_REASONS


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        # exposed as vincie_data_skipped_total{reason}
        self.data_skipped = Counter("vincie_data_skipped", "Sessions skipped as bad or unreadable, by reason",
                                    ["reason"], registry=self.registry)
        for reason in SKIP_REASONS:  # every series exists from the start, so alerts see a 0 rather than nothing
            self.data_skipped.labels(reason)
        self.data_wait = Histogram("vincie_data_wait_seconds", "Time a training step waited for its sessions",
                                   registry=self.registry,
                                   buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, float("inf")))

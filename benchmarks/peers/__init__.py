"""The peers in the suite: ``python -m benchmarks --peers`` runs the same workloads against
PgQueuer and procrastinate, each installed from PyPI in a virtual environment of its own
(created once, under ~/.cache/beanflow-benchmarks) and run on the same server in the same run,
each in a scratch database of its own. Standard library only: the drivers import this package
from the peers' environments."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class Peer:
    name: str
    driver: str  # module under benchmarks/peers
    requirements: tuple[str, ...]
    defaults: str  # what "defaults" means for its workers
    tuned: int  # the setting the driver's drain takes for "tuned" (0: defaults)
    tuned_as: str
    # the share of the suite's drain size it drains: a rate is a rate, and a peer draining
    # ~100 tasks/s would spend most of the suite's time on 20,000 of them
    drain_share: float = 1.0

    @property
    def environment(self) -> Path:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        return cache / "beanflow-benchmarks" / "-".join(self.requirements).replace("==", "-")

    def install(self) -> None:
        """Create the peer's virtual environment, once."""
        python = self.environment / "bin" / "python"
        if python.exists():
            return
        subprocess.run([sys.executable, "-m", "venv", str(self.environment)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", *self.requirements], check=True
        )

    def run(self, command: str, dsn: str, *arguments: int) -> float:
        """One figure from the peer's driver, run with its own interpreter."""
        output = subprocess.run(
            [
                str(self.environment / "bin" / "python"),
                "-m",
                f"benchmarks.peers.{self.driver}",
                command,
                dsn,
                *map(str, arguments),
            ],
            cwd=ROOT,
            env=os.environ | {"PYTHONPATH": str(ROOT)},
            check=True,
            capture_output=True,
            text=True,
        )
        return float(json.loads(output.stdout.strip().splitlines()[-1]))


PEERS = (
    Peer(
        "PgQueuer 1.6",
        "pgqueuer_driver",
        ("pgqueuer==1.6.0", "asyncpg"),
        "batch_size 10",
        100,
        "batch_size 100",
    ),
    Peer(
        "procrastinate 3.10",
        "procrastinate_driver",
        ("procrastinate==3.10.0",),
        "concurrency 1",
        10,
        "concurrency 10",
        drain_share=0.1,
    ),
)


def measure(peer: Peer, dsn: str, sizes: object, repeats: int) -> dict[str, float]:
    """The peer's figures, keyed like the suite's rows (medians of ``repeats`` runs)."""
    peer.install()
    peer.run("install", dsn)

    def median(command: str, *arguments: int) -> float:
        return statistics.median(peer.run(command, dsn, *arguments) for _ in range(repeats))

    enqueue = sizes.enqueue  # type: ignore[attr-defined]
    drain = max(round(sizes.drain * peer.drain_share), 100)  # type: ignore[attr-defined]
    figures = {
        "enqueue 1": median("enqueue", enqueue, 1),
        "enqueue 1000": median("enqueue", enqueue, 1000),
    }
    for workers in (1, 4):
        figures[f"drain {workers} defaults"] = median("drain", drain, workers, 0)
        figures[f"drain {workers} tuned"] = median("drain", drain, workers, peer.tuned)
    return figures

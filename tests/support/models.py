"""What the hypothesis model tests share: two server processes on one store, and the
settings a state machine runs with (``GRAFT_MODEL_EXAMPLES``, ``GRAFT_MODEL_NO_SHRINK``)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import RuleBasedStateMachine, run_state_machine_as_test

from .servers import ServerProcess

# 10 examples of 30 steps by default keep `make test` within its few minutes (the model
# tests were a third of its time at 25); `make soak` runs 400.
EXAMPLES = int(os.environ.get("GRAFT_MODEL_EXAMPLES", "10"))
STEPS = 30
PHASES = [Phase.explicit, Phase.reuse, Phase.generate] + (
    [] if os.environ.get("GRAFT_MODEL_NO_SHRINK") else [Phase.shrink]
)


def two_servers(own_server: ServerProcess) -> Iterator[list[ServerProcess]]:
    """Two server processes on one fresh store (the own_server and a second one)."""
    own_server.start()
    second = dataclasses.replace(own_server, port=0, proc=None).start()
    yield [own_server, second]
    second.stop()


def run_machine(
    machine: type[RuleBasedStateMachine], servers: list[ServerProcess], tmp: str
) -> None:
    """Run ``machine`` against ``servers`` (it reads ``urls``, ``store`` and ``tmp``)."""
    machine.urls = [srv.url for srv in servers]  # type: ignore[attr-defined]
    machine.store = servers[0]._backing()  # type: ignore[attr-defined]
    machine.tmp = tmp  # type: ignore[attr-defined]
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
            phases=PHASES,
        ),
    )

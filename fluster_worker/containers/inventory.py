"""What containers of one worker id exist on the engine, and what they say about
themselves (their labels and state): what a restarted worker finds and re-adopts.
Pure parsing of the engine's list answer; no Docker calls here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fluster_worker.containers.spec import ATTEMPT_ID_LABEL, JOB_ID_LABEL

__all__ = ["ContainerInfo", "container_infos"]


@dataclass(frozen=True)
class ContainerInfo:
    """One container of ours. ``state`` is Docker's: created, running, paused,
    restarting, removing, exited or dead. ``job_id`` is "" and ``attempt_id`` -1
    when its labels do not say (not a container a job of ours made)."""

    container_id: str
    name: str
    job_id: str
    attempt_id: int
    state: str

    @property
    def started(self) -> bool:
        """It ran (or runs): a job's work may have happened in it."""
        return self.state in ("running", "paused", "restarting", "exited")


def container_infos(listed: list[dict[str, Any]]) -> list[ContainerInfo]:
    """ContainerInfos from ``GET /containers/json?all=1`` entries."""
    infos = []
    for entry in listed:
        labels = entry.get("Labels") or {}
        try:
            attempt = int(labels.get(ATTEMPT_ID_LABEL, ""))
        except ValueError:
            attempt = -1
        names = entry.get("Names") or [""]
        infos.append(
            ContainerInfo(
                container_id=str(entry.get("Id", "")),
                name=str(names[0]).lstrip("/"),
                job_id=str(labels.get(JOB_ID_LABEL, "")),
                attempt_id=attempt,
                state=str(entry.get("State", "")),
            )
        )
    return infos

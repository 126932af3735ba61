"""The live episodes of a served multi-turn env (envs/service.py's /episodes routes), by id.

A step is idempotent on (id, turn): the client retries a step whose answer it lost (a timeout, a
reset connection), and the env must not see that turn twice, so the last turn's reply is kept and
answered again. Ids die with the process: after a restart the client gets 404 for them and ends
only those episodes. The table is bounded (`max_live`, oldest dropped first) so a client that never
deletes its episodes cannot grow the service without end.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from typing import Optional

from envs.episode import Episode, Reply


class UnknownEpisode(KeyError):
    """No live episode has this id (the service restarted, or it was deleted or dropped)."""


class OutOfTurn(ValueError):
    """A step that is neither the episode's next turn nor a repeat of its last one."""


@dataclass
class _Entry:
    episode: Episode
    turn: int = 0  # turns stepped
    reply: Optional[dict] = None  # the last turn's reply, answered again to a repeat


class EpisodeTable:
    def __init__(self, max_live: int = 1 << 16):
        self.max_live = max_live
        self.entries: dict[str, _Entry] = {}

    def add(self, episode: Episode) -> str:
        while len(self.entries) >= self.max_live:
            del self.entries[next(iter(self.entries))]
        episode_id = uuid.uuid4().hex
        self.entries[episode_id] = _Entry(episode)
        return episode_id

    def step(self, episode_id: str, turn: int, text: str) -> dict:
        """Turn `turn` (1, 2, ...) of the episode: the env's reply as JSON."""
        entry = self._get(episode_id)
        if turn == entry.turn and entry.reply is not None:
            return entry.reply
        if turn != entry.turn + 1:
            raise OutOfTurn(f"episode {episode_id}: turn {turn} after turn {entry.turn}")
        reply: Reply = entry.episode.step(text)
        entry.turn, entry.reply = turn, dataclasses.asdict(reply)
        return entry.reply

    def delete(self, episode_id: str) -> None:
        self._get(episode_id)
        del self.entries[episode_id]

    def _get(self, episode_id: str) -> _Entry:
        try:
            return self.entries[episode_id]
        except KeyError:
            raise UnknownEpisode(episode_id) from None

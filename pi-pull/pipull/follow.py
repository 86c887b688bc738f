"""Follow mode: ``pi_pull.py --config FILE --follow`` ticks within about a second of a change.

The loop: tick, then wait for the server to say its accepted head moved, tick, wait again.
What it waits on:

- a node that fetches from the server (``[remote] url`` ends in ``/v1/nodes/state.git``), or
  one with ``[remote] wake_url``: the server's long poll ``GET /v1/nodes/wait?head=&timeout=``
  with the node's sync key (HTTP Basic). It answers as soon as the accepted head differs from
  the one the node knows; the connection is outgoing, so a node behind NAT needs nothing open;
- any other remote (a git host): ``git ls-remote`` of the statement ref every ``[agent]
  poll_interval`` seconds (5), and a tick when the ref changed. The log says the node polls.

Whatever happens, a tick runs at least every ``[agent] interval`` seconds (the timer's
fallback), so a lost connection, a server without the wait endpoint or a wrong URL delay a
change by one interval at most. Failed waits are retried after an exponential backoff with
full jitter (1 s doubling to 60 s, each wait a random 50-100 % of that), so a fleet that
lost its server does not come back all in the same second.

Ticks never overlap anything: each takes the agent's flock (statefile.Lock) like ``--once``
does; when the timer's run holds it, the follower tries again every second until it gets it.
SIGTERM or SIGINT stop the loop: a running tick finishes, a wait is abandoned at once.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .agent import Agent
from .config import Config
from .errors import EXIT_LOCKED, EXIT_OK, EXIT_USAGE, ConfigError, Locked, TickError
from .replication import watch

WAIT_TIMEOUT = 25.0  # seconds the server holds a wait (its maximum is 55)
BACKOFF_BASE = 1.0
BACKOFF_MAX = 60.0
LOCKED_RETRY = 1.0
# A tick that left move work over (a sync budget ran out, a queue still to empty) is followed by
# another this soon, not at the next change or fallback tick.
MORE_WORK_PAUSE = 1.0
_SHA = re.compile(r"^[0-9a-f]{40}$")
_SERVER_GIT_PATH = "/v1/nodes/state.git"


@dataclass
class Answer:
    """What a wait said: did the head move, and which head the server holds now."""

    changed: bool
    head: str


class WaitFailed(Exception):
    """A wait that did not get an answer; ``retry_after`` when the server asked for a delay."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def wake_url(cfg: Config) -> str:
    """The long-poll URL: ``[remote] wake_url``, else derived from a server remote, else ""."""
    if cfg.wake_url:
        return cfg.wake_url
    url = cfg.remote_url.rstrip("/")
    if cfg.remote_is_http and url.endswith(_SERVER_GIT_PATH):
        return url[: -len(_SERVER_GIT_PATH)] + "/v1/nodes/wait"
    return ""


def backoff(failures: int, rng: random.Random) -> float:
    """Seconds before the next try after ``failures`` failed waits in a row (full jitter, 50-100 %)."""
    cap = min(BACKOFF_MAX, BACKOFF_BASE * 2.0 ** max(0, min(failures - 1, 16)))
    return float(cap * rng.uniform(0.5, 1.0))


class LongPoll:
    """``GET <wake_url>?head=&timeout=`` with the node's HTTP Basic credentials."""

    def __init__(self, url: str, token: Callable[[], str], timeout: float = WAIT_TIMEOUT) -> None:
        self.url = url
        self.token = token
        self.timeout = timeout

    def wait(self, head: str, timeout: float | None = None) -> Answer:
        hold = self.timeout if timeout is None else max(0.0, min(timeout, self.timeout))
        query = urllib.parse.urlencode({"head": head, "timeout": f"{hold:.1f}"})
        sep = "&" if "?" in self.url else "?"
        req = urllib.request.Request(
            self.url + sep + query,
            headers={"Authorization": "Basic " + self.token(), "User-Agent": "pi-pull", "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=hold + 15) as resp:
                body = resp.read(65536)
        except urllib.error.HTTPError as e:
            retry = _retry_after(e.headers.get("Retry-After") if e.headers else None)
            reason = {
                401: "bad node name or sync key",
                403: "address not on the node's whitelist",
                404: "the server has no wait endpoint (older server?)",
                429: "too many waits open for this node",
            }
            raise WaitFailed(f"wait: HTTP {e.code} {reason.get(e.code, e.reason)}", retry) from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            why: object = e.reason if isinstance(e, urllib.error.URLError) else e
            raise WaitFailed(f"wait on {_safe(self.url)} failed: {why}") from None
        try:
            data = json.loads(body)
            changed, now = data["changed"], data["head"] or ""
        except (ValueError, KeyError, TypeError):
            raise WaitFailed("wait: the server's answer is not the expected JSON") from None
        if not isinstance(changed, bool) or not isinstance(now, str) or (now and not _SHA.match(now)):
            raise WaitFailed("wait: the server's answer is not the expected JSON")
        return Answer(changed, now)


class RefPoll:
    """A git host has no long poll: ``git ls-remote`` of the statement ref every poll_interval."""

    def __init__(self, agent: Agent, interval: float, sleep: Callable[[float], bool]) -> None:
        self.agent = agent
        self.interval = interval
        self.sleep = sleep  # returns True when stopped meanwhile

    def wait(self, head: str, timeout: float | None = None) -> Answer:
        """``head`` is the statement's tag id here (what ls-remote shows); polls until it differs."""
        deadline = time.monotonic() + (WAIT_TIMEOUT if timeout is None else timeout)
        while True:
            try:
                self.agent.mirror.ensure()
                now = self.agent.mirror.ls_remote(self.agent._fetch_env()) or ""
            except (TickError, OSError) as e:
                raise WaitFailed(str(e)) from None
            if now != head:
                return Answer(True, now)
            left = deadline - time.monotonic()
            if left <= 0 or self.sleep(min(self.interval, left)):
                return Answer(False, now)


class Follower:
    """The follow loop of one agent; ``run()`` returns an exit code once ``stop`` is set.

    ``tick`` runs one tick (agent.run_once); the clock, sleep and random source are seams for tests.
    """

    def __init__(
        self,
        agent: Agent,
        cfg: Config,
        log: logging.Logger,
        tick: Callable[[], int],
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.agent = agent
        self.cfg = cfg
        self.log = log
        self.tick = tick
        self.rng = rng or random.Random()
        self.clock = clock
        self.stop = threading.Event()
        url = wake_url(cfg)
        self.source: LongPoll | RefPoll
        if url:
            self.source = LongPoll(url, agent.basic_token)
            self.mode = f"long poll on {_safe(url)}"
        else:
            self.source = RefPoll(agent, cfg.poll_interval, self.stop.wait)
            self.mode = (
                f"polling the statement ref with git ls-remote every {cfg.poll_interval:g}s (the remote is not a "
                "mailstate server; set [remote] wake_url to the server's /v1/nodes/wait to be woken instead)"
            )
        self.failures = 0
        self.last_tick = float("-inf")

    # ---- what the loop knows

    def known(self) -> str:
        """What the node last saw: the statement's head (long poll) or tag id (ref poll)."""
        try:
            st, _raw = self.agent.state.load()
        except TickError:
            return ""
        stmt = st.get("statement") if isinstance(st.get("statement"), dict) else {}
        value = stmt.get("tag" if isinstance(self.source, RefPoll) else "head") if stmt else None
        return value if isinstance(value, str) else ""

    def _tick(self) -> int:
        """One tick, taking turns with the timer's ``--once`` on the lock; EXIT_USAGE ends the loop.
        A tick that left move work over (its budget ran out: Agent.more_work) is followed by another."""
        while not self.stop.is_set():
            code = self.tick()
            if code == EXIT_LOCKED:
                self.log.info("another pi-pull run holds the lock; trying again in a second")
                self.stop.wait(LOCKED_RETRY)
                continue
            self.last_tick = self.clock()
            if code == EXIT_USAGE or not self.agent.more_work:
                return code
            self.stop.wait(MORE_WORK_PAUSE)
        return EXIT_OK

    def _wait(self, head: str, timeout: float) -> Answer | None:
        """One wait in a helper thread, so that SIGTERM ends it at once; None when stopped."""
        box: queue.Queue[Answer | BaseException] = queue.Queue(1)

        def run() -> None:
            try:
                box.put(self.source.wait(head, timeout))
            except BaseException as e:  # handed to the loop, which decides
                box.put(e)

        threading.Thread(target=run, name="pi-pull-wait", daemon=True).start()
        while not self.stop.is_set():
            try:
                got = box.get(timeout=0.2)
            except queue.Empty:
                continue
            if isinstance(got, BaseException):
                raise got
            return got
        return None

    def run(self) -> int:
        self.log.info(f"follow mode: {self.mode}; a tick at least every {self.cfg.interval:g}s")
        if self._tick() == EXIT_USAGE:
            return EXIT_USAGE
        # Replication on change (pipull/replication.py): the ticks plan the targets, this thread
        # syncs what changed between them.
        threading.Thread(
            target=watch,
            args=(self.agent.fleet.replication, self.cfg.fleet_replicate_interval, self.stop, self.log),
            name="pi-pull-replicate",
            daemon=True,
        ).start()
        seen: str | None = None
        while not self.stop.is_set():
            due = self.last_tick + self.cfg.interval
            left = due - self.clock()
            if left <= 0:
                if self._tick() == EXIT_USAGE:
                    return EXIT_USAGE
                continue
            head = seen if seen is not None else self.known()
            try:
                answer = self._wait(head, min(WAIT_TIMEOUT, max(1.0, left)))
            except WaitFailed as e:
                self.failures += 1
                delay = e.retry_after if e.retry_after is not None else backoff(self.failures, self.rng)
                # The first failure and then every 10th, not one line per retry.
                if self.failures == 1 or self.failures % 10 == 0:
                    self.log.warning(
                        f"{e}; retrying in {delay:.1f}s (failure {self.failures}), a tick every "
                        f"{self.cfg.interval:g}s meanwhile"
                    )
                self.stop.wait(max(0.0, min(delay, due - self.clock())))
                continue
            if answer is None:
                break
            if self.failures:
                self.log.info(f"wait works again after {self.failures} failure(s)")
                self.failures = 0
            seen = answer.head
            if answer.changed:
                self.log.debug(f"woken: the server's statement is now {answer.head[:12] or 'none'}")
                if self._tick() == EXIT_USAGE:
                    return EXIT_USAGE
        self.log.info("follow mode stopped")
        return EXIT_OK


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, min(float(value), BACKOFF_MAX)) if value else None
    except ValueError:
        return None


def _safe(url: str) -> str:
    """The URL without any user:password part, for the log."""
    return re.sub(r"//[^/@]*@", "//***@", url)


def follow(agent: Agent, cfg: Config, log: logging.Logger, tick: Callable[[], int]) -> int:
    """Run follow mode until SIGTERM/SIGINT (cli.py installs the handlers that set ``stop``)."""
    import signal

    follower = Follower(agent, cfg, log, tick)

    def on_signal(signum: int, frame: Any) -> None:
        follower.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return follower.run()
    except ConfigError as e:
        log.error(str(e))
        return EXIT_USAGE
    except Locked as e:  # never escapes run_once, but be sure
        log.error(str(e))
        return EXIT_LOCKED

"""The master process: binds, forks workers and supervises them until told to stop.

Untrusted input: none from the network (the master never reads client bytes); signals
and the YAML file on reload, which is validated in full before anything changes.

Signals: TERM/INT graceful stop, QUIT immediate stop, HUP reload, TTIN/TTOU one worker
more/less. They arrive as bytes on a socket (`signals.py`) and are dispatched from the
master's own loop, never from a handler.
"""

from __future__ import annotations

import logging
import os
import pwd
import selectors
import signal
import socket
import time
from collections.abc import Iterable

from minismtp import exitcodes
from minismtp.config import Config, ConfigError, ListenAddress, load_config
from minismtp.delivery import DeliveryError, make_backend
from minismtp.faults import MAX_RULES
from minismtp.heartbeat import HeartbeatBoard
from minismtp.signals import SignalWakeup
from minismtp.stats import StatsBoard, Totals, summary_line
from minismtp.statshttp import StatsHttpServer, pages
from minismtp.supervision import (
    WorkerRecord, overdue, spawn_delay, stale_workers, workers_missing, workers_to_retire,
)
from minismtp.worker import Worker

log = logging.getLogger("minismtp.master")

MAX_WORKERS = 1024  # heartbeat slots; far above what one machine's cores can use
_LOOP_S = 0.5  # heartbeat and back-off checks at least this often
_KILL_GRACE_S = 5.0  # after shutdown_timeout, a worker that has not exited is killed
_SHORT_LIFE_S = 5.0  # a worker dying younger than this counts towards spawn back-off
_HANDLED = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT,
            signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD)


# -- sockets -----------------------------------------------------------------------

def bind(address: ListenAddress, backlog: int, reuse_port: bool, listen: bool = True
         ) -> socket.socket:
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if address.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.host, address.port))
        # Replies go out whole, one send per batch: no Nagle delay. Linux copies this to
        # every accepted socket, which saves the worker a syscall per connection.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if listen:
            sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def bound_address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"


class Arbiter:
    def __init__(self, config: Config, config_path: str | None,
                 overrides: dict[str, object] | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.overrides = overrides or {}
        self.target = config.server.workers
        self.generation = 0
        self.workers: dict[int, WorkerRecord] = {}
        self.listeners: dict[str, socket.socket] = {}  # by configured address text
        self.board = HeartbeatBoard(MAX_WORKERS)
        self.stats_board = StatsBoard(MAX_WORKERS, MAX_RULES)
        self.retired = Totals()  # counters of workers that have exited
        self.stats_http: StatsHttpServer | None = None
        self.started = time.monotonic()
        self.free_slots = list(range(MAX_WORKERS - 1, -1, -1))
        self.crash_streak = 0
        self.next_spawn_at = 0.0
        self.stopping = False
        self.stop_deadline = float("inf")
        self.exit_code = exitcodes.OK
        self.sel = selectors.DefaultSelector()
        self.wakeup = SignalWakeup()
        self._dispatch = {
            signal.SIGHUP: self._reload, signal.SIGTERM: self._stop_gracefully,
            signal.SIGINT: self._stop_gracefully, signal.SIGQUIT: self._stop_now,
            signal.SIGTTIN: self._more_workers, signal.SIGTTOU: self._fewer_workers,
        }

    # -- start and main loop ---------------------------------------------------------

    def run(self) -> int:
        try:
            _check_user(self.config.server.user)
            self._bind_all(self.config)
            self._prepare_delivery(self.config)
            self._start_stats_http(self.config)
        except (OSError, DeliveryError, LookupError) as exc:
            log.error("cannot start: %s", exc)
            return exitcodes.FAILURE
        self._init_signals()
        for text, sock in self.listeners.items():
            log.info("listening on %s", bound_address(sock))
        if self.stats_http is not None:
            log.info("statistics on http://%s/metrics and /stats",
                     bound_address(self.stats_http.sock))
        log.info("starting %d worker(s), delivery=%s", self.target, self.config.delivery.backend)
        try:
            while not (self.stopping and not self.workers):
                self._maintain(time.monotonic())
                self._wait_for_signals(_LOOP_S)
                self._reap()
        finally:
            self._kill_all(signal.SIGKILL)
            for sock in self.listeners.values():
                sock.close()
            if self.stats_http is not None:
                self.stats_http.close()
        totals, _ = self._current_stats()
        log.info("%s", summary_line(totals, time.monotonic() - self.started))
        log.info("master exiting")
        return self.exit_code

    def _init_signals(self) -> None:
        self.wakeup.install(_HANDLED)
        self.sel.register(self.wakeup.sock, selectors.EVENT_READ)

    def _wait_for_signals(self, timeout: float) -> None:
        """Wait for a signal, serving statistics requests meanwhile."""
        for key, mask in self.sel.select(timeout):
            if key.data is not None:
                key.data.handle(key, mask)  # the stats HTTP server's sockets
                continue
            for signum in self.wakeup.read():
                action = self._dispatch.get(signum)
                if action is not None:
                    action()
        if self.stats_http is not None:
            self.stats_http.expire(time.monotonic())

    def _maintain(self, now: float) -> None:
        records = list(self.workers.values())
        if self.stopping:
            if now > self.stop_deadline:
                self._kill_all(signal.SIGKILL)
            return
        beats = {r.slot: self.board.last(r.slot) for r in records}
        for record in stale_workers(records, beats, now, self.config.server.worker_timeout):
            log.error("worker %d missed its heartbeat for %.0fs, killing it",
                      record.pid, now - beats[record.slot])
            self._signal(record, signal.SIGKILL)
            record.killed = True
        for record in workers_to_retire(records, self.generation, self.target):
            self._signal(record, signal.SIGTERM)
            record.retiring_since = now
        grace = self.config.server.shutdown_timeout + _KILL_GRACE_S
        for record in overdue(records, now, grace):
            log.warning("worker %d did not stop in %.0fs, killing it", record.pid, grace)
            self._signal(record, signal.SIGKILL)
            record.killed = True
        if self.crash_streak and any(now - r.started > _SHORT_LIFE_S for r in records
                                     if r.retiring_since is None):
            self.crash_streak = 0
        if now >= self.next_spawn_at:
            for _ in range(workers_missing(records, self.generation, self.target)):
                self._spawn(now)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            record = self.workers.pop(pid, None)
            if record is None:
                continue  # not ours (or already forgotten): reaped, not reported
            self.stats_board.retire(record.slot, self.retired)  # totals never go back
            self.board.vacate(record.slot)
            self.free_slots.append(record.slot)
            self._report_exit(record, status)

    def _report_exit(self, record: WorkerRecord, status: int) -> None:
        expected = record.retiring_since is not None or self.stopping
        if os.WIFEXITED(status):
            code = os.WEXITSTATUS(status)
            how, clean = f"exited with status {code}", code == exitcodes.OK
        else:
            how, clean = f"was killed by signal {os.WTERMSIG(status)}", False
        if expected and (clean or record.killed):
            log.debug("worker %d %s", record.pid, how)
            return
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == exitcodes.WORKER_BOOT_FAILED:
            # Its own set-up failed (privileges, delivery): a new one would fail the same
            # way, so stop rather than fork in a loop (gunicorn's WORKER_BOOT_ERROR).
            log.error("worker %d could not start; stopping", record.pid)
            self.exit_code = exitcodes.FAILURE
            self._stop_gracefully()
            return
        (log.warning if clean else log.error)("worker %d %s; replacing it", record.pid, how)
        now = time.monotonic()
        if now - record.started < _SHORT_LIFE_S:
            self.crash_streak += 1
            self.next_spawn_at = now + spawn_delay(self.crash_streak)

    # -- workers ---------------------------------------------------------------------

    def _spawn(self, now: float) -> None:
        slot = self.free_slots.pop()
        self.board.hand_out(slot, now)
        # Until the worker has handlers of its own, a signal sent to it would run the
        # master's, which notify the master's loop: the worker would never see a SIGTERM
        # sent right after it was forked. Blocked, it waits for the worker (worker.py).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            raise
        if pid:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            self.workers[pid] = WorkerRecord(pid, slot, self.generation, now)
            return
        code = exitcodes.WORKER_CRASHED
        try:
            code = self._become_worker(slot, mask)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else exitcodes.OK
        except BaseException:
            log.exception("worker %d crashed", os.getpid())
        finally:
            os._exit(code)  # this must never return into the master's code

    def _become_worker(self, slot: int, signal_mask: Iterable[int]) -> int:
        self.wakeup.close(_HANDLED)  # the worker routes its own signals
        self.sel.close()
        config = self.config
        try:
            listeners = self._worker_listeners(config)
            _drop_privileges(config.server.user)
            delivery = config.delivery
            backend = make_backend(delivery.backend, delivery.path, delivery.fsync,
                                   delivery.layout, config.server.hostname)
        except (OSError, DeliveryError, KeyError) as exc:
            log.error("worker %d cannot start: %s", os.getpid(), exc)
            return exitcodes.WORKER_BOOT_FAILED
        if self.stats_http is not None:
            self.stats_http.close_inherited()
        return Worker(config, listeners, backend, self.board, slot, self.stats_board,
                      signal_mask).run()

    def _worker_listeners(self, config: Config) -> list[socket.socket]:
        if not config.server.reuse_port:
            return list(self.listeners.values())
        # Each worker its own socket on the port the master reserved: the kernel spreads
        # connections evenly instead of waking every worker on one shared queue.
        own = []
        for address in config.server.listen:
            port = self.listeners[str(address)].getsockname()[1]
            own.append(bind(ListenAddress(address.host, port, address.family),
                            config.server.backlog, reuse_port=True))
        for placeholder in self.listeners.values():
            placeholder.close()
        return own

    def _signal(self, record: WorkerRecord, signum: int) -> None:
        try:
            os.kill(record.pid, signum)
        except ProcessLookupError:
            pass

    def _kill_all(self, signum: int) -> None:
        for record in self.workers.values():
            self._signal(record, signum)
            record.killed = record.killed or signum == signal.SIGKILL

    # -- signal actions ----------------------------------------------------------------

    def _stop_gracefully(self) -> None:
        if self.stopping:
            return
        log.info("stopping: workers finish the transactions in flight (up to %.0fs)",
                 self.config.server.shutdown_timeout)
        self.stopping = True
        self.stop_deadline = time.monotonic() + self.config.server.shutdown_timeout + _KILL_GRACE_S
        self._kill_all(signal.SIGTERM)

    def _stop_now(self) -> None:
        log.info("stopping now")
        self.stopping = True
        self.stop_deadline = time.monotonic() + 1.0
        self._kill_all(signal.SIGQUIT)

    def _more_workers(self) -> None:
        self.target += 1
        log.info("workers: %d", self.target)

    def _fewer_workers(self) -> None:
        self.target = max(1, self.target - 1)
        log.info("workers: %d", self.target)

    def _reload(self) -> None:
        if self.stopping:
            return
        try:
            config = load_config(self.config_path, self.overrides)
            _check_user(config.server.user)
            self._prepare_delivery(config)
            fresh = self._bind_all(config)  # last: nothing after it can fail
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload refused: %s", problem)
            log.error("reload refused: still running on the previous configuration")
            return
        except (OSError, DeliveryError, LookupError) as exc:
            log.error("reload refused: %s; still running on the previous configuration", exc)
            return
        except Exception:  # a reload must never take the running server down
            log.exception("reload refused: still running on the previous configuration")
            return
        for sock in fresh.values():
            log.info("listening on %s", bound_address(sock))
        for text in [t for t in self.listeners if t not in {str(a) for a in config.server.listen}]:
            self.listeners.pop(text).close()
        if config.stats.listen != self.config.stats.listen:
            log.warning("stats.listen changes take effect at the next start")
        self.config = config
        self.target = config.server.workers
        self.generation += 1
        log.info("reloaded %s: starting generation %d with %d worker(s)",
                 self.config_path or "embedded defaults", self.generation, self.target)

    def _start_stats_http(self, config: Config) -> None:
        address = config.stats.listen
        if address is None:
            return
        try:
            sock = bind(address, 64, reuse_port=False)
        except OSError as exc:
            raise OSError(f"cannot listen on {address} (stats.listen): {exc.strerror}") from exc
        self.stats_http = StatsHttpServer(sock, pages(self._current_stats))
        self.stats_http.register(self.sel)

    def _current_stats(self) -> tuple[Totals, list[str]]:
        live = [record.slot for record in self.workers.values()]
        totals = self.stats_board.totals(live, self.retired)
        totals.workers = len(live)
        return totals, [rule.name for rule in self.config.faults.rules]

    def _bind_all(self, config: Config) -> dict[str, socket.socket]:
        """Bind the addresses not bound yet and return them; on failure close what this
        call bound."""
        fresh: dict[str, socket.socket] = {}
        server = config.server
        try:
            for address in server.listen:
                text = str(address)
                if text not in self.listeners and text not in fresh:
                    try:
                        fresh[text] = bind(address, server.backlog, server.reuse_port,
                                           listen=not server.reuse_port)
                    except OSError as exc:
                        raise OSError(f"cannot listen on {text}: {exc.strerror}") from exc
        except OSError:
            for sock in fresh.values():
                sock.close()
            raise
        self.listeners.update(fresh)
        return fresh

    def _prepare_delivery(self, config: Config) -> None:
        d = config.delivery
        make_backend(d.backend, d.path, d.fsync, d.layout, config.server.hostname).prepare()
        if d.backend == "maildir" and config.server.user and os.geteuid() == 0:
            user = pwd.getpwnam(config.server.user)
            for sub in ("", "tmp", "new", "cur"):
                os.chown(os.path.join(d.path, sub), user.pw_uid, user.pw_gid)


def _check_user(user: str | None) -> None:
    if user and os.geteuid() == 0:
        try:
            pwd.getpwnam(user)
        except KeyError:
            raise LookupError(f'server.user: no such user "{user}"') from None


def _drop_privileges(user: str | None) -> None:
    if not user or os.geteuid() != 0:
        return
    entry = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)

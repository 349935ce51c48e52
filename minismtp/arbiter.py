"""The master process: binds, forks workers and supervises them until told to stop.

Untrusted input: none from the network (the master never reads client bytes); signals
and the YAML file on reload, which is validated in full before anything changes.

Signals: TERM/INT graceful stop, QUIT immediate stop, HUP reload, TTIN/TTOU one worker
more/less, USR1/USR2 a log line (nothing to reopen). Handlers only count them and wake
the master's loop (`signals.py`), which acts on each turn's counts, never from a handler.
They are blocked from the start of `serve` until the handlers are in place, and again
once the loop is done, so that none takes its default action meanwhile.

A new generation (a reload; TTIN/TTOU with reuse_port) starts beside the old one, which
goes on accepting until every new worker accepts: a new generation that cannot start
leaves the old one serving, its dead replaced as they were started (`Plan`). A reload
applies every changed key, or refuses one it cannot apply with a log line and keeps its
old value (RESTART_ONLY names the keys that need a restart). Nothing on disk changes
until every check has passed: the Maildir is made ready last, as the reload is
committed. The listening sockets belong to the master for as long as their address is
configured (`listeners.py`), so workers come and go without a queued connection being
reset; a stop lets go of them at once. A worker that misses its heartbeat gets SIGABRT,
then SIGKILL (`supervision.py`); the files a dead worker left in tmp/ are swept
(`debris.py`).
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import ssl
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import replace

from minismtp import exitcodes
from minismtp.anvil import ClientTable
from minismtp.balance import queued
from minismtp.config import Config, ConfigError
from minismtp.debris import Sweeper, remove_orphans
from minismtp.delivery import DeliveryError
from minismtp.delivery.maildir import this_host
from minismtp.descriptors import fit_connections
from minismtp.faults import MAX_RULES
from minismtp.heartbeat import NOT_ACCEPTING, HeartbeatBoard
from minismtp.listeners import (
    ListenerPool, bind, bound_address, is_listening, shares_port, switch_reuse_port,
)
from minismtp.logboard import LogBoard
from minismtp.logsetup import apply_format, apply_level
from minismtp.logstream import log_handler
from minismtp.msglog import log_stream
from minismtp.profiles import own_rules
from minismtp.sdnotify import Notifier
from minismtp.signals import MASTER_SIGNALS, SignalWakeup
from minismtp.startup import (
    RESTART_ONLY, check_user, delivery_problems, drop_privileges, load_for_reload,
    make_delivery, prepare_delivery, report_where_stuck, tmp_dir,
)
from minismtp.stats import StatsBoard, Totals
from minismtp.statsformat import RuleName, summary_line
from minismtp.statshttp import StatsHttpServer, pages
from minismtp.supervision import (
    Backoff, Plan, WorkerRecord, attended, free_index, generation_ready, overdue,
    places_missing, resized, stale_signals, workers_missing, workers_to_retire,
)
from minismtp.tls import reloaded_context
from minismtp.values import MAX_WORKERS
from minismtp.worker import Worker

__all__ = ["RESTART_ONLY", "Arbiter", "MAX_WORKERS", "bind", "bound_address"]

log = logging.getLogger("minismtp.master")

BOARD_SLOTS = 2 * MAX_WORKERS  # a retiring generation and a new one, side by side
_LOOP_S = 0.5  # heartbeat and back-off checks at least this often
_STARTING_LOOP_S = 0.05  # while a generation starts: the one before retires once it is ready
_KILL_GRACE_S = 5.0  # after shutdown_timeout, a worker that has not exited is killed
_KILLED_WAIT_S = 2.0  # at the master's exit, how long killed workers are waited for
_ABORT_GRACE_S = 2.0  # after a SIGABRT for a missed heartbeat, SIGKILL if still alive
_SWEEP_BUDGET = 2000  # tmp/ entries looked at per loop turn after a worker died
_SHORT_LIFE_S = 5.0  # a worker dying younger than this counts towards spawn back-off
_HANDLED = MASTER_SIGNALS


class Arbiter:
    def __init__(self, config: Config, config_path: str | None,
                 overrides: dict[str, object] | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.overrides = overrides or {}
        self.target = config.server.workers
        self.generation = 0
        # The last generation that was all ready: it serves while a newer one starts,
        # and while that one is not ready its dead are replaced as they were started.
        self.serving = 0
        self.serving_plan = Plan(0, config, config, self.target, None)
        self.refill_backoff = Backoff()  # for those replacements (the current generation
        # may be crashing in a loop: its back-off must not hold them up)
        self.has_been_ready = False  # every worker of a generation has accepted, once
        self.workers: dict[int, WorkerRecord] = {}
        self.worker_config = config  # with max_connections fitted to the descriptor limit
        self.listeners = ListenerPool()
        self.board = HeartbeatBoard(BOARD_SLOTS)
        self.stats_board = StatsBoard(BOARD_SLOTS, MAX_RULES)
        self.log_board = LogBoard(BOARD_SLOTS)  # log lines a worker made, not yet written
        # limits.per_client's counts, shared by every worker of every generation; its
        # size is fixed here (a reload that changes it is refused for that key).
        self.clients = ClientTable(config.limits.per_client.table_size, BOARD_SLOTS)
        self.sweeper = Sweeper()
        self.notifier = Notifier()  # systemd's Type=notify, when run by systemd
        self.tls_context: ssl.SSLContext | None = None  # with tls.certificates
        self.retired = Totals()  # counters of workers that have exited
        self.stats_http: StatsHttpServer | None = None
        self.started = time.monotonic()
        self.free_slots = list(range(BOARD_SLOTS - 1, -1, -1))
        self.waiting_for_slots = False
        self.backoff = Backoff()  # the current generation's, while its workers die young
        self.stopping = False
        self.stop_deadline = float("inf")
        self.exit_code = exitcodes.OK
        self.sel = selectors.DefaultSelector()
        self.wakeup = SignalWakeup()

    # -- start and main loop ---------------------------------------------------------

    def run(self) -> int:
        try:
            check_user(self.config.server.user)
            if problems := delivery_problems(self.config, serving=True):
                for problem in problems:  # each message would get 451
                    log.error("cannot start: %s", problem)
                return exitcodes.FAILURE
            self.listeners.bind_missing(self.config)
            prepare_delivery(self.config)
            if (tmp := tmp_dir(self.config)) is not None:
                # Not at a reload: the running workers' files are in use. At start none
                # runs, so a file of a pid now dead is a killed worker's (the master's
                # record of it died with the master, so the Sweeper never heard).
                remove_orphans(tmp)
            self._start_stats_http(self._bind_stats(self.config))
            # Built once, here, so that every worker shares its session-ticket keys (tls.py).
            self.tls_context = reloaded_context(None, self.config.tls)
        except (OSError, DeliveryError, LookupError) as exc:
            log.error("cannot start: %s", exc)
            return exitcodes.FAILURE
        except ConfigError as exc:  # the certificates, broken since they were checked
            for problem in exc.problems:
                log.error("cannot start: %s", problem)
            return exitcodes.FAILURE
        self._init_signals()
        for group in self.listeners.groups.values():
            log.info("listening on %s", bound_address(group[0]))
        self.worker_config = fit_connections(self.config, self.listeners.count())
        self.serving_plan = self._current_plan()
        log.info("starting %d worker(s), delivery=%s", self.target, self.config.delivery.backend)
        try:
            while not (self.stopping and not self.workers):
                self._maintain(time.monotonic())
                if not (self.notifier.ready or self.stopping):
                    self._maybe_ready()
                settled = self.has_been_ready and self.serving == self.generation
                self._wait_for_signals(_LOOP_S if settled else _STARTING_LOOP_S)
                self._reap()
                self._retry_log()
        finally:
            # From here on a signal could only interrupt the way out, or, once the
            # interpreter has put back the default actions, kill it on its way out
            # (a HUP just after a TERM). Blocked, none is delivered.
            signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
            self._kill_all(signal.SIGKILL)
            self._reap_killed(time.monotonic() + _KILLED_WAIT_S)
            self.listeners.close()
            while self.sweeper.busy:  # what the last workers left; nothing runs any more
                self.sweeper.sweep(_SWEEP_BUDGET, ())
            if self.stats_http is not None:
                self.stats_http.close()
        totals, _ = self._current_stats()
        log.info("%s", summary_line(totals, time.monotonic() - self.started))
        log.info("master exiting")
        return self.exit_code

    def _init_signals(self) -> None:
        self.wakeup.install(_HANDLED)
        self.sel.register(self.wakeup.sock, selectors.EVENT_READ)
        # Blocked by `serve` until now (cli.py): what came meanwhile is noted now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)

    def _wait_for_signals(self, timeout: float) -> None:
        """Wait for a signal, serving statistics requests meanwhile."""
        for key, mask in self.sel.select(timeout):
            if key.data is not None:
                key.data.handle(key, mask)  # the stats HTTP server's sockets
            else:
                self._on_signals(self.wakeup.read())
        if self.stats_http is not None:
            self.stats_http.expire(time.monotonic())

    def _on_signals(self, arrived: Counter[int]) -> None:
        """Act on the signals that came since the last turn, however many: a stop before
        anything else, one reload for any number of HUPs, the TTINs and TTOUs added up
        (after the reload, which would otherwise undo them)."""
        if arrived[signal.SIGQUIT]:
            self._stop_now()
        elif arrived[signal.SIGTERM] or arrived[signal.SIGINT]:
            self._stop_gracefully()
        else:
            for signum in (signal.SIGUSR1, signal.SIGUSR2):
                if arrived[signum]:
                    log.info("%s: nothing to do (the log goes to standard error: no file "
                             "to reopen)", signal.Signals(signum).name)
            if arrived[signal.SIGHUP]:
                self._reload()
            step = arrived[signal.SIGTTIN] - arrived[signal.SIGTTOU]
            if step:
                self._resize(step)

    def _maintain(self, now: float) -> None:
        records = list(self.workers.values())
        self.sweeper.sweep(_SWEEP_BUDGET, self.workers)
        if self.stopping:
            if now > self.stop_deadline:
                self._kill_all(signal.SIGKILL)
            return
        self._check_heartbeats(records, now)
        self._note_ready(records)
        if generation_ready(records, self.generation, self.target):
            if self.serving != self.generation:
                self.refill_backoff = Backoff()
            self.serving = self.generation
            self.serving_plan = self._current_plan()  # TTIN/TTOU may have moved the target
            self.has_been_ready = True
        retiring = workers_to_retire(records, self.generation, self.target, self.serving)
        for record in retiring:
            self._signal(record, signal.SIGTERM)
            record.retiring_since = now
        for record in overdue(records, now, _KILL_GRACE_S):
            log.warning("worker %d did not stop in %.0fs, killing it", record.pid,
                        record.shutdown_timeout_s + _KILL_GRACE_S)
            self._signal(record, signal.SIGKILL)
            record.killed = True
        # A worker started since the last failure has lived: the cause has gone.
        self.backoff.maybe_forgive(records, self.generation, now, _SHORT_LIFE_S)
        self._refill_serving(records, now)
        if now >= self.backoff.next_at:
            plan = self._current_plan()
            for _ in range(workers_missing(records, self.generation, self.target)):
                if not self._spawn(now, plan):
                    break
        if retiring:
            # After the spawns: a generation retired by a second TTIN, TTOU or HUP may
            # have made a socket listen that the new generation's workers, started just
            # now, take; checked before them it would be renewed, and its queue reset.
            self._close_unattended()

    def _current_plan(self) -> Plan:
        return Plan(self.generation, self.config, self.worker_config, self.target,
                    self.tls_context)

    def _refill_serving(self, records: list[WorkerRecord], now: float) -> None:
        """While the current generation is not ready, the serving one is all that
        accepts: a worker of it that dies (OOM, SIGKILL) is replaced by one started as it
        was, with its configuration and its place, so that a new generation crashing in
        a loop never leaves nobody accepting."""
        if self.serving == self.generation:
            return
        plan, backoff = self.serving_plan, self.refill_backoff
        backoff.maybe_forgive(records, plan.generation, now, _SHORT_LIFE_S)
        if now < backoff.next_at:
            return
        for _ in range(workers_missing(records, plan.generation, plan.target)):
            if not self._spawn(now, plan):
                break

    def _note_ready(self, records: list[WorkerRecord]) -> None:
        """Mark the workers that accept now: once booted, a worker counts as ready even
        while it pauses accepting (a burst left to siblings, out of descriptors)."""
        loads = self.board.loads
        for record in records:
            if not record.ready and loads[record.slot] != NOT_ACCEPTING:
                record.ready = True

    def _check_heartbeats(self, records: list[WorkerRecord], now: float) -> None:
        beats = {r.slot: self.board.last(r.slot) for r in records}
        timeout = self.config.server.worker_timeout
        for record, signum in stale_signals(records, beats, now, timeout, _ABORT_GRACE_S):
            if signum == signal.SIGABRT:
                log.error("worker %d missed its heartbeat for %.0fs: SIGABRT (it writes "
                          "where it was stuck to the log)", record.pid, now - beats[record.slot])
                record.aborted_at = now
            else:
                log.error("worker %d still alive %.0fs after SIGABRT: killing it",
                          record.pid, _ABORT_GRACE_S)
                record.killed = True
            self._signal(record, signum)

    def _reap(self) -> None:
        reaped = False
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            record = self.workers.pop(pid, None)
            if record is None:
                continue  # not ours (or already forgotten): reaped, not reported
            # Totals never go back.
            self.stats_board.retire(record.slot, self.retired, record.listener_names,
                                    record.rule_names)
            self._recover_log_lines(record)
            self.board.vacate(record.slot)
            self.clients.vacate(record.slot)  # its sessions went with it
            self.free_slots.append(record.slot)
            if record.tmp_dir is not None and status != 0:  # 0: exited with status 0
                self.sweeper.add(record.tmp_dir, pid, record.host)  # died mid-DATA?
            self._report_exit(record, status)
            reaped = True
        if reaped:  # a worker told to stop may have made its sockets listen meanwhile
            self._close_unattended()

    def _close_unattended(self) -> None:
        """Close each socket that listens with no worker to accept from it, putting in
        its place one bound as it was, which listens once the worker that takes it is
        set up (listeners.py).

        A worker makes the sockets it takes listen once set up, and a socket stops
        listening only when closed. So a generation dropped before it was ready (a TTOU
        or HUP while one of its workers crashes at every start) leaves listening the
        sockets its set-up workers took, as does a set-up worker of a generation not yet
        serving that dies: where no working worker holds one (a worker crashing at every
        start holds it only until it dies, when this is called again) and the serving
        generation does not take it for a replacement, the kernel goes on sending it its
        share of new connections, to wait unanswered until a later generation is ready.
        Those waiting on it are reset instead (a client tries again, or its next MX, at
        once). A socket without SO_REUSEPORT is left as it is: it could not be bound again
        while a worker still holds it.
        """
        if self.stopping:
            return  # the sockets are closed (_stop_listening): nothing to renew
        records = list(self.workers.values())
        kept = attended(records)
        plan = self.serving_plan  # its dead are replaced, taking their sockets and queues
        for index in places_missing(records, plan.generation, plan.target):
            kept.update(self.listeners.share(plan.config, index, plan.target))
        for sock in self.listeners.all():
            if sock in kept or not shares_port(sock) or not is_listening(sock):
                continue
            address, waiting = bound_address(sock), queued(sock)
            try:
                self.listeners.renew(sock)
            except OSError as exc:
                log.error("%s: a socket no worker accepts from goes on listening: it could "
                          "not be replaced: %s", address, exc.strerror or exc)
                continue
            reset = f"; {waiting} connection(s) waiting on it reset" if waiting else ""
            log.warning("%s: closed a socket listening with no worker to accept from it%s; "
                        "one bound in its place listens once a worker that takes it is set "
                        "up", address, reset)

    def _reap_killed(self, deadline: float) -> None:
        """After SIGKILL to every worker on the way out: reap them, and so write the log
        lines they held, unless one is stuck in the kernel past `deadline`."""
        self.stopping = True  # their deaths are expected: no "replacing it"
        while self.workers and time.monotonic() < deadline:
            self._reap()
            if self.workers:
                time.sleep(0.01)

    def _retry_log(self) -> None:
        """Records held for a stalled log stream: out as soon as it takes them again."""
        if (handler := log_handler()) is not None and handler.holding:
            handler.flush()

    def _recover_log_lines(self, record: WorkerRecord) -> None:
        """What a worker that died without writing its log lines out left in its slot
        (logboard.py), before any line of ours about its death."""
        if (handler := log_handler()) is not None:
            # After what our handler holds, written as far as the stream takes it now;
            # the rest is held with our own records, never waited for.
            left, dropped = self.log_board.take(record.slot)
            handler.hold_lines(left, dropped)
            if left:
                log.debug("worker %d: %d bytes of log lines it left", record.pid, len(left))
            return
        fd = log_stream()  # logging set up otherwise (tests): written as it goes
        if fd is None:
            return  # not a plain stream: its lines went through logging, none were held
        if written := self.log_board.recover(record.slot, fd):
            log.debug("worker %d: wrote the %d bytes of log lines it left", record.pid,
                      written)

    def _will_replace(self, record: WorkerRecord) -> bool:
        """Whether a worker that just died gets a successor: one of the current
        generation, or of the serving one while the current one is not ready (a worker
        told to stop, or of a generation left behind, does not)."""
        if self.stopping or record.retiring_since is not None:
            return False
        return record.generation in (self.generation, self.serving)

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
            if not self.has_been_ready:
                # Its own set-up failed (privileges, delivery) at start: a new one would
                # fail the same way, so stop rather than fork in a loop (gunicorn's
                # WORKER_BOOT_ERROR).
                log.error("worker %d could not start; stopping", record.pid)
                self.exit_code = exitcodes.FAILURE
                self._stop_gracefully()
                return
            # Once serving, the cause may pass (a user or group lookup failing for a
            # moment): the others go on serving, and the next one waits its back-off.
            how = "could not start"
        if not self._will_replace(record):
            (log.warning if clean else log.error)("worker %d %s", record.pid, how)
            return
        (log.warning if clean else log.error)("worker %d %s; replacing it", record.pid, how)
        now = time.monotonic()
        if now - record.started < _SHORT_LIFE_S:
            self._back_off(now, record.generation)

    def _back_off(self, now: float, generation: int) -> None:
        """A worker died young or could not be started: wait longer before the next of
        its generation."""
        (self.backoff if generation == self.generation else self.refill_backoff).note_death(now)

    # -- workers ---------------------------------------------------------------------

    def _spawn(self, now: float, plan: Plan) -> bool:
        """Fork a worker of `plan`'s generation; False if none could be started now."""
        if not self.free_slots:
            if not self.waiting_for_slots:
                log.warning("all %d worker slots taken: new workers wait for retiring ones "
                            "to exit", BOARD_SLOTS)
            self.waiting_for_slots = True
            return False
        self.waiting_for_slots = False
        index = free_index(list(self.workers.values()), plan.generation)
        try:
            listeners = self.listeners.for_worker(plan.config, index, plan.target)
        except OSError as exc:
            log.error("cannot start a worker: %s", exc)
            self._back_off(now, plan.generation)
            return False
        slot = self.free_slots.pop()
        self.board.hand_out(slot, now)
        self.clients.hand_out(slot)
        self.log_board.hand_out(slot)
        # Until the worker has handlers of its own, a signal sent to it would run the
        # master's, which notify the master's loop: the worker would never see a SIGTERM
        # sent right after it was forked. Blocked, it waits for the worker (worker.py).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
        try:
            pid = os.fork()
        except OSError as exc:  # out of processes or memory: try again later, as above
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            self.free_slots.append(slot)
            log.error("cannot start a worker: fork: %s", exc.strerror or exc)
            self._back_off(now, plan.generation)
            return False
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            raise
        if pid:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            config = plan.config
            self.workers[pid] = WorkerRecord(
                pid, slot, plan.generation, now, index=index, tmp_dir=tmp_dir(config),
                shutdown_timeout_s=config.server.shutdown_timeout,
                listener_names=tuple(entry.name for entry in config.server.listen),
                rule_names=rule_names(config), host=this_host(), listeners=tuple(listeners))
            return True
        code = exitcodes.WORKER_CRASHED
        try:
            code = self._become_worker(slot, index, mask, listeners, plan)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else exitcodes.OK
        except BaseException:
            log.exception("worker %d crashed", os.getpid())
        finally:
            os._exit(code)  # this must never return into the master's code

    def _become_worker(self, slot: int, index: int, signal_mask: Iterable[int],
                       listeners: list[socket.socket], plan: Plan) -> int:
        self.wakeup.close(_HANDLED)  # the worker routes its own signals
        if (handler := log_handler()) is not None:
            handler.forget_held()  # the master's records, held for the stream: its own
        self.sel.close()
        report_where_stuck()
        for sock in self.listeners.all():
            if sock not in listeners:
                sock.close()  # the master's, and other workers' share
        config = plan.worker_config
        try:
            drop_privileges(config.server.user, config.delivery.group)
            backend = make_delivery(config)
        except (OSError, DeliveryError, KeyError) as exc:
            log.error("worker %d cannot start: %s", os.getpid(), exc)
            return exitcodes.WORKER_BOOT_FAILED
        if self.stats_http is not None:
            self.stats_http.close_inherited()
        return Worker(config, self.listeners.entries(config, listeners), backend, self.board,
                      slot, self.stats_board, signal_mask, plan.tls_context,
                      self.clients, self.log_board, index).run()

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
        self.notifier.notify_stopping()
        # Workers of an older generation may have been given longer to finish.
        longest = max([r.shutdown_timeout_s for r in self.workers.values()],
                      default=self.config.server.shutdown_timeout)
        self.stop_deadline = time.monotonic() + longest + _KILL_GRACE_S
        self._kill_all(signal.SIGTERM)
        self._stop_listening()

    def _stop_now(self) -> None:
        log.info("stopping now")
        self.stopping = True
        self.notifier.notify_stopping()
        self.stop_deadline = time.monotonic() + 1.0
        self._kill_all(signal.SIGQUIT)
        self._stop_listening()

    def _stop_listening(self) -> None:
        """Let the listening sockets close as soon as the workers close theirs.

        Told to stop, a worker closes its listeners at once and accepts nothing more.
        Our descriptors would keep each socket listening until we exit: the kernel would
        go on completing handshakes that nobody answers, and reset them only then. Without
        them, a socket closes with its last worker's descriptor (each SO_REUSEPORT socket
        with its own workers'): what is queued then would never be accepted anyway, and
        new clients are refused at once, so a sending MTA moves on to its next MX."""
        self.listeners.close()

    def _resize(self, step: int) -> None:
        """TTIN/TTOU: `step` workers more (or fewer), never fewer than one."""
        if step > 0 and self.target >= MAX_WORKERS:
            log.warning("workers: %d, the most there can be; TTIN ignored", self.target)
            return
        target, new_generation = resized(self.target, step, self.config.server.reuse_port)
        if new_generation:  # reuse_port: every socket shared out again (supervision.py)
            self.generation += 1
            log.info("workers: %d, as generation %d", target, self.generation)
        else:
            log.info("workers: %d", target)
        self.target = target

    # -- reload ------------------------------------------------------------------------

    def _maybe_ready(self) -> None:
        """Tell systemd we are ready once every worker of this generation accepts."""
        if generation_ready(list(self.workers.values()), self.generation, self.target):
            addresses = ", ".join(bound_address(group[0])
                                  for group in self.listeners.groups.values())
            self.notifier.notify_ready(f"{self.target} worker(s) on {addresses}")

    def _reload(self) -> None:
        if self.stopping:
            return
        self.notifier.notify_reloading()
        self.notifier.ready = False  # READY again once the new generation accepts
        self._apply_reload()

    def _apply_reload(self) -> None:
        fresh: dict[str, socket.socket] = {}
        try:
            config = load_for_reload(self.config_path, self.overrides, self.config)
            if config is None:
                return
            tls_context = reloaded_context(self.tls_context, config.tls)
            fresh = self.listeners.bind_missing(config, listen=False)
            # The commit point, last of what may refuse the reload: it changes the disk
            # (a new delivery.path made and given to server.user). What follows keeps an
            # old value rather than refuse.
            prepare_delivery(config)
            config = switch_reuse_port(self.listeners, self.config, config)
            config = self._switch_stats(config)
            config = self._keep_table_size(config)
        except (OSError, DeliveryError, LookupError) as exc:
            self.listeners.drop_unlisted(self.config)  # what this reload bound, if anything
            log.error("reload refused: %s; still running on the previous configuration", exc)
            return
        except ConfigError as exc:  # TLS wanted, its certificates broken since the check
            for problem in exc.problems:
                log.error("reload refused: %s", problem)
            log.error("reload refused: still running on the previous configuration")
            return
        except Exception:  # a reload must never take the running server down
            self.listeners.drop_unlisted(self.config)
            log.exception("reload refused: still running on the previous configuration")
            return
        for sock in fresh.values():
            log.info("listening on %s", bound_address(sock))
        self.listeners.drop_unlisted(config)
        self.listeners.set_deferral(config)  # a listener's PROXY or TLS mode may have changed
        if config.server.backlog != self.config.server.backlog:
            self.listeners.set_backlog(config.server.backlog)
        apply_level(config.logging.level)
        apply_format(config.logging.format)
        self.tls_context = tls_context
        self.config = config
        self.target = config.server.workers
        self.worker_config = fit_connections(config, self.listeners.count())
        self.generation += 1
        # The new configuration may have cured what made workers die young: its workers
        # start now, not after the back-off (the old ones serve until they are ready).
        self.backoff = Backoff()
        log.info("reloaded %s: starting generation %d with %d worker(s)",
                 self.config_path or "embedded defaults", self.generation, self.target)

    def _keep_table_size(self, config: Config) -> Config:
        """The per-client table was made before the first fork, for every generation:
        its size stays; the limits themselves apply in the new generation."""
        per_client = config.limits.per_client
        if per_client.table_size == self.clients.capacity:
            return config
        log.error("reload: limits.per_client.table_size stays %d until a restart",
                  self.clients.capacity)
        kept = replace(per_client, table_size=self.clients.capacity)
        return replace(config, limits=replace(config.limits, per_client=kept))

    def _switch_stats(self, config: Config) -> Config:
        """Serve statistics on the new address, or keep the old one if it cannot be bound."""
        old = self.config.stats
        if config.stats.listen == old.listen:
            return config
        try:
            server = self._bind_stats(config)
        except OSError as exc:
            log.error("reload: stats.listen stays %s: %s", old.listen or "null", exc)
            return replace(config, stats=old)
        if self.stats_http is not None:
            self.stats_http.close()
            self.stats_http = None
        self._start_stats_http(server)
        return config

    # -- statistics, descriptors, delivery ----------------------------------------------

    def _bind_stats(self, config: Config) -> StatsHttpServer | None:
        address = config.stats.listen
        if address is None:
            return None
        try:
            sock = bind(address, 64, reuse_port=False)
        except OSError as exc:
            raise OSError(f"cannot listen on {address} (stats.listen): {exc.strerror}") from exc
        return StatsHttpServer(sock, pages(self._current_stats, self._stats_shape))

    def _start_stats_http(self, server: StatsHttpServer | None) -> None:
        if server is not None:
            self.stats_http = server
            server.register(self.sel)
            log.info("statistics on http://%s/metrics and /stats", bound_address(server.sock))

    def _stats_shape(self) -> tuple[object, ...]:
        """What the names in the statistics depend on: the configuration (its fault rules)
        and the workers (each one's listeners, kept when it exits). A page is rendered
        anew when this changes, so a reload's names show in the very next answer."""
        return self.config, tuple(self.workers)

    def _current_stats(self) -> tuple[Totals, tuple[RuleName, ...]]:
        records = self.workers.values()
        totals = self.stats_board.totals([record.slot for record in records], self.retired,
                                         {record.slot: record.listener_names
                                          for record in records},
                                         {record.slot: record.rule_names for record in records})
        totals.workers = len(records)
        return totals, rule_names(self.config)


def rule_names(config: Config) -> tuple[RuleName, ...]:
    """The fault rules' labels by counter index (FaultRule.index): the top-level rules,
    then each listener's own, numbered in that order (profiles.resolve)."""
    names: list[RuleName] = [rule.name for rule in config.faults.rules]
    for entry in config.server.listen:
        names.extend((entry.name, rule.name) for rule in own_rules(entry))
    return tuple(names)

"""Signals the master gets before its handlers are in place, after its loop is done, and
those it has no use for (USR1/USR2): none may stop or end it."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from support.sitehook import site_env

from minismtp.signals import MASTER_SIGNALS

# A start held up where the configuration is loaded (after `serve` has begun), with a
# file to say so: a signal sent then comes before the master's handlers are in place.
_SLOW_START = '''\
import time

import minismtp.cli as cli

_load = cli.load_config


def _slow_load(*args, **kwargs):
    open({flag!r}, "w").close()
    time.sleep(1.0)
    return _load(*args, **kwargs)


cli.load_config = _slow_load
'''

# The interpreter's way out, held up once the default actions are back (as Python puts
# them back before it exits), with a file to say so: a signal sent then comes after.
_SLOW_EXIT = '''\
import atexit
import os
import signal
import threading
import time


def _slow_exit():
    for signum in (signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_DFL)
    open({flag!r}, "w").close()
    time.sleep(1.0)


atexit.register(_slow_exit)
'''


def _blocked(pid: int) -> set[int]:
    """The signals `pid` blocks (/proc: SigBlk, a hexadecimal mask, bit n-1 for n)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigBlk:"):
                mask = int(line.split()[1], 16)
                return {n for n in range(1, 65) if mask >> (n - 1) & 1}
    raise AssertionError(f"no SigBlk for pid {pid}")


def _process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return stat[stat.rindex(b")") + 2:][:1].decode()


@pytest.mark.parametrize("signum", [signal.SIGTTIN, signal.SIGHUP, signal.SIGUSR1],
                         ids=["TTIN", "HUP", "USR1"])
def test_a_signal_during_start_up_is_acted_on_once_the_master_runs(make_server, tmp_path,
                                                                  signum):
    """By default TTIN stops a process and HUP and USR1 end it: sent while the master
    starts, each waits for its handler, and the server comes up and acts on it."""
    flag = tmp_path / "loading"
    server = make_server({"server": {"workers": 1}}, start=False,
                         env=site_env(tmp_path, _SLOW_START.format(flag=str(flag))))

    def send_while_loading() -> None:
        server.wait_until(flag.exists, 15, interval=0.01, message="the slow start")
        server.send_signal(signum)

    sender = threading.Thread(target=send_while_loading)
    sender.start()
    server.start(workers=2 if signum == signal.SIGTTIN else 1)
    sender.join()
    if signum == signal.SIGTTIN:
        server.wait_for_log(r"workers: 2$")
    elif signum == signal.SIGHUP:
        server.wait_for_log(r"reloaded .*: starting generation 1 ")
    else:
        server.wait_for_log(r"SIGUSR1: nothing to do")
    assert _process_state(server.pid) not in "TZ"
    assert server.stop() == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_a_stop_during_start_up_ends_it_at_once(make_server, tmp_path, signum):
    """A start held up (a slow disk, a user lookup) can still be stopped: TERM and INT
    keep their default action until the master's handlers are in, so the process ends
    at once, without a traceback, not once the start is over."""
    flag = tmp_path / "loading"
    slow = _SLOW_START.format(flag=str(flag)).replace("time.sleep(1.0)", "time.sleep(20)")
    server = make_server({"server": {"workers": 1}}, start=False,
                         env=site_env(tmp_path, slow))

    def stop_while_loading() -> None:
        server.wait_until(flag.exists, 15, interval=0.01, message="the slow start")
        server.send_signal(signum)

    sender = threading.Thread(target=stop_while_loading)
    sender.start()
    with pytest.raises(Exception):  # noqa: B017 (the start fails: the process is gone)
        server.start(timeout=10)
    sender.join()
    assert server.wait(5) == -signum
    assert "Traceback" not in server.log_text()


def test_a_hup_just_after_the_master_is_done_does_not_end_it(make_server, tmp_path):
    """TERM, then a HUP as the master's interpreter exits: it exits with status 0, not
    killed by the HUP's default action."""
    flag = tmp_path / "exiting"
    server = make_server({"server": {"workers": 1}},
                         env=site_env(tmp_path, _SLOW_EXIT.format(flag=str(flag))))
    server.send_signal(signal.SIGTERM)
    server.wait_until(flag.exists, 15, interval=0.01, message="the master's way out")
    server.send_signal(signal.SIGHUP)
    server.send_signal(signal.SIGUSR1)
    assert server.wait(15) == 0



def test_neither_master_nor_workers_keep_a_signal_blocked(make_server):
    """A worker is forked with them blocked, and unblocks them once set up."""
    server = make_server({"server": {"workers": 2}})
    for pid in [server.pid, *server.worker_pids()]:
        server.wait_until(lambda pid=pid: not _blocked(pid) & set(MASTER_SIGNALS), 10,
                          message=f"process {pid} to unblock its signals")
    assert server.stop() == 0


def test_usr1_and_usr2_are_logged_and_stop_nothing(make_server):
    """logrotate's postrotate scripts often send USR1 (reopen the logs, elsewhere): the
    master says it has nothing to do, and it and its workers go on serving."""
    server = make_server({"server": {"workers": 2}})
    workers = server.worker_pids()
    mark = server.mark()
    for signum in (signal.SIGUSR1, signal.SIGUSR2):
        server.send_signal(signum)
    server.wait_for_log(r"SIGUSR1: nothing to do \(the log goes to standard error: no "
                        r"file to reopen\)$", since=mark)
    server.wait_for_log(r"SIGUSR2: nothing to do", since=mark)
    for pid in workers:  # sent to a worker too (a process group's kill): ignored
        os.kill(pid, signal.SIGUSR1)
        os.kill(pid, signal.SIGUSR2)
    time.sleep(0.5)
    assert server.worker_pids() == workers
    assert server.stop() == 0

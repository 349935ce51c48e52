"""What the master does with one loop turn's signals, however many came: a stop first,
one reload for any number of HUPs, TTIN and TTOU added up."""

from __future__ import annotations

import signal
from collections import Counter

import pytest

from minismtp.arbiter import Arbiter
from minismtp.config import load_config


@pytest.fixture
def arbiter():
    arbiter = Arbiter(load_config(overrides={"server.workers": 4}), None)
    arbiter.reloads = 0

    def reload() -> None:
        arbiter.reloads += 1

    arbiter._reload = reload  # a real one reads the file: here only how often it runs
    yield arbiter
    arbiter.sel.close()  # never run: only its selector, wakeup pair and boards to close
    arbiter.wakeup.close()
    arbiter.board.close()
    arbiter.log_board.close()


def test_a_stop_is_acted_on_before_reloads_and_resizes(arbiter):
    arbiter._on_signals(Counter({signal.SIGHUP: 300, signal.SIGTTIN: 5, signal.SIGTERM: 1}))
    assert arbiter.stopping
    assert arbiter.reloads == 0
    assert arbiter.target == 4


def test_quit_wins_over_term(arbiter):
    arbiter._on_signals(Counter({signal.SIGTERM: 1, signal.SIGQUIT: 1}))
    assert arbiter.stopping
    assert arbiter.stop_deadline < float("inf")
    assert arbiter.exit_code == 0


def test_any_number_of_hups_make_one_reload(arbiter):
    arbiter._on_signals(Counter({signal.SIGHUP: 250}))
    assert arbiter.reloads == 1
    assert not arbiter.stopping


def test_ttin_and_ttou_are_added_up(arbiter):
    arbiter._on_signals(Counter({signal.SIGTTIN: 3, signal.SIGTTOU: 1}))
    assert arbiter.target == 6
    arbiter._on_signals(Counter({signal.SIGTTOU: 9}))
    assert arbiter.target == 1  # never fewer than one
    arbiter._on_signals(Counter({signal.SIGTTIN: 2, signal.SIGTTOU: 2}))
    assert arbiter.target == 1


def test_usr1_and_usr2_only_say_they_do_nothing(arbiter, caplog):
    caplog.set_level("INFO", "minismtp.master")
    arbiter._on_signals(Counter({signal.SIGUSR1: 2, signal.SIGUSR2: 1}))
    assert not arbiter.stopping and arbiter.reloads == 0 and arbiter.target == 4
    assert "SIGUSR1: nothing to do (the log goes to standard error: no file to reopen)" \
        in caplog.text
    assert "SIGUSR2: nothing to do" in caplog.text

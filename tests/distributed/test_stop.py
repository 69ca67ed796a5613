import os
import signal

from pipeline.distributed.stop import EXIT_STOPPED, StopFlag, catch_early, release_early


def test_a_signal_sets_the_stop_flag_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGUSR1)
    flag = StopFlag()
    try:
        assert not flag.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.should_stop() and flag.received == signal.SIGUSR1
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGUSR1) is before and EXIT_STOPPED == 75


def test_a_signal_before_the_loop_starts_is_kept_for_the_stop_flag():
    """A SIGUSR1 during set-up (between `catch_early` and the loop's StopFlag) neither kills the process nor
    is lost; the handlers in place before set-up come back at the end."""
    import os
    import signal

    from pipeline.distributed.stop import StopFlag, catch_early
    before = signal.getsignal(signal.SIGUSR1)
    catch_early()
    os.kill(os.getpid(), signal.SIGUSR1)
    flag = StopFlag()
    try:
        assert flag.received == signal.SIGUSR1 and flag.should_stop()
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGUSR1) is before
    again = StopFlag()
    again.restore()
    assert again.received is None  # remembered once, for the one loop


def test_release_early_puts_back_what_catch_early_replaced_when_no_stop_flag_took_it_over():
    """Set-up that fails (or a dry run) never creates the StopFlag; the process must not keep a handler that
    swallows SIGTERM (its forked workers would inherit it and outlive their pool's terminate())."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    catch_early()
    assert all(signal.getsignal(s) is not h for s, h in before.items())
    os.kill(os.getpid(), signal.SIGUSR1)
    release_early()
    assert {s: signal.getsignal(s) for s in before} == before
    flag = StopFlag()
    flag.restore()
    assert flag.received is None  # the released signal is not remembered for a later loop

import os
import signal

from pipeline.distributed.stop import EXIT_STOPPED, StopFlag


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

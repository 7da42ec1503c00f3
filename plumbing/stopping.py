"""One way to stop, for every command: Ctrl-C, SIGINT or SIGTERM.

- A script's entry point (plumbing.errors.reported) runs in `ctrl_c_on_sigterm()`: SIGTERM then does what Ctrl-C
  does, KeyboardInterrupt, so every command stops the same way, cleans up on the way out and exits with status 130.
- A KeyboardInterrupt may land between any two lines. Where that would leave a half-made state (half the
  parameters updated by an optimizer step, a checkpoint half written), the change runs in `deferred()`: a signal
  that comes during it is held and delivered as soon as it is complete, so what is saved is always whole.
- A parent process (tools/sweep.py) starts its child in a session of its own and runs it in `passed_on(child)`:
  each signal goes to the child alone, which stops and saves as it would by itself, and the parent waits for it.

Library code stays catchable: what a notebook sees is the KeyboardInterrupt of its kernel's interrupt (a SIGINT).
Python runs signal handlers in the main thread only, so in any other thread these do nothing.
"""

import contextlib
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _handled(handler):
    """While the block runs, SIGINT and SIGTERM call handler(signum); the previous handlers come back afterwards. A
    signal the process ignores (SIG_IGN, as a shell's background job ignores SIGINT) stays ignored, and one whose
    handler was set outside Python (getsignal gives None: it could not be put back) is left alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    previous = {s: before for s, before in previous.items() if before not in (signal.SIG_IGN, None)}
    for s in previous:
        signal.signal(s, lambda signum, frame: handler(signum))
    try:
        yield
    finally:
        for s, before in previous.items():
            signal.signal(s, before)


def _interrupt(signum):
    raise KeyboardInterrupt


def ctrl_c_on_sigterm():
    """A script's entry point: SIGTERM raises KeyboardInterrupt, as Ctrl-C (SIGINT) does."""
    return _handled(_interrupt)


@contextlib.contextmanager
def deferred():
    """Run the block whole: a SIGINT or SIGTERM that comes during it is delivered when it ends (to the handler there
    was before: KeyboardInterrupt for Ctrl-C). If the block raises, its exception goes on and the signal is dropped:
    the run is stopping anyway, and with the error's own message."""
    held = []
    with _handled(held.append):
        yield
    if held:
        signal.raise_signal(held[0])


@contextlib.contextmanager
def passed_on(child):
    """While the block runs (waiting for child, a subprocess.Popen), SIGINT and SIGTERM go to child instead of this
    process; yields the list of the signals passed on. Start child with start_new_session=True, so that a
    terminal's Ctrl-C, which reaches the whole foreground process group, gets to it once, through here, not twice."""
    passed = []

    def pass_on(signum):
        passed.append(signum)
        child.send_signal(signum)

    with _handled(pass_on):
        yield passed

"""An SMTP server that accepts and counts every message (the benchmark's fallback receiver
when Postfix's smtp-sink is missing; see bench/postfix.py).

python -m bench.smtp_sink PORT      # writes `mesg=N` as the count changes, and on SIGTERM/SIGINT
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

from aiosmtpd.controller import Controller


class Counter:
    def __init__(self) -> None:
        self.messages = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages += 1
        return "250 OK"


def main() -> None:
    counter = Counter()
    controller = Controller(counter, hostname="127.0.0.1", port=int(sys.argv[1]))
    controller.start()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    written = -1
    # The same running-count format as smtp-sink -c, a few times a second rather than per message.
    while not stop.wait(0.1):
        if counter.messages != written:
            written = counter.messages
            print(f"mesg={written}", flush=True)
    controller.stop()
    print(f"mesg={counter.messages}", flush=True)


if __name__ == "__main__":
    main()

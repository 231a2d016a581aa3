"""Sends 'tick' messages to pipelines at a steady rate: ``sender.py URL NAME RATE SECONDS UUID...``.
Prints how many it sent."""

import sys
import time

from prorch import Orchestrator

if __name__ == "__main__":
    url, name, rate, seconds, *uuids = sys.argv[1:]
    orchestrator = Orchestrator(url)
    period = 1.0 / float(rate)
    started = time.monotonic()
    sent = 0
    while time.monotonic() - started < float(seconds):
        orchestrator.send(uuids[sent % len(uuids)], "tick", f"{name}-{sent}")
        sent += 1
        lag = started + sent * period - time.monotonic()
        if lag > 0:
            time.sleep(lag)
    print(sent)

"""Sends COUNT 'tick' messages to pipelines, at most RATE a second, round robin:
``sender.py URL NAME RATE COUNT UUID...``. Prints how many it sent.

A count, not a duration: on a busy machine the burst takes longer instead of being smaller, so
the test that uses it asserts what happened to the messages, never how fast they went."""

import sys
import time

from prorch import Orchestrator

if __name__ == "__main__":
    url, name, rate, count, *uuids = sys.argv[1:]
    orchestrator = Orchestrator(url)
    period = 1.0 / float(rate)
    started = time.monotonic()
    sent = 0
    while sent < int(count):
        orchestrator.send(uuids[sent % len(uuids)], "tick", f"{name}-{sent}")
        sent += 1
        lag = started + sent * period - time.monotonic()
        if lag > 0:
            time.sleep(lag)
    print(sent)

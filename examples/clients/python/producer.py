"""A BSFG producer in Python: appends facts with idempotent retries.

Every fact's message_id comes from the business event (here: the batch and step),
never from the attempt, so a retry after a lost answer can never store the fact
twice: the gateway answers it as a duplicate with the original offset. Only the
reasons `unavailable` and `backpressure` (and a call that got no answer) are retried;
every other refusal is final and reported with its stable reason and metadata
(`invalid_argument` names the field and the rule).

Usage:
    python producer.py --target 127.0.0.1:7443 --batch B1042 --steps 20
        [--from-zone plant-a] [--to-zone enterprise] [--retry-for 60]
        [--invalid] [--ca CA.pem --cert C.pem --key C.key]

Prints one JSON object: what was appended, what was a duplicate, what was refused.
Exit code 0 when every valid fact is stored.
"""
import argparse
import json
import random
import sys
import time

from bsfg.v1 import boundary_pb2, boundary_pb2_grpc

from bsfg_client import Refusal, add_connection_args, channel_for


def fact(args, step, obj):
    return boundary_pb2.FactMessage(
        envelope=boundary_pb2.Envelope(
            # Derived from the event: the same step always has the same id.
            message_id=f"{args.from_zone}:batch:{args.batch}:step:{step}",
            from_zone=args.from_zone,
            to_zone=args.to_zone,
            produced_at_unix_ms=int(time.time() * 1000),
            correlation_id=f"batch:{args.batch}",
            labels={"site": args.from_zone},
        ),
        fact=boundary_pb2.Fact(
            subject=f"batch:{args.from_zone}/{args.batch}",
            predicate="step_completed",
            object_json=json.dumps(obj, separators=(",", ":")),
        ),
    )


def append(stub, message, retry_for):
    """Appends one fact, retrying the same request while the refusal is retryable.
    Returns (response, None, attempts) or (None, Refusal, attempts)."""
    deadline = time.monotonic() + retry_for
    delay, attempts = 0.05, 0
    while True:
        attempts += 1
        try:
            resp = stub.AppendFact(
                boundary_pb2.AppendFactRequest(message=message), timeout=10
            )
            return resp, None, attempts
        except Exception as err:  # grpc.RpcError
            if not hasattr(err, "code"):
                raise
            refusal = Refusal(err)
            if not refusal.retryable or time.monotonic() + delay > deadline:
                return None, refusal, attempts
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    add_connection_args(p)
    p.add_argument("--batch", default="B1042")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--from-zone", default="plant-a")
    p.add_argument("--to-zone", default="enterprise")
    p.add_argument("--retry-for", type=float, default=60.0,
                   help="seconds to keep retrying one fact")
    p.add_argument("--invalid", action="store_true",
                   help="also send a fact the contract refuses (a 64-bit number)")
    args = p.parse_args()

    stub = boundary_pb2_grpc.BoundaryStub(channel_for(args))
    report = {"appended": [], "duplicates": [], "refused": [], "retries": 0}
    for step in range(1, args.steps + 1):
        m = fact(args, step, {"step": step, "operator": "jdoe"})
        resp, refusal, attempts = append(stub, m, args.retry_for)
        report["retries"] += attempts - 1
        if refusal is not None:
            report["refused"].append(
                {"message_id": m.envelope.message_id, **refusal.as_dict()}
            )
            continue
        key = "duplicates" if resp.duplicate else "appended"
        report[key].append(
            {"message_id": m.envelope.message_id, "stream": resp.stream,
             "offset": resp.offset}
        )

    # An answer lost on the way looks like a failure to the producer: it sends the
    # same fact again. The gateway stores nothing new and returns the first offset.
    if report["appended"]:
        first = fact(args, 1, {"step": 1, "operator": "jdoe"})
        resp, refusal, _ = append(stub, first, args.retry_for)
        report["resent_first"] = (
            {"duplicate": resp.duplicate, "offset": resp.offset}
            if refusal is None else refusal.as_dict()
        )

    if args.invalid:
        # 2^63 - 1 cannot survive a trip through a double: refused, never rounded.
        bad = fact(args, args.steps + 1, {"step": args.steps + 1, "id": 9223372036854775807})
        _, refusal, _ = append(stub, bad, args.retry_for)
        report["invalid"] = refusal.as_dict() if refusal else {"stored": True}

    print(json.dumps(report))
    return 1 if report["refused"] else 0


if __name__ == "__main__":
    sys.exit(main())

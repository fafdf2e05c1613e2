"""A BSFG reader in Python: fetch a page, process it, confirm it.

The gateway keeps the consumer's position (a durable named consumer declared in the
zone's file); the reader never sends an offset to fetch. A page is confirmed only
after its facts are processed durably (here: appended to an output file and
fsynced), so a crash at any point means the page comes again (at-least-once); the
output is keyed by message_id, so a page that comes again is not processed twice.

Usage:
    python reader.py --target 127.0.0.1:7443 --consumer reporting --out facts.jsonl
        [--limit 100] [--wait-ms 2000] [--idle-pages 2] [--max-facts N]
        [--ca CA.pem --cert C.pem --key C.key]

Stops after --idle-pages empty long-polls in a row (or --max-facts facts) and prints
one JSON object: facts processed, replays skipped, the consumer's frontier.
"""
import argparse
import json
import os
import sys

from bsfg.v1 import boundary_pb2, boundary_pb2_grpc

from bsfg_client import Refusal, add_connection_args, channel_for


def seen_ids(path):
    if not os.path.exists(path):
        return set()
    with open(path, encoding="utf-8") as f:
        return {json.loads(line)["message_id"] for line in f if line.strip()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    add_connection_args(p)
    p.add_argument("--consumer", required=True)
    p.add_argument("--out", required=True, help="JSON lines, one per fact processed")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--wait-ms", type=int, default=2000)
    p.add_argument("--idle-pages", type=int, default=2)
    p.add_argument("--max-facts", type=int, default=0)
    args = p.parse_args()

    stub = boundary_pb2_grpc.BoundaryStub(channel_for(args))
    seen = seen_ids(args.out)
    processed = replays = idle = 0
    frontier = None
    with open(args.out, "a", encoding="utf-8") as out:
        while idle < args.idle_pages and not (args.max_facts and processed >= args.max_facts):
            try:
                page = stub.FetchFacts(
                    boundary_pb2.FetchFactsRequest(
                        consumer_name=args.consumer, limit=args.limit, wait_ms=args.wait_ms
                    ),
                    timeout=args.wait_ms / 1000 + 10,
                )
            except Exception as err:  # grpc.RpcError
                if not hasattr(err, "code"):
                    raise
                print(json.dumps({"error": Refusal(err).as_dict()}))
                return 1
            if page.first_offset > page.frontier + 1 and page.frontier > 0:
                print(json.dumps({"gap": {"frontier": page.frontier,
                                          "first_offset": page.first_offset}}),
                      file=sys.stderr)
            if not page.facts:
                idle += 1
                frontier = page.frontier
                continue
            idle = 0
            for f in page.facts:
                mid = f.message.envelope.message_id
                if mid in seen:
                    replays += 1
                    continue
                out.write(json.dumps({
                    "message_id": mid,
                    "stream": page.stream,
                    "offset": f.offset,
                    "subject": f.message.fact.subject,
                    "predicate": f.message.fact.predicate,
                    "object": json.loads(f.message.fact.object_json),
                }) + "\n")
                seen.add(mid)
                processed += 1
            # Durable first, then confirm: never confirm what is not yet kept.
            out.flush()
            os.fsync(out.fileno())
            resp = stub.ConfirmReceipt(
                boundary_pb2.ConfirmReceiptRequest(
                    consumer_name=args.consumer, offset=page.facts[-1].offset
                ),
                timeout=10,
            )
            frontier = resp.frontier
    print(json.dumps({"processed": processed, "replays": replays, "frontier": frontier}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

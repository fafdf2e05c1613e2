"""A BSFG client that knows nothing but the gateway's address.

It discovers `bsfg.v1.Boundary` through gRPC server reflection, builds the request
and response types from the descriptors the server sends, calls AppendFact,
FetchFacts and ConfirmReceipt, and reads the stable error reason from the
`google.rpc.ErrorInfo` status detail. Exit code 0 means every check held.

Usage: python reflection_client.py HOST:PORT CONSUMER
"""
import json
import sys

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_status import rpc_status


def main() -> int:
    target, consumer = sys.argv[1], sys.argv[2]
    channel = grpc.insecure_channel(target)
    db = ProtoReflectionDescriptorDatabase(channel)
    services = db.get_services()
    assert "bsfg.v1.Boundary" in services, services
    assert "grpc.health.v1.Health" in services, services
    pool = DescriptorPool(db)
    service = pool.FindServiceByName("bsfg.v1.Boundary")

    def method(name):
        m = service.FindMethodByName(name)
        req = message_factory.GetMessageClass(m.input_type)
        resp = message_factory.GetMessageClass(m.output_type)
        call = channel.unary_unary(
            f"/bsfg.v1.Boundary/{name}",
            request_serializer=req.SerializeToString,
            response_deserializer=resp.FromString,
        )
        return req, call

    def error_info(err):
        status = rpc_status.from_call(err)
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                return info
        raise AssertionError(f"no ErrorInfo in {status}")

    AppendReq, append = method("AppendFact")

    def fact(step):
        req = AppendReq()
        m = req.message
        m.envelope.message_id = "py:batch:B7:step:1"
        m.envelope.from_zone = "plant-a"
        m.envelope.to_zone = "enterprise"
        m.envelope.produced_at_unix_ms = 1764000000000
        m.envelope.labels["site"] = "PlantA"
        m.fact.subject = "batch:PlantA/B7"
        m.fact.predicate = "step_completed"
        m.fact.object_json = json.dumps({"step": step})
        return req

    first = append(fact(1))
    again = append(fact(1))
    assert again.offset == first.offset and again.duplicate, (first, again)

    try:
        append(fact(2))
        raise AssertionError("a changed payload under the same id was accepted")
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.ALREADY_EXISTS, err.code()
        info = error_info(err)
        assert info.domain == "bsfg.v1", info
        assert info.reason == "conflicting_duplicate", info
        assert info.metadata["offset"] == str(first.offset), info

    bad = fact(1)
    bad.message.envelope.message_id = "py:bad"
    bad.message.fact.subject = "not a subject"
    try:
        append(bad)
        raise AssertionError("an invalid subject was accepted")
    except grpc.RpcError as err:
        info = error_info(err)
        assert info.reason == "invalid_argument", info
        assert info.metadata["field"] == "fact.subject", info

    FetchReq, fetch = method("FetchFacts")
    page = fetch(FetchReq(consumer_name=consumer, limit=10, wait_ms=500))
    ids = [f.message.envelope.message_id for f in page.facts]
    assert "py:batch:B7:step:1" in ids, ids
    ConfirmReq, confirm = method("ConfirmReceipt")
    last = page.facts[-1].offset
    frontier = confirm(ConfirmReq(consumer_name=consumer, offset=last)).frontier
    assert frontier == last, (frontier, last)

    print(json.dumps({"ok": True, "offset": first.offset, "frontier": frontier}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

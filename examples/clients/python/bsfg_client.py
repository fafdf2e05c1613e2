"""Shared helpers of the Python examples: a channel to a gateway and the stable error
reason of a refused call.

The stubs come from the contract, proto/bsfg/v1/boundary.proto, generated with
grpcio-tools (see README.md):

    python -m grpc_tools.protoc -I proto --python_out=gen --grpc_python_out=gen \\
        proto/bsfg/v1/boundary.proto

and `gen` on PYTHONPATH (`from bsfg.v1 import boundary_pb2`).
"""
import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

# Reasons after which the same call may be sent again unchanged (same message_id):
# nothing was stored, or it was and the retry is answered as a duplicate.
RETRYABLE_REASONS = {"unavailable", "backpressure"}
RETRYABLE_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}


def add_connection_args(parser):
    """--target and the mutual-TLS options, shared by the examples."""
    parser.add_argument("--target", required=True, help="HOST:PORT of the gateway")
    parser.add_argument("--ca", help="the zone CA (a grpcs:// listener)")
    parser.add_argument("--cert", help="this client's certificate")
    parser.add_argument("--key", help="its private key")
    parser.add_argument("--server-name", help="when the address is not in its certificate")


def channel_for(args):
    """The channel `add_connection_args` describes."""
    return channel(args.target, args.ca, args.cert, args.key, args.server_name)


def channel(target, ca=None, cert=None, key=None, server_name=None):
    """A channel to HOST:PORT: plaintext (a loopback listener) or mutual TLS."""
    if ca is None:
        return grpc.insecure_channel(target)
    with open(ca, "rb") as f:
        root = f.read()
    with open(cert, "rb") as f:
        chain = f.read()
    with open(key, "rb") as f:
        private = f.read()
    creds = grpc.ssl_channel_credentials(root, private, chain)
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(target, creds, options)


class Refusal:
    """A refused call: the gRPC code, and the google.rpc.ErrorInfo the gateway sends
    (domain "bsfg.v1", a stable `reason`, metadata such as `field` and `rule`)."""

    def __init__(self, err):
        self.code = err.code()
        self.message = err.details()
        self.reason = None
        self.metadata = {}
        status = rpc_status.from_call(err)
        for detail in status.details if status else []:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info) and info.domain == "bsfg.v1":
                self.reason = info.reason
                self.metadata = dict(info.metadata)
        if self.reason is None and self.code == grpc.StatusCode.UNAVAILABLE:
            # No answer from the gateway at all (not listening, connection lost).
            self.reason = "unavailable"

    @property
    def retryable(self):
        return self.reason in RETRYABLE_REASONS or (
            self.reason is None and self.code in RETRYABLE_CODES
        )

    def as_dict(self):
        return {
            "code": self.code.name,
            "reason": self.reason,
            "message": self.message,
            "metadata": self.metadata,
        }

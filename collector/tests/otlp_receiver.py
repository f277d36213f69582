"""A real OTLP/HTTP receiver for collector/tests/otlp.rs: oteltap (a third-party receiver,
installed by scripts/setup.sh) listens on 127.0.0.1:PORT and answers the collector.

oteltap hands out bare metrics and spans, without the resource they came under, so it is
asked to re-emit every request it accepts, as it received it, to a second listener here,
which decodes each with the official opentelemetry-proto package and prints one JSON line
per metric, {"metric": ..., "resource": ...}, and per span, {"span": ..., "resource": ...},
field names as in the .proto, in the order of the request. Prints "listening" once both
listen. Runs until killed."""

import asyncio
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from oteltap import OtelTapHttpProtobufReceiver, OtelTapHttpProtobufReceiverSettings

# One request's lines at a time, so two requests' lines never interleave.
PRINTING = threading.Lock()


def as_dict(message) -> dict:
    return MessageToDict(message, preserving_proto_field_name=True)


def lines_of(path: str, body: bytes) -> list[str]:
    lines = []
    if path == "/v1/metrics":
        for entity in ExportMetricsServiceRequest.FromString(body).resource_metrics:
            resource = as_dict(entity.resource)
            for scope in entity.scope_metrics:
                for metric in scope.metrics:
                    lines.append(json.dumps({"metric": as_dict(metric), "resource": resource}))
    elif path == "/v1/traces":
        for entity in ExportTraceServiceRequest.FromString(body).resource_spans:
            resource = as_dict(entity.resource)
            for scope in entity.scope_spans:
                for span in scope.spans:
                    lines.append(json.dumps({"span": as_dict(span), "resource": resource}))
    return lines


class Reemitted(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        lines = lines_of(self.path, body)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
        with PRINTING:
            for line in lines:
                print(line, flush=True)

    def log_message(self, format, *args) -> None:
        # stdout is the test's channel; stderr stays for errors.
        pass


async def main(port: int) -> None:
    reemitted = ThreadingHTTPServer(("127.0.0.1", 0), Reemitted)
    threading.Thread(target=reemitted.serve_forever, daemon=True).start()
    local = f"http://127.0.0.1:{reemitted.server_address[1]}"
    settings = OtelTapHttpProtobufReceiverSettings(
        http_port=port,
        reemit_metrics_to_url=f"{local}/v1/metrics",
        reemit_traces_to_url=f"{local}/v1/traces",
    )
    async with OtelTapHttpProtobufReceiver(settings):
        print("listening", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))

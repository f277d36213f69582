"""A real OTLP/HTTP receiver for collector/tests/otlp.rs: oteltap (a third-party receiver,
installed by scripts/setup.sh) listens on 127.0.0.1:PORT; every metric and span it decodes
(with the official opentelemetry-proto package) is printed to stdout as one JSON line,
{"metric": ...} or {"span": ...}, field names as in the .proto. Prints "listening" once
both are subscribed (oteltap hands an item only to subscribers present when it arrives).
Runs until killed."""

import asyncio
import json
import sys

from google.protobuf.json_format import MessageToJson
from oteltap import OtelTapHttpProtobufReceiver, OtelTapHttpProtobufReceiverSettings


async def relay(stream, kind: str) -> None:
    async for item in stream:
        message = json.loads(MessageToJson(item, preserving_proto_field_name=True))
        print(json.dumps({kind: message}), flush=True)


async def main(port: int) -> None:
    settings = OtelTapHttpProtobufReceiverSettings(http_port=port)
    async with OtelTapHttpProtobufReceiver(settings) as receiver:
        relays = [
            asyncio.create_task(relay(receiver.stream_metrics(), "metric")),
            asyncio.create_task(relay(receiver.stream_traces(), "span")),
        ]
        # Let both tasks reach their first wait, which subscribes them.
        await asyncio.sleep(0.2)
        print("listening", flush=True)
        await asyncio.gather(*relays)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))

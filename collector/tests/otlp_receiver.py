"""A real OTLP/HTTP receiver for collector/tests/otlp.rs: oteltap (a third-party receiver,
installed by scripts/setup.sh) listens on 127.0.0.1:PORT; every metric it decodes (with the
official opentelemetry-proto package) is printed to stdout as one JSON line, field names as
in the .proto. Prints "listening" once it accepts requests. Runs until killed."""

import asyncio
import sys

from google.protobuf.json_format import MessageToJson
from oteltap import OtelTapHttpProtobufReceiver, OtelTapHttpProtobufReceiverSettings


async def main(port: int) -> None:
    settings = OtelTapHttpProtobufReceiverSettings(http_port=port)
    async with OtelTapHttpProtobufReceiver(settings) as receiver:
        print("listening", flush=True)
        async for metric in receiver.stream_metrics():
            print(MessageToJson(metric, indent=None, preserving_proto_field_name=True), flush=True)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))

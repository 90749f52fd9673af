"""A client that knows only Falco 0.43's protos. Run in its own process; prints JSON results.

Usage: legacy_client.py GENERATED_DIR unix:///path/to/socket EXPECTED_SUB_ALERTS
"""

import json
import sys
import threading

sys.path.insert(0, sys.argv[1])

import grpc
import outputs_pb2
import outputs_pb2_grpc
import version_pb2
import version_pb2_grpc

with grpc.insecure_channel(sys.argv[2]) as channel:
    version = version_pb2_grpc.serviceStub(channel).version(version_pb2.request(), timeout=10)
    outputs = outputs_pb2_grpc.serviceStub(channel)
    got = list(outputs.get(outputs_pb2.request(), timeout=10))
    enough = threading.Event()

    def requests():
        yield outputs_pb2.request()
        enough.wait(20)  # keep the request stream open, as Falco's clients do

    subbed = []
    subbed_error = ""
    try:
        for response in outputs.sub(requests(), timeout=20):
            subbed.append(response)
            if len(subbed) == int(sys.argv[3]):
                enough.set()
    except grpc.RpcError as error:
        subbed_error = error.code().name
    print(
        json.dumps(
            {
                "version": [
                    version.version,
                    version.major,
                    version.minor,
                    version.patch,
                    version.engine_major,
                    version.engine_minor,
                    version.engine_patch,
                    version.engine_version,
                ],
                "get": [
                    {
                        "rule": r.rule,
                        "priority": r.priority,
                        "source": r.source,
                        "deprecated_source": r.source_deprecated,
                        "hostname": r.hostname,
                        "tags": list(r.tags),
                        "fields": dict(r.output_fields),
                        "time": [r.time.seconds, r.time.nanos],
                        "output": r.output,
                    }
                    for r in got
                ],
                "sub": [r.rule for r in subbed],
                "sub_error": subbed_error,
            }
        )
    )

"""Generated protobuf/gRPC stubs live here (git-ignored); `python -m kvlink._proto.build` makes them."""

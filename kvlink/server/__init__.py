"""kvlink-serve: the gRPC receiver and its REST stats app."""

"""kvlink-send: the sender agent CLI."""

"""Container runtimes: everything Docker and CRIU lives here."""

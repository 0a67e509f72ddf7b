"""The fedlora ServerApp (`fedlora.server.app:app`) and the files a run writes."""

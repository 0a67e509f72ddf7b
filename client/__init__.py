"""The fedlora ClientApp (`fedlora.client.app:app`)."""

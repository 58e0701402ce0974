"""Publishing: the producer, messages, publisher confirms, delays and the RPC client."""

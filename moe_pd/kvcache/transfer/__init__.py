"""KV-cache transfer from prefill to decode ranks: a transport interface and a pyzmq backend."""

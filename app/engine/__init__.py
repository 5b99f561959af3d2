"""The generation engine: pipelines, samplers, LoRAs, the queue and the device workers."""

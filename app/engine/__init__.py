"""The generation engine: pipelines, samplers, LoRAs, the queue and the device workers."""

import logging as _logging


def _no_torchvision_notice(record: _logging.LogRecord) -> bool:
    """transformers warns at every start that its image processors fall back to PIL without
    torchvision (craftserve installs none on purpose: pyproject.toml); nothing here uses them."""
    return "requires torchvision (not installed)" not in record.getMessage()


_logging.getLogger("transformers.utils.import_utils").addFilter(_no_torchvision_notice)

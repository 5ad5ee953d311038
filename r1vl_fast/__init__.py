"""r1vl_fast: fast, exact StepGRPO (R1-VL) training for multimodal LLMs."""

__version__ = "0.1.0"

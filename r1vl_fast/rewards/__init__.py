"""Rule-based step-wise rewards of StepGRPO: StepRAR (accuracy) and StepRVR (validity)."""
